"""Residual blocks: ``BasicBlock`` (ResNet-18/34, CIFAR) and ``Bottleneck`` (ResNet-50 and deeper), NHWC.

Blocks receive their layers as partials (``conv``, ``norm``, ``act``) from the model, so one block class
serves every depth, dtype and BatchNorm setting; ``norm`` already knows whether it uses batch statistics
(training) or running averages (evaluation).

Three orderings (``order``), written for the basic block; the bottleneck has three conv/BN pairs, the
middle one strided (``stride_in_1x1=False``, torchvision's "v1.5") or the first one (the paper's v1); and
a fourth, bottleneck-only ablation:

- ``"v1"`` (He et al. 2015, post-activation; torchvision)::

    F(x) = BN(conv(ReLU(BN(conv(x)))))
    y    = ReLU(F(x) + S(x))

- ``"v2"`` (He et al. 2016, "Identity Mappings in Deep Residual Networks", pre-activation)::

    x'   = ReLU(BN(x))
    F(x) = conv(ReLU(BN(conv(x'))))
    y    = F(x) + S(x)      with S(x) = x (identity), or conv1x1(x') (projection from the pre-activated input)

  Nothing acts on the sum, so the gradient at the input of an identity block is exactly ``g + J_F^T g``.
  The model adds the final ``ReLU(BN(.))`` after the last stage.

- ``"relu_before_add"`` (the derivation's basic-block ordering: the branch ends in a ReLU, the sum is left
  alone)::

    F(x) = ReLU(BN(conv(ReLU(BN(conv(x))))))
    y    = F(x) + S(x)

  He et al. 2016 (Fig. 4c) found it worse than v1 (7.84% against 6.61% test error, ResNet-110 on CIFAR-10):
  ``F(x) >= 0``, so with an identity shortcut every block can only add to its input and the forward signal
  grows through the stack. With ``zero_init_last`` the last BN outputs 0 and ``ReLU'(0) = 0``, so no gradient
  ever reaches the branch: the block stays its shortcut through training.

- ``"literal_bottleneck"`` (Bottleneck only: the derivation's bottleneck formula taken literally, an
  ablation)::

    F(x) = Conv1x1(BN(Conv3x3(BN(Conv1x1(x)))))
    y    = F(x) + S(x)

  No ReLU anywhere and no BN after the last 1x1 conv. In evaluation mode BN is affine, so the block is an
  affine map of ``x`` and a stack of them is one affine map: the network's depth adds no expressive power
  (in training mode only the batch statistics make it nonlinear). The library's v1 bottleneck is this
  formula with a ReLU after each of the first two BNs, a BN after the last conv, and a ReLU after the sum.
  The shortcut projection is v1's (conv1x1 + BN); ``zero_init_last`` zeroes the last conv's kernel, as
  there is no last BN. It has the v1 bottleneck's parameters less the last BN's ``2 * 4 * filters``.

Shortcuts ``S``: identity when the shape is kept; otherwise ``shortcut="B"`` projects with a 1x1 conv
(plus BN in v1 / relu_before_add, no BN in v2) and ``shortcut="A"`` (the CIFAR paper's option A) takes the
parameter-free strided identity ``x[:, ::s, ::s, :]`` with zero channels appended. With ``residual=False``
the block is its plain twin ``y = ReLU(F(x))`` (v1) or ``y = F(x)``: same branch layers, no shortcut
(no projection layers either).

Padding is torch's everywhere: 3x3 convs pad 1 on each side, 1x1 convs pad 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.errors import ModelError

ModuleDef = Any
Array = Any

ORDERS = ("v1", "v2", "relu_before_add", "literal_bottleneck")
SHORTCUTS = ("A", "B")

_PAD3 = ((1, 1), (1, 1))
_PAD1 = ((0, 0), (0, 0))


def option_a_shortcut(x: Array, out_features: int, stride: int) -> Array:
  """The CIFAR paper's option A: ``x[:, ::s, ::s, :]`` with ``out_features - C`` zero channels appended."""
  if stride > 1:
    x = x[:, ::stride, ::stride, :]
  extra = out_features - x.shape[-1]
  if extra < 0:
    raise ModelError(f"option A shortcut cannot reduce channels: {x.shape[-1]} -> {out_features}")
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
  return x


def check_block_options(order: str, shortcut: str) -> None:
  """Raise ModelError for an unknown ordering or shortcut type."""
  if order not in ORDERS:
    raise ModelError(f"unknown block order {order!r}: expected one of {', '.join(ORDERS)}")
  if shortcut not in SHORTCUTS:
    raise ModelError(f"unknown shortcut type {shortcut!r}: expected 'A' (zero-padded identity) or 'B' (projection)")


class _Block(nn.Module):
  """Shared wiring of the two blocks: ordering, shortcut and plain twin; subclasses define the branch."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[Array], Array] = nn.relu
  strides: int = 1
  order: str = "v1"
  shortcut: str = "B"
  shortcut_changes_shape: bool = False  # stride or width changes: S is a projection (B) or option A, not x
  residual: bool = True
  zero_init_last: bool = False  # gamma of the branch's last BN starts at 0, so F(x) = 0 at init
  expansion: int = 1

  @property
  def out_features(self) -> int:
    return self.filters * self.expansion

  def _last_norm(self) -> nn.Module:
    scale_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    return self.norm(scale_init=scale_init)

  def setup(self):
    check_block_options(self.order, self.shortcut)
    self._setup_branch()
    if self.order == "v2":
      self.bn1 = self.norm()
    if self.residual and self.shortcut_changes_shape and self.shortcut == "B":
      s = (self.strides, self.strides)
      self.downsample_conv = self.conv(self.out_features, (1, 1), s, padding=_PAD1)
      if self.order != "v2":
        self.downsample_bn = self.norm()

  def _setup_branch(self) -> None:
    raise NotImplementedError

  def _branch_from(self, x: Array) -> Array:
    """The branch applied to (already pre-activated, for v2) input ``x``."""
    raise NotImplementedError

  def _preact(self, x: Array) -> Array:
    return self.act(self.bn1(x)) if self.order == "v2" else x

  def branch(self, x: Array) -> Array:
    """F(x): the residual branch alone (for v2 including the pre-activation ReLU(BN(x)))."""
    return self._branch_from(self._preact(x))

  def _shortcut(self, x: Array, xp: Array) -> Array:
    if not self.shortcut_changes_shape:
      return x
    if self.shortcut == "A":
      return option_a_shortcut(x, self.out_features, self.strides)
    if self.order == "v2":
      return self.downsample_conv(xp)
    return self.downsample_bn(self.downsample_conv(x))

  def shortcut_path(self, x: Array) -> Array:
    """S(x): identity, option A, or the projection (from ReLU(BN(x)) in v2)."""
    return self._shortcut(x, self._preact(x))

  def __call__(self, x: Array) -> Array:
    """y = ReLU(F(x) + S(x)) for v1, F(x) + S(x) otherwise; the plain twin drops S."""
    xp = self._preact(x)
    y = self._branch_from(xp)
    if self.residual:
      y = y + self._shortcut(x, xp)
    return self.act(y) if self.order == "v1" else y


class BasicBlock(_Block):
  """Two 3x3 convs (ResNet-18/34, CIFAR ResNets); the first one carries the stride.

  Submodules carry torchvision's names: ``conv1 bn1 conv2 bn2 downsample_conv downsample_bn`` (in v2,
  ``bn1``/``bn2`` are the BNs *before* ``conv1``/``conv2``).
  """

  def _setup_branch(self) -> None:
    if self.order == "literal_bottleneck":
      raise ModelError(
        "block order 'literal_bottleneck' exists only for Bottleneck blocks "
        "(ResNet-50 and deeper); BasicBlock takes v1, v2 or relu_before_add"
      )
    s = (self.strides, self.strides)
    self.conv1 = self.conv(self.filters, (3, 3), s, padding=_PAD3)
    self.conv2 = self.conv(self.filters, (3, 3), padding=_PAD3)
    if self.order == "v2":
      self.bn2 = self._last_norm()
    else:
      self.bn1 = self.norm()
      self.bn2 = self._last_norm()

  def _branch_from(self, x: Array) -> Array:
    if self.order == "v2":  # x is ReLU(BN1(x)) already
      return self.conv2(self.act(self.bn2(self.conv1(x))))
    y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
    return self.act(y) if self.order == "relu_before_add" else y


class Bottleneck(_Block):
  """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand to ``filters * 4`` (ResNet-50 and deeper).

  The inner width is ``int(filters * width_per_group / 64) * groups`` (torchvision's rule: 64/1 for ResNet,
  4/32 for ResNeXt-50 32x4d, 128/1 for Wide ResNet-50-2). ``stride_in_1x1=False`` puts the stride on the
  3x3 conv (v1.5, torchvision), ``True`` on the first 1x1 (the original paper).
  Submodules: ``conv1 bn1 conv2 bn2 conv3 bn3 downsample_conv downsample_bn``.
  """

  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = False
  expansion: int = 4

  def _setup_branch(self) -> None:
    width = int(self.filters * (self.width_per_group / 64.0)) * self.groups
    s = (self.strides, self.strides)
    s1, s3 = (s, (1, 1)) if self.stride_in_1x1 else ((1, 1), s)
    self.conv1 = self.conv(width, (1, 1), s1, padding=_PAD1)
    self.conv2 = self.conv(width, (3, 3), s3, padding=_PAD3, feature_group_count=self.groups)
    if self.order == "literal_bottleneck":  # no BN after conv3: zero_init_last zeroes its kernel instead
      zero = dict(kernel_init=nn.initializers.zeros) if self.zero_init_last else {}
      self.conv3 = self.conv(self.out_features, (1, 1), padding=_PAD1, **zero)
      self.bn1 = self.norm()
      self.bn2 = self.norm()
      return
    self.conv3 = self.conv(self.out_features, (1, 1), padding=_PAD1)
    if self.order == "v2":
      self.bn2 = self.norm()
      self.bn3 = self._last_norm()
    else:
      self.bn1 = self.norm()
      self.bn2 = self.norm()
      self.bn3 = self._last_norm()

  def _branch_from(self, x: Array) -> Array:
    act = self.act
    if self.order == "literal_bottleneck":
      return self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    if self.order == "v2":
      return self.conv3(act(self.bn3(self.conv2(act(self.bn2(self.conv1(x)))))))
    y = self.bn3(self.conv3(act(self.bn2(self.conv2(act(self.bn1(self.conv1(x))))))))
    return act(y) if self.order == "relu_before_add" else y
