"""How much a training command's accuracy moves with the seed: the same ``train.py`` command, once per seed.

usage: python experiments/seed_spread.py [--seeds 0-7] [--workdir runs/seeds] [--out seeds.json] [-- TRAIN_ARGS...]

Runs ``python train.py TRAIN_ARGS --config.seed=N --workdir=WORKDIR/seedN`` for each seed (``0-7``, or
``0,3,5``), one after the other, then reads each run's ``summary.json`` and writes OUT: per seed the final
and best test accuracy, the steps and the wall time of the whole command; over the seeds the minimum, mean,
maximum and standard deviation; the machine and the command. Each seed's run is an ordinary workdir, so the
same command again resumes (a finished run returns at once) and another seed list adds runs. A failed run
ends the script with its own one-line error. Without TRAIN_ARGS, ``python train.py``: the digits quick start.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # The repository, when run from a clone without install.

USAGE = "usage: python experiments/seed_spread.py [--seeds 0-7] [--workdir W] [--out FILE] [-- TRAIN_ARGS...]"


def parse_seeds(text: str) -> list[int]:
  """``"0-7"`` or ``"0,3,5"`` (or both, ``"0-3,9"``) as distinct seeds in that order; else a ConfigError."""
  from resnet_jax.errors import ConfigError

  seeds = []
  try:
    for part in text.split(","):
      first, _, last = part.partition("-")
      seeds += list(range(int(first), int(last) + 1)) if last else [int(first)]
  except ValueError:
    seeds = []
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ConfigError(f"--seeds={text!r}: expected distinct non-negative seeds, as 0-7 or 0,3,5")
  return seeds


def spread(values: list[float]) -> dict:
  """Minimum, mean, maximum and sample standard deviation (0 for one value) of ``values``."""
  return {
    "min": min(values),
    "mean": statistics.fmean(values),
    "max": max(values),
    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
  }


def run_seed(seed: int, workdir: str, train_args: list[str]) -> dict:
  """Train one seed with ``train.py`` (its output passed through); its row of the result."""
  from resnet_jax.errors import ConfigError

  command = [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    *train_args,
    f"--config.seed={seed}",
    f"--workdir={workdir}",
  ]
  start = time.perf_counter()
  proc = subprocess.run(command, stderr=subprocess.PIPE, text=True)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    raise ConfigError(f"seed {seed}: train.py ended with status {proc.returncode}: {lines[-1] if lines else ''}")
  sys.stderr.write(proc.stderr)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {
    "seed": seed,
    "final_accuracy": summary["test_accuracy"],
    "best_accuracy": summary["best_test_accuracy"],
    "steps": summary["steps"],
    "command_wall_time_s": wall,  # This process's call of train.py, start-up and compilation included.
    "run_wall_time_s": summary.get("wall_time_s"),  # The run's own record, over its resumes.
    "workdir": workdir,
  }


def main(argv: list[str] | None = None) -> int:
  from resnet_jax import machine
  from resnet_jax.errors import parse_args

  argv = sys.argv[1:] if argv is None else argv
  train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
  own = argv[: argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,3,5 (default 0-7)")
  parser.add_argument("--workdir", default=os.path.join("runs", "seeds"), help="one train.py workdir per seed")
  parser.add_argument("--out", default="", help="the JSON result (default WORKDIR/seed_spread.json)")
  args = parse_args(parser, own, USAGE)
  seeds = parse_seeds(args.seeds)
  rows = [run_seed(s, os.path.join(args.workdir, f"seed{s}"), train_args) for s in seeds]
  result = {
    "command": shlex.join(["python", "experiments/seed_spread.py", *own, *(["--", *train_args] if train_args else [])]),
    "train_args": train_args,
    "machine": machine.one_line(),
    "machine_details": machine.describe(),
    "seeds": seeds,
    "final_accuracy": spread([r["final_accuracy"] for r in rows]),
    "best_accuracy": spread([r["best_accuracy"] for r in rows]),
    "command_wall_time_s": spread([r["command_wall_time_s"] for r in rows]),
    "runs": rows,
  }
  out = args.out or os.path.join(args.workdir, "seed_spread.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  final = result["final_accuracy"]
  print(
    f"seeds {args.seeds}: final accuracy {100 * final['min']:.2f}% to {100 * final['max']:.2f}% "
    f"(mean {100 * final['mean']:.2f}%, standard deviation {100 * final['std']:.2f} points); wrote {out}"
  )
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli

  run_cli(main)
