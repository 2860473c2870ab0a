"""Accuracy against wall time of a finished train.py run: the figure and JSON of docs/cifar.md.

usage: python experiments/time_to_accuracy.py --workdir runs/cifar10_fast [--target 0.91]
           [--out docs/figures/cifar] [--name cifar10_fast]

Reads WORKDIR/metrics.jsonl (each evaluation record carries ``wall_time_s``: seconds since the job
started, data loading, compilation, evaluations and checkpoints included) and WORKDIR/summary.json,
and writes OUT/NAME.json (the curve, the time the target was first reached, the final accuracy, the
training images/s, the CPU) and OUT/NAME.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # The repository, when run from a clone without install.
sys.path.insert(0, HERE)


def time_to_accuracy(records: list[dict], target: float) -> dict:
  """The evaluation curve and when it first reached ``target``; ``None`` where it never did."""
  evals = [r for r in records if r.get("split") == "test" and "wall_time_s" in r]
  reached = next((r for r in evals if r["accuracy"] >= target), None)
  return {
    "wall_time_s": [r["wall_time_s"] for r in evals],
    "epoch": [r.get("epoch") for r in evals],
    "step": [r["step"] for r in evals],
    "accuracy": [r["accuracy"] for r in evals],
    "target": target,
    "target_reached_s": reached["wall_time_s"] if reached else None,
    "target_reached_epoch": reached.get("epoch") if reached else None,
  }


def run_machine(m: dict) -> str:
  """The machine of a run's ``summary.json`` on one line: ``"AMD EPYC (AVX-512 with bf16; family 26 model 2
  stepping 1), 2 CPUs"``, with the accelerator in front where the run had one. One name covers CPUs of
  different speed, so the instruction set and family/model go with it where the run recorded them."""
  detail = "; ".join(v for v in (m.get("cpu_isa"), m.get("cpu_id")) if v)
  line = f"{m['cpu']}{f' ({detail})' if detail else ''}, {m['cpus']} CPUs"
  return f"{m['device']}, host {line}" if m.get("device") else line


def main(argv: list[str] | None = None) -> int:
  from resnet_jax import machine
  from resnet_jax.data import eval_split_name
  from resnet_jax.errors import ConfigError, parse_args
  from resnet_jax.metrics import read_metrics

  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True, help="a finished train.py run")
  parser.add_argument("--target", type=float, default=0.91, help="accuracy to reach (default 0.91)")
  parser.add_argument("--out", default=os.path.join("docs", "figures", "cifar"))
  parser.add_argument("--name", default="", help="file name (default: the workdir's name)")
  args = parse_args(
    parser,
    argv,
    "usage: python experiments/time_to_accuracy.py --workdir DIR [--target 0.91] [--out DIR] [--name NAME]",
  )
  summary_path = os.path.join(args.workdir, "summary.json")
  if not os.path.isfile(summary_path):
    raise ConfigError(f"{summary_path} not found: --workdir must be a finished train.py run")
  if not 0 < args.target <= 1:
    raise ConfigError(f"--target={args.target}: expected an accuracy in (0, 1]")
  with open(summary_path) as f:
    summary = json.load(f)
  data_path = os.path.join(args.workdir, "data.json")
  if not os.path.isfile(data_path):
    raise ConfigError(f"{data_path} not found: --workdir must be a finished train.py run")
  with open(data_path) as f:
    eval_split = eval_split_name(json.load(f))
  budget_path = os.path.join(args.workdir, "time_budget.json")  # config.time_budget_minutes: what it chose, and why
  time_budget = None
  if os.path.isfile(budget_path):
    with open(budget_path) as f:
      time_budget = json.load(f)
  records = read_metrics(args.workdir)
  curve = time_to_accuracy(records, args.target)
  train_records = [r for r in records if r.get("split") == "train"]
  if not curve["wall_time_s"]:
    raise ConfigError(f"{args.workdir}/metrics.jsonl has no evaluation with wall_time_s")
  name = args.name or os.path.basename(os.path.normpath(args.workdir))
  result = {
    "name": name,
    # The run's own machine (summary.json names it); runs from before it did: this one, where it ran.
    "machine": run_machine(summary["machine"]) if "machine" in summary else machine.one_line(),
    # Everything summary.json records of it: CPU family/model, instruction set, jax, or the accelerator.
    "machine_details": summary.get("machine"),
    "dtype": summary.get("compute_dtype", summary["config"]["model"]["dtype"]),  # what "auto" resolved to
    "model": summary["model"],
    "seed": summary["config"].get("seed"),  # the initialisation, batch order and augmentation of the run
    "model_options": summary["config"]["model"].get("options", {}),  # e.g. ResNet-9's num_filters
    "parameters": summary["parameters"],
    "steps": summary["steps"],
    "epochs": summary["epochs"],
    "final_accuracy": summary["test_accuracy"],
    "best_accuracy": summary["best_test_accuracy"],
    "total_wall_time_s": summary.get("wall_time_s"),
    "train_images_per_sec": summary["images_per_sec"],
    # With config.ema_decay > 0 the curve is the weight average's, and this the last weights' own accuracy.
    "final_unaveraged_accuracy": summary.get("unaveraged_test_accuracy"),
    # Accuracy on the augmented training batches of the last logged window (log_every_steps steps).
    "final_train_accuracy": train_records[-1]["accuracy"] if train_records else None,
    "recipe": {
      **{
        k: summary["config"].get(k)
        for k in ("batch_size", "num_epochs", "optimizer", "schedule", "label_smoothing", "eval_flip")
      },
      "eval_translate": summary["config"].get("eval_translate", 0),
      "ema_decay": summary["config"].get("ema_decay", 0.0),
      "augment": summary["config"]["dataset"].get("augment"),
      "cutout": summary["config"]["dataset"].get("cutout", 0),
      "time_budget_minutes": summary["config"].get("time_budget_minutes", 0.0),
    },
    "time_budget": time_budget,
    "eval_split": eval_split,
    **curve,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=1)

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  minutes = [t / 60 for t in curve["wall_time_s"]]
  ax.plot(minutes, [100 * a for a in curve["accuracy"]], "o-", ms=3, label=f"{summary['model']}")
  ax.axhline(100 * args.target, color="grey", ls="--", lw=0.8, label=f"{100 * args.target:g}%")
  ax.set_xlabel("wall time (minutes, everything included)")
  ax.set_ylabel("validation accuracy (%)")
  ax.set_ylim(max(0, 100 * min(curve["accuracy"]) - 5), 100)
  ax.set_title(
    f"{name}: {100 * summary['test_accuracy']:.2f}% in {minutes[-1]:.1f} min\n"
    + textwrap.fill(f"({result['machine']})", 80),  # a long CPU name on two lines, not cut at the edge
    fontsize=10,
  )
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=100)
  plt.close(fig)
  print(
    f"{name}: {100 * summary['test_accuracy']:.2f}% after {minutes[-1]:.1f} min; "
    f"{100 * args.target:g}% "
    + (
      f"first reached at {curve['target_reached_s'] / 60:.1f} min"
      if curve["target_reached_s"] is not None
      else "not reached"
    )
  )
  print(f"wrote {os.path.join(args.out, name + '.json')} and {name}.png")
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli

  run_cli(main)
