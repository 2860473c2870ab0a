"""Gradient flow through plain and residual networks: measured, predicted from the Jacobians, and drawn.

usage: python experiments/gradient_flow.py [--out DIR] [--depths 10,20,...] [--skip-conv] [--skip-train]
           [--explosion | --block-orders] [options: --help]

Answers three questions for a plain network and its residual twin (same layers, shortcut switched off),
with the mathematics of :mod:`resnet_jax.gradient_flow`:

1. How large is the gradient that reaches every layer at initialisation? For the stacks of the seed's
   residual unit (``x_{l+1} = x_l + H_l(x_l)`` against the plain ``x_{l+1} = H_l(x_l)``) it runs the
   hand-derived backward pass and checks it against ``jax.grad`` (:func:`resnet_jax.gradient_flow.measure_mlp`);
   for the convolutional CIFAR nets of the registry (``plainN`` against ``resnetN``) it takes ``jax.grad``
   with respect to the per-block input perturbations (:func:`resnet_jax.gradient_flow.measure_conv`).
2. What does the algebra predict? The per-unit factors of the Jacobians ``J_l`` (plain) and ``I + J_l``
   (residual), their bound and their product (:func:`resnet_jax.gradient_flow.predicted_factors`).
3. Does it matter for training? Plain and residual MLPs of growing depth are trained on the digits
   for the same budget with the library's training step; their training and test errors are reported by
   depth (the degradation problem of He et al. 2015).

Outputs: a table on stdout, ``OUT/results.json``, ``OUT/grad_norms.png`` and ``OUT/degradation.png``.
``--explosion`` runs only the weight-scale study of :mod:`resnet_jax.explosion` (vanishing and explosion
over a gain axis, and the remedies), writing ``OUT/explosion.json`` and ``OUT/explosion.png``;
``--block-orders`` only the bottleneck-ordering ablation on the digits and :func:`xor_halves`
(``OUT/block_orders.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repository, from a clone.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from resnet_jax import errors, explosion, machine, optim, train_step  # noqa: E402
from resnet_jax.config_check import base_config  # noqa: E402
from resnet_jax.datasets import digits_split  # noqa: E402
from resnet_jax.errors import ConfigError, run_cli  # noqa: E402
from resnet_jax.gradient_flow import SIGMA_PRIME_SUP, log10_norm, measure_conv, measure_mlp  # noqa: E402
from resnet_jax.metrics import strict_json  # noqa: E402
from resnet_jax.models import create_model, zero_perturbations  # noqa: E402

DEFAULT_DEPTHS = (10, 20, 50, 100, 200, 500)
DEFAULT_CONV_DEPTHS = (20, 56)
DEFAULT_TRAIN_DEPTHS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_GAINS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
DEFAULT_EXPLOSION_DEPTHS = (10, 50, 100)
NUM_CLASSES = 10
USAGE = (
  "usage: python experiments/gradient_flow.py [--out DIR] [--depths N,N,...] [--skip-conv] [--skip-train] "
  "[--explosion | --block-orders] (all options: --help)"
)


@dataclasses.dataclass(frozen=True)
class GradflowConfig:
  """Settings of one run of the study (see ``python experiments/gradient_flow.py --help``)."""

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
  """Parse ``"10,20,50"`` into ints >= ``minimum``; a bad entry is a ConfigError naming the flag."""
  return _number_list(
    text,
    flag,
    int,
    ("an integer", "integers", "10,20,50"),
    lambda item, value: None if value >= minimum else f">= {minimum}, got {value}",
  )


def _float_list(text: str, flag: str) -> tuple[float, ...]:
  """Parse ``"0.5,1,2"`` into positive finite floats; a bad entry is a ConfigError naming the flag."""
  return _number_list(
    text,
    flag,
    float,
    ("a number", "numbers", "0.5,1,2"),
    lambda item, value: None if value > 0 and math.isfinite(value) else f"a positive number, got {item}",
  )


def _number_list(text: str, flag: str, convert, words: tuple[str, str, str], problem) -> tuple:
  """Parse a comma-separated list with ``convert``; ``words``: (one, several, an example) for the messages;
  ``problem(item, value)``: what a valid value must be, or None when it is valid."""
  one, several, example = words
  items = [t.strip() for t in str(text).split(",") if t.strip()]
  if not items:
    raise ConfigError(f"{flag}: expected a comma-separated list of {several}, got {text!r}")
  values = []
  for item in items:
    try:
      value = convert(item)
    except ValueError:
      raise ConfigError(f"{flag}: {item!r} is not {one} (expected e.g. {example})") from None
    must = problem(item, value)
    if must:
      raise ConfigError(f"{flag}: every value must be {must}")
    values.append(value)
  return tuple(values)


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser of ``python experiments/gradient_flow.py``."""
  d = GradflowConfig()
  p = argparse.ArgumentParser(
    prog="python experiments/gradient_flow.py",
    description="Gradient norms by layer in plain vs residual networks, the Jacobian-"
    "product prediction, and the degradation problem on the digits.",
  )
  p.add_argument(
    "--depths", default=",".join(map(str, d.depths)), help="MLP stack depths in residual units (default %(default)s)"
  )
  p.add_argument("--width", type=int, default=d.width, help="dim of x in the MLP stacks (default %(default)s)")
  p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size of each unit (default %(default)s)")
  p.add_argument(
    "--activation", default=d.activation, help="sigma of the MLP stacks: sigmoid, tanh or relu (default %(default)s)"
  )
  p.add_argument("--batch", type=int, default=d.batch, help="examples in the MLP measurement (default %(default)s)")
  p.add_argument("--seed", type=int, default=d.seed, help="PRNG seed of weights and data (default %(default)s)")
  p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
  p.add_argument(
    "--conv-depths",
    default=",".join(map(str, d.conv_depths)),
    help="CIFAR conv net depths 6n+2: plainN vs resnetN (default %(default)s)",
  )
  p.add_argument("--conv-batch", type=int, default=d.conv_batch, help="images in the conv measurement")
  p.add_argument("--conv-size", type=int, default=d.conv_size, help="image side of the conv measurement")
  p.add_argument(
    "--train-depths",
    default=",".join(map(str, d.train_depths)),
    help="MLP depths (units) trained on the digits (default %(default)s)",
  )
  p.add_argument(
    "--train-steps",
    type=int,
    default=d.train_steps,
    help="SGD steps per trained net: the fixed budget (default %(default)s)",
  )
  p.add_argument("--train-batch", type=int, default=d.train_batch, help="training batch size")
  p.add_argument("--train-width", type=int, default=d.train_width, help="dim of the trained MLPs")
  p.add_argument("--train-hidden", type=int, default=d.train_hidden, help="hidden size of the trained MLPs")
  p.add_argument(
    "--train-activation", default=d.train_activation, help="sigma of the trained MLPs (default %(default)s)"
  )
  p.add_argument("--train-lr", type=float, default=d.train_lr, help="SGD (momentum 0.9) learning rate")
  p.add_argument("--skip-conv", action="store_true", help="skip the conv-net gradient measurement")
  p.add_argument("--skip-train", action="store_true", help="skip the degradation training")
  p.add_argument(
    "--explosion",
    action="store_true",
    help="run only the explosion study (weight-scale axis, remedies): writes explosion.json and "
    "explosion.png into --out, with --width, --hidden and --seed",
  )
  p.add_argument(
    "--block-orders",
    action="store_true",
    help="run only the bottleneck ordering ablation (v1, relu_before_add, literal_bottleneck trained on "
    "the digits and on the XOR of two image halves for --train-steps steps): writes "
    "block_orders.json into --out",
  )
  p.add_argument(
    "--gains",
    default=",".join(map(str, d.gains)),
    help="explosion study: weight gains, multiplying W1 and W2 of the default init (default %(default)s)",
  )
  p.add_argument(
    "--explosion-depths",
    default=",".join(map(str, d.explosion_depths)),
    help="explosion study: stack depths in units (default %(default)s)",
  )
  p.add_argument(
    "--explosion-batch",
    type=int,
    default=d.explosion_batch,
    help="explosion study: examples (>= 2, BatchNorm's batch) (default %(default)s)",
  )
  p.add_argument(
    "--remedy-gain",
    type=float,
    default=d.remedy_gain,
    help="explosion study: the gain at which the remedies are measured, ReLU (default %(default)s)",
  )
  return p


def parse_args(argv: Sequence[str] | None = None) -> GradflowConfig:
  """Parse and validate the command line; every bad value raises ConfigError naming the flag."""
  a = errors.parse_args(build_parser(), argv, USAGE)
  for name in ("activation", "train_activation"):
    value = getattr(a, name)
    if value not in SIGMA_PRIME_SUP:
      raise ConfigError(
        f"--{name.replace('_', '-')}: unknown activation {value!r}; expected one of {', '.join(SIGMA_PRIME_SUP)}"
      )
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
  try:  # folder: one line via run_cli), not after the computing.
    with tempfile.TemporaryFile(dir=a.out):
      pass
  except OSError as e:
    raise OSError(e.errno, e.strerror, a.out) from None
  return GradflowConfig(
    depths=_int_list(a.depths, "--depths"),
    width=a.width,
    hidden=a.hidden,
    activation=a.activation,
    batch=a.batch,
    seed=a.seed,
    out=a.out,
    conv_depths=conv_depths,
    conv_batch=a.conv_batch,
    conv_size=a.conv_size,
    train_depths=_int_list(a.train_depths, "--train-depths"),
    train_steps=a.train_steps,
    train_batch=a.train_batch,
    train_width=a.train_width,
    train_hidden=a.train_hidden,
    train_activation=a.train_activation,
    train_lr=a.train_lr,
    skip_conv=a.skip_conv,
    skip_train=a.skip_train,
    explosion=a.explosion,
    block_orders=a.block_orders,
    gains=_float_list(a.gains, "--gains"),
    explosion_depths=_int_list(a.explosion_depths, "--explosion-depths"),
    explosion_batch=a.explosion_batch,
    remedy_gain=remedy_gain,
  )


# ----------------------------------------------------------------------------------------------
# Degradation: plain vs residual MLPs of growing depth trained on the digits for the same budget


def batch_indices(rng: np.random.Generator, n: int, batch: int, steps: int) -> list[np.ndarray]:
  """The example indices of ``steps`` batches of ``batch``: a fresh permutation of the ``n`` examples of
  ``rng`` whenever the current one has fewer than ``batch`` left (the rest is dropped)."""
  order, pos, batches = rng.permutation(n), 0, []
  for _ in range(steps):
    if pos + batch > n:
      order, pos = rng.permutation(n), 0
    batches.append(order[pos : pos + batch])
    pos += batch
  return batches


def sgd_with_clipping(learning_rate: float) -> optax.GradientTransformation:
  """The library's SGD (momentum 0.9, no weight decay) at a constant ``learning_rate``, after clipping the
  gradients to global norm 1."""
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optim.make_optimizer(_sgd_config(learning_rate), optax.constant_schedule(learning_rate)),
  )


def train_digits(depth: int, residual: bool, cfg: GradflowConfig, data=None) -> dict[str, Any]:
  """Train ``residual_mlp`` (depth units, shortcut on or off) on the digits; return its errors.

  The library's training step (:func:`resnet_jax.train_step.make_train_step`: softmax cross-entropy) with
  :func:`sgd_with_clipping` at ``cfg.train_lr``, for ``cfg.train_steps`` steps of ``cfg.train_batch`` examples
  (the same budget, data order and initial weights for the plain and the residual twin). The errors are
  measured on the whole training and test sets after the budget; the gradient norms of the input layer
  (``embed``) and of the classifier (``head``) on the first batch, before any step, show how much signal
  reaches the bottom at the start.
  """
  x_tr, y_tr, x_te, y_te = data if data is not None else digits_split(seed=0)
  model = create_model(
    "residual_mlp",
    num_classes=NUM_CLASSES,
    depth=depth,
    dim=cfg.train_width,
    hidden=cfg.train_hidden,
    activation=cfg.train_activation,
    residual=residual,
  )
  state = train_step.create_train_state(
    model, sgd_with_clipping(cfg.train_lr), x_tr.shape[1:], jax.random.key(cfg.seed)
  )
  step = jax.jit(train_step.make_train_step(NUM_CLASSES))
  t0 = time.perf_counter()
  batches = batch_indices(
    np.random.default_rng(cfg.seed), len(x_tr), min(cfg.train_batch, len(x_tr)), max(cfg.train_steps, 1)
  )
  init_grads = _loss_grads(state, x_tr[batches[0]], y_tr[batches[0]])
  for idx in batches[: cfg.train_steps]:
    state, _ = step(state, {"image": x_tr[idx], "label": y_tr[idx]})
  train_err, train_loss = _errors(state, x_tr, y_tr)
  test_err, test_loss = _errors(state, x_te, y_te)
  return {
    "net": "residual" if residual else "plain",
    "depth": depth,
    "steps": cfg.train_steps,
    "train_error": train_err,
    "test_error": test_err,
    "train_loss": train_loss,
    "test_loss": test_loss,
    "log10_embed_grad_at_init": log10_norm(jax.tree.leaves(init_grads["embed"])),
    "log10_head_grad_at_init": log10_norm(jax.tree.leaves(init_grads["head"])),
    "seconds": time.perf_counter() - t0,
  }


def _sgd_config(learning_rate: float):
  """The training config's optimizer section for plain SGD with momentum 0.9 and no weight decay."""
  config = base_config()
  config.optimizer.name, config.optimizer.learning_rate = "sgd", learning_rate
  config.optimizer.momentum, config.optimizer.weight_decay = 0.9, 0.0
  return config


def _loss_grads(state: train_step.TrainState, images: np.ndarray, labels: np.ndarray) -> Any:
  """The gradient of the training step's loss (mean cross-entropy) with respect to the parameters."""

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images, train=True)
    return train_step.cross_entropy(logits, labels, NUM_CLASSES).mean()

  return jax.grad(loss_fn)(state.params)


def _errors(state: train_step.TrainState, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """(error rate, mean cross-entropy) on a whole set in one batch, with the library's evaluation step."""
  sums = jax.jit(train_step.make_eval_step(NUM_CLASSES))(
    state, {"image": images, "label": labels, "mask": np.ones(len(labels), np.float32)}
  )
  count = float(sums["count"])
  return 1.0 - float(sums["correct"]) / count, float(sums["loss"]) / count


# ----------------------------------------------------------------------------------------------
# Block orderings of the bottleneck on the digits: why the ReLUs are not optional

# the two-halves XOR task (:func:`xor_halves`), and ReLU-before-add with the last BN's gamma at 0, whose
# branches then never train (relu'(0) = 0 stops every gradient to them).
BLOCK_ORDERS = (
  ("v1", False, "digits"),
  ("relu_before_add", False, "digits"),
  ("literal_bottleneck", False, "digits"),
  ("v1", False, "xor"),
  ("relu_before_add", False, "xor"),
  ("literal_bottleneck", False, "xor"),
  ("relu_before_add", True, "digits"),
)


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


def train_block_order(
  order: str,
  steps: int = 300,
  batch: int = 64,
  lr: float = 0.05,
  num_filters: int = 8,
  seed: int = 0,
  data=None,
  zero_init_residual: bool = False,
) -> dict[str, Any]:
  """Train ``resnet50`` (16 bottlenecks, CIFAR stem, ``num_filters``) with ``block_order=order`` on the digits.

  The library's training step (:func:`resnet_jax.train_step.make_train_step`: softmax cross-entropy, batch
  statistics) with SGD, momentum 0.9, no weight decay, ``steps`` steps of ``batch`` images, the same initial
  key and data order for every ordering (``data``: ``(x_train, y_train, x_test, y_test)``, default the
  digits); errors on the whole training and test sets in evaluation mode (running BN statistics), and
  :func:`eval_nonlinearity` of the trained net.
  """
  x_tr, y_tr, x_te, y_te = data if data is not None else digits_split(seed=0)
  model = create_model(
    "resnet50",
    num_classes=NUM_CLASSES,
    stem="cifar",
    num_filters=num_filters,
    block_order=order,
    zero_init_residual=zero_init_residual,
  )
  tx = optim.make_optimizer(_sgd_config(lr), optax.constant_schedule(lr))
  state = train_step.create_train_state(model, tx, x_tr.shape[1:], jax.random.key(seed))
  step = jax.jit(train_step.make_train_step(NUM_CLASSES, skip_nonfinite=False))
  t0 = time.perf_counter()
  metrics = {"loss": float("nan")}
  for idx in batch_indices(np.random.default_rng(seed), len(x_tr), batch, steps):
    state, metrics = step(state, {"image": x_tr[idx], "label": y_tr[idx]})
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  defect = eval_nonlinearity(model, variables, jnp.asarray(x_te[:64]), seed)
  return {
    "order": order,
    "zero_init_residual": zero_init_residual,
    "model": "resnet50",
    "num_filters": num_filters,
    "parameters": train_step.count_parameters(state.params),
    "steps": steps,
    "batch": batch,
    "lr": lr,
    "seed": seed,
    "final_batch_loss": float(metrics["loss"]),
    "train_error": _errors(state, x_tr, y_tr)[0],
    "test_error": _errors(state, x_te, y_te)[0],
    "eval_nonlinearity": defect,
    "seconds": time.perf_counter() - t0,
  }


def eval_nonlinearity(model, variables: dict, images: jax.Array, seed: int) -> float:
  """How far the map from the first block's input to the logits is from affine, in evaluation mode:
  ``||f(a + b) - f(a) - f(b) + f(0)|| / ||f(a + b) - f(0)||`` for random perturbations ``a, b`` of that input
  (the ``perturbations`` collection), 0 up to rounding for an affine stack."""
  zeros = zero_perturbations(model, variables, images)
  first = sorted(zeros)[0]

  def logits_at(p):
    return model.apply({**variables, "perturbations": {**zeros, first: p}}, images, train=False)

  ka, kb = jax.random.split(jax.random.key(seed + 1))
  shape = zeros[first].shape
  a, b = jax.random.normal(ka, shape), jax.random.normal(kb, shape)
  f0, fa, fb, fab = (logits_at(v) for v in (jnp.zeros(shape), a, b, a + b))
  return float(jnp.linalg.norm(fab - fa - fb + f0) / jnp.linalg.norm(fab - f0))


def run_block_orders(out: str, steps: int = 300, seed: int = 0, log=None) -> dict[str, Any]:
  """Every ordering of :data:`BLOCK_ORDERS` trained by :func:`train_block_order`; writes ``block_orders.json``."""
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  data = {"digits": digits_split(seed=0), "xor": xor_halves(seed=seed)}
  t0 = time.perf_counter()
  records = []
  for order, zero_init, task in BLOCK_ORDERS:
    log(
      f"gradflow: training resnet50 (num_filters 8) with block_order={order!r}, "
      f"zero_init_residual={zero_init} on {task}"
    )
    records.append(
      {"task": task, **train_block_order(order, steps=steps, seed=seed, data=data[task], zero_init_residual=zero_init)}
    )
  results = {
    "machine": machine.describe(),
    "block_orders": records,
    "seconds": time.perf_counter() - t0,
  }
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "block_orders.json"), "w") as f:
    json.dump(strict_json(results), f, indent=1, allow_nan=False)
  return results


def format_block_orders(results: dict[str, Any]) -> str:
  """The stdout table of :func:`run_block_orders`."""
  head = (
    f"{'block_order':>20} {'zero_init':>9} {'task':>7} {'params':>8} {'train err %':>11} {'test err %':>10} "
    f"{'eval nonlinearity':>17}"
  )
  lines = [
    "Bottleneck orderings, resnet50 (num_filters 8, CIFAR stem), on the digits and the XOR of two halves",
    head,
    "-" * len(head),
  ]
  for r in results["block_orders"]:
    lines.append(
      f"{r['order']:>20} {str(r['zero_init_residual']):>9} {r['task']:>7} "
      f"{r['parameters']:>8} {100 * r['train_error']:>11.2f} "
      f"{100 * r['test_error']:>10.2f} {r['eval_nonlinearity']:>17.2e}"
    )
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Table and plots


def format_tables(results: dict[str, Any]) -> str:
  """The stdout report: one table per part."""
  lines = []
  cfg = results["config"]
  if results.get("mlp"):
    lines.append(
      f"Gradient flow at initialisation, MLP stacks of the residual unit "
      f"(width {cfg['width']}, hidden {cfg['hidden']}, {cfg['activation']}, batch {cfg['batch']}, "
      f"float64; factor = per-unit ratio input-side/output-side of the gradient norm)"
    )
    head = (
      f"{'depth':>5} {'net':>8} {'log10|dL/dx0|':>13} {'log10|dL/dy|':>12} {'first/last':>10} "
      f"{'measured':>8} {'typical':>8} {'||J||2':>8} {'bound':>8} {'log10||prodJ||':>14} {'hand-vs-jax':>11}"
    )
    lines += [head, "-" * len(head)]
    for r in results["mlp"]:
      lines.append(
        f"{r['depth']:>5} {r['net']:>8} {r['log10_input_grad'][0]:>13.2f} {r['log10_input_grad'][-1]:>12.2f} "
        f"{_fmt_ratio(r['log10_first_over_last']):>10} {r['measured_factor']:>8.3f} "
        f"{r['predicted_typical_factor']:>8.3f} {r['jacobian_norm_factor']:>8.3f} "
        f"{r['predicted_bound_factor']:>8.3f} {r['log10_jacobian_product_norm']:>14.2f} "
        f"{r['max_rel_diff_vs_jax']:>11.1e}"
      )
    lines.append("")
  if results.get("conv"):
    lines.append(
      f"Gradient at each block input, CIFAR conv nets (jax.grad w.r.t. perturbations, "
      f"BN in training mode, batch {cfg['conv_batch']}, {cfg['conv_size']}x{cfg['conv_size']})"
    )
    head = f"{'model':>9} {'blocks':>6} {'log10|first|':>12} {'log10|last|':>11} {'first/last':>10} {'min/max':>8}"
    lines += [head, "-" * len(head)]
    for r in results["conv"]:
      v = r["log10_block_input_grad"]
      lines.append(
        f"{r['model']:>9} {len(v):>6} {v[0]:>12.2f} {v[-1]:>11.2f} "
        f"{_fmt_ratio(r['log10_first_over_last']):>10} {_fmt_ratio(min(v) - max(v)):>8}"
      )
    lines.append("")
  if results.get("train"):
    lines.append(
      f"Degradation on the digits: {cfg['train_steps']} SGD steps (batch {cfg['train_batch']}, "
      f"lr {cfg['train_lr']}, momentum 0.9, clip 1), residual_mlp width {cfg['train_width']}, "
      f"hidden {cfg['train_hidden']}, {cfg['train_activation']}; errors in %"
    )
    head = (
      f"{'units':>5} {'plain train':>11} {'plain test':>10} {'resid train':>11} {'resid test':>10} "
      f"{'log10|g_embed| at init: plain':>30} {'resid':>6}"
    )
    lines += [head, "-" * len(head)]
    by = {(r["depth"], r["net"]): r for r in results["train"]}
    for depth in cfg["train_depths"]:
      p, q = by[(depth, "plain")], by[(depth, "residual")]
      lines.append(
        f"{depth:>5} {100 * p['train_error']:>11.1f} {100 * p['test_error']:>10.1f} "
        f"{100 * q['train_error']:>11.1f} {100 * q['test_error']:>10.1f} "
        f"{_fmt_log(p['log10_embed_grad_at_init']):>30} {_fmt_log(q['log10_embed_grad_at_init']):>6}"
      )
    lines.append("")
  return "\n".join(lines)


def _fmt_log(log10_value: float) -> str:
  """A log10 value with two decimals; ``0`` (a gradient that underflowed to exactly zero) as ``-inf``."""
  return f"{log10_value:.2f}" if math.isfinite(log10_value) else str(log10_value)


def _fmt_ratio(log10_value: float) -> str:
  """A ratio given by its log10, as ``1e-35`` style text."""
  if not math.isfinite(log10_value):
    return "0" if log10_value < 0 else "inf"
  return f"1e{log10_value:+.1f}" if abs(log10_value) >= 2 else f"{10**log10_value:.3g}"


def plot_grad_norms(results: dict[str, Any], path: str) -> None:
  """``grad_norms.png``: log10 gradient norm by layer, one line per depth; plain | residual | conv."""
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
      ax.plot(np.arange(len(v)), v, ls="-" if r["net"] == "residual" else "--", marker=".", label=r["model"])
    ax.set_title("CIFAR conv nets (BN, train mode): ||dL/d block input||")
    ax.set_xlabel("block (0 = first)")
    ax.set_ylabel("log10 gradient norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(
    f"Gradient norm reaching each layer at initialisation (width {cfg['width']}, "
    f"hidden {cfg['hidden']}, batch {cfg['batch']}, seed {cfg['seed']})"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_degradation(results: dict[str, Any], path: str) -> None:
  """``degradation.png``: training and test error after the fixed budget, by depth, plain vs residual."""
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
  fig.suptitle(
    f"Digits, {cfg['train_steps']} SGD steps each ({cfg['train_activation']}, "
    f"width {cfg['train_width']}, lr {cfg['train_lr']})"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_explosion_table(results: dict[str, Any]) -> str:
  """The stdout report of the explosion study: one row per stack, log10 of the first/last gradient ratio."""
  cfg = results["config"]
  lines = [
    f"Vanishing and explosion over the weight gain (width {cfg['width']}, hidden {cfg['hidden']}, "
    f"batch {cfg['explosion_batch']}, float64): log10 ||dL/dx_0|| / ||dL/dx_L|| measured, and predicted by "
    f"||prod M_l||_2, the typical sum log10(||M_l||_F/sqrt(n)) and the bound sum log10 ||M_l||_2 "
    f"(M_l = J_l or I + J_l); fwd = log10 rms(x_L)/rms(x_0)"
  ]
  head = (
    f"{'activation':>10} {'gain':>5} {'net':>28} {'depth':>5} {'measured':>9} {'||prod||':>9} "
    f"{'typical':>9} {'bound':>9} {'fwd':>8}"
  )
  lines += [head, "-" * len(head)]
  for r in results["explosion"]:
    lines.append(
      f"{r['activation']:>10} {r['gain']:>5g} {r['net']:>28} {r['depth']:>5} "
      f"{_fmt_log(r['log10_first_over_last']):>9} {_fmt_log(r['log10_product_norm']):>9} "
      f"{_fmt_log(r['log10_typical']):>9} {_fmt_log(r['log10_bound']):>9} {_fmt_log(r['log10_forward']):>8}"
    )
  return "\n".join(lines) + "\n"


def plot_explosion(results: dict[str, Any], path: str) -> None:
  """``explosion.png``: first/last gradient ratio over the gain (plain | residual), the remedies' profiles,
  and the ratio over depth; measured as markers and solid lines, the product-norm prediction dashed."""
  cfg = results["config"]
  recs = results["explosion"]
  deepest = max(r["depth"] for r in recs)
  fig, axes = plt.subplots(2, 2, figsize=(12, 9))
  for ax, net in zip(axes[0], ("plain", "residual")):
    _plot_explosion_over_gain(ax, recs, net, deepest)
  _plot_remedies(axes[1][0], recs, cfg["remedy_gain"], deepest)
  _plot_explosion_over_depth(axes[1][1], recs)
  fig.suptitle(
    f"Vanishing and explosion at initialisation (width {cfg['width']}, hidden {cfg['hidden']}, "
    f"batch {cfg['explosion_batch']}, seed {cfg['seed']}, float64)"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_explosion_over_gain(ax, recs: list[dict], net: str, deepest: int) -> None:
  """One panel: the deepest ``net`` stack's ratio over the gain, one colour per activation."""
  colors = {"sigmoid": "tab:blue", "tanh": "tab:orange", "relu": "tab:green"}
  for act, color in colors.items():
    rs = sorted(
      (r for r in recs if r["net"] == net and r["activation"] == act and r["depth"] == deepest), key=lambda r: r["gain"]
    )
    if not rs:
      continue
    gains = [r["gain"] for r in rs]
    ax.plot(gains, [_finite(r["log10_first_over_last"]) for r in rs], "o-", color=color, label=f"{act} measured")
    ax.plot(gains, [_finite(r["log10_product_norm"]) for r in rs], "--", color=color, label=f"{act} ||prod M_l||_2")
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("gain (W1, W2 = gain x default init)")
  ax.set_ylabel(f"log10 ||dL/dx_0|| / ||dL/dx_L||, depth {deepest}")
  ax.set_title(f"{net} stack: {'prod J_l' if net == 'plain' else 'prod (I + J_l)'}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def _plot_remedies(ax, recs: list[dict], remedy_gain: float, deepest: int) -> None:
  """One panel: each remedy's profile, unit by unit, at ``remedy_gain`` with ReLU."""
  at_gain = [r for r in recs if r["gain"] == remedy_gain and r["activation"] == "relu" and r["depth"] == deepest]
  cmap = plt.get_cmap("tab10")
  for i, name in enumerate(dict.fromkeys(r["net"] for r in at_gain)):
    prof = next(r for r in at_gain if r["net"] == name)["profile"]
    dist = np.arange(len(prof["log10_grad"]))[::-1]  # units between x_l and the output
    ax.plot(dist, [_finite(v) for v in prof["log10_grad"]], "-", color=cmap(i), label=name)
    ax.plot(dist, [_finite(v) for v in prof["log10_product"]], "--", color=cmap(i), lw=0.8)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xlabel("units between x_l and the output (L - l)")
  ax.set_ylabel("log10 ||dL/dx_l|| / ||dL/dx_L||")
  ax.set_title(f"remedies, ReLU, gain {remedy_gain:g}: measured (solid), ||prod||_2 (dashed)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def _plot_explosion_over_depth(ax, recs: list[dict]) -> None:
  """One panel: the ReLU stacks' ratio over depth, one colour per gain."""
  gains = sorted({r["gain"] for r in recs if r["net"] in ("plain", "residual")})
  for i, gain in enumerate(gains):
    for net, style in (("plain", "o--"), ("residual", "s-")):
      rs = sorted(
        (r for r in recs if r["net"] == net and r["activation"] == "relu" and r["gain"] == gain),
        key=lambda r: r["depth"],
      )
      ax.plot(
        [r["depth"] for r in rs],
        [_finite(r["log10_first_over_last"]) for r in rs],
        style,
        color=plt.get_cmap("viridis")(i / max(1, len(gains) - 1)),
        label=f"gain {gain:g}" if net == "residual" else None,
      )
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xlabel("depth L (units)")
  ax.set_ylabel("log10 ||dL/dx_0|| / ||dL/dx_L||")
  ax.set_title("ReLU over depth: residual (solid), plain (dashed)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def _finite(value):
  """A log10 value for plotting: non-finite (an exactly zero gradient) as NaN, so it is left out."""
  return value if value is not None and math.isfinite(value) else np.nan


def run_explosion(cfg: GradflowConfig, log=None) -> dict[str, Any]:
  """The explosion study alone: write ``explosion.json`` and ``explosion.png`` into ``cfg.out``."""
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  t_start = time.perf_counter()
  results: dict[str, Any] = {
    "config": {
      k: v
      for k, v in dataclasses.asdict(cfg).items()
      if k in ("width", "hidden", "seed", "out", "gains", "explosion_depths", "explosion_batch", "remedy_gain")
    },
    "machine": machine.describe(),
    "explosion": explosion.study(
      cfg.gains,
      cfg.explosion_depths,
      cfg.width,
      cfg.hidden,
      cfg.explosion_batch,
      cfg.seed,
      remedy_gain=cfg.remedy_gain,
      log=log,
    ),
  }
  results["seconds"] = time.perf_counter() - t_start
  os.makedirs(cfg.out, exist_ok=True)
  with open(os.path.join(cfg.out, "explosion.json"), "w") as f:
    json.dump(strict_json(results), f, indent=1, allow_nan=False)
  plot_explosion(results, os.path.join(cfg.out, "explosion.png"))
  return results


# ----------------------------------------------------------------------------------------------
# Entry point


def run(cfg: GradflowConfig, log=None) -> dict[str, Any]:
  """Run every part of ``cfg``; write ``results.json`` and the plots into ``cfg.out``; return results."""
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  t_start = time.perf_counter()
  results: dict[str, Any] = {
    "config": dataclasses.asdict(cfg),
    "machine": machine.describe(),
    "mlp": [],
    "conv": [],
    "train": [],
  }
  for depth in cfg.depths:
    log(f"gradflow: MLP stacks, depth {depth}")
    results["mlp"] += measure_mlp(depth, cfg.width, cfg.hidden, cfg.activation, cfg.batch, cfg.seed)
  if not cfg.skip_conv:
    for depth in cfg.conv_depths:
      log(f"gradflow: conv nets plain{depth} / resnet{depth}")
      results["conv"] += measure_conv(depth, cfg.conv_batch, cfg.conv_size, cfg.seed)
  if not cfg.skip_train:
    data = digits_split(seed=0)
    for depth in cfg.train_depths:
      for residual in (False, True):
        log(f"gradflow: training {'residual' if residual else 'plain'} MLP, {depth} units")
        results["train"].append(train_digits(depth, residual, cfg, data))
  results["seconds"] = time.perf_counter() - t_start
  os.makedirs(cfg.out, exist_ok=True)
  with open(os.path.join(cfg.out, "results.json"), "w") as f:
    json.dump(strict_json(results), f, indent=1, allow_nan=False)
  plot_grad_norms(results, os.path.join(cfg.out, "grad_norms.png"))
  if results["train"]:
    plot_degradation(results, os.path.join(cfg.out, "degradation.png"))
  return results


def main(argv: Sequence[str] | None = None) -> int:
  """``python experiments/gradient_flow.py``: print the tables and write results.json + the two plots."""
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
  print(
    f"wrote {os.path.join(cfg.out, 'results.json')}, grad_norms.png"
    f"{', degradation.png' if results['train'] else ''} in {results['seconds']:.0f} s"
  )
  return 0


if __name__ == "__main__":
  run_cli(main)
