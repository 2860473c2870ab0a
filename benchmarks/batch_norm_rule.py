"""A BatchNorm whose batch-statistics mode carries its own derivative rule, for ``bench.py --compare-batch-norm``.

Training-mode BatchNorm over the ``m`` positions (N*H*W for NHWC maps) of each channel::

    mu = mean(x)    sigma2 = max(0, mean(x^2) - mu^2)    inv = 1 / sqrt(sigma2 + eps)
    x_hat = (x - mu) * inv    y = gamma * x_hat + beta

the statistics computed as :class:`flax.linen.BatchNorm` computes them (one pass, at least float32). Its
tangent (forward mode), with ``S = sum(x_dot)`` and ``s = sum((x - mu) * x_dot)`` per channel::

    y_dot = gamma*inv * x_dot + (x - mu) * (inv*gamma_dot - gamma*inv^3 * s/m) + beta_dot - gamma*inv * S/m
    mu_dot = S/m    sigma2_dot = 2*s/m

is written so that everything per channel is multiplied in after the two sums. Its transpose, which is
what ``jax.grad`` runs, is then the textbook gradient with ``delta = dL/dy`` and two sums per channel::

    dL/dgamma = sum(delta * x_hat)    dL/dbeta = sum(delta)
    dL/dx     = gamma*inv * (delta - mean(delta) - x_hat * mean(delta * x_hat))

and the backward pass keeps the input in its own dtype (bfloat16 stays bfloat16), where autodiff of flax's
formula sums along each path through ``mu``, ``mean(x^2)`` and ``inv``. Forward and reverse mode both work
(``jax.jvp``, ``jax.jacfwd``, ``jax.grad``); ``tests/test_batch_norm_rule.py`` checks values, running
statistics, gradients and Jacobians against flax's BatchNorm in float64.

The question it answers: is BatchNorm's gradient, as XLA compiles autodiff of flax's formula, a cost
worth a rule of its own? ``python benchmarks/bench.py --model M --mode train --compare-batch-norm`` times
the training step with this layer (the model option ``norm_layer``) interleaved with the default, and
``benchmarks/README.md`` has the answer for the CPUs measured: no measurable difference, so the models
keep ``flax.linen.BatchNorm``.

:class:`BatchNorm` is ``flax.linen.BatchNorm`` with this rule in batch-statistics mode: the same
attributes, variables, initialisers, running-average update and outputs. Settings the rule does not cover
(running statistics, a mask, ``axis_name``, features on an axis other than the last,
``use_fast_variance=False``, no scale or no bias, complex inputs) run flax's own code.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype
from flax.linen.module import merge_param
from jax import lax

Array = Any


def _statistics(x: Array, stats_dtype: Any) -> tuple[Array, Array, Array]:
  """``(x in stats_dtype, mu, sigma2)`` over every axis but the last: flax's fast variance, clipped at 0."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(stats_dtype)
  mu = jnp.mean(xf, axes)
  sigma2 = jnp.maximum(0.0, jnp.mean(lax.square(xf), axes) - lax.square(mu))
  return xf, mu, sigma2


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(
  x: Array, gamma: Array, beta: Array, epsilon: float, stats_dtype: Any, out_dtype: Any
) -> tuple[Array, Array, Array]:
  """BatchNorm with the batch statistics of ``x`` (features on the last axis): ``(y, mu, sigma2)``.

  ``y = gamma * (x - mu) / sqrt(sigma2 + epsilon) + beta`` in ``out_dtype``; ``mu`` and ``sigma2`` (the
  biased variance) are computed in ``stats_dtype``, and ``y`` in that dtype promoted with ``gamma``'s and
  ``beta``'s. The derivative is the rule of the module docstring.
  """
  xf, mu, sigma2 = _statistics(x, stats_dtype)
  y = (xf - mu) * (lax.rsqrt(sigma2 + epsilon) * gamma) + beta
  return y.astype(out_dtype), mu, sigma2


@batch_norm_train.defjvp
def _batch_norm_train_jvp(epsilon, stats_dtype, out_dtype, primals, tangents):
  x, gamma, beta = primals
  x_dot, gamma_dot, beta_dot = tangents
  m = x.size // x.shape[-1]
  axes = tuple(range(x.ndim - 1))
  xf, mu, sigma2 = _statistics(x, stats_dtype)
  inv = lax.rsqrt(sigma2 + epsilon)
  a = inv * gamma  # gamma * inv, per channel
  xc = xf - mu
  y = xc * a + beta
  x_dot = x_dot.astype(stats_dtype)
  S = jnp.sum(x_dot, axes)
  s = jnp.sum(xc * x_dot, axes)
  # Per-channel factors first, then one elementwise pass: the transpose then needs only sum(delta) and
  # sum(delta * (x - mu)).
  y_dot = a * x_dot + xc * (inv * gamma_dot - a * inv * inv * s / m) + (beta_dot - a * S / m)
  return (y.astype(out_dtype), mu, sigma2), (y_dot.astype(out_dtype), S / m, 2.0 * s / m)


class BatchNorm(nn.BatchNorm):
  """``flax.linen.BatchNorm`` whose batch-statistics mode runs :func:`batch_norm_train` (see the module
  docstring): the same attributes, variables and results, a gradient computed in fewer passes."""

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
    running = merge_param("use_running_average", self.use_running_average, use_running_average)
    axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    own_rule = (
      not running
      and mask is None
      and self.axis_name is None
      and self.axis_index_groups is None
      and tuple(a % x.ndim for a in axes) == (x.ndim - 1,)
      and self.use_fast_variance
      and self.use_scale
      and self.use_bias
      and self.force_float32_reductions
      and jnp.issubdtype(x.dtype, jnp.floating)
    )
    if not own_rule:
      return super().__call__(x, use_running_average, mask=mask)
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    gamma = self.param("scale", self.scale_init, features, self.param_dtype)
    beta = self.param("bias", self.bias_init, features, self.param_dtype)
    stats_dtype = jnp.promote_types(self.dtype if self.dtype is not None else x.dtype, jnp.float32)
    out_dtype = canonicalize_dtype(x, gamma, beta, dtype=self.dtype)
    y, mu, sigma2 = batch_norm_train(x, gamma, beta, self.epsilon, stats_dtype, out_dtype)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mu
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * sigma2
    return y
