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
   the residual stack typically by ``sqrt(1 + q_l^2)``, never forced below 1 by the product.
3. Does it matter for training? Plain and residual MLPs of growing depth are trained on the digits
   for the same budget; their training and test errors are reported by depth (the degradation
   problem of He et al. 2015).

Outputs: a table on stdout, ``OUT/results.json``, ``OUT/grad_norms.png`` and ``OUT/degradation.png``.
Deep plain stacks push the gradient far below the float range (about 10^-350 at 500 sigmoid units),
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
      skip_conv=a.skip_conv, skip_train=a.skip_train)


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
  from resnet_jax.data import digits_split
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
    from resnet_jax.data import digits_split
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
  results = run(cfg)
  print(format_tables(results))
  print(f"wrote {os.path.join(cfg.out, 'results.json')}, grad_norms.png"
        f"{', degradation.png' if results['train'] else ''} in {results['seconds']:.0f} s")
  return 0


if __name__ == "__main__":
  run_cli(main)
