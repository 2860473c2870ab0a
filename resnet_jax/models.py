"""ResNet models (NHWC, flax.linen) and the name registry: ``create_model(name, num_classes, **options)``.

One ``ResNet`` module covers every depth: the depth is data (``stage_sizes``), the block is a class
(``BasicBlock`` / ``Bottleneck``), and the layers are partials handed to the blocks.

- ImageNet stem (``stem="imagenet"``): 7x7/2 conv (pad 3) -> BN -> ReLU -> 3x3/2 max-pool (pad 1, -inf),
  then 4 stages of 64/128/256/512 filters (x4 out for bottlenecks), strides 1/2/2/2. torchvision layout and
  parameter names, so :mod:`resnet_jax.convert` maps weights one to one.
- CIFAR stem (``stem="cifar"``): 3x3/1 conv -> BN -> ReLU, no max-pool, 3 stages of 16/32/64 filters,
  depth 6n+2 with n basic blocks per stage; option A shortcuts by default (the paper's counts).
- Pre-activation (``block_order="v2"``): the stem has no BN/ReLU (the first block pre-activates), and a final
  BN + ReLU follows the last stage.
- Head: global average pool, then Dense. The Dense is initialised like torchvision's ``nn.Linear``
  (weights and bias uniform in +-1/sqrt(fan_in)); convs use Kaiming normal with fan_out (torchvision's).
  Logits are returned in float32 for half-precision compute dtypes (float64 stays float64).
- Features: ``model.apply(variables, x, return_features=True)`` returns a dict of the stage outputs
  ``stem, stage1 .. stageN`` (NHWC, compute dtype), ``pre_logits`` (the pooled features the head consumes)
  and ``logits``; ``ResNet.feature_strides`` / ``feature_channels`` give each output's stride and width
  (ImageNet: stem 4, stage1..stage4 at 4, 8, 16, 32; CIFAR: stem 1, stage1..stage3 at 1, 2, 4). With
  ``num_classes=0`` the model is a headless backbone: no ``fc`` parameters, and the plain call returns
  ``pre_logits``.

Every residual block's input passes through ``self.perturb(f"block{i:02d}", x)`` (i = 0.. in forward order,
collection ``"perturbations"``). ``model.init`` does not create that collection, so the variables are
``{"params", "batch_stats"}`` only and independent of the batch size; get zero perturbations for a batch
with :func:`zero_perturbations` and differentiate a loss with respect to them to read dL/d(block input).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.blocks import BasicBlock, Bottleneck, ModuleDef, check_block_options
from resnet_jax.errors import ModelError
from resnet_jax.pooling import max_pool
from resnet_jax.residual_unit import ResidualMLP, uniform_fan_in

Array = Any

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming_normal_(fan_out, relu)
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(+-1/sqrt(fan_in))


CONV_BACKENDS = ("auto", "xla", "onednn")


def _check_conv_backend(backend: str) -> None:
  if backend not in CONV_BACKENDS:
    raise ModelError(f"unknown conv_backend {backend!r}: expected one of {', '.join(CONV_BACKENDS)}")


def _conv_class(backend: str) -> type[nn.Conv]:
  """The convolution layer of a backend: ``nn.Conv``, oneDNN's drop-in, or the per-convolution choice."""
  if backend == "xla":
    return nn.Conv
  from resnet_jax import onednn_conv

  if backend == "auto":
    return onednn_conv.AutoConv
  onednn_conv.library()  # a ModelError saying how to install oneDNN, before any tracing
  return onednn_conv.Conv


def _conv_and_norm(module: nn.Module, train: bool) -> tuple[ModuleDef, ModuleDef]:
  """The ``conv`` and ``norm`` partials of a conv net: bias-free convolutions of ``module.conv_backend`` with
  torchvision's init, and ``module.norm_layer`` with batch statistics when ``train``; both in the module's
  dtypes."""
  conv = functools.partial(
    _conv_class(module.conv_backend),
    use_bias=False,
    dtype=module.dtype,
    param_dtype=module.param_dtype,
    kernel_init=conv_kernel_init,
  )
  norm = functools.partial(
    module.norm_layer,
    use_running_average=not train,
    momentum=module.bn_momentum,
    epsilon=module.bn_epsilon,
    dtype=module.dtype,
    param_dtype=module.param_dtype,
  )
  return conv, norm


class ResNet(nn.Module):
  """A residual network; see the module docstring for the stems and :mod:`resnet_jax.blocks` for orderings.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 3, 3) for CIFAR ResNet-20.
    block_cls: ``BasicBlock`` or ``Bottleneck``.
    num_classes: size of the final Dense layer; 0 gives a headless backbone (no ``fc``; the call returns
      the pooled pre-logits).
    num_filters: filters of the first stage (64 ImageNet, 16 CIFAR); doubles at each later stage.
    stem: ``"imagenet"`` or ``"cifar"``.
    block_order: ``"v1"``, ``"v2"`` (pre-activation), ``"relu_before_add"`` or, for bottleneck models only,
      the ablation ``"literal_bottleneck"`` (no ReLU in the block, no BN after the last conv).
    shortcut: ``"B"`` (1x1 projection where the shape changes) or ``"A"`` (zero-padded strided identity).
    stride_in_1x1: bottleneck stride on the first 1x1 conv (original v1) instead of the 3x3 (v1.5).
    groups, width_per_group: ResNeXt / Wide ResNet bottleneck width (torchvision's meaning).
    zero_init_residual: start each block's last BN gamma at 0 so that every block is the identity (v2,
      relu_before_add) or ReLU of its shortcut (v1) at init. ``None`` means True for residual nets and
      False for plain twins (zeroing a plain net's branch would cut the signal).
    residual: False gives the plain twin: same branch layers, no shortcut and no projection layers.
    bn_momentum, bn_epsilon: flax convention (0.9 = torch momentum 0.1), eps 1e-5 as in torch.
    dtype, param_dtype: compute and storage dtypes (``dtype=jnp.bfloat16`` with float32 params is mixed precision).
    conv_backend: ``"auto"`` (default: oneDNN for each convolution it supports when the default backend is
      an x86-64 CPU, XLA's convolutions elsewhere and for the rest, with a one-line note when a fallback
      has a reason worth knowing), ``"xla"`` (``flax.linen.Conv``: XLA's convolutions, any platform) or
      ``"onednn"`` (:class:`resnet_jax.onednn_conv.Conv`: oneDNN's forward, backward-data and
      backward-weights kernels called from the compiled program; CPU only; an error where oneDNN cannot
      compute a convolution). All three have the same parameters, so checkpoints and converted weights work
      with any of them.
    norm_layer: the BatchNorm layer (torchvision's and timm's ``norm_layer``): ``flax.linen.BatchNorm``, or
      a class or partial taking its arguments (``use_running_average``, ``momentum``, ``epsilon``, ``dtype``,
      ``param_dtype``, ``scale_init``) with its variables (``scale``, ``bias``; ``mean``, ``var`` in
      ``batch_stats``), e.g. ``functools.partial(nn.BatchNorm, use_fast_variance=False)`` for two-pass
      batch variances. Checkpoints and converted weights work with any such layer.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int = 1000
  num_filters: int = 64
  stem: str = "imagenet"
  block_order: str = "v1"
  shortcut: str = "B"
  stride_in_1x1: bool = False
  groups: int = 1
  width_per_group: int = 64
  zero_init_residual: bool | None = None
  residual: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  act: Callable[[Array], Array] = nn.relu
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_backend: str = "auto"
  norm_layer: ModuleDef = nn.BatchNorm

  def __post_init__(self):
    check_block_options(self.block_order, self.shortcut)
    _check_conv_backend(self.conv_backend)
    if self.stem not in ("imagenet", "cifar"):
      raise ModelError(f"unknown stem {self.stem!r}: expected 'imagenet' or 'cifar'")
    if self.block_cls is BasicBlock and (self.groups != 1 or self.width_per_group != 64):
      raise ModelError("BasicBlock supports only groups=1 and width_per_group=64 (use a bottleneck model)")
    if self.zero_init_residual and not self.residual:
      raise ModelError(
        "zero_init_residual=True with residual=False would make every block output zero: "
        "use zero_init_residual=False for plain networks"
      )
    super().__post_init__()

  @property
  def feature_strides(self) -> dict[str, int]:
    """Downsampling factor of each feature map of ``return_features=True``: ``{"stem": 4, "stage1": 4, ...}``."""
    stem = 4 if self.stem == "imagenet" else 1
    out = {"stem": stem}
    for i in range(len(self.stage_sizes)):
      out[f"stage{i + 1}"] = stem * 2**i
    return out

  @property
  def feature_channels(self) -> dict[str, int]:
    """Channels of each feature map of ``return_features=True`` and of ``pre_logits``."""
    expansion = self.block_cls.expansion
    out = {"stem": self.num_filters}
    for i in range(len(self.stage_sizes)):
      out[f"stage{i + 1}"] = self.num_filters * 2**i * expansion
    out["pre_logits"] = out[f"stage{len(self.stage_sizes)}"]
    return out

  @property
  def min_input_size(self) -> int:
    """Smallest height/width accepted: the total downsampling factor (32 ImageNet, 4 CIFAR)."""
    return (4 if self.stem == "imagenet" else 1) * 2 ** (len(self.stage_sizes) - 1)

  def _check_input(self, x: Array) -> None:
    if x.ndim != 4:
      raise ModelError(f"expected NHWC images of rank 4, got shape {tuple(x.shape)}")
    h, w = x.shape[1], x.shape[2]
    m = self.min_input_size
    if h < m or w < m:
      raise ModelError(
        f"input of {h}x{w} pixels is too small for this network: it downsamples by {m}, "
        f"so images must be at least {m}x{m}"
      )

  @nn.compact
  def __call__(self, x: Array, train: bool = False, return_features: bool = False) -> Array | dict:
    """Logits ``(batch, num_classes)`` (pre-logits when ``num_classes == 0``), or with ``return_features``
    the dict ``{"stem", "stage1", ..., "pre_logits", "logits"}`` (no ``logits`` when headless).

    For pre-activation nets (``block_order="v2"``) the last stage's entry is taken after the final
    BN + ReLU, i.e. it is the map that is pooled into ``pre_logits``.
    """
    self._check_input(x)
    conv, norm = self._layers(train)
    features = {"stem": self._stem(jnp.asarray(x, self.dtype), conv, norm)}
    x = self._stages(features, conv, norm)
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    x = jnp.mean(x, axis=(1, 2))  # global average pool
    features["pre_logits"] = jnp.asarray(x, out_dtype)
    if self.num_classes == 0:  # headless backbone
      return features if return_features else features["pre_logits"]
    x = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=dense_kernel_init,
      bias_init=uniform_fan_in(x.shape[-1]),
      name="fc",
    )(x)
    features["logits"] = jnp.asarray(x, out_dtype)
    return features if return_features else features["logits"]

  def _layers(self, train: bool) -> tuple[ModuleDef, ModuleDef]:
    """The ``conv`` and ``norm`` partials every layer of the net is built from."""
    return _conv_and_norm(self, train)

  def _stem(self, x: Array, conv: ModuleDef, norm: ModuleDef) -> Array:
    """ImageNet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool; CIFAR: 3x3 conv, BN, ReLU (v2: the conv alone)."""
    if self.stem == "imagenet":
      x = conv(self.num_filters, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
    else:
      x = conv(self.num_filters, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x)
    if self.block_order != "v2":
      x = self.act(norm(name="bn1")(x))
    if self.stem == "imagenet":
      x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))  # pads with -inf; fast gradient on the CPU
    return x

  def _stages(self, features: dict, conv: ModuleDef, norm: ModuleDef) -> Array:
    """The blocks, stage by stage (the first block of every stage after the first has stride 2); adds each
    stage's output to ``features`` and returns the last (v2: after the final BN + ReLU)."""
    zero_init = self.residual if self.zero_init_residual is None else self.zero_init_residual
    extra = {}
    if self.block_cls is Bottleneck:
      extra = dict(groups=self.groups, width_per_group=self.width_per_group, stride_in_1x1=self.stride_in_1x1)
    x, index = features["stem"], 0
    for i, num_blocks in enumerate(self.stage_sizes):
      filters = self.num_filters * 2**i
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        if not self.is_initializing():
          x = self.perturb(f"block{index:02d}", x)
        x = self.block_cls(
          filters,
          conv=conv,
          norm=norm,
          act=self.act,
          strides=stride,
          order=self.block_order,
          shortcut=self.shortcut,
          shortcut_changes_shape=stride != 1 or x.shape[-1] != filters * self.block_cls.expansion,
          residual=self.residual,
          zero_init_last=zero_init,
          name=f"layer{i + 1}_{j}",
          **extra,
        )(x)
        index += 1
      features[f"stage{i + 1}"] = x
    if self.block_order == "v2":
      x = self.act(norm(name="bn_final")(x))
      features[f"stage{len(self.stage_sizes)}"] = x
    return x


class ResNet9(nn.Module):
  """The 9-layer residual network of Page's DAWNBench CIFAR-10 entries ("How to train your ResNet", 2018):
  a fast CIFAR net, wider and shallower than the paper's ResNet-20.

  With ``w = num_filters`` (64 in Page's net)::

    prep    = ReLU(BN(conv3x3(x, w)))                                             32x32, w
    layer1  = ReLU(BN(maxpool2(conv3x3(., 2w))));  y = F(y) + y                   16x16, 2w
    layer2  = ReLU(BN(maxpool2(conv3x3(., 4w))))                                  8x8,   4w
    layer3  = ReLU(BN(maxpool2(conv3x3(., 8w))));  y = F(y) + y                   4x4,   8w
    logits  = logit_scale * Dense(global max pool(y))                             (no bias)

  where ``F(y) = ReLU(BN(conv(ReLU(BN(conv(y))))))`` is a :class:`~resnet_jax.blocks.BasicBlock` of order
  ``relu_before_add`` with an identity shortcut: the ordering of the derivation's residual unit. Its last BN
  starts at 1, not 0 (with ``ReLU'(0) = 0`` a zeroed last BN would keep the branch at zero for good).
  The max-pool sits between the conv and its BN, where Page's net pools after the ReLU: with fixed statistics
  and a positive BN scale the two orders give the same output (max-pooling commutes with a non-decreasing
  per-channel map); in training the batch statistics are taken over the pooled map, and BN and ReLU run on
  a quarter of the pixels. Parameters at ``w = 64``: 6,573,120 (10 classes).
  Layer names: ``prep_conv``/``prep_bn``, ``layer1_conv``/``layer1_bn``, the block ``layer1_res``,
  ``layer2_*``, ``layer3_*``, ``layer3_res`` and ``fc``.

  ``block_order`` and ``residual`` give the same ablations as :class:`ResNet`: the residual blocks in
  another ordering (``v1``, ``v2``), or ``residual=False`` for the plain twin; ``norm_layer`` and
  ``conv_backend`` choose the layers as in :class:`ResNet`.
  """

  num_classes: int = 10
  num_filters: int = 64
  logit_scale: float = 0.125
  block_order: str = "relu_before_add"
  residual: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  act: Callable[[Array], Array] = nn.relu
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_backend: str = "auto"
  norm_layer: ModuleDef = nn.BatchNorm

  def __post_init__(self):
    check_block_options(self.block_order, "B")
    if self.block_order == "literal_bottleneck":
      raise ModelError("ResNet9's residual blocks are basic blocks: block_order must be v1, v2 or relu_before_add")
    _check_conv_backend(self.conv_backend)
    super().__post_init__()

  @property
  def min_input_size(self) -> int:
    """Smallest height/width accepted: 8, for the three 2x2 max-pools."""
    return 8

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Logits ``(batch, num_classes)``, in float32 for half-precision compute dtypes."""
    if x.ndim != 4 or x.shape[1] < self.min_input_size or x.shape[2] < self.min_input_size:
      raise ModelError(
        f"ResNet9 expects NHWC images of at least {self.min_input_size}x{self.min_input_size}, "
        f"got shape {tuple(x.shape)}"
      )
    conv, norm = _conv_and_norm(self, train)
    w = self.num_filters

    def layer(x, filters, name, pool):
      y = conv(filters, (3, 3), padding=((1, 1), (1, 1)), name=f"{name}_conv")(x)
      if pool:
        y = max_pool(y, (2, 2), (2, 2), ((0, 0), (0, 0)))
      return self.act(norm(name=f"{name}_bn")(y))

    def res(x, name):
      block = BasicBlock(
        x.shape[-1], conv=conv, norm=norm, act=self.act, order=self.block_order, residual=self.residual, name=name
      )
      return block(x)

    x = layer(jnp.asarray(x, self.dtype), w, "prep", pool=False)
    x = res(layer(x, 2 * w, "layer1", pool=True), "layer1_res")
    x = layer(x, 4 * w, "layer2", pool=True)
    x = res(layer(x, 8 * w, "layer3", pool=True), "layer3_res")
    x = jnp.max(x, axis=(1, 2))  # global max pool
    x = nn.Dense(
      self.num_classes,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=dense_kernel_init,
      name="fc",
    )(x)
    return jnp.asarray(x, jnp.promote_types(self.dtype, jnp.float32)) * self.logit_scale


def zero_perturbations(model: nn.Module, variables: dict, x: Array, **kwargs) -> dict:
  """Zeros shaped like each block input for the batch ``x``: ``{"block00": ..., ...}``.

  Use as ``model.apply({**variables, "perturbations": p}, x)`` and take ``jax.grad`` with respect to ``p``
  to get dL/d(block input) for every block.
  """

  def run(v, x):
    _, state = model.apply(v, x, mutable=["perturbations"], **kwargs)
    return state["perturbations"]

  shapes = jax.eval_shape(run, variables, x)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# ---------------------------------------------------------------------------------------------------------
# Registry

IMAGENET_STAGES = {
  18: (2, 2, 2, 2),
  34: (3, 4, 6, 3),
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
  200: (3, 24, 36, 3),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110)

# Options of the conv models that users may set (the rest defines the architecture named).
CONV_OPTIONS = (
  "dtype",
  "param_dtype",
  "zero_init_residual",
  "residual",
  "bn_momentum",
  "bn_epsilon",
  "block_order",
  "shortcut",
  "stride_in_1x1",
  "groups",
  "width_per_group",
  "num_filters",
  "act",
  "stem",
  "conv_backend",
  "norm_layer",
)
MLP_OPTIONS = ("depth", "dim", "hidden", "activation", "residual")

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict, tuple[str, ...], str]] = {}


def _register(
  name: str, factory: Callable[..., nn.Module], defaults: dict, options: Sequence[str], summary: str
) -> None:
  _REGISTRY[name] = (factory, dict(defaults), tuple(options), summary)


def _imagenet(depth: int) -> dict:
  block = BasicBlock if depth < 50 else Bottleneck
  return dict(stage_sizes=IMAGENET_STAGES[depth], block_cls=block, stem="imagenet", num_filters=64)


def _cifar(depth: int) -> dict:
  n = (depth - 2) // 6
  return dict(stage_sizes=(n, n, n), block_cls=BasicBlock, stem="cifar", num_filters=16, shortcut="A")


for _d in IMAGENET_STAGES:
  _kind = "basic" if _d < 50 else "bottleneck"
  _what = "basic blocks" if _d < 50 else "bottleneck v1.5, stride on the 3x3"
  _where = "torchvision's" if _d != 200 else "torchvision layout (not in torchvision)"
  _register(f"resnet{_d}", ResNet, _imagenet(_d), CONV_OPTIONS, f"ResNet-{_d} ({_what}), {_where}")
  if _d != 200:
    _register(
      f"preact_resnet{_d}",
      ResNet,
      dict(_imagenet(_d), block_order="v2"),
      CONV_OPTIONS,
      f"pre-activation ResNet-{_d} (v2, {_kind} blocks)",
    )
_register(
  "wide_resnet50_2",
  ResNet,
  dict(_imagenet(50), width_per_group=128),
  CONV_OPTIONS,
  "Wide ResNet-50-2: bottleneck twice as wide inside",
)
_register(
  "resnext50_32x4d",
  ResNet,
  dict(_imagenet(50), groups=32, width_per_group=4),
  CONV_OPTIONS,
  "ResNeXt-50 32x4d: grouped 3x3 convs",
)
for _d in CIFAR_DEPTHS:
  _register(
    f"resnet{_d}", ResNet, _cifar(_d), CONV_OPTIONS, f"CIFAR ResNet-{_d} (16/32/64 filters, option A shortcuts)"
  )
  _register(
    f"preact_resnet{_d}",
    ResNet,
    dict(_cifar(_d), block_order="v2"),
    CONV_OPTIONS,
    f"CIFAR pre-activation ResNet-{_d} (option A shortcuts)",
  )
  _register(
    f"plain{_d}",
    ResNet,
    dict(_cifar(_d), residual=False),
    CONV_OPTIONS,
    f"CIFAR plain-{_d}: ResNet-{_d} without shortcuts",
  )

RESNET9_OPTIONS = (
  "dtype",
  "param_dtype",
  "num_filters",
  "logit_scale",
  "block_order",
  "residual",
  "bn_momentum",
  "bn_epsilon",
  "act",
  "conv_backend",
  "norm_layer",
)
_register(
  "resnet9",
  ResNet9,
  {},
  RESNET9_OPTIONS,
  "ResNet-9 for 32x32 images (Page's DAWNBench net): 64/128/256/512 filters, two residual blocks",
)


def _residual_mlp(
  num_classes: int, depth: int = 8, dim: int = 64, hidden: int = 64, activation: str = "relu", residual: bool = True
) -> nn.Module:
  return ResidualMLP(
    depth=depth, dim=dim, hidden=hidden, num_classes=num_classes, activation=activation, residual=residual
  )


_register(
  "residual_mlp",
  _residual_mlp,
  {},
  MLP_OPTIONS,
  "flatten -> Dense(dim) -> depth residual units -> Dense (defaults depth 8, dim 64, hidden 64)",
)


def list_models() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_REGISTRY)


def model_options(name: str) -> tuple[str, ...]:
  """The options :func:`create_model` accepts for ``name``."""
  return _lookup(name)[2]


def describe_model(name: str) -> str:
  """One line saying what ``name`` is."""
  _lookup(name)
  return _REGISTRY[name][3]


def _lookup(name: str):
  if name not in _REGISTRY:
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=5, cutoff=0.5)
    # Names sharing a word with the request ("resnet_mlp" -> "residual_mlp"), which the character
    # similarity above can rank below five ResNets.
    words = {w for w in str(name).lower().split("_") if len(w) >= 3 and not w.startswith("resnet")}
    close += [n for n in list_models() if n not in close and words & set(n.split("_"))][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(list_models())}"
    raise ModelError(f"unknown model {name!r}{hint}")
  return _REGISTRY[name]


def create_model(name: str, num_classes: int = 1000, **options) -> nn.Module:
  """Build the registered model ``name`` with a ``num_classes``-way head.

  Conv models accept the options ``dtype, param_dtype, zero_init_residual, residual, bn_momentum,
  bn_epsilon, block_order, shortcut, stride_in_1x1, groups, width_per_group, num_filters, act, stem,
  conv_backend, norm_layer`` (see
  :class:`ResNet`; ``stem="cifar"`` on an ImageNet model gives the usual CIFAR ResNet-18: 3x3/1 stem conv,
  no max-pool); ``residual_mlp`` accepts ``depth, dim, hidden, activation, residual``.
  ``num_classes=0`` gives a conv model without its head (a backbone returning the pooled pre-logits;
  ``return_features=True`` gives the stage outputs, see :class:`ResNet`).
  Unknown names and options raise :class:`~resnet_jax.errors.ModelError`.
  """
  factory, defaults, allowed, _ = _lookup(name)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ModelError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; accepted: {', '.join(allowed)}")
  headless_ok = factory is ResNet
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < (0 if headless_ok else 1):
    expected = "a positive integer, or 0 for a headless backbone" if headless_ok else "a positive integer"
    raise ModelError(f"num_classes must be {expected}, got {num_classes!r} (model {name!r})")
  _check_options(name, options)
  return factory(num_classes=num_classes, **{**defaults, **options})


# Integer options and their smallest value; options that must be callables or booleans.
_INT_OPTIONS = {"num_filters": 1, "groups": 1, "width_per_group": 1, "depth": 0, "dim": 1, "hidden": 1}
_CALLABLE_OPTIONS = ("act", "norm_layer")
_BOOL_OPTIONS = ("residual", "stride_in_1x1")


def _check_options(name: str, options: dict) -> None:
  """Types and ranges of the architecture options, checked before any layer is built."""
  for key, lo in _INT_OPTIONS.items():
    if key in options:
      v = options[key]
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ModelError(f"model {name!r}: option {key}={v!r} is invalid: expected an integer >= {lo}")
  for key in _CALLABLE_OPTIONS:
    if key in options and not callable(options[key]):
      raise ModelError(
        f"model {name!r}: option {key}={options[key]!r} is invalid: expected "
        + (
          "a function such as flax.linen.relu"
          if key == "act"
          else "a module class or partial such as flax.linen.BatchNorm"
        )
        + " (a callable, not a name)"
      )
  for key in _BOOL_OPTIONS:
    if key in options and not isinstance(options[key], (bool, np.bool_)):
      raise ModelError(f"model {name!r}: option {key}={options[key]!r} is invalid: expected True or False")
