"""Gradient explosion as well as vanishing: the residual unit's stack over a weight-scale (gain) axis.

The stack is that of the residual unit, ``x_{l+1} = x_l + H_l(x_l)`` (residual) or ``x_{l+1} = H_l(x_l)`` (plain), with
``H(x) = sigma(x W1^T + b1) W2^T + b2`` and the library's initialisation (:func:`resnet_jax.residual_unit.init_stack`,
``U(+-1/sqrt(fan_in))``) multiplied by ``gain`` in ``W1`` and ``W2``. Three remedies can be switched on:

- ``norm=True``: BatchNorm with batch statistics (training mode, no learned shift) after each weight layer
  of the branch, ``H(x) = gamma * BN(sigma(BN(x W1^T + b1)) W2^T + b2)``, as in a conv block;
- ``gamma``: the scale of that last BN (``0``: the zero-initialised last BN gamma, so ``H = 0`` at init);
- ``branch_scale``: a further factor on ``W2`` only (small initialisation of the branch).

For every unit the error (a row vector ``g`` over the whole batch, ``B * dim`` entries) crosses the unit as
``g -> g M_l`` with ``M_l = J_l`` (plain) or ``I + J_l`` (residual), ``J_l`` the branch's Jacobian over the
batch (block-diagonal per example without BN; BN couples the examples). :func:`measure` returns, in log10,

- the measured gradient norm at every unit's input, ``||dL/dx_l||`` over ``||dL/dx_L||`` (``jax.vjp``
  unit by unit, renormalised after each so no depth overflows or underflows);
- the predictions, unit by unit from the output: the sum of ``log10 ||M_l||_2`` (a bound: no error can grow
  faster), the spectral norm ``log10 ||M_{L-1} ... M_l||_2`` of the product (the largest growth any output
  error can see; the measured one is at most this), and the sum of ``log10 (||M_l||_F / sqrt(n))``, the
  typical (root-mean-square) gain of a random error direction.

Everything runs in float64 (x64 is enabled inside); numbers that span hundreds of orders of magnitude are
carried as log10.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from threadpoolctl import threadpool_limits

from resnet_jax import residual_unit

BN_EPS = 1e-5


def stack_params(
  key, depth: int, width: int, hidden: int, gain: float = 1.0, branch_scale: float = 1.0, dtype=None
) -> list[dict]:
  """:func:`resnet_jax.residual_unit.init_stack` with ``W1 *= gain`` and ``W2 *= gain * branch_scale``."""
  params = residual_unit.init_stack(key, depth, width, hidden, dtype=dtype or jnp.float64)
  return [{**p, "w1": p["w1"] * gain, "w2": p["w2"] * (gain * branch_scale)} for p in params]


def _batch_norm(h):
  """Normalise each column over the batch (training mode: batch mean and variance, eps 1e-5)."""
  mean = jnp.mean(h, axis=0)
  var = jnp.mean(jnp.square(h - mean), axis=0)
  return (h - mean) / jnp.sqrt(var + BN_EPS)


def unit(p: dict, x, activation: str, residual: bool, norm: bool = False, gamma: float = 1.0):
  """One unit on a batch ``x`` (B, dim): ``x + H(x)`` or ``H(x)``; with ``norm`` the branch has two BNs."""
  sigma = residual_unit.ACTIVATIONS[activation].sigma
  if norm:
    h = gamma * _batch_norm(sigma(_batch_norm(x @ p["w1"].T + p["b1"])) @ p["w2"].T + p["b2"])
  else:
    h = sigma(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]
  return x + h if residual else h


def measure(
  params: list[dict],
  x,
  y,
  activation: str,
  residual: bool,
  norm: bool = False,
  gamma: float = 1.0,
  jacobians: bool = True,
) -> dict[str, Any]:
  """Measured and predicted gradient growth through the stack ``params`` on the batch ``x``, targets ``y``.

  The loss is ``1/(2B) ||x_L - y||^2``, so the output error is ``(x_L - y) / B``. Returns lists indexed by
  unit input ``l = 0 .. L`` (the last entry is the output, 0 by definition):

  - ``log10_grad``: ``log10 ||dL/dx_l|| - log10 ||dL/dx_L||`` (measured);
  - ``log10_bound``: ``sum_{k >= l} log10 ||M_k||_2``;
  - ``log10_product``: ``log10 ||M_{L-1} ... M_l||_2``;
  - ``log10_typical``: ``sum_{k >= l} log10 (||M_k||_F / sqrt(n))``, ``n = B * dim``;

  and ``log10_forward``: ``log10 (rms(x_L) / rms(x_0))``, the growth of the signal itself. With
  ``jacobians=False`` only the measured and forward parts are computed (the three predictions are ``None``).
  """
  # One BLAS thread: the many small SVDs run several times faster than with threads competing for cores.
  with jax.enable_x64(True), threadpool_limits(limits=1, user_api="blas"):
    return _measure(params, x, y, activation, residual, norm, gamma, jacobians)


@functools.cache
def _compiled(activation: str, residual: bool, norm: bool, gamma: float):
  """Jitted forward, backward (vjp) and Jacobian blocks of one unit, built once per kind of unit.

  The Jacobian ``d x_{l+1} / d x_l`` is returned as blocks: ``(B, dim, dim)``, one per example, without BN
  (the batch Jacobian is block-diagonal), ``(1, B*dim, B*dim)`` with BN (which couples the examples).
  """

  def f(p, v):
    return unit(p, v, activation, residual, norm, gamma)

  def bwd(p, v, g):
    return jax.vjp(lambda v: f(p, v), v)[1](g)[0]

  def blocks(p, v):
    if norm:
      n = v.size
      return jax.jacfwd(lambda u: f(p, u.reshape(v.shape)).reshape(n))(v.reshape(n))[None]
    return jax.vmap(lambda u: jax.jacfwd(lambda w: f(p, w[None])[0])(u))(v)

  return jax.jit(f), jax.jit(bwd), jax.jit(blocks)


def _measure(params, x, y, activation, residual, norm, gamma, jacobians):
  f, bwd, jac = _compiled(activation, bool(residual), bool(norm), float(gamma))
  x = jnp.asarray(x, jnp.float64)
  xs = [x]
  for p in params:
    xs.append(f(p, xs[-1]))
  depth = len(params)
  batch, dim = x.shape
  n = batch * dim
  g = (xs[-1] - jnp.asarray(y, jnp.float64)) / batch
  top = math.log10(float(jnp.linalg.norm(g)))
  grad, scale = [0.0] * (depth + 1), top
  g = g / 10**top
  bound, product, typical = [0.0] * (depth + 1), [0.0] * (depth + 1), [0.0] * (depth + 1)
  prod, prod_scale = None, 0.0
  for l in range(depth - 1, -1, -1):
    if g is not None:
      g = bwd(params[l], xs[l], g)
      size = float(jnp.linalg.norm(g))
      if size == 0.0 or not math.isfinite(size):
        grad[: l + 1] = [-math.inf if size == 0.0 else math.inf] * (l + 1)
        g = None
      else:
        scale += math.log10(size)
        g = g / size
        grad[l] = scale - top
    if jacobians:
      m = np.asarray(jac(params[l], xs[l]))  # blocks of d x_{l+1} / d x_l
      bound[l] = bound[l + 1] + _log10(_spectral(m))
      typical[l] = typical[l + 1] + _log10(math.sqrt(float(np.sum(m * m)) / n))
      prod = m if prod is None else prod @ m  # g_l = g_L M_{L-1} ... M_l
      s = _spectral(prod)
      prod_scale += _log10(s)
      product[l] = prod_scale
      if s > 0 and math.isfinite(s):
        prod = prod / s
    elif g is None:
      break
  rms = lambda v: float(jnp.sqrt(jnp.mean(jnp.square(v))))
  return {
    "log10_grad": grad,
    "log10_bound": bound if jacobians else None,
    "log10_product": product if jacobians else None,
    "log10_typical": typical if jacobians else None,
    "log10_forward": _log10(rms(xs[-1])) - _log10(rms(xs[0])),
  }


def _spectral(blocks: np.ndarray) -> float:
  """Spectral norm of a block-diagonal matrix given as its blocks: the largest block's."""
  return float(np.max(np.linalg.norm(blocks, 2, axis=(1, 2))))


def _log10(value: float) -> float:
  return math.log10(value) if value > 0 and math.isfinite(value) else (-math.inf if value == 0 else math.inf)


# The remedies, measured at one exploding setting: (name, residual, norm, last BN gamma, branch scale).
# A branch scale of None means 1/L: the branch of a depth-L stack starts L times smaller.
REMEDIES = (
  ("plain", False, False, 1.0, 1.0),
  ("residual", True, False, 1.0, 1.0),
  ("plain + BN", False, True, 1.0, 1.0),
  ("residual + BN", True, True, 1.0, 1.0),
  ("residual + BN, last gamma 0", True, True, 0.0, 1.0),
  ("residual, branch x 0.1", True, False, 1.0, 0.1),
  ("residual, branch x 1/L", True, False, 1.0, None),
)


# Record key (after "log10_") -> the measurement of :func:`measure` whose first entry it holds.
_FIRST = {"first_over_last": "grad", "product_norm": "product", "bound": "bound", "typical": "typical"}


def study(
  gains,
  depths,
  width: int,
  hidden: int,
  batch: int,
  seed: int,
  activations=("sigmoid", "tanh", "relu"),
  remedy_gain: float = 3.0,
  remedy_activation: str = "relu",
  log=None,
) -> list[dict[str, Any]]:
  """Every (activation, gain, plain/residual, depth) and every remedy at ``remedy_gain``: one record each.

  The stacks of every depth are the first ``depth`` units of one stack of ``max(depths)`` units (same
  weights, data ``x, y ~ N(0, 1)`` of shape ``(batch, width)``). Each record holds the log10 first/last
  gradient ratio measured and its three predictions (see :func:`measure`); the records of the deepest stack
  also hold the whole profile, unit by unit.
  """
  log = log or (lambda msg: None)
  kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
  with jax.enable_x64(True):
    x = jax.random.normal(kx, (batch, width), jnp.float64)
    y = jax.random.normal(ky, (batch, width), jnp.float64)
  settings = [
    (a, g, "plain" if not r else "residual", r, False, 1.0, 1.0)
    for a in activations
    for g in gains
    for r in (False, True)
  ]
  settings += [
    (remedy_activation, remedy_gain, name, r, bn, gamma, scale) for name, r, bn, gamma, scale in REMEDIES[2:]
  ]
  records = []
  for activation, gain, name, residual, norm, gamma, scale in settings:
    log(f"explosion: {activation}, gain {gain}, {name}")
    for depth in sorted(depths):
      branch_scale = 1.0 / depth if scale is None else scale
      with jax.enable_x64(True):
        params = stack_params(kp, max(depths), width, hidden, gain, branch_scale)[:depth]
      m = measure(params, x, y, activation, residual, norm, gamma)
      rec = dict(activation=activation, gain=gain, net=name, residual=residual, norm=norm, last_gamma=gamma)
      rec.update(branch_scale=branch_scale, depth=depth, width=width, hidden=hidden, batch=batch, seed=seed)
      rec.update({f"log10_{k}": m[f"log10_{v}"][0] for k, v in _FIRST.items()}, log10_forward=m["log10_forward"])
      if depth == max(depths):
        rec["profile"] = {k: m[k] for k in ("log10_grad", "log10_product", "log10_bound", "log10_typical")}
      records.append(rec)
  return records
