"""Gradient flow through plain and residual networks: measured, predicted from the Jacobians, and drawn.

``python -m resnet_jax.gradflow`` answers three questions for a plain network and its residual twin
(same layers, shortcut switched off):

1. How large is the gradient that reaches every layer at initialisation? For the stacks of the seed's
   residual unit (``x_{l+1} = x_l + H_l(x_l)`` against the plain ``x_{l+1} = H_l(x_l)``) it runs the
   hand-derived backward pass :func:`resnet_jax.residual.manual_stack_grads` and checks it against
   ``jax.grad``; for the convolutional CIFAR nets of the registry (``plainN`` against ``resnetN``) it
   takes ``jax.grad`` with respect to the per-block input perturbations (flax ``Module.perturb``).
2. What does the algebra predict? The error signal (a row vector ``g`` per example) crosses unit ``l``
   as ``g -> g J_l`` in the plain stack and ``g -> g (I + J_l)`` in the residual one, with
   ``J_l = W2_l diag(sigma'(z_l)) W1_l``. Per unit the plain stack therefore multiplies the gradient
   norm by at most ``||W1_l||_2 ||W2_l||_2 sup sigma'`` (``sup sigmoid' = 1/4``) and typically by
   ``q_l = ||W1_l||_F ||W2_l||_F rms(sigma'(z_l)) / sqrt(dim * hidden)`` (random-matrix estimate);
   the residual stack typically by ``sqrt(1 + q_l^2)`` (at least 1 on average, but not a bound either way:
   ``||I + J_l||_2`` can exceed 1 by ``||J_l||_2``, and the product of L such factors grows exponentially).
3. Does it matter for training? Plain and residual MLPs of growing depth are trained on the digits
   for the same budget; their training and test errors are reported by depth (the degradation
   problem of He et al. 2015).

Outputs: a table on stdout, ``OUT/results.json``, ``OUT/grad_norms.png`` and ``OUT/degradation.png``.
``--explosion`` runs only the weight-scale study of :mod:`resnet_jax.explosion` (vanishing and explosion
over a gain axis, and the remedies), writing ``OUT/explosion.json`` and ``OUT/explosion.png``;
``--block-orders`` only the bottleneck-ordering ablation on the digits and :func:`xor_halves`
(``OUT/block_orders.json``).
Deep plain stacks push the gradient far below the float range (below 10^-550 at 500 sigmoid units),
so the backward pass runs in float64 over chunks of units, each chunk restarted from a unit-norm
error with its log10 scale carried along (exact: the backward pass is linear in the error).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from resnet_jax.errors import ConfigError, run_cli

DEFAULT_DEPTHS = (10, 20, 50, 100, 200, 500)
DEFAULT_CONV_DEPTHS = (20, 56)
DEFAULT_TRAIN_DEPTHS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_GAINS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
DEFAULT_EXPLOSION_DEPTHS = (10, 50, 100)
# Upper bound of |sigma'| for each activation: the per-unit factor that no weight scale can change.
SIGMA_PRIME_SUP = {"sigmoid": 0.25, "tanh": 1.0, "relu": 1.0}
# Units per backward chunk: the gradient inside one chunk stays far inside float64's range.
CHUNK = 25


@dataclasses.dataclass(frozen=True)
class GradflowConfig:
  """Settings of one ``gradflow`` run (see ``python -m resnet_jax.gradflow --help``)."""
  depths: tuple[int, ...] = DEFAULT_DEPTHS
  width: int = 16
  hidden: int = 32
  activation: str = "sigmoid"
  batch: int = 64
  seed: int = 0
  out: str = "gradflow_out"
  conv_depths: tuple[int, ...] = DEFAULT_CONV_DEPTHS
  conv_batch: int = 8
  conv_size: int = 32
  train_depths: tuple[int, ...] = DEFAULT_TRAIN_DEPTHS
  train_steps: int = 400
  train_batch: int = 128
  train_width: int = 32
  train_hidden: int = 32
  train_activation: str = "relu"
  train_lr: float = 0.05
  skip_conv: bool = False
  skip_train: bool = False
  explosion: bool = False
  block_orders: bool = False
  gains: tuple[float, ...] = DEFAULT_GAINS
  explosion_depths: tuple[int, ...] = DEFAULT_EXPLOSION_DEPTHS
  explosion_batch: int = 16
  remedy_gain: float = 3.0


# ----------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str, flag: str, minimum: int = 1) -> tuple[int, ...]:
  """Parse ``"10,20,50"`` into positive ints; a bad entry is a ConfigError naming the flag."""
  items = [t.strip() for t in str(text).split(",") if t.strip()]
  if not items:
    raise ConfigError(f"{flag}: expected a comma-separated list of integers, got {text!r}")
  values = []
  for item in items:
    try:
      value = int(item)
    except ValueError:
      raise ConfigError(f"{flag}: {item!r} is not an integer (expected e.g. 10,20,50)") from None
    if value < minimum:
      raise ConfigError(f"{flag}: every value must be >= {minimum}, got {value}")
    values.append(value)
  return tuple(values)


def _float_list(text: str, flag: str) -> tuple[float, ...]:
  """Parse ``"0.5,1,2"`` into positive finite floats; a bad entry is a ConfigError naming the flag."""
  items = [t.strip() for t in str(text).split(",") if t.strip()]
  if not items:
    raise ConfigError(f"{flag}: expected a comma-separated list of numbers, got {text!r}")
  values = []
  for item in items:
    try:
      value = float(item)
    except ValueError:
      raise ConfigError(f"{flag}: {item!r} is not a number (expected e.g. 0.5,1,2)") from None
    if not (value > 0 and math.isfinite(value)):
      raise ConfigError(f"{flag}: every value must be a positive number, got {item}")
    values.append(value)
  return tuple(values)


class _Parser(argparse.ArgumentParser):
  """argparse that raises ConfigError (one line, exit 2 through run_cli) instead of printing usage."""

  def error(self, message: str) -> None:  # type: ignore[override]
    raise ConfigError(f"gradflow: {message} (see python -m resnet_jax.gradflow --help)")


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser of ``python -m resnet_jax.gradflow``."""
  d = GradflowConfig()
  p = _Parser(prog="python -m resnet_jax.gradflow",
              description="Gradient norms by layer in plain vs residual networks, the Jacobian-product "
                          "prediction, and the degradation problem on the digits.")
  p.add_argument("--depths", default=",".join(map(str, d.depths)),
                 help="MLP stack depths in residual units (default %(default)s)")
  p.add_argument("--width", type=int, default=d.width, help="dim of x in the MLP stacks (default %(default)s)")
  p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size of each unit (default %(default)s)")
  p.add_argument("--activation", default=d.activation,
                 help="sigma of the MLP stacks: sigmoid, tanh or relu (default %(default)s)")
  p.add_argument("--batch", type=int, default=d.batch, help="examples in the MLP measurement (default %(default)s)")
  p.add_argument("--seed", type=int, default=d.seed, help="PRNG seed of weights and data (default %(default)s)")
  p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
  p.add_argument("--conv-depths", default=",".join(map(str, d.conv_depths)),
                 help="CIFAR conv net depths 6n+2: plainN vs resnetN (default %(default)s)")
  p.add_argument("--conv-batch", type=int, default=d.conv_batch, help="images in the conv measurement")
  p.add_argument("--conv-size", type=int, default=d.conv_size, help="image side of the conv measurement")
  p.add_argument("--train-depths", default=",".join(map(str, d.train_depths)),
                 help="MLP depths (units) trained on the digits (default %(default)s)")
  p.add_argument("--train-steps", type=int, default=d.train_steps,
                 help="SGD steps per trained net: the fixed budget (default %(default)s)")
  p.add_argument("--train-batch", type=int, default=d.train_batch, help="training batch size")
  p.add_argument("--train-width", type=int, default=d.train_width, help="dim of the trained MLPs")
  p.add_argument("--train-hidden", type=int, default=d.train_hidden, help="hidden size of the trained MLPs")
  p.add_argument("--train-activation", default=d.train_activation,
                 help="sigma of the trained MLPs (default %(default)s)")
  p.add_argument("--train-lr", type=float, default=d.train_lr, help="SGD (momentum 0.9) learning rate")
  p.add_argument("--skip-conv", action="store_true", help="skip the conv-net gradient measurement")
  p.add_argument("--skip-train", action="store_true", help="skip the degradation training")
  p.add_argument("--explosion", action="store_true",
                 help="run only the explosion study (weight-scale axis, remedies): writes explosion.json and "
                      "explosion.png into --out, with --width, --hidden and --seed")
  p.add_argument("--block-orders", action="store_true",
                 help="run only the bottleneck ordering ablation (v1, relu_before_add, literal_bottleneck trained on "
                      "the digits and on the XOR of two image halves for --train-steps steps): writes "
                      "block_orders.json into --out")
  p.add_argument("--gains", default=",".join(map(str, d.gains)),
                 help="explosion study: weight gains, multiplying W1 and W2 of the default init (default %(default)s)")
  p.add_argument("--explosion-depths", default=",".join(map(str, d.explosion_depths)),
                 help="explosion study: stack depths in units (default %(default)s)")
  p.add_argument("--explosion-batch", type=int, default=d.explosion_batch,
                 help="explosion study: examples (>= 2, BatchNorm's batch) (default %(default)s)")
  p.add_argument("--remedy-gain", type=float, default=d.remedy_gain,
                 help="explosion study: the gain at which the remedies are measured, ReLU (default %(default)s)")
  return p


def parse_args(argv: Sequence[str] | None = None) -> GradflowConfig:
  """Parse and validate the command line; every bad value raises ConfigError naming the flag."""
  a = build_parser().parse_args(argv)
  for name in ("activation", "train_activation"):
    value = getattr(a, name)
    if value not in SIGMA_PRIME_SUP:
      raise ConfigError(f"--{name.replace('_', '-')}: unknown activation {value!r}; "
                        f"expected one of {', '.join(SIGMA_PRIME_SUP)}")
  for name in ("width", "hidden", "batch", "conv_batch", "train_batch", "train_width", "train_hidden"):
    if getattr(a, name) < 1:
      raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(a, name)}")
  if a.conv_batch < 2:
    raise ConfigError(f"--conv-batch: BatchNorm needs at least 2 images, got {a.conv_batch}")
  if a.conv_size < 8:
    raise ConfigError(f"--conv-size: CIFAR nets downsample 4x; expected >= 8, got {a.conv_size}")
  if a.train_steps < 0:
    raise ConfigError(f"--train-steps: must be >= 0, got {a.train_steps}")
  if not (a.train_lr > 0 and math.isfinite(a.train_lr)):
    raise ConfigError(f"--train-lr: must be a positive number, got {a.train_lr}")
  conv_depths = _int_list(a.conv_depths, "--conv-depths", minimum=8)
  for depth in conv_depths:
    if (depth - 2) % 6:
      raise ConfigError(f"--conv-depths: CIFAR ResNet depths are 6n+2 (20, 32, 44, 56, 110), got {depth}")
  if a.explosion and a.block_orders:
    raise ConfigError("--explosion and --block-orders: each runs one study alone, give at most one of them")
  if a.explosion_batch < 2:
    raise ConfigError(f"--explosion-batch: BatchNorm needs at least 2 examples, got {a.explosion_batch}")
  remedy_gain = _float_list(str(a.remedy_gain), "--remedy-gain")[0]
  if os.path.exists(a.out) and not os.path.isdir(a.out):
    raise ConfigError(f"--out: {a.out!r} exists and is not a folder")
  os.makedirs(a.out, exist_ok=True)  # A read-only or full --out fails here (an OSError naming the
  try:                                # folder: one line via run_cli), not after the computing.
    with tempfile.TemporaryFile(dir=a.out):
      pass
  except OSError as e:
    raise OSError(e.errno, e.strerror, a.out) from None
  return GradflowConfig(
      depths=_int_list(a.depths, "--depths"), width=a.width, hidden=a.hidden, activation=a.activation,
      batch=a.batch, seed=a.seed, out=a.out, conv_depths=conv_depths, conv_batch=a.conv_batch,
      conv_size=a.conv_size, train_depths=_int_list(a.train_depths, "--train-depths"),
      train_steps=a.train_steps, train_batch=a.train_batch, train_width=a.train_width,
      train_hidden=a.train_hidden, train_activation=a.train_activation, train_lr=a.train_lr,
      skip_conv=a.skip_conv, skip_train=a.skip_train, explosion=a.explosion, block_orders=a.block_orders,
      gains=_float_list(a.gains, "--gains"), explosion_depths=_int_list(a.explosion_depths, "--explosion-depths"),
      explosion_batch=a.explosion_batch, remedy_gain=remedy_gain)


# ----------------------------------------------------------------------------------------------
# The analytic part: per-unit Jacobians of the seed's unit


def _sigma(activation: str):
  """sigma of an activation name, taken from :data:`resnet_jax.residual.ACTIVATIONS`."""
  from resnet_jax import residual
  entry = residual.ACTIVATIONS[activation]
  return entry[0] if isinstance(entry, (tuple, list)) else entry


def sigma_prime(z, activation: str):
  """Elementwise sigma'(z) at pre-activations ``z`` (a forward-mode derivative of sigma itself)."""
  import jax
  import jax.numpy as jnp
  return jax.jvp(_sigma(activation), (z,), (jnp.ones_like(z),))[1]


def layer_inputs(params: list[dict], x, residual: bool, activation: str) -> list:
  """``[x_0, ..., x_L]``: the input of every unit and the stack's output ``x_L = y_hat``.

  Each step is :func:`resnet_jax.residual.stack_forward` on a one-unit stack, so the plain and
  residual recursions are exactly the library's.
  """
  from resnet_jax import residual as res
  xs = [x]
  for p in params:
    xs.append(res.stack_forward([p], xs[-1], residual=residual, activation=activation))
  return xs


def unit_jacobians(p: dict, x, activation: str):
  """Per-example Jacobian of the branch, ``J = W2 diag(sigma'(z)) W1`` with ``z = x W1^T + 1 b1^T``.

  Shape ``(batch, dim, dim)``. A row-vector error ``g`` at the unit's output becomes ``g J`` at its
  input through the branch; the unit's full backward map is ``J`` (plain) or ``I + J`` (residual).
  """
  import jax.numpy as jnp
  z = x @ p["w1"].T + p["b1"]
  s = sigma_prime(z, activation)                       # (B, hidden)
  return jnp.einsum("dh,bh,hk->bdk", p["w2"], s, p["w1"])


def predicted_factors(params: list[dict], xs: list, residual: bool, activation: str) -> dict[str, Any]:
  """Per-unit factors by which the gradient norm is predicted to change, input side over output side.

  - ``bound``: ``||W1||_2 ||W2||_2 sup|sigma'|`` (plain) or ``1 + that`` (residual): no input can do worse.
  - ``typical``: ``q = ||W1||_F ||W2||_F rms(sigma'(z)) / sqrt(dim hidden)`` (plain), the gain of a
    random error direction through iid-like weights; ``sqrt(1 + q^2)`` for the residual unit, whose
    error keeps its identity path and gains the branch in quadrature.
  - ``jacobian``: the spectral norm ``||J_l||_2`` (plain) or ``||I + J_l||_2`` (residual), measured per
    example and averaged in log over the batch.
  Returns lists (one value per unit, input side first) and their geometric means.
  """
  import jax.numpy as jnp
  sup = SIGMA_PRIME_SUP[activation]
  bound, typical, jac = [], [], []
  for p, x in zip(params, xs[:-1]):
    hidden, dim = p["w1"].shape
    z = x @ p["w1"].T + p["b1"]
    rms = jnp.sqrt(jnp.mean(sigma_prime(z, activation) ** 2))
    spec = jnp.linalg.norm(p["w1"], 2) * jnp.linalg.norm(p["w2"], 2) * sup
    q = jnp.linalg.norm(p["w1"]) * jnp.linalg.norm(p["w2"]) * rms / math.sqrt(dim * hidden)
    j = unit_jacobians(p, x, activation)
    if residual:
      j = j + jnp.eye(dim, dtype=j.dtype)
    sv = jnp.linalg.svd(j, compute_uv=False)[:, 0]
    bound.append(float(1 + spec if residual else spec))
    typical.append(float(jnp.sqrt(1 + q * q) if residual else q))
    jac.append(float(jnp.exp(jnp.mean(jnp.log(sv)))))

  def gmean(v: list[float]) -> float:
    return float(np.exp(np.mean(np.log(np.maximum(v, 1e-300)))))
  return {"bound": bound, "typical": typical, "jacobian": jac,
          "bound_gmean": gmean(bound), "typical_gmean": gmean(typical), "jacobian_gmean": gmean(jac)}


def log10_product_norm(params: list[dict], xs: list, residual: bool, activation: str,
                       example: int = 0) -> float:
  """log10 of ``||J_{L-1} ... J_0||_2`` (plain) or ``||(I+J_{L-1}) ... (I+J_0)||_2`` for one example.

  The product maps the error at the output to the error at the input (row vectors on the left). It is
  accumulated from the output side with its spectral norm divided out after every unit, so no depth
  underflows; the log10 scale is carried separately.
  """
  import jax.numpy as jnp
  dim = xs[0].shape[-1]
  prod = jnp.eye(dim, dtype=xs[0].dtype)
  scale = 0.0
  for p, x in reversed(list(zip(params, xs[:-1]))):
    j = unit_jacobians(p, x[example:example + 1], activation)[0]
    if residual:
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


def _max_rel_diff(a, b) -> float:
  """max |a - b| / max |b| over a pytree's leaves (leaves with b == 0 everywhere compare absolutely)."""
  import jax
  worst = 0.0
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    ref = float(np.max(np.abs(v))) if v.size else 0.0
    diff = float(np.max(np.abs(u - v))) if v.size else 0.0
    worst = max(worst, diff / ref if ref > 0 else diff)
  return worst


def stack_gradient_norms(params: list[dict], x, y, residual: bool, activation: str,
                         chunk: int = CHUNK, check: bool = True) -> dict[str, Any]:
  """log10 norms of the gradient reaching every unit, from :func:`residual.manual_stack_grads`.

  Returns ``log10_input_grad`` (length L+1: ``||dL/dx_l||`` for l = 0..L-1, then ``||dL/dy_hat||``),
  ``log10_param_grad`` (length L: ``||dL/d(w1, b1, w2, b2)_l||``), and ``max_rel_diff_vs_jax``: the
  largest relative difference between the hand-derived gradients (every unit's parameters and the
  chunk input) and ``jax.grad`` of :func:`residual.stack_loss` on the same chunk (``nan`` if unchecked).

  The stack is walked from the output in chunks of ``chunk`` units. The last chunk gets the real
  targets ``y``. An earlier chunk ending at ``x_e`` must receive the error ``g`` that reached ``x_e``;
  since ``stack_loss`` is a mean of ``1/2 ||y_hat - y||^2``, its output error is ``(y_hat - y) / B``,
  so targets ``y' = x_e - B g / ||g||`` hand it the unit-norm error ``g / ||g||`` and the chunk's
  gradients come out divided by ``||g||``, whose log10 is added back. The backward pass is linear in
  the error, so this is exact up to rounding and never underflows.
  """
  import jax
  import jax.numpy as jnp
  from resnet_jax import residual as res
  depth = len(params)
  batch = x.shape[0]
  xs = layer_inputs(params, x, residual, activation)
  log_in = [0.0] * (depth + 1)
  log_par = [0.0] * depth
  delta = (xs[-1] - y) / batch
  log_in[depth] = math.log10(float(jnp.linalg.norm(delta)))
  worst = 0.0
  grad_fn = jax.grad(res.stack_loss, argnums=(0, 1))
  targets, scale = y, 0.0
  end = depth
  while end > 0:
    start = max(0, end - chunk)
    sub = params[start:end]
    g = res.manual_stack_grads(sub, xs[start], targets, residual=residual, activation=activation)
    for i, gi in enumerate(g["inputs"]):
      log_in[start + i] = scale + _log10_norm(gi)
    for i, gp in enumerate(g["params"]):
      log_par[start + i] = scale + _log10_norm(jax.tree.leaves(gp))
    if check:
      ref_params, ref_x = grad_fn(sub, xs[start], targets, residual=residual, activation=activation)
      worst = max(worst, _max_rel_diff((g["params"], g["x"]), (ref_params, ref_x)))
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
  return {"log10_input_grad": log_in, "log10_param_grad": log_par,
          "max_rel_diff_vs_jax": worst if check else float("nan"), "layer_inputs": xs}


def _log10_norm(arrays) -> float:
  """log10 of the Euclidean norm of one array or a list of arrays (-inf for zero)."""
  if not isinstance(arrays, (list, tuple)):
    arrays = [arrays]
  sq = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays)
  return 0.5 * math.log10(sq) if sq > 0 else -math.inf


def measure_mlp(depth: int, width: int, hidden: int, activation: str, batch: int, seed: int,
                check: bool = True) -> list[dict[str, Any]]:
  """Gradient flow through a plain stack of ``depth`` units and its residual twin (same weights).

  Runs in float64 (x64 is enabled inside). Data: ``x, y ~ N(0, 1)`` of shape ``(batch, width)``.
  Returns two records (plain, residual) with the measured log10 gradient norms per unit, the measured
  per-unit factor ``(||dL/dx_0|| / ||dL/dy_hat||)^(1/L)``, the predicted factors, the spectral norm of
  the Jacobian product for one example, and the agreement of the hand-derived gradients with jax.grad.
  """
  import jax
  with jax.enable_x64(True):
    return _measure_mlp(depth, width, hidden, activation, batch, seed, check)


def _measure_mlp(depth: int, width: int, hidden: int, activation: str, batch: int, seed: int,
                 check: bool) -> list[dict[str, Any]]:
  """:func:`measure_mlp` under x64."""
  import jax
  import jax.numpy as jnp
  from resnet_jax import residual as res
  kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
  params = res.init_stack(kp, depth, width, hidden, dtype=jnp.float64)
  x = jax.random.normal(kx, (batch, width), jnp.float64)
  y = jax.random.normal(ky, (batch, width), jnp.float64)
  records = []
  for residual in (False, True):
    t0 = time.perf_counter()
    g = stack_gradient_norms(params, x, y, residual, activation, check=check)
    xs = g.pop("layer_inputs")
    pred = predicted_factors(params, xs, residual, activation)
    log_in = g["log10_input_grad"]
    drop = log_in[0] - log_in[-1]
    records.append({
        "net": "residual" if residual else "plain", "depth": depth, "width": width, "hidden": hidden,
        "activation": activation, "batch": batch, "seed": seed,
        **g,
        "log10_first_over_last": drop,
        "measured_factor": 10 ** (drop / depth) if math.isfinite(drop) else 0.0,
        "predicted_typical_factor": pred["typical_gmean"],
        "predicted_bound_factor": pred["bound_gmean"],
        "jacobian_norm_factor": pred["jacobian_gmean"],
        "predicted_typical_per_unit": pred["typical"],
        "jacobian_norm_per_unit": pred["jacobian"],
        "log10_jacobian_product_norm": log10_product_norm(params, xs, residual, activation),
        "seconds": time.perf_counter() - t0,
    })
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
  import jax
  import jax.numpy as jnp
  import optax
  from resnet_jax.models import create_model, zero_perturbations
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, size, size, 3), jnp.float32)
  labels = jax.random.randint(ky, (batch,), 0, 10)
  records = []
  for residual in (False, True):
    name = f"{'resnet' if residual else 'plain'}{depth}"
    model = create_model(name, num_classes=10, zero_init_residual=False)
    variables = model.init(kp, x, train=False)
    rest = {k: v for k, v in variables.items() if k != "perturbations"}
    perturbations = zero_perturbations(model, rest, x, train=False)
    if not _block_items(perturbations):
      raise ConfigError(f"model {name!r} exposes no 'blockNN' perturbations: its blocks need "
                        "self.perturb('blockNN', x) to measure per-block gradients")

    def loss_fn(perturbations, rest=rest, model=model):
      logits, _ = model.apply({**rest, "perturbations": perturbations}, x, train=True,
                              mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    t0 = time.perf_counter()
    grads = jax.jit(jax.grad(loss_fn))(perturbations)
    items = _block_items(grads)
    log_norms = [_log10_norm(v) for _, v in items]
    records.append({
        "model": name, "net": "residual" if residual else "plain", "depth": depth, "batch": batch,
        "size": size, "seed": seed, "blocks": [k for k, _ in items], "log10_block_input_grad": log_norms,
        "log10_first_over_last": log_norms[0] - log_norms[-1], "seconds": time.perf_counter() - t0})
  return records


# ----------------------------------------------------------------------------------------------
# Degradation: plain vs residual MLPs of growing depth trained on the digits for the same budget


def train_digits(depth: int, residual: bool, cfg: GradflowConfig, data=None) -> dict[str, Any]:
  """Train ``residual_mlp`` (depth units, shortcut on or off) on the digits; return its errors.

  SGD with momentum 0.9 at ``cfg.train_lr``, gradients clipped to global norm 1, for ``cfg.train_steps``
  steps of ``cfg.train_batch`` examples (the same budget, data order and initial weights for the plain
  and the residual twin), softmax cross-entropy. The errors are measured on the whole training and test
  sets after the budget; the gradient norms of the input layer (``embed``) and of the classifier
  (``head``) on the first batch, before any step, show how much signal reaches the bottom at the start.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from resnet_jax.datasets import digits_split
  from resnet_jax.models import create_model
  x_tr, y_tr, x_te, y_te = data if data is not None else digits_split(seed=0)
  model = create_model("residual_mlp", num_classes=10, depth=depth, dim=cfg.train_width,
                       hidden=cfg.train_hidden, activation=cfg.train_activation, residual=residual)
  key = jax.random.key(cfg.seed)
  variables = model.init(key, jnp.asarray(x_tr[:2]), train=False)
  params = variables["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(cfg.train_lr, momentum=0.9))
  opt_state = tx.init(params)

  def loss_fn(params, xb, yb):
    logits = model.apply({"params": params}, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def errors(params, xb, yb):
    logits = model.apply({"params": params}, xb, train=False)
    return jnp.mean(jnp.argmax(logits, -1) != yb), optax.softmax_cross_entropy_with_integer_labels(
        logits, yb).mean()

  rng = np.random.default_rng(cfg.seed)
  n = len(x_tr)
  bs = min(cfg.train_batch, n)
  t0 = time.perf_counter()
  order = rng.permutation(n)
  init_grads = jax.grad(loss_fn)(params, x_tr[order[:bs]], y_tr[order[:bs]])
  pos = 0
  loss = float("nan")
  for _ in range(cfg.train_steps):
    if pos + bs > n:
      order, pos = rng.permutation(n), 0
    idx = order[pos:pos + bs]
    pos += bs
    params, opt_state, loss = step(params, opt_state, x_tr[idx], y_tr[idx])
  train_err, train_loss = errors(params, x_tr, y_tr)
  test_err, test_loss = errors(params, x_te, y_te)
  return {"net": "residual" if residual else "plain", "depth": depth, "steps": cfg.train_steps,
          "train_error": float(train_err), "test_error": float(test_err),
          "train_loss": float(train_loss), "test_loss": float(test_loss),
          "log10_embed_grad_at_init": _log10_norm(jax.tree.leaves(init_grads["embed"])),
          "log10_head_grad_at_init": _log10_norm(jax.tree.leaves(init_grads["head"])),
          "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# Block orderings of the bottleneck on the digits: why the ReLUs are not optional

# (block_order, zero_init_residual, task): every ordering from the same initialisation on the digits and on
# the two-halves XOR task (:func:`xor_halves`), and ReLU-before-add with the last BN's gamma at 0, whose
# branches then never train (relu'(0) = 0 stops every gradient to them).
BLOCK_ORDERS = (("v1", False, "digits"), ("relu_before_add", False, "digits"), ("literal_bottleneck", False, "digits"),
                ("v1", False, "xor"), ("relu_before_add", False, "xor"), ("literal_bottleneck", False, "xor"),
                ("relu_before_add", True, "digits"))


def xor_halves(n_train: int = 2048, n_test: int = 512, seed: int = 0):
  """8x8 images: rows 0-2 are ``a``, rows 5-7 are ``b``, rows 3-4 are 0, plus N(0, 0.3^2) noise on every
  pixel; ``a, b ~ N(0, 1)``; label 1 where ``a b > 0``. No 3x3 patch sees both ``a`` and ``b``, and each alone
  says nothing about the label, so any sum of functions of 3x3 patches (a linear map of one 3x3 conv layer's
  features) is at chance, 50%; a net that combines the halves nonlinearly is not. Returns
  ``(x_train, y_train, x_test, y_test)`` like :func:`resnet_jax.datasets.digits_split`.
  """
  rng = np.random.default_rng(seed)
  n = n_train + n_test
  a, b = rng.standard_normal(n), rng.standard_normal(n)
  x = np.zeros((n, 8, 8, 1), np.float32)
  x[:, :3] = a[:, None, None, None]
  x[:, 5:] = b[:, None, None, None]
  x += 0.3 * rng.standard_normal(x.shape).astype(np.float32)
  y = (a * b > 0).astype(np.int32)
  return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train_block_order(order: str, steps: int = 300, batch: int = 64, lr: float = 0.05, num_filters: int = 8,
                      seed: int = 0, data=None, zero_init_residual: bool = False) -> dict[str, Any]:
  """Train ``resnet50`` (16 bottlenecks, CIFAR stem, ``num_filters``) with ``block_order=order`` on the digits.

  SGD with momentum 0.9, ``steps`` steps of ``batch`` images, the same initial key and data order for every
  ordering (``data``: ``(x_train, y_train, x_test, y_test)``, default the digits); errors on the whole training
  and test sets in evaluation mode (running BN statistics). Also
  measures, in evaluation mode, how far the map from the first block's input to the logits is from affine:
  ``||f(a + b) - f(a) - f(b) + f(0)|| / ||f(a + b) - f(0)||`` for random perturbations ``a, b`` of that input
  (``jax.grad``-style ``perturbations`` collection), 0 up to rounding for an affine stack.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from resnet_jax.datasets import digits_split
  from resnet_jax.models import create_model, zero_perturbations
  x_tr, y_tr, x_te, y_te = data if data is not None else digits_split(seed=0)
  model = create_model("resnet50", num_classes=10, stem="cifar", num_filters=num_filters, block_order=order,
                       zero_init_residual=zero_init_residual)
  variables = model.init(jax.random.key(seed), jnp.asarray(x_tr[:2]), train=False)
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(lr, momentum=0.9)
  opt_state = tx.init(params)

  def loss_fn(params, stats, xb, yb):
    logits, upd = model.apply({"params": params, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd["batch_stats"]

  @jax.jit
  def step(params, stats, opt_state, xb, yb):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  @jax.jit
  def error(params, stats, xb, yb):
    logits = model.apply({"params": params, "batch_stats": stats}, xb, train=False)
    return jnp.mean(jnp.argmax(logits, -1) != yb)

  rng = np.random.default_rng(seed)
  n = len(x_tr)
  t0 = time.perf_counter()
  order_idx, pos, loss = rng.permutation(n), 0, float("nan")
  for _ in range(steps):
    if pos + batch > n:
      order_idx, pos = rng.permutation(n), 0
    idx = order_idx[pos:pos + batch]
    pos += batch
    params, stats, opt_state, loss = step(params, stats, opt_state, x_tr[idx], y_tr[idx])
  final = {"params": params, "batch_stats": stats}
  xb = jnp.asarray(x_te[:64])
  zeros = zero_perturbations(model, final, xb)
  first = sorted(zeros)[0]

  def logits_at(p):
    return model.apply({**final, "perturbations": {**zeros, first: p}}, xb, train=False)
  ka, kb = jax.random.split(jax.random.key(seed + 1))
  shape = zeros[first].shape
  a, b = jax.random.normal(ka, shape), jax.random.normal(kb, shape)
  f0, fa, fb, fab = (logits_at(v) for v in (jnp.zeros(shape), a, b, a + b))
  defect = float(jnp.linalg.norm(fab - fa - fb + f0) / jnp.linalg.norm(fab - f0))
  n_params = sum(int(np.size(v)) for v in jax.tree.leaves(params))
  return {"order": order, "zero_init_residual": zero_init_residual, "model": "resnet50",
          "num_filters": num_filters, "parameters": n_params,
          "steps": steps, "batch": batch, "lr": lr, "seed": seed, "final_batch_loss": float(loss),
          "train_error": float(error(params, stats, x_tr, y_tr)),
          "test_error": float(error(params, stats, x_te, y_te)),
          "eval_nonlinearity": defect, "seconds": time.perf_counter() - t0}


def run_block_orders(out: str, steps: int = 300, seed: int = 0, log=None) -> dict[str, Any]:
  """Every ordering of :data:`BLOCK_ORDERS` trained by :func:`train_block_order`; writes ``block_orders.json``."""
  import jax
  from resnet_jax.datasets import digits_split
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  data = {"digits": digits_split(seed=0), "xor": xor_halves(seed=seed)}
  t0 = time.perf_counter()
  records = []
  for order, zero_init, task in BLOCK_ORDERS:
    log(f"gradflow: training resnet50 (num_filters 8) with block_order={order!r}, "
        f"zero_init_residual={zero_init} on {task}")
    records.append({"task": task, **train_block_order(order, steps=steps, seed=seed, data=data[task],
                                                      zero_init_residual=zero_init)})
  results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                         "backend": jax.default_backend()},
             "block_orders": records, "seconds": time.perf_counter() - t0}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "block_orders.json"), "w") as f:
    json.dump(_json_safe(results), f, indent=1, allow_nan=False)
  return results


def format_block_orders(results: dict[str, Any]) -> str:
  """The stdout table of :func:`run_block_orders`."""
  head = (f"{'block_order':>20} {'zero_init':>9} {'task':>7} {'params':>8} {'train err %':>11} {'test err %':>10} "
          f"{'eval nonlinearity':>17}")
  lines = ["Bottleneck orderings, resnet50 (num_filters 8, CIFAR stem), on the digits and the XOR of two halves",
           head, "-" * len(head)]
  for r in results["block_orders"]:
    lines.append(f"{r['order']:>20} {str(r['zero_init_residual']):>9} {r['task']:>7} "
                 f"{r['parameters']:>8} {100 * r['train_error']:>11.2f} "
                 f"{100 * r['test_error']:>10.2f} {r['eval_nonlinearity']:>17.2e}")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Table and plots


def format_tables(results: dict[str, Any]) -> str:
  """The stdout report: one table per part."""
  lines = []
  cfg = results["config"]
  if results.get("mlp"):
    lines.append(f"Gradient flow at initialisation, MLP stacks of the residual unit "
                 f"(width {cfg['width']}, hidden {cfg['hidden']}, {cfg['activation']}, batch {cfg['batch']}, "
                 f"float64; factor = per-unit ratio input-side/output-side of the gradient norm)")
    head = (f"{'depth':>5} {'net':>8} {'log10|dL/dx0|':>13} {'log10|dL/dy|':>12} {'first/last':>10} "
            f"{'measured':>8} {'typical':>8} {'||J||2':>8} {'bound':>8} {'log10||prodJ||':>14} {'hand-vs-jax':>11}")
    lines += [head, "-" * len(head)]
    for r in results["mlp"]:
      lines.append(
          f"{r['depth']:>5} {r['net']:>8} {r['log10_input_grad'][0]:>13.2f} {r['log10_input_grad'][-1]:>12.2f} "
          f"{_fmt_ratio(r['log10_first_over_last']):>10} {r['measured_factor']:>8.3f} "
          f"{r['predicted_typical_factor']:>8.3f} {r['jacobian_norm_factor']:>8.3f} "
          f"{r['predicted_bound_factor']:>8.3f} {r['log10_jacobian_product_norm']:>14.2f} "
          f"{r['max_rel_diff_vs_jax']:>11.1e}")
    lines.append("")
  if results.get("conv"):
    lines.append(f"Gradient at each block input, CIFAR conv nets (jax.grad w.r.t. perturbations, "
                 f"BN in training mode, batch {cfg['conv_batch']}, {cfg['conv_size']}x{cfg['conv_size']})")
    head = f"{'model':>9} {'blocks':>6} {'log10|first|':>12} {'log10|last|':>11} {'first/last':>10} {'min/max':>8}"
    lines += [head, "-" * len(head)]
    for r in results["conv"]:
      v = r["log10_block_input_grad"]
      lines.append(f"{r['model']:>9} {len(v):>6} {v[0]:>12.2f} {v[-1]:>11.2f} "
                   f"{_fmt_ratio(r['log10_first_over_last']):>10} {_fmt_ratio(min(v) - max(v)):>8}")
    lines.append("")
  if results.get("train"):
    lines.append(f"Degradation on the digits: {cfg['train_steps']} SGD steps (batch {cfg['train_batch']}, "
                 f"lr {cfg['train_lr']}, momentum 0.9, clip 1), residual_mlp width {cfg['train_width']}, "
                 f"hidden {cfg['train_hidden']}, {cfg['train_activation']}; errors in %")
    head = (f"{'units':>5} {'plain train':>11} {'plain test':>10} {'resid train':>11} {'resid test':>10} "
            f"{'log10|g_embed| at init: plain':>30} {'resid':>6}")
    lines += [head, "-" * len(head)]
    by = {(r["depth"], r["net"]): r for r in results["train"]}
    for depth in cfg["train_depths"]:
      p, q = by[(depth, "plain")], by[(depth, "residual")]
      lines.append(f"{depth:>5} {100 * p['train_error']:>11.1f} {100 * p['test_error']:>10.1f} "
                   f"{100 * q['train_error']:>11.1f} {100 * q['test_error']:>10.1f} "
                   f"{_fmt_log(p['log10_embed_grad_at_init']):>30} {_fmt_log(q['log10_embed_grad_at_init']):>6}")
    lines.append("")
  return "\n".join(lines)


def _fmt_log(log10_value: float) -> str:
  """A log10 value with two decimals; ``0`` (a gradient that underflowed to exactly zero) as ``-inf``."""
  return f"{log10_value:.2f}" if math.isfinite(log10_value) else str(log10_value)


def _fmt_ratio(log10_value: float) -> str:
  """A ratio given by its log10, as ``1e-35`` style text."""
  if not math.isfinite(log10_value):
    return "0" if log10_value < 0 else "inf"
  return f"1e{log10_value:+.1f}" if abs(log10_value) >= 2 else f"{10 ** log10_value:.3g}"


def plot_grad_norms(results: dict[str, Any], path: str) -> None:
  """``grad_norms.png``: log10 gradient norm by layer, one line per depth; plain | residual | conv."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = 3 if results.get("conv") else 2
  fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
  cfg = results["config"]
  cmap = plt.get_cmap("viridis")
  depths = sorted({r["depth"] for r in results["mlp"]})
  for ax, net in zip(axes[:2], ("plain", "residual")):
    for i, depth in enumerate(depths):
      r = next(r for r in results["mlp"] if r["net"] == net and r["depth"] == depth)
      v = np.array(r["log10_input_grad"])
      ax.plot(np.arange(len(v)), v, color=cmap(i / max(1, len(depths) - 1)), label=f"L={depth}")
    ax.set_title(f"{net} stack, {cfg['activation']}: ||dL/dx_l||")
    ax.set_xlabel("unit l (0 = input, L = output)")
    ax.set_ylabel("log10 gradient norm")
    if net == "residual":
      lo, hi = ax.get_ylim()
      ax.set_ylim(min(lo, -2.0), max(hi, 2.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if panels == 3:
    ax = axes[2]
    for r in results["conv"]:
      v = np.array(r["log10_block_input_grad"])
      ax.plot(np.arange(len(v)), v, ls="-" if r["net"] == "residual" else "--", marker=".",
              label=r["model"])
    ax.set_title("CIFAR conv nets (BN, train mode): ||dL/d block input||")
    ax.set_xlabel("block (0 = first)")
    ax.set_ylabel("log10 gradient norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"Gradient norm reaching each layer at initialisation (width {cfg['width']}, "
               f"hidden {cfg['hidden']}, batch {cfg['batch']}, seed {cfg['seed']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_degradation(results: dict[str, Any], path: str) -> None:
  """``degradation.png``: training and test error after the fixed budget, by depth, plain vs residual."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cfg = results["config"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  axes[1].sharey(axes[0])
  for ax, key in zip(axes, ("train_error", "test_error")):
    for net, style in (("plain", "o--"), ("residual", "s-")):
      rs = sorted((r for r in results["train"] if r["net"] == net), key=lambda r: r["depth"])
      ax.plot([r["depth"] for r in rs], [100 * r[key] for r in rs], style, label=net)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth (residual units, 2 weight layers each)")
    ax.set_title(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_ylabel("error (%)")
  ax = axes[2]
  for net, style in (("plain", "o--"), ("residual", "s-")):
    rs = sorted((r for r in results["train"] if r["net"] == net), key=lambda r: r["depth"])
    v = [r["log10_embed_grad_at_init"] for r in rs]
    ax.plot([r["depth"] for r in rs], [x if math.isfinite(x) else np.nan for x in v], style, label=net)
    for r, x in zip(rs, v):
      if not math.isfinite(x):
        ax.annotate("0 (underflow)", (r["depth"], ax.get_ylim()[0]), fontsize=8, ha="center")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("depth (residual units)")
  ax.set_ylabel("log10 ||dL/d embed||")
  ax.set_title("gradient at the input layer, first batch, before training")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.suptitle(f"Digits, {cfg['train_steps']} SGD steps each ({cfg['train_activation']}, "
               f"width {cfg['train_width']}, lr {cfg['train_lr']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_explosion_table(results: dict[str, Any]) -> str:
  """The stdout report of the explosion study: one row per stack, log10 of the first/last gradient ratio."""
  cfg = results["config"]
  lines = [f"Vanishing and explosion over the weight gain (width {cfg['width']}, hidden {cfg['hidden']}, "
           f"batch {cfg['explosion_batch']}, float64): log10 ||dL/dx_0|| / ||dL/dx_L|| measured, and predicted by "
           f"||prod M_l||_2, the typical sum log10(||M_l||_F/sqrt(n)) and the bound sum log10 ||M_l||_2 "
           f"(M_l = J_l or I + J_l); fwd = log10 rms(x_L)/rms(x_0)"]
  head = (f"{'activation':>10} {'gain':>5} {'net':>28} {'depth':>5} {'measured':>9} {'||prod||':>9} "
          f"{'typical':>9} {'bound':>9} {'fwd':>8}")
  lines += [head, "-" * len(head)]
  for r in results["explosion"]:
    lines.append(f"{r['activation']:>10} {r['gain']:>5g} {r['net']:>28} {r['depth']:>5} "
                 f"{_fmt_log(r['log10_first_over_last']):>9} {_fmt_log(r['log10_product_norm']):>9} "
                 f"{_fmt_log(r['log10_typical']):>9} {_fmt_log(r['log10_bound']):>9} {_fmt_log(r['log10_forward']):>8}")
  return "\n".join(lines) + "\n"


def plot_explosion(results: dict[str, Any], path: str) -> None:
  """``explosion.png``: first/last gradient ratio over the gain (plain | residual), the remedies' profiles,
  and the ratio over depth; measured as markers and solid lines, the product-norm prediction dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cfg = results["config"]
  recs = results["explosion"]
  deepest = max(r["depth"] for r in recs)
  fig, axes = plt.subplots(2, 2, figsize=(12, 9))
  colors = {"sigmoid": "tab:blue", "tanh": "tab:orange", "relu": "tab:green"}
  for ax, net in zip(axes[0], ("plain", "residual")):
    for act, color in colors.items():
      rs = sorted((r for r in recs if r["net"] == net and r["activation"] == act and r["depth"] == deepest),
                  key=lambda r: r["gain"])
      if not rs:
        continue
      gains = [r["gain"] for r in rs]
      ax.plot(gains, [_finite(r["log10_first_over_last"]) for r in rs], "o-", color=color, label=f"{act} measured")
      ax.plot(gains, [_finite(r["log10_product_norm"]) for r in rs], "--", color=color,
              label=f"{act} ||prod M_l||_2")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("gain (W1, W2 = gain x default init)")
    ax.set_ylabel(f"log10 ||dL/dx_0|| / ||dL/dx_L||, depth {deepest}")
    ax.set_title(f"{net} stack: {'prod J_l' if net == 'plain' else 'prod (I + J_l)'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  ax = axes[1][0]
  remedy_names = [r["net"] for r in recs if r["gain"] == cfg["remedy_gain"] and r["activation"] == "relu"
                  and r["depth"] == deepest]
  cmap = plt.get_cmap("tab10")
  for i, name in enumerate(dict.fromkeys(remedy_names)):
    r = next(r for r in recs if r["net"] == name and r["gain"] == cfg["remedy_gain"]
             and r["activation"] == "relu" and r["depth"] == deepest)
    prof = r["profile"]
    dist = np.arange(len(prof["log10_grad"]))[::-1]          # units between x_l and the output
    ax.plot(dist, [_finite(v) for v in prof["log10_grad"]], "-", color=cmap(i), label=name)
    ax.plot(dist, [_finite(v) for v in prof["log10_product"]], "--", color=cmap(i), lw=0.8)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xlabel("units between x_l and the output (L - l)")
  ax.set_ylabel("log10 ||dL/dx_l|| / ||dL/dx_L||")
  ax.set_title(f"remedies, ReLU, gain {cfg['remedy_gain']:g}: measured (solid), ||prod||_2 (dashed)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax = axes[1][1]
  gains = sorted({r["gain"] for r in recs if r["net"] in ("plain", "residual")})
  for i, gain in enumerate(gains):
    for net, style in (("plain", "o--"), ("residual", "s-")):
      rs = sorted((r for r in recs if r["net"] == net and r["activation"] == "relu" and r["gain"] == gain),
                  key=lambda r: r["depth"])
      ax.plot([r["depth"] for r in rs], [_finite(r["log10_first_over_last"]) for r in rs], style,
              color=plt.get_cmap("viridis")(i / max(1, len(gains) - 1)),
              label=f"gain {gain:g}" if net == "residual" else None)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xlabel("depth L (units)")
  ax.set_ylabel("log10 ||dL/dx_0|| / ||dL/dx_L||")
  ax.set_title("ReLU over depth: residual (solid), plain (dashed)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.suptitle(f"Vanishing and explosion at initialisation (width {cfg['width']}, hidden {cfg['hidden']}, "
               f"batch {cfg['explosion_batch']}, seed {cfg['seed']}, float64)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _finite(value):
  """A log10 value for plotting: non-finite (an exactly zero gradient) as NaN, so it is left out."""
  return value if value is not None and math.isfinite(value) else np.nan


def run_explosion(cfg: GradflowConfig, log=None) -> dict[str, Any]:
  """The explosion study alone: write ``explosion.json`` and ``explosion.png`` into ``cfg.out``."""
  import jax
  from resnet_jax import explosion
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  t_start = time.perf_counter()
  results: dict[str, Any] = {
      "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                 if k in ("width", "hidden", "seed", "out", "gains", "explosion_depths", "explosion_batch",
                          "remedy_gain")},
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                  "backend": jax.default_backend()},
      "explosion": explosion.study(cfg.gains, cfg.explosion_depths, cfg.width, cfg.hidden, cfg.explosion_batch,
                                   cfg.seed, remedy_gain=cfg.remedy_gain, log=log)}
  results["seconds"] = time.perf_counter() - t_start
  os.makedirs(cfg.out, exist_ok=True)
  with open(os.path.join(cfg.out, "explosion.json"), "w") as f:
    json.dump(_json_safe(results), f, indent=1, allow_nan=False)
  plot_explosion(results, os.path.join(cfg.out, "explosion.png"))
  return results


# ----------------------------------------------------------------------------------------------
# Entry point


def run(cfg: GradflowConfig, log=None) -> dict[str, Any]:
  """Run every part of ``cfg``; write ``results.json`` and the plots into ``cfg.out``; return results."""
  import jax
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  t_start = time.perf_counter()
  results: dict[str, Any] = {
      "config": dataclasses.asdict(cfg),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                  "backend": jax.default_backend()},
      "mlp": [], "conv": [], "train": []}
  for depth in cfg.depths:
    log(f"gradflow: MLP stacks, depth {depth}")
    results["mlp"] += measure_mlp(depth, cfg.width, cfg.hidden, cfg.activation, cfg.batch, cfg.seed)
  if not cfg.skip_conv:
    for depth in cfg.conv_depths:
      log(f"gradflow: conv nets plain{depth} / resnet{depth}")
      results["conv"] += measure_conv(depth, cfg.conv_batch, cfg.conv_size, cfg.seed)
  if not cfg.skip_train:
    from resnet_jax.datasets import digits_split
    data = digits_split(seed=0)
    for depth in cfg.train_depths:
      for residual in (False, True):
        log(f"gradflow: training {'residual' if residual else 'plain'} MLP, {depth} units")
        results["train"].append(train_digits(depth, residual, cfg, data))
  results["seconds"] = time.perf_counter() - t_start
  os.makedirs(cfg.out, exist_ok=True)
  with open(os.path.join(cfg.out, "results.json"), "w") as f:
    json.dump(_json_safe(results), f, indent=1, allow_nan=False)
  plot_grad_norms(results, os.path.join(cfg.out, "grad_norms.png"))
  if results["train"]:
    plot_degradation(results, os.path.join(cfg.out, "degradation.png"))
  return results


def _json_safe(value):
  """A copy of ``value`` that strict JSON accepts: numpy scalars as numbers, non-finite floats as ``null``.

  A ``null`` log10 norm means the gradient was exactly zero (underflowed) or not finite.
  """
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m resnet_jax.gradflow``: print the tables and write results.json + the two plots."""
  cfg = parse_args(argv)
  if cfg.block_orders:
    results = run_block_orders(cfg.out, steps=cfg.train_steps, seed=cfg.seed)
    print(format_block_orders(results))
    print(f"wrote {os.path.join(cfg.out, 'block_orders.json')} in {results['seconds']:.0f} s")
    return 0
  if cfg.explosion:
    results = run_explosion(cfg)
    print(format_explosion_table(results))
    print(f"wrote {os.path.join(cfg.out, 'explosion.json')}, explosion.png in {results['seconds']:.0f} s")
    return 0
  results = run(cfg)
  print(format_tables(results))
  print(f"wrote {os.path.join(cfg.out, 'results.json')}, grad_norms.png"
        f"{', degradation.png' if results['train'] else ''} in {results['seconds']:.0f} s")
  return 0


if __name__ == "__main__":
  run_cli(main)
