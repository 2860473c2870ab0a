"""GFLOP/s of single 3x3 convolutions (stride 1, padding 1, float32, NHWC): forward, input gradient (dx) and
weight gradient (dW), for XLA's convolutions, oneDNN's called from jax (``resnet_jax.onednn_conv``) and,
when installed, PyTorch channels_last, all in one process with their repeats interleaved.

  python benchmarks/conv_ops.py                                   # the shapes of ResNet-20 and ResNet-18
  python benchmarks/conv_ops.py --shapes "128,32,16;16,56,64" --json ops.json

GFLOP/s = 2·B·H·W·C·C·9 / seconds (every one of the three passes does that many multiply-adds); median of
``--repeats`` timings, each as many calls as fill ``--min-seconds``. Every backend's forward result is checked
against XLA's before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_jax.errors import ConfigError, run_cli  # noqa: E402  (no jax import)

DEFAULT_SHAPES = "128,32,16;128,16,32;128,8,64;16,56,64;16,28,128;16,14,256;16,7,512"
PASSES = ("fwd", "dx", "dW")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--shapes", default=DEFAULT_SHAPES, help="B,H,C triples separated by ';' (W = H, C in = C out)")
  p.add_argument(
    "--backends",
    default="xla,onednn,torch",
    help="comma-separated, of xla, onednn, torch (torch is left out with a note when missing)",
  )
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs usable)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--min-seconds", type=float, default=0.2, help="shortest timed repeat")
  p.add_argument("--json", dest="json_out", default=None, help="write the GFLOP/s to this file")
  args = p.parse_args(argv)
  try:
    args.shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s.strip()]
  except ValueError:
    raise ConfigError(f"--shapes must be B,H,C triples separated by ';', got {args.shapes!r}") from None
  if not args.shapes or any(len(s) != 3 or min(s) < 1 for s in args.shapes):
    raise ConfigError(f"--shapes must be positive B,H,C triples separated by ';', got {args.shapes!r}")
  args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
  unknown = sorted(set(args.backends) - {"xla", "onednn", "torch"})
  if unknown or not args.backends:
    raise ConfigError(f"unknown --backends {', '.join(unknown) or '(none)'}: expected xla, onednn, torch")
  if args.repeats < 1 or args.min_seconds < 0:
    raise ConfigError("--repeats must be at least 1 and --min-seconds non-negative")
  return args


def time_call(fn: Callable[[], object], min_seconds: float) -> float:
  """Seconds per call, over as many calls as fill ``min_seconds`` (after one untimed call)."""
  fn()
  n, t0 = 0, time.perf_counter()
  while True:
    fn()
    n += 1
    elapsed = time.perf_counter() - t0
    if elapsed >= min_seconds:
      return elapsed / n


def jax_passes(conv: Callable, x, w, dy) -> dict[str, Callable[[], object]]:
  import jax

  fwd = jax.jit(conv)
  dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return {
    "fwd": lambda: fwd(x, w).block_until_ready(),
    "dx": lambda: dx(x, w, dy).block_until_ready(),
    "dW": lambda: dw(x, w, dy).block_until_ready(),
  }


def torch_passes(torch, x, w, dy) -> tuple[dict[str, Callable[[], object]], object]:
  """channels_last tensors; dx and dW each through aten's convolution_backward with one output asked for."""
  cl = torch.channels_last
  tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=cl)
  tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=cl)
  tdy = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous(memory_format=cl)

  def backward(mask):
    return torch.ops.aten.convolution_backward(tdy, tx, tw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

  def fwd():
    with torch.no_grad():
      return torch.nn.functional.conv2d(tx, tw, padding=1)

  return (
    {"fwd": fwd, "dx": lambda: backward([True, False, False]), "dW": lambda: backward([False, True, False])},
    lambda: fwd().permute(0, 2, 3, 1).numpy(),
  )


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  import jax
  import numpy as np
  from jax import lax

  backends = list(args.backends)
  torch = None
  if "torch" in backends:
    try:
      import torch

      torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    except ImportError:
      print("note: torch is not installed; measuring without it", file=sys.stderr)
      backends.remove("torch")
  if "onednn" in backends:
    from resnet_jax import onednn_conv, onednn_lib

    onednn_lib.library()  # a one-line error saying how to install oneDNN when it is missing

  pad, dn = ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")
  convs = {"xla": lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=dn)}
  if "onednn" in backends:
    convs["onednn"] = lambda x, w: onednn_conv.conv2d(x, w, (1, 1), pad)
  print(
    f"jax {jax.__version__}"
    + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "")
    + f", {len(os.sched_getaffinity(0))} CPUs usable, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  print("| B, H, C | " + " | ".join(f"{b} fwd / dx / dW" for b in backends) + " |")
  print("|---|" + "---|" * len(backends))
  results = {}
  for b, h, c in args.shapes:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, h, c), np.float32)
    w = (rng.standard_normal((3, 3, c, c)) * 0.1).astype(np.float32)
    dy = rng.standard_normal((b, h, h, c), np.float32)
    reference = np.asarray(convs["xla"](x, w))
    steps = {}
    for name in backends:
      if name == "torch":
        steps[name], out = torch_passes(torch, x, w, dy)
        result = out()
      else:
        steps[name] = jax_passes(convs[name], jax.numpy.asarray(x), jax.numpy.asarray(w), jax.numpy.asarray(dy))
        result = np.asarray(jax.jit(convs[name])(x, w))
      np.testing.assert_allclose(result, reference, rtol=1e-3, atol=1e-3 * float(np.abs(reference).max()))
    times: dict[tuple[str, str], list[float]] = {(n, p): [] for n in backends for p in PASSES}
    for _ in range(args.repeats):  # interleaved: every pass of every backend once per round
      for n in backends:
        for p in PASSES:
          times[(n, p)].append(time_call(steps[n][p], args.min_seconds))
    flops = 2 * b * h * h * c * c * 9
    gflops = {f"{n}.{p}": flops / statistics.median(t) / 1e9 for (n, p), t in times.items()}
    results[f"{b},{h},{c}"] = gflops
    cells = [" / ".join(f"{gflops[f'{n}.{p}']:.0f}" for p in PASSES) for n in backends]
    print(f"| {b}, {h}, {c} | " + " | ".join(cells) + f" |   (load {os.getloadavg()[0]:.1f})", flush=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"backends": backends, "gflops": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(run_cli(main))
