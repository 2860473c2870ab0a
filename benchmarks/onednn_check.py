"""Check this CPU's oneDNN convolutions against float64 sums, over a grid of shapes, several runs each.

  python benchmarks/onednn_check.py                          # 1x1 and 3x3, strides 1 and 2, 675 shapes each
  python benchmarks/onednn_check.py --kernels 1 --strides 2 --runs 5 --json check.json

Every shape (input channels x output channels x image side x batch, float32, padding k // 2) is run through
the oneDNN primitives directly (``resnet_jax.onednn_lib``, the layer under ``resnet_jax.onednn_conv``):
forward, backward-data and backward-weights, ``--runs`` times each, since a race between oneDNN's threads
shows up in some runs only. Forward and dW are compared with numpy's float64 sums, dx through the adjoint
identity ``<dx, x> = <dy, y>``. A shape is wrong where a relative error exceeds 1e-4; each wrong shape is
printed with the implementations oneDNN chose. A shape whose runs do not return within ``--hang-seconds`` is
reported as a hang on stderr, and the check ends with exit status 3. This found oneDNN 3.2's strided 1x1
weight-gradient defect on AVX2-only CPUs (wrong results, and now and then a call that never returns), which
``resnet_jax.onednn_conv.unit_stride_spec`` keeps the models away from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_jax.errors import ConfigError, run_cli  # noqa: E402  (no jax import)

TOLERANCE = 1e-4


def _ints(text: str, what: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise ConfigError(f"--{what}={text!r}: expected comma-separated positive integers")
  return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--kernels", default="1,3", help="kernel sides (padding k // 2)")
  p.add_argument("--strides", default="1,2")
  p.add_argument("--in-channels", default="1,2,3,4,6,8,16,32,64")
  p.add_argument("--out-channels", default="4,8,16,64,128")
  p.add_argument("--sizes", default="4,7,8,16,32", help="image sides (square)")
  p.add_argument("--batches", default="1,2,8")
  p.add_argument("--runs", type=int, default=2, help="runs of every primitive per shape")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--hang-seconds", type=float, default=60.0, help="a shape whose runs take longer is reported as a hang"
  )
  p.add_argument("--json", dest="json_out", default=None, help="write the counts and the wrong shapes here")
  args = p.parse_args(argv)
  for name in ("kernels", "strides", "in_channels", "out_channels", "sizes", "batches"):
    setattr(args, name, _ints(getattr(args, name), name.replace("_", "-")))
  if args.runs < 1:
    raise ConfigError(f"--runs={args.runs}: expected at least 1")
  if not args.hang_seconds > 0:
    raise ConfigError(f"--hang-seconds={args.hang_seconds}: expected a positive number of seconds")
  return args


def check_shape(lib, rng, k: int, s: int, cin: int, cout: int, size: int, batch: int, runs: int) -> dict:
  """The largest relative error of y, dx and dW over ``runs`` runs of one convolution's primitives."""
  import numpy as np

  p = k // 2
  x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
  w = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
  spec = lib.make_spec(x.shape, w.shape, np.float32, s, ((p, p), (p, p)))
  prims = lib.primitives(spec)
  _, ho, wo, _ = spec.out_shape
  dy = rng.standard_normal((batch, ho, wo, cout)).astype(np.float32)
  x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
  xp = np.pad(x64, ((0, 0), (p, p), (p, p), (0, 0)))
  taps = [(a, b, xp[:, a : a + s * (ho - 1) + 1 : s, b : b + s * (wo - 1) + 1 : s]) for a in range(k) for b in range(k)]
  y_ref = sum(np.einsum("nhwi,io->nhwo", t, w64[a, b]) for a, b, t in taps)
  dw_ref = np.zeros(w.shape)
  for a, b, t in taps:
    dw_ref[a, b] = np.einsum("nhwi,nhwo->io", t, dy64)
  worst = {"y": 0.0, "dx": 0.0, "dw": 0.0}
  for _ in range(runs):
    y, dx, dw = prims.forward(x, w), prims.backward_data(dy, w), prims.backward_weights(x, dy)
    dx64 = dx.astype(np.float64)
    adjoint = abs(np.sum(dx64 * x64) - np.sum(dy64 * y_ref)) / (np.linalg.norm(dx64) * np.linalg.norm(x64) + 1e-12)
    errors = {
      "y": np.abs(y - y_ref).max() / np.abs(y_ref).max(),
      "dx": adjoint,
      "dw": np.abs(dw - dw_ref).max() / np.abs(dw_ref).max(),
    }
    worst = {key: max(worst[key], float(errors[key])) for key in worst}
  impls = [prims.forward_p.impl, prims.backward_data_p.impl, prims.backward_weights_p.impl]
  return {"errors": worst, "impl": impls}


def _hung(where: str, seconds: float) -> None:
  sys.stdout.flush()
  print(
    f"error: oneDNN did not return from the {where} convolution within {seconds:g} s (a hang inside oneDNN)",
    file=sys.stderr,
    flush=True,
  )
  os._exit(3)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  import numpy as np

  from resnet_jax import machine, onednn_lib

  onednn_lib.library()  # a one-line error saying how to install oneDNN when it is missing
  rng = np.random.default_rng(args.seed)
  summary, wrong = [], []
  for k, s in itertools.product(args.kernels, args.strides):
    start, count, bad = time.perf_counter(), 0, 0
    for cin, cout, size, batch in itertools.product(args.in_channels, args.out_channels, args.sizes, args.batches):
      if size + 2 * (k // 2) < k:
        continue
      count += 1
      where = f"{k}x{k} stride {s}, {cin} -> {cout} channels, {size}x{size}, batch {batch}"
      # A oneDNN thread that never returns cannot be stopped: report it and end the process.
      watchdog = threading.Timer(args.hang_seconds, _hung, (where, args.hang_seconds))
      watchdog.daemon = True
      watchdog.start()
      r = check_shape(onednn_lib, rng, k, s, cin, cout, size, batch, args.runs)
      watchdog.cancel()
      if max(r["errors"].values()) > TOLERANCE:
        bad += 1
        shape = {"kernel": k, "stride": s, "in": cin, "out": cout, "size": size, "batch": batch}
        wrong.append({**shape, **r})
        errs = ", ".join(f"{key} {v:.1e}" for key, v in r["errors"].items())
        print(f"wrong: {where}: {errs} (backward-weights: {r['impl'][2]})")
    summary.append({"kernel": k, "stride": s, "shapes": count, "wrong": bad})
    print(f"{k}x{k} stride {s}: {bad} of {count} shapes wrong ({time.perf_counter() - start:.0f} s)", flush=True)
  if args.json_out:
    out = {"machine": machine.describe(), "config": vars(args), "summary": summary, "wrong": wrong}
    with open(args.json_out, "w") as f:
      json.dump(out, f, indent=2)
    print(f"wrote {args.json_out}")
  return 0


if __name__ == "__main__":
  sys.exit(run_cli(main))
