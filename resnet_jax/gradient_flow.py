"""Gradient flow through plain and residual stacks: the gradient reaching every layer, measured and predicted.

The error signal (a row vector ``g`` per example) crosses unit ``l`` of the seed's stack as ``g -> g J_l``
in the plain stack (``x_{l+1} = H_l(x_l)``) and ``g -> g (I + J_l)`` in the residual one
(``x_{l+1} = x_l + H_l(x_l)``), with ``J_l = W2_l diag(sigma'(z_l)) W1_l``. Per unit the plain stack
therefore multiplies the gradient norm by at most ``||W1_l||_2 ||W2_l||_2 sup sigma'`` (``sup sigmoid' =
1/4``) and typically by ``q_l = ||W1_l||_F ||W2_l||_F rms(sigma'(z_l)) / sqrt(dim * hidden)`` (random-matrix
estimate); the residual stack typically by ``sqrt(1 + q_l^2)`` (at least 1 on average, but not a bound either
way: ``||I + J_l||_2`` can exceed 1 by ``||J_l||_2``, and the product of L such factors grows exponentially).

- Predictions: :func:`unit_jacobians`, :func:`predicted_factors`, :func:`log10_product_norm`.
- Measurements: :func:`stack_gradient_norms` runs the hand-derived backward pass
  :func:`resnet_jax.residual_unit.manual_stack_grads` and checks it against ``jax.grad``;
  :func:`measure_mlp` puts both together for a plain stack and its residual twin; :func:`measure_conv` takes
  ``jax.grad`` with respect to the per-block input perturbations of the registry's CIFAR nets (``plainN``
  against ``resnetN``, flax ``Module.perturb``).

Deep plain stacks push the gradient far below the float range (below 10^-550 at 500 sigmoid units),
so the backward pass runs in float64 over chunks of units, each chunk restarted from a unit-norm
error with its log10 scale carried along (exact: the backward pass is linear in the error).
``experiments/gradient_flow.py`` runs the study and writes its tables and plots.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import residual_unit
from resnet_jax.errors import ConfigError
from resnet_jax.gradcheck import error_floor, rel_error
from resnet_jax.models import create_model, zero_perturbations
from resnet_jax.residual_unit import sigma_prime

# Upper bound of |sigma'| for each activation: the per-unit factor that no weight scale can change.
SIGMA_PRIME_SUP = {"sigmoid": 0.25, "tanh": 1.0, "relu": 1.0}
# Units per backward chunk: the gradient inside one chunk stays far inside float64's range.
CHUNK = 25


# ----------------------------------------------------------------------------------------------
# The analytic part: per-unit Jacobians of the seed's unit


def layer_inputs(params: list[dict], x, shortcut: bool, activation: str) -> list:
  """``[x_0, ..., x_L]``: the input of every unit and the stack's output ``x_L = y_hat``.

  Each step is :func:`resnet_jax.residual_unit.stack_forward` on a one-unit stack, so the plain and
  residual recursions are exactly the library's.
  """
  xs = [x]
  for p in params:
    xs.append(residual_unit.stack_forward([p], xs[-1], shortcut=shortcut, activation=activation))
  return xs


def unit_jacobians(p: dict, x, activation: str):
  """Per-example Jacobian of the branch, ``J = W2 diag(sigma'(z)) W1`` with ``z = x W1^T + 1 b1^T``.

  Shape ``(batch, dim, dim)``. A row-vector error ``g`` at the unit's output becomes ``g J`` at its
  input through the branch; the unit's full backward map is ``J`` (plain) or ``I + J`` (residual).
  """
  z = x @ p["w1"].T + p["b1"]
  s = sigma_prime(z, activation)  # (B, hidden)
  return jnp.einsum("dh,bh,hk->bdk", p["w2"], s, p["w1"])


def predicted_factors(params: list[dict], xs: list, shortcut: bool, activation: str) -> dict[str, Any]:
  """Per-unit factors by which the gradient norm is predicted to change, input side over output side.

  - ``bound``: ``||W1||_2 ||W2||_2 sup|sigma'|`` (plain) or ``1 + that`` (residual): no input can do worse.
  - ``typical``: ``q = ||W1||_F ||W2||_F rms(sigma'(z)) / sqrt(dim hidden)`` (plain), the gain of a
    random error direction through iid-like weights; ``sqrt(1 + q^2)`` for the residual unit, whose
    error keeps its identity path and gains the branch in quadrature.
  - ``jacobian``: the spectral norm ``||J_l||_2`` (plain) or ``||I + J_l||_2`` (residual), measured per
    example and averaged in log over the batch.
  Returns lists (one value per unit, input side first) and their geometric means.
  """
  sup = SIGMA_PRIME_SUP[activation]
  bound, typical, jac = [], [], []
  for p, x in zip(params, xs[:-1]):
    hidden, dim = p["w1"].shape
    z = x @ p["w1"].T + p["b1"]
    rms = jnp.sqrt(jnp.mean(sigma_prime(z, activation) ** 2))
    spec = jnp.linalg.norm(p["w1"], 2) * jnp.linalg.norm(p["w2"], 2) * sup
    q = jnp.linalg.norm(p["w1"]) * jnp.linalg.norm(p["w2"]) * rms / math.sqrt(dim * hidden)
    j = unit_jacobians(p, x, activation)
    if shortcut:
      j = j + jnp.eye(dim, dtype=j.dtype)
    sv = jnp.linalg.svd(j, compute_uv=False)[:, 0]
    bound.append(float(1 + spec if shortcut else spec))
    typical.append(float(jnp.sqrt(1 + q * q) if shortcut else q))
    jac.append(float(jnp.exp(jnp.mean(jnp.log(sv)))))

  def gmean(v: list[float]) -> float:
    return float(np.exp(np.mean(np.log(np.maximum(v, 1e-300)))))

  return {
    "bound": bound,
    "typical": typical,
    "jacobian": jac,
    "bound_gmean": gmean(bound),
    "typical_gmean": gmean(typical),
    "jacobian_gmean": gmean(jac),
  }


def log10_product_norm(params: list[dict], xs: list, shortcut: bool, activation: str, example: int = 0) -> float:
  """log10 of ``||J_{L-1} ... J_0||_2`` (plain) or ``||(I+J_{L-1}) ... (I+J_0)||_2`` for one example.

  The product maps the error at the output to the error at the input (row vectors on the left). It is
  accumulated from the output side with its spectral norm divided out after every unit, so no depth
  underflows; the log10 scale is carried separately.
  """
  dim = xs[0].shape[-1]
  prod = jnp.eye(dim, dtype=xs[0].dtype)
  scale = 0.0
  for p, x in reversed(list(zip(params, xs[:-1]))):
    j = unit_jacobians(p, x[example : example + 1], activation)[0]
    if shortcut:
      j = j + jnp.eye(dim, dtype=j.dtype)
    prod = prod @ j
    n = float(jnp.linalg.norm(prod, 2))
    if n == 0.0:
      return -math.inf
    scale += math.log10(n)
    prod = prod / n
  return scale + math.log10(float(jnp.linalg.norm(prod, 2)))


# ----------------------------------------------------------------------------------------------
# The measured part: hand-derived backward pass over chunks, checked against jax.grad


def max_rel_error(a, b) -> float:
  """The largest :func:`resnet_jax.gradcheck.rel_error` over the leaves of two pytrees, in float64."""
  floor = error_floor(np.float64)
  return max((rel_error(u, v, floor) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def stack_gradient_norms(
  params: list[dict], x, y, shortcut: bool, activation: str, chunk: int = CHUNK, check: bool = True
) -> dict[str, Any]:
  """log10 norms of the gradient reaching every unit, from :func:`residual_unit.manual_stack_grads`.

  Returns ``log10_input_grad`` (length L+1: ``||dL/dx_l||`` for l = 0..L-1, then ``||dL/dy_hat||``),
  ``log10_param_grad`` (length L: ``||dL/d(w1, b1, w2, b2)_l||``), and ``max_rel_diff_vs_jax``: the
  largest relative difference between the hand-derived gradients (every unit's parameters and the
  chunk input) and ``jax.grad`` of :func:`residual_unit.stack_loss` on the same chunk (``nan`` if unchecked).

  The stack is walked from the output in chunks of ``chunk`` units. The last chunk gets the real
  targets ``y``. An earlier chunk ending at ``x_e`` must receive the error ``g`` that reached ``x_e``;
  since ``stack_loss`` is a mean of ``1/2 ||y_hat - y||^2``, its output error is ``(y_hat - y) / B``,
  so targets ``y' = x_e - B g / ||g||`` hand it the unit-norm error ``g / ||g||`` and the chunk's
  gradients come out divided by ``||g||``, whose log10 is added back. The backward pass is linear in
  the error, so this is exact up to rounding and never underflows.
  """
  depth = len(params)
  batch = x.shape[0]
  xs = layer_inputs(params, x, shortcut, activation)
  log_in = [0.0] * (depth + 1)
  log_par = [0.0] * depth
  delta = (xs[-1] - y) / batch
  log_in[depth] = math.log10(float(jnp.linalg.norm(delta)))
  worst = 0.0
  grad_fn = jax.grad(residual_unit.stack_loss, argnums=(0, 1))
  targets, scale = y, 0.0
  end = depth
  while end > 0:
    start = max(0, end - chunk)
    sub = params[start:end]
    g = residual_unit.manual_stack_grads(sub, xs[start], targets, shortcut=shortcut, activation=activation)
    for i, gi in enumerate(g["inputs"]):
      log_in[start + i] = scale + log10_norm(gi)
    for i, gp in enumerate(g["params"]):
      log_par[start + i] = scale + log10_norm(jax.tree.leaves(gp))
    if check:
      ref_params, ref_x = grad_fn(sub, xs[start], targets, shortcut=shortcut, activation=activation)
      worst = max(worst, max_rel_error((g["params"], g["x"]), (ref_params, ref_x)))
    g0 = g["inputs"][0]
    n = float(jnp.linalg.norm(g0))
    if n == 0.0 or not math.isfinite(n):
      for i in range(start):
        log_in[i] = -math.inf if n == 0.0 else math.inf
        log_par[i] = log_in[i]
      break
    scale += math.log10(n)
    targets = xs[start] - batch * (g0 / n)
    end = start
  return {
    "log10_input_grad": log_in,
    "log10_param_grad": log_par,
    "max_rel_diff_vs_jax": worst if check else float("nan"),
    "layer_inputs": xs,
  }


def log10_norm(arrays) -> float:
  """log10 of the Euclidean norm of one array or a list of arrays (-inf for zero)."""
  if not isinstance(arrays, (list, tuple)):
    arrays = [arrays]
  sq = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays)
  return 0.5 * math.log10(sq) if sq > 0 else -math.inf


def measure_mlp(
  depth: int, width: int, hidden: int, activation: str, batch: int, seed: int, check: bool = True
) -> list[dict[str, Any]]:
  """Gradient flow through a plain stack of ``depth`` units and its residual twin (same weights).

  Runs in float64 (x64 is enabled inside). Data: ``x, y ~ N(0, 1)`` of shape ``(batch, width)``.
  Returns two records (plain, residual) with the measured log10 gradient norms per unit, the measured
  per-unit factor ``(||dL/dx_0|| / ||dL/dy_hat||)^(1/L)``, the predicted factors, the spectral norm of
  the Jacobian product for one example, and the agreement of the hand-derived gradients with jax.grad.
  """
  with jax.enable_x64(True):
    return _measure_mlp(depth, width, hidden, activation, batch, seed, check)


def _measure_mlp(
  depth: int, width: int, hidden: int, activation: str, batch: int, seed: int, check: bool
) -> list[dict[str, Any]]:
  """:func:`measure_mlp` under x64."""
  kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
  params = residual_unit.init_stack(kp, depth, width, hidden, dtype=jnp.float64)
  x = jax.random.normal(kx, (batch, width), jnp.float64)
  y = jax.random.normal(ky, (batch, width), jnp.float64)
  records = []
  for shortcut in (False, True):
    t0 = time.perf_counter()
    g = stack_gradient_norms(params, x, y, shortcut, activation, check=check)
    xs = g.pop("layer_inputs")
    pred = predicted_factors(params, xs, shortcut, activation)
    log_in = g["log10_input_grad"]
    drop = log_in[0] - log_in[-1]
    records.append(
      {
        "net": "residual" if shortcut else "plain",
        "depth": depth,
        "width": width,
        "hidden": hidden,
        "activation": activation,
        "batch": batch,
        "seed": seed,
        **g,
        "log10_first_over_last": drop,
        "measured_factor": 10 ** (drop / depth) if math.isfinite(drop) else 0.0,
        "predicted_typical_factor": pred["typical_gmean"],
        "predicted_bound_factor": pred["bound_gmean"],
        "jacobian_norm_factor": pred["jacobian_gmean"],
        "predicted_typical_per_unit": pred["typical"],
        "jacobian_norm_per_unit": pred["jacobian"],
        "log10_jacobian_product_norm": log10_product_norm(params, xs, shortcut, activation),
        "seconds": time.perf_counter() - t0,
      }
    )
  return records


# ----------------------------------------------------------------------------------------------
# Conv nets from the registry: jax.grad with respect to the per-block input perturbations


def _block_items(tree, prefix: str = "") -> list[tuple[str, Any]]:
  """(name, array) for every perturbation named ``blockNN`` anywhere in a nested dict, in order."""
  items = []
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      items.extend(_block_items(value, f"{prefix}{key}/"))
    elif str(key).startswith("block"):
      items.append((f"{prefix}{key}", value))
  return sorted(items, key=lambda kv: kv[0].rsplit("/", 1)[-1])


def measure_conv(depth: int, batch: int, size: int, seed: int) -> list[dict[str, Any]]:
  """Per-block gradient norms ``||dL/d(block input)||`` of ``plain{depth}`` and ``resnet{depth}``.

  Random CIFAR-shaped images (``batch, size, size, 3``) and labels, softmax cross-entropy, BatchNorm
  in training mode (batch statistics, as in training), ``zero_init_residual=False`` for both so that
  the two nets have the same weights. The gradients are ``jax.grad`` with respect to the
  ``perturbations`` collection that each block's input is routed through.
  """
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, size, size, 3), jnp.float32)
  labels = jax.random.randint(ky, (batch,), 0, 10)
  records = []
  for shortcut in (False, True):
    name = f"{'resnet' if shortcut else 'plain'}{depth}"
    model = create_model(name, num_classes=10, zero_init_residual=False)
    variables = model.init(kp, x, train=False)
    rest = {k: v for k, v in variables.items() if k != "perturbations"}
    perturbations = zero_perturbations(model, rest, x, train=False)
    if not _block_items(perturbations):
      raise ConfigError(
        f"model {name!r} exposes no 'blockNN' perturbations: its blocks need "
        "self.perturb('blockNN', x) to measure per-block gradients"
      )

    def loss_fn(perturbations, rest=rest, model=model):
      logits, _ = model.apply({**rest, "perturbations": perturbations}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    t0 = time.perf_counter()
    grads = jax.jit(jax.grad(loss_fn))(perturbations)
    items = _block_items(grads)
    log_norms = [log10_norm(v) for _, v in items]
    records.append(
      {
        "model": name,
        "net": "residual" if shortcut else "plain",
        "depth": depth,
        "batch": batch,
        "size": size,
        "seed": seed,
        "blocks": [k for k, _ in items],
        "log10_block_input_grad": log_norms,
        "log10_first_over_last": log_norms[0] - log_norms[-1],
        "seconds": time.perf_counter() - t0,
      }
    )
  return records
