"""Gradient check: the hand-derived gradients of :mod:`resnet_jax.residual_unit` against ``jax.grad``.

Run ``python -m resnet_jax.gradcheck`` (options: ``--depth --width --hidden --activation --batch --dtype
--seed --rtol``). It compares, for one unit, a residual stack and its plain twin, every parameter's
gradient and the gradient with respect to the input (and, for the stacks, to every unit's input), prints
a table and exits with status 1 if any relative error exceeds the tolerance (2 for a bad option).

Error measure (norm-wise, per tensor, so that tiny entries cannot blow it up)::

  abs_err(a, b) = max_i |a_i - b_i|
  rel_err(a, b) = max_i |a_i - b_i| / max(max_i |b_i|, floor)      floor = finfo.tiny / finfo.eps

with ``a`` hand-derived and ``b`` from ``jax.grad``. For a stack, the measure is taken per unit and the
largest over the units is reported, so that a wrong early unit is not hidden behind larger gradients
near the output (in a deep plain stack early gradients are many orders of magnitude smaller). The floor
(about 1e-31 in float32, 1e-292 in float64) only matters where gradients have underflowed.

Default tolerances (``--rtol`` overrides): float64 ``1e-10``; float32 ``1e-4``. Both computations round
differently (float32 eps = 1.2e-7), and a stack of L units can accumulate about L such roundings along
the chain, hence the margin; measured float32 errors stay below 1e-6 (depth 50, all activations).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import errors, residual_unit
from resnet_jax.errors import ConfigError, run_cli

DEFAULT_RTOL = {"float32": 1e-4, "float64": 1e-10}
USAGE = (
  "usage: python -m resnet_jax.gradcheck [--depth N] [--width N] [--hidden N] [--activation NAME] "
  "[--batch N] [--dtype float64|float32] [--seed N] [--rtol X]"
)


def error_floor(dtype: Any) -> float:
  """finfo.tiny / finfo.eps: below this magnitude a number may already have lost precision to underflow."""
  fi = np.finfo(np.dtype(dtype))
  return float(fi.tiny / fi.eps)


def abs_error(a: Any, b: Any) -> float:
  """max_i |a_i - b_i| (0 for empty arrays)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def rel_error(a: Any, b: Any, floor: float) -> float:
  """max_i |a_i - b_i| / max(max_i |b_i|, floor): norm-wise relative error of ``a`` against ``b``."""
  b64 = np.asarray(b, np.float64)
  scale = max(float(np.max(np.abs(b64))) if b64.size else 0.0, floor)
  return abs_error(a, b) / scale


def autodiff_stack_grads(
  params: Sequence[dict], x: Any, y: Any, shortcut: bool = True, activation: str = "sigmoid"
) -> dict[str, Any]:
  """The reference: :func:`residual_unit.manual_stack_grads`' result computed with ``jax.grad``.

  The gradient with respect to unit l's input is the gradient with respect to a zero perturbation
  ``e_l`` added to that input (``x_l + e_l``), taken at ``e = 0``.
  """
  x = jnp.asarray(x)

  def perturbed_loss(params, eps):
    h = x
    for p, e in zip(params, eps):
      h = residual_unit.stack_forward([p], h + e, shortcut, activation)  # one unit, residual or plain
    return 0.5 * jnp.sum(jnp.square(h - y)) / x.shape[0]

  eps = [jnp.zeros_like(x) for _ in params]
  g_params, g_inputs = jax.grad(perturbed_loss, argnums=(0, 1))(list(params), eps)
  g_x = jax.grad(residual_unit.stack_loss, argnums=1)(list(params), x, y, shortcut, activation)
  return {"params": g_params, "x": g_x, "inputs": g_inputs}


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the table: the largest errors of one gradient (over units, for a stack)."""

  model: str
  name: str
  abs_err: float
  rel_err: float
  rtol: float

  @property
  def ok(self) -> bool:
    return bool(np.isfinite(self.rel_err)) and self.rel_err <= self.rtol


def check(
  depth: int = 20,
  width: int = 8,
  hidden: int = 16,
  activation: str = "sigmoid",
  batch: int = 4,
  dtype: str = "float64",
  seed: int = 0,
  rtol: float | None = None,
) -> list[Row]:
  """Computes every comparison of the table and returns its rows (x64 must be on for float64).

  Rows: for ``unit``, ``w1 b1 w2 b2 x``; for ``residual stack`` and ``plain stack`` (``depth`` units),
  ``w1 b1 w2 b2`` (worst unit), ``x`` (dL/dx_0) and ``x_l`` (worst of the L unit inputs).
  """
  if dtype not in DEFAULT_RTOL:
    raise ConfigError(f"gradcheck: dtype must be one of {', '.join(DEFAULT_RTOL)}, got {dtype!r}")
  dt = jnp.dtype(dtype)
  if dt == jnp.float64 and not jax.config.jax_enable_x64:
    raise ConfigError("gradcheck: dtype float64 needs 64-bit JAX (run inside jax.enable_x64(True))")
  rtol = DEFAULT_RTOL[dtype] if rtol is None else float(rtol)
  floor = error_floor(dt)
  kp, kx, ky, ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(kx, (batch, width), dt)
  y = jax.random.normal(ky, (batch, width), dt)
  rows: list[Row] = []

  p = residual_unit.init_params(kp, width, hidden, dt)
  manual = residual_unit.manual_grads(p, x, y, activation)
  g_p, g_x = jax.grad(residual_unit.loss, argnums=(0, 1))(p, x, y, activation)
  auto = {**g_p, "x": g_x}
  for k in ("w1", "b1", "w2", "b2", "x"):
    rows.append(Row("unit", k, abs_error(manual[k], auto[k]), rel_error(manual[k], auto[k], floor), rtol))

  stack = residual_unit.init_stack(ks, depth, width, hidden, dt)
  for label, shortcut in (("residual stack", True), ("plain stack", False)):
    manual = residual_unit.manual_stack_grads(stack, x, y, shortcut, activation)
    auto = autodiff_stack_grads(stack, x, y, shortcut, activation)
    for k in ("w1", "b1", "w2", "b2"):
      pairs = [(m[k], a[k]) for m, a in zip(manual["params"], auto["params"])]
      rows.append(_worst(label, f"{k} ({depth} units)", pairs, floor, rtol))
    rows.append(_worst(label, "x", [(manual["x"], auto["x"])], floor, rtol))
    rows.append(_worst(label, f"x_l ({depth} inputs)", list(zip(manual["inputs"], auto["inputs"])), floor, rtol))
  return rows


def _worst(model: str, name: str, pairs: list, floor: float, rtol: float) -> Row:
  return Row(model, name, max(abs_error(a, b) for a, b in pairs), max(rel_error(a, b, floor) for a, b in pairs), rtol)


def format_table(rows: Sequence[Row]) -> str:
  """The rows as an aligned text table."""
  head = f"{'model':<15} {'gradient':<17} {'max abs diff':>12} {'max rel diff':>12} {'tolerance':>9}  result"
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
      f"{r.model:<15} {r.name:<17} {r.abs_err:>12.2e} {r.rel_err:>12.2e} {r.rtol:>9.0e}  {'PASS' if r.ok else 'FAIL'}"
    )
  return "\n".join(lines)


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
  if not (value > 0 and np.isfinite(value)):
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
  return value


def _int(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line of ``python -m resnet_jax.gradcheck``."""
  ap = argparse.ArgumentParser(
    prog="python -m resnet_jax.gradcheck",
    description="Compare the hand-derived gradients of the residual unit, of a "
    "deep residual stack and of its plain twin with jax.grad; exit 1 if "
    "any exceeds its tolerance.",
  )
  ap.add_argument("--depth", type=_positive_int, default=20, help="units in the stacks (default 20)")
  ap.add_argument(
    "--width", "--dim", dest="width", type=_positive_int, default=8, help="dim, the width of x (default 8)"
  )
  ap.add_argument("--hidden", type=_positive_int, default=16, help="hidden width of each branch (default 16)")
  ap.add_argument(
    "--activation", choices=sorted(residual_unit.ACTIVATIONS), default="sigmoid", help="sigma (default sigmoid)"
  )
  ap.add_argument("--batch", type=_positive_int, default=4, help="rows of x (default 4)")
  ap.add_argument(
    "--dtype",
    choices=sorted(DEFAULT_RTOL),
    default="float64",
    help="float64 (default; enables 64-bit JAX for this run) or float32",
  )
  ap.add_argument("--seed", type=_int, default=0, help="PRNG seed of parameters and data (default 0)")
  ap.add_argument(
    "--rtol",
    type=_positive_float,
    default=None,
    help="relative tolerance (default 1e-10 for float64, 1e-4 for float32)",
  )
  return errors.parse_args(ap, argv, USAGE)


def main(argv: Sequence[str] | None = None) -> int:
  """Prints the table; returns 0 if every gradient is within tolerance, else 1."""
  args = parse_args(argv)
  with jax.enable_x64(args.dtype == "float64"):
    rows = check(args.depth, args.width, args.hidden, args.activation, args.batch, args.dtype, args.seed, args.rtol)
  print(
    f"hand-derived gradients vs jax.grad: depth={args.depth} width={args.width} hidden={args.hidden} "
    f"activation={args.activation} batch={args.batch} dtype={args.dtype} seed={args.seed}"
  )
  print(
    f"rel diff = max|manual - jax.grad| / max(max|jax.grad|, {error_floor(args.dtype):.1e}) per tensor; "
    f"stacks: worst unit"
  )
  print(format_table(rows))
  failed = [r for r in rows if not r.ok]
  if failed:
    print(f"FAIL: {len(failed)} of {len(rows)} gradients exceed their tolerance")
    return 1
  print(f"PASS: all {len(rows)} gradients within tolerance")
  return 0


if __name__ == "__main__":
  run_cli(main, sys.argv[1:])
