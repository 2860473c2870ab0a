"""A hand-written backward pass of the BasicBlock in training mode (batch statistics), without autodiff.

It mirrors :class:`resnet_jax.blocks.BasicBlock` (same parameter tree: ``conv1 bn1 conv2 bn2`` and, for a
projection shortcut, ``downsample_conv downsample_bn``) for the three orderings, e.g. for ``"v1"``::

    z1 = conv(x, w1, stride s)    u1 = BN1(z1)    a1 = ReLU(u1)
    z2 = conv(a1, w2)             u2 = BN2(z2)    t = u2 + S(x)    y = ReLU(t)

and, given ``delta = dL/dy``, runs the chain rule backwards with these pieces:

- ReLU: ``dL/du = dL/da * [u > 0]`` (the mask).
- BatchNorm with batch statistics over the N*H*W positions (``m`` of them) of each channel,
  ``xhat = (z - mu) / sqrt(var + eps)``, ``u = gamma * xhat + beta``::

    dL/dgamma = sum(delta * xhat)     dL/dbeta = sum(delta)
    dL/dz     = gamma / sqrt(var + eps) * (delta - mean(delta) - xhat * mean(delta * xhat))

- Convolution ``y = conv(x, w)`` with stride ``s`` and padding ``p``: the input gradient is the transposed
  convolution (``delta`` dilated by ``s``, padded by ``k - 1 - p``, correlated with the spatially flipped
  kernel whose in/out channels are swapped); the kernel gradient correlates the padded input with ``delta``
  used as a kernel dilated by ``s``, with the batch axis as the contracted axis (swapped dimension numbers).
- Shortcut: identity passes ``delta`` on; option A routes the first ``C`` channels back to the strided
  positions; a projection runs BN and conv backward.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from resnet_jax.blocks import option_a_shortcut

Array = Any
_DN = ("NHWC", "HWIO", "NHWC")
_HI = lax.Precision.HIGHEST


def conv(x: Array, w: Array, stride: int, pad: int) -> Array:
  """torch-style convolution: NHWC input, HWIO kernel, symmetric padding ``pad``."""
  return lax.conv_general_dilated(
    x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_DN, precision=_HI
  )


def conv_backward(x: Array, w: Array, delta: Array, stride: int, pad: int) -> tuple[Array, Array]:
  """(dL/dx, dL/dw) of ``conv(x, w, stride, pad)`` given ``delta = dL/dy``."""
  k = w.shape[0]
  (h, wd), (ho, wo) = x.shape[1:3], delta.shape[1:3]
  lo = k - 1 - pad
  hi_h, hi_w = h - 1 + pad - (ho - 1) * stride, wd - 1 + pad - (wo - 1) * stride
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = lax.conv_general_dilated(
    delta, w_t, (1, 1), ((lo, hi_h), (lo, hi_w)), lhs_dilation=(stride, stride), dimension_numbers=_DN, precision=_HI
  )
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  xp = xp[:, : (ho - 1) * stride + k, : (wo - 1) * stride + k, :]
  dw = lax.conv_general_dilated(
    xp, delta, (1, 1), "VALID", rhs_dilation=(stride, stride), dimension_numbers=("CHWN", "IHWO", "HWNC"), precision=_HI
  )
  return dx, dw


def batch_norm(z: Array, p: dict, eps: float) -> tuple[Array, tuple]:
  """Training-mode BatchNorm over N, H, W; returns the output and the cache for the backward pass."""
  mu = jnp.mean(z, axis=(0, 1, 2))
  var = jnp.mean((z - mu) ** 2, axis=(0, 1, 2))
  inv = 1.0 / jnp.sqrt(var + eps)
  xhat = (z - mu) * inv
  return p["scale"] * xhat + p["bias"], (xhat, inv, p["scale"])


def batch_norm_backward(delta: Array, cache: tuple) -> tuple[Array, dict]:
  """dL/dz = gamma/sqrt(var+eps) (delta - mean(delta) - xhat mean(delta xhat)); and dL/dgamma, dL/dbeta."""
  xhat, inv, gamma = cache
  axes = (0, 1, 2)
  dgamma = jnp.sum(delta * xhat, axis=axes)
  dbeta = jnp.sum(delta, axis=axes)
  dz = gamma * inv * (delta - jnp.mean(delta, axis=axes) - xhat * jnp.mean(delta * xhat, axis=axes))
  return dz, {"scale": dgamma, "bias": dbeta}


def relu(u: Array) -> Array:
  return jnp.maximum(u, 0)


def _shortcut_kind(params: dict, x: Array, out_features: int, stride: int) -> str:
  if "downsample_conv" in params:
    return "projection"
  if stride != 1 or x.shape[-1] != out_features:
    return "A"
  return "identity"


def basic_block_forward(
  params: dict, x: Array, stride: int = 1, order: str = "v1", eps: float = 1e-5, residual: bool = True
) -> tuple[Array, dict]:
  """The BasicBlock in training mode as a pure function; returns ``(y, cache)``."""
  w1, w2 = params["conv1"]["kernel"], params["conv2"]["kernel"]
  c: dict = {"x": x}
  kind = _shortcut_kind(params, x, w2.shape[-1], stride)
  if order == "v2":
    b0, c["bn1"] = batch_norm(x, params["bn1"], eps)
    c["b0"] = b0
    inp = relu(b0)
  else:
    inp = x
  c["inp"] = inp
  z1 = conv(inp, w1, stride, 1)
  if order == "v2":
    u1, c["bn2"] = batch_norm(z1, params["bn2"], eps)
    c["u1"] = u1
    c["a1"] = a1 = relu(u1)
    f = conv(a1, w2, 1, 1)
  else:
    u1, c["bn1"] = batch_norm(z1, params["bn1"], eps)
    c["u1"] = u1
    c["a1"] = a1 = relu(u1)
    u2, c["bn2"] = batch_norm(conv(a1, w2, 1, 1), params["bn2"], eps)
    c["u2"] = u2
    f = relu(u2) if order == "relu_before_add" else u2
  if residual:
    if kind == "identity":
      s = x
    elif kind == "A":
      s = option_a_shortcut(x, w2.shape[-1], stride)
    elif order == "v2":
      s = conv(inp, params["downsample_conv"]["kernel"], stride, 0)
    else:
      s, c["bnd"] = batch_norm(conv(x, params["downsample_conv"]["kernel"], stride, 0), params["downsample_bn"], eps)
    f = f + s
  c["t"] = f
  return (relu(f) if order == "v1" else f), c


def basic_block_backward(
  params: dict, x: Array, delta: Array, stride: int = 1, order: str = "v1", eps: float = 1e-5, residual: bool = True
) -> dict:
  """Gradients of ``sum(delta * y)`` for ``y = basic_block_forward(params, x, ...)``, by hand.

  Returns ``{"params": <same tree as params>, "x": dL/dx}``.
  """
  _, c = basic_block_forward(params, x, stride, order, eps, residual)
  w1, w2 = params["conv1"]["kernel"], params["conv2"]["kernel"]
  kind = _shortcut_kind(params, x, w2.shape[-1], stride)
  grads: dict = {}
  g_t = delta * (c["t"] > 0) if order == "v1" else delta  # ReLU after the addition (v1 only)
  g_f = g_t
  if order == "v2":
    g_a1, dw2 = conv_backward(c["a1"], w2, g_f, 1, 1)
    g_z1, grads["bn2"] = batch_norm_backward(g_a1 * (c["u1"] > 0), c["bn2"])
  else:
    g_u2 = g_f * (c["u2"] > 0) if order == "relu_before_add" else g_f
    g_z2, grads["bn2"] = batch_norm_backward(g_u2, c["bn2"])
    g_a1, dw2 = conv_backward(c["a1"], w2, g_z2, 1, 1)
    g_z1, grads["bn1"] = batch_norm_backward(g_a1 * (c["u1"] > 0), c["bn1"])
  g_inp, dw1 = conv_backward(c["inp"], w1, g_z1, stride, 1)
  grads["conv1"], grads["conv2"] = {"kernel": dw1}, {"kernel": dw2}
  g_x = jnp.zeros_like(x)
  if residual:
    if kind == "identity":
      g_x = g_x + g_t
    elif kind == "A":
      g_x = g_x.at[:, ::stride, ::stride, :].add(g_t[..., : x.shape[-1]])
    elif order == "v2":
      g_p, dwd = conv_backward(c["inp"], params["downsample_conv"]["kernel"], g_t, stride, 0)
      g_inp = g_inp + g_p
      grads["downsample_conv"] = {"kernel": dwd}
    else:
      g_zd, grads["downsample_bn"] = batch_norm_backward(g_t, c["bnd"])
      g_xd, dwd = conv_backward(x, params["downsample_conv"]["kernel"], g_zd, stride, 0)
      g_x = g_x + g_xd
      grads["downsample_conv"] = {"kernel": dwd}
  if order == "v2":
    g_b0, grads["bn1"] = batch_norm_backward(g_inp * (c["b0"] > 0), c["bn1"])
    g_x = g_x + g_b0
  else:
    g_x = g_x + g_inp
  return {"params": grads, "x": g_x}
