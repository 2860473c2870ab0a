"""He et al. (2015), Table 6: ResNet-20/32/44/56/110 on CIFAR-10 with the paper's recipe, and the paper's errors.

usage: python experiments/he_table.py --data_dir DIR [--depths 20,32,44,56,110] [--steps 64000]
           [--steps_per_call 1] [--workdir runs/he_table] [--out docs/figures/cifar] [--table_only]

Every depth trains with ``configs/cifar10_resnet20.py``, the recipe of section 4.2 (batch 128, SGD
momentum 0.9, lr 0.1 divided by 10 at 32k and 48k iterations, weight decay 1e-4, 64k iterations, pad-4
crop and flip), only ``model.name`` changed; ResNet-110 warms up over its first 400 iterations, as the
paper does (there at a constant 0.01, here linearly from 0). ``--steps`` shortens every run and moves the
two learning-rate drops to the same fractions of it (1/2 and 3/4). On a GPU or TPU the training batches
are augmented on the device (``dataset.augment_on='auto'``), so the input pipeline only draws indices.

Each run is a ``train.py`` workdir, ``WORKDIR/resnetN``, checkpointed every 2,000 steps: the same
command resumes what is unfinished, so the table can be filled over several sessions (on machines that
start bare, ``benchmarks/runs_archive.py`` carries the workdirs from one to the next). ``--steps_per_call``
is ``config.steps_per_call``, which leaves the runs' records, evaluations and checkpoints where they are. Writes
``OUT/he_table.json`` (per depth: parameters, steps, error, wall time, images/s (the run's mean, and the
median of its log windows, which hours of a shared CPU move less), the machine, the
paper's figure, and the run's curves), ``OUT/he_table.md`` (the table) and ``OUT/he_table.png`` (the
curves as in the paper's Fig. 6: training error dashed, evaluation error bold, against iterations). With
the pickle release the error is on the 10,000 test images, as in the paper; an image folder without
``test/`` reports its 5,000 held-out images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # The repository, when run from a clone without install.

# He et al. (2015), Table 6: test error (%) on CIFAR-10; ResNet-110: best of 5 runs (mean 6.61 +- 0.16).
PAPER_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}
PAPER_STEPS = 64000
WARMUP_STEPS = {110: 400}


def run_config(depth: int, data_dir: str, steps: int, steps_per_call: int = 1):
  """``configs/cifar10_resnet20.py`` for ResNet-``depth``, ``steps`` iterations, drops at 1/2 and 3/4,
  ``steps_per_call`` training steps per compiled call."""
  from resnet_jax.config_check import load_config_file

  c = load_config_file(os.path.join(ROOT, "configs", "cifar10_resnet20.py"))
  c.dataset.data_dir = data_dir
  c.dataset.holdout = -1  # 5,000 held-out images when the folder has no test/.
  c.model.name = f"resnet{depth}"
  c.num_train_steps = steps
  c.schedule.boundaries = tuple(b * steps / PAPER_STEPS for b in c.schedule.boundaries)
  c.schedule.warmup = float(min(WARMUP_STEPS.get(depth, 0), steps // 8))
  c.eval_every_steps = min(c.eval_every_steps, steps)
  c.checkpoint_every_steps = min(c.checkpoint_every_steps, steps)
  c.progress_bar = False
  c.steps_per_call = steps_per_call
  return c


def finished(workdir: str, steps: int) -> dict | None:
  """The summary of a run of ``steps`` iterations that has finished in ``workdir``, else ``None``.

  Such a run is not trained again: its records are all the table reads, and a workdir carried from
  another machine may hold them without a checkpoint (``benchmarks/runs_archive.py``)."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get("steps") == steps else None


def curve(workdir: str) -> dict:
  """A run's error curves (%) from its ``metrics.jsonl``: the training error on the augmented batches at
  each log step (``log_every_steps``, a mean over those steps), and the evaluation error at each evaluation;
  with the training images/s of each log window."""
  from resnet_jax.metrics import read_metrics

  records = read_metrics(workdir)
  train = [r for r in records if r.get("split") == "train"]
  test = [r for r in records if r.get("split") == "test"]
  return {
    "steps": [r["step"] for r in train],
    "train_error": [100 * (1 - r["accuracy"]) for r in train],
    "images_per_sec": [r.get("images_per_sec") for r in train],
    "eval_steps": [r["step"] for r in test],
    "error": [100 * (1 - r["accuracy"]) for r in test],
  }


def row(depth: int, workdir: str) -> dict:
  """One finished run's line of the table, with its curves."""
  with open(os.path.join(workdir, "summary.json")) as f:
    s = json.load(f)
  machine = s.get("machine", {})
  c = curve(workdir)
  speeds = [v for v in c["images_per_sec"] if v]
  return {
    "depth": depth,
    "model": s["model"],
    "parameters": s["parameters"],
    "steps": s["steps"],
    "error": 100 * (1 - s["test_accuracy"]),
    "best_error": 100 * (1 - s["best_test_accuracy"]),
    "paper_error": PAPER_ERROR[depth],
    "wall_time_s": s.get("wall_time_s"),
    "images_per_sec": s["images_per_sec"],
    # Robust to the hours a long run may share the CPU: the median of its log windows' images/s.
    "median_images_per_sec": statistics.median(speeds) if speeds else None,
    "machine": machine.get("device") or f"{machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs",
    # The paper's dashed curves end here: the mean of the last five log steps' training error.
    "final_train_error": sum(c["train_error"][-5:]) / len(c["train_error"][-5:]) if c["train_error"] else None,
    "curve": c,
  }


def markdown(rows: list[dict], eval_split: str) -> str:
  lines = [
    f"| net | parameters | iterations | error here ({eval_split}) | He et al. (test) "
    "| training error at the end (augmented batches) | wall time | images/s (mean) | images/s (median log window) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    train = f"{r['final_train_error']:.2f}%" if r["final_train_error"] is not None else "-"
    wall = f"{r['wall_time_s'] / 60:.1f} min" if r["wall_time_s"] else "-"
    speed = f"{r['images_per_sec']:,.0f}" if r["images_per_sec"] else "-"  # None: too few steps to time
    median = f"{r['median_images_per_sec']:,.0f}" if r["median_images_per_sec"] else "-"
    lines.append(
      f"| ResNet-{r['depth']} | {r['parameters']:,} | {r['steps']:,} | {r['error']:.2f}% | {r['paper_error']:.2f}% "
      f"| {train} | {wall} | {speed} | {median} |"
    )
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], eval_split: str, path: str, smooth: int = 5) -> None:
  """He et al.'s Fig. 6 (right) from these runs: per depth the training error (dashed; a moving mean over
  ``smooth`` log steps) and the evaluation error (bold) against iterations, with the learning-rate drops."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, ax = plt.subplots(figsize=(7, 4.6))
  for r in rows:
    c = r["curve"]
    train = np.asarray(c["train_error"], dtype=float)
    k = max(1, min(smooth, len(train)))
    mean = np.convolve(train, np.ones(k) / k, mode="valid")
    (line,) = ax.plot(c["steps"][k - 1 :], mean, "--", lw=0.9)
    ax.plot(c["eval_steps"], c["error"], "-", lw=2.2, color=line.get_color(), label=f"ResNet-{r['depth']}")
  steps = max(r["steps"] for r in rows)
  for b in run_config(rows[0]["depth"], "", steps).schedule.boundaries:
    ax.axvline(b, color="0.5", lw=0.7, ls=":")
  # As in the paper, the scale fits the curves after their first tenth; the first evaluations run off the top.
  later = [e for r in rows for s, e in zip(r["curve"]["eval_steps"], r["curve"]["error"]) if s >= steps / 10]
  ax.set_ylim(0, min(100, 5 * math.ceil(max(later) / 5) + 5) if later else 100)
  ax.set_xlim(0, steps)
  ax.set_xlabel("iterations (batch 128); dotted: learning rate / 10")
  ax.set_ylabel("error (%)")
  ax.set_title(f"CIFAR-10, the paper's recipe: training error dashed, error on the {eval_split} bold", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  from resnet_jax import machine
  from resnet_jax.data import eval_split_name
  from resnet_jax.errors import ConfigError, parse_args

  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--data_dir", required=True, help="CIFAR-10: pickle release or train/<class>/ images")
  parser.add_argument("--depths", default="20,32,44,56,110", help="comma-separated, of 20,32,44,56,110")
  parser.add_argument("--steps", type=int, default=PAPER_STEPS, help="iterations per run (default 64000)")
  parser.add_argument("--steps_per_call", type=int, default=1, help="training steps per compiled call (default 1)")
  parser.add_argument("--workdir", default=os.path.join("runs", "he_table"), help="one train.py workdir per depth")
  parser.add_argument("--out", default=os.path.join("docs", "figures", "cifar"))
  parser.add_argument("--table_only", action="store_true", help="write the table from the finished runs")
  args = parse_args(
    parser,
    argv,
    "usage: python experiments/he_table.py --data_dir DIR [--depths 20,32,44,56,110] [--steps 64000] "
    "[--steps_per_call K] [--workdir W] [--out O] [--table_only]",
  )
  try:
    depths = [int(d) for d in args.depths.split(",") if d]
  except ValueError:
    depths = []
  if not depths or any(d not in PAPER_ERROR for d in depths):
    raise ConfigError(f"--depths={args.depths!r}: expected a comma-separated subset of 20,32,44,56,110")
  if args.steps < 8:
    raise ConfigError(f"--steps={args.steps}: expected at least 8 iterations")
  if args.steps_per_call < 1:
    raise ConfigError(f"--steps_per_call={args.steps_per_call}: expected a positive number of steps")
  if not args.table_only:
    from resnet_jax import host_memory

    # Before jax starts: what train.py would choose for these runs (batch 128 of 32x32: keep).
    host_memory.apply(host_memory.choose_for_config(run_config(depths[0], args.data_dir, args.steps)))
    from resnet_jax import train_loop

    for depth in depths:
      done = finished(os.path.join(args.workdir, f"resnet{depth}"), args.steps)
      if done is not None:
        print(f"== ResNet-{depth}: finished already, error {100 * (1 - done['test_accuracy']):.2f}%", flush=True)
        continue
      print(f"== ResNet-{depth}: {args.steps} iterations", flush=True)
      summary = train_loop.train_and_evaluate(
        run_config(depth, args.data_dir, args.steps, args.steps_per_call), os.path.join(args.workdir, f"resnet{depth}")
      )
      print(f"ResNet-{depth}: error {100 * (1 - summary['test_accuracy']):.2f}%", flush=True)
  missing = [d for d in depths if not os.path.isfile(os.path.join(args.workdir, f"resnet{d}", "summary.json"))]
  if missing:
    raise ConfigError(
      f"--table_only: no finished run of ResNet-{', '.join(map(str, missing))} in {args.workdir} "
      "(run without --table_only first)"
    )
  rows = [row(d, os.path.join(args.workdir, f"resnet{d}")) for d in depths]
  with open(os.path.join(args.workdir, f"resnet{depths[0]}", "data.json")) as f:
    info = json.load(f)
  eval_split = eval_split_name(info)
  result = {
    "command": f"python experiments/he_table.py --data_dir CIFAR10_DIR --depths {args.depths} --steps {args.steps}",
    "machine": machine.one_line(),
    "eval_split": eval_split,
    "rows": rows,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "he_table.json"), "w") as f:
    json.dump(result, f, indent=1)
  table = markdown(rows, eval_split)
  with open(os.path.join(args.out, "he_table.md"), "w") as f:
    f.write(table)
  plot(rows, eval_split, os.path.join(args.out, "he_table.png"))
  print(table)
  print(f"wrote {os.path.join(args.out, 'he_table.json')}, he_table.md and he_table.png")
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli

  run_cli(main)
