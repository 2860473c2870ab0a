"""Max pooling whose gradient is fast on the CPU: the ImageNet stem's 3x3/2 max-pool and ResNet-9's 2x2 pools.

The forward pass is ``flax.linen.max_pool`` (XLA's ``reduce_window``). Its gradient, as XLA differentiates
it, is a ``select_and_scatter``, which XLA's CPU back end runs slowly: about 190 ms per ResNet-18 training
step at batch 16, 224x224, on 2 cores, a quarter of the step. :func:`max_pool` gives the same gradient from
the window's taps instead (three times faster there, ``benchmarks/README.md``)::

  y = max over taps (i, j) of xp[:, i + s*p, j + s*q, :]          xp: x padded with -inf
  dx = sum over taps of  pad_to_x( g * [tap (i, j) is the first tap, in row-major order, equal to y] )

"First" reproduces ``select_and_scatter``'s choice among equal values, so the gradient is the one XLA
computes (up to the order in which overlapping windows' contributions are added). Windows that tile the
input (window = strides, no padding: ResNet-9's 2x2 pools) take a shorter road to the same gradient: the
input viewed as blocks, one broadcast of ``g`` and one select (``_bwd_disjoint``), instead of one strided
pad and one addition per tap, which XLA's CPU back end fuses poorly (ResNet-9 at half width, bfloat16,
batch 512: 1.35 times the images/s of the training step). Other back ends keep XLA's own gradient.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = Any


def max_pool(x: Array, window: Sequence[int], strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> Array:
  """``nn.max_pool(x, window, strides, padding)`` on NHWC ``x`` with explicit padding (padded with -inf).

  On the CPU the gradient comes from the window's taps (module docstring); elsewhere from XLA.
  """
  window, strides = tuple(int(v) for v in window), tuple(int(v) for v in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if _EXPORTING[0]:
    return _max_over_taps(x, window, strides, padding)
  if jax.default_backend() != "cpu":
    return _reduce_max(x, window, strides, padding)
  return _max_pool_taps(x, window, strides, padding)


_EXPORTING = [False]


@contextlib.contextmanager
def export_friendly():
  """Inside the block, :func:`max_pool` is written as the maximum of the window's strided taps of the
  -inf-padded input (pad, slices, maxima: the same values), which ONNX exporters translate op by op;
  ``reduce_window`` with padding is not translated correctly by jax2onnx."""
  old, _EXPORTING[0] = _EXPORTING[0], True
  try:
    yield
  finally:
    _EXPORTING[0] = old


def _max_over_taps(
  x: Array, window: tuple[int, int], strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
) -> Array:
  (pt, pb), (pl, pr) = padding
  (kh, kw), (sh, sw) = window, strides
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
  oh = (xp.shape[1] - kh) // sh + 1
  ow = (xp.shape[2] - kw) // sw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = xp[:, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw, :]
      y = tap if y is None else jnp.maximum(y, tap)
  return y


def _reduce_max(
  x: Array, window: tuple[int, int], strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
) -> Array:
  """What ``nn.max_pool`` computes (``lax.reduce_window`` of max from -inf), written out: exporters that
  replace ``flax.linen.max_pool`` (jax2onnx) see the plain ``reduce_window_max`` instead."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_taps(
  x: Array, window: tuple[int, int], strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
) -> Array:
  return _reduce_max(x, window, strides, padding)


def _fwd(x, window, strides, padding):
  y = _max_pool_taps(x, window, strides, padding)
  return y, (x, y)


def _bwd(window, strides, padding, residuals, g):
  x, y = residuals
  if window == strides and padding == ((0, 0), (0, 0)) and x.shape[1] % window[0] == 0 and x.shape[2] % window[1] == 0:
    return (_bwd_disjoint(window, x, y, g),)
  (pt, pb), (pl, pr) = padding
  (kh, kw), (sh, sw) = window, strides
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
  n, hp, wp, c = xp.shape
  oh, ow = y.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, g.dtype)
  for i in range(kh):
    for j in range(kw):
      last_h, last_w = i + (oh - 1) * sh, j + (ow - 1) * sw
      tap = lax.slice(xp, (0, i, j, 0), (n, last_h + 1, last_w + 1, c), (1, sh, sw, 1))
      first = (tap == y) & ~taken  # this tap holds the window's maximum, and no earlier tap did
      taken = taken | first
      # Back to the padded input's grid: tap (p, q) sits at (i + sh*p, j + sw*q).
      dxp = dxp + lax.pad(
        jnp.where(first, g, zero),
        zero,
        ((0, 0, 0), (i, hp - 1 - last_h, sh - 1), (j, wp - 1 - last_w, sw - 1), (0, 0, 0)),
      )
  return (dxp[:, pt : hp - pb, pl : wp - pr, :],)


def _bwd_disjoint(window: tuple[int, int], x: Array, y: Array, g: Array) -> Array:
  """The gradient for windows that tile ``x`` (window = strides, no padding, sides divisible by the window).

  Each window is one block of ``x`` viewed as ``(n, h/kh, kh, w/kw, kw, c)``; its first tap equal to the
  maximum, in row-major order, has rank ``r* = min{kw*i + j : x[., i, ., j, .] = y}``, and::

    dx[., i, ., j, .] = g  if kw*i + j = r*  else 0

  one broadcast and select over ``x``'s elements, instead of one strided pad per tap."""
  (kh, kw), (n, h, w, c) = window, x.shape
  x6 = x.reshape(n, h // kh, kh, w // kw, kw, c)
  rank = (jnp.arange(kh)[:, None] * kw + jnp.arange(kw)[None, :]).astype(jnp.int32).reshape(1, 1, kh, 1, kw, 1)
  first = jnp.full(y.shape, kh * kw, jnp.int32)
  for r in reversed(range(kh * kw)):  # the last assignment is the first tap in row-major order
    first = jnp.where(x6[:, :, r // kw, :, r % kw, :] == y, r, first)
  dx6 = jnp.where(rank == first[:, :, None, :, None, :], g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  return dx6.reshape(x.shape)


_max_pool_taps.defvjp(_fwd, _bwd)
