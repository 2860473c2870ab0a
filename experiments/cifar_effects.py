"""He et al.'s effects on real CIFAR-10 images: degradation, block orderings, gradient norms per block.

usage: python experiments/cifar_effects.py --data_dir DIR [--epochs 3] [--runs degradation,orderings]
           [--workdir runs/cifar_effects] [--out docs/figures/cifar] [--plot_only]

Every run trains with one recipe and one budget (:func:`run_config`: batch 128, Nesterov SGD, a
linear warmup to 0.1 over the first half epoch then a linear decay to 0, weight decay 5e-4, pad-crop-flip,
no label smoothing, He initialisation without zero-initialised residual BN) and logs the training error
and the gradient norm of every block (``config.log_grad_norms``) every 50 steps, and the validation
error every half epoch. Each run is a ``train.py`` workdir under ``--workdir``: running the command
again resumes the unfinished runs from their checkpoints (every 100 steps), so the study can be spread
over several sessions.

- ``degradation`` (He et al. 2015, Fig. 6): plain-20, plain-56, ResNet-20, ResNet-56.
- ``orderings`` (He et al. 2016): ResNet-20 with the original (v1), pre-activation (v2) and
  ReLU-before-add blocks.

Writes ``OUT/effects.json`` (every curve) and ``OUT/degradation.png``, ``OUT/orderings.png``,
``OUT/block_grad_norms.png``; docs/cifar.md reads them. ``DIR`` holds CIFAR-10 as the pickle release or
as ``train/<class>/*.png|jpg`` (5,000 images held out when there is no ``test/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # The repository, when run from a clone without install.

# name: (model, model options, which studies it belongs to)
RUNS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
  "plain20": ("plain20", {}, ("degradation",)),
  "plain56": ("plain56", {}, ("degradation",)),
  "resnet20": ("resnet20", {"zero_init_residual": False}, ("degradation", "orderings")),
  "resnet56": ("resnet56", {"zero_init_residual": False}, ("degradation",)),
  "resnet20_v2": ("preact_resnet20", {"zero_init_residual": False}, ("orderings",)),
  "resnet20_relu_before_add": (
    "resnet20",
    {"zero_init_residual": False, "block_order": "relu_before_add"},
    ("orderings",),
  ),
}
STUDIES = ("degradation", "orderings")


def run_config(model: str, options: dict, data_dir: str, epochs: float):
  """The training config every run of the study shares; only the model differs."""
  from resnet_jax.config_check import base_config

  c = base_config()
  c.dataset.name = "cifar10"
  c.dataset.data_dir = data_dir
  c.dataset.holdout = -1
  c.dataset.augment = "pad_crop_flip"
  c.model.name = model
  c.model.options = dict(options)
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = float(epochs)
  c.optimizer.name = "nesterov"
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "linear"
  c.schedule.unit = "epochs"
  c.schedule.warmup = 0.5
  c.log_every_steps = 50
  c.log_grad_norms = True
  c.eval_every_steps = 175  # about half an epoch of 45,000 images
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 1
  c.progress_bar = False
  c.host_memory = "keep"
  return c


def curves(workdir: str) -> dict[str, Any]:
  """A finished run's curves from its metrics.jsonl and summary.json."""
  from resnet_jax.metrics import read_metrics

  records = read_metrics(workdir)
  train = [r for r in records if r.get("split") == "train"]
  test = [r for r in records if r.get("split") == "test"]
  blocks = sorted({k.split("/", 1)[1] for r in train for k in r if k.startswith("grad_norm/")}, key=_block_order)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {
    "steps": [r["step"] for r in train],
    "train_error": [1 - r["accuracy"] for r in train],
    "train_loss": [r["loss"] for r in train],
    "eval_steps": [r["step"] for r in test],
    "val_error": [1 - r["accuracy"] for r in test],
    "grad_norm": {b: [r.get(f"grad_norm/{b}") for r in train] for b in blocks},
    "parameters": summary["parameters"],
    "images_per_sec": summary["images_per_sec"],
    "wall_time_s": summary.get("wall_time_s"),
    "final_train_error": _mean_tail([1 - r["accuracy"] for r in train], 5),
    "final_val_error": 1 - summary["test_accuracy"],
  }


def _block_order(name: str) -> tuple:
  """conv1 (the stem), layer1_0, ..., layer3_2, then the rest (fc), in the order of the network."""
  if name.startswith("layer"):
    stage, block = name[5:].split("_")
    return (1, int(stage), int(block))
  return (0 if name.startswith(("conv1", "bn1", "stem")) else 2, 0, 0, name)


def _mean_tail(values: list[float], n: int) -> float:
  tail = values[-n:]
  return sum(tail) / len(tail)


def plot(results: dict[str, Any], out: str) -> list[str]:
  """The three figures; returns their paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs, paths = results["runs"], []
  budget = f"{results['epochs']:g} epochs, CIFAR-10 ({results['machine']})"
  for study, names, title in (
    ("degradation", ("plain20", "plain56", "resnet20", "resnet56"), "plain vs residual"),
    ("orderings", ("resnet20", "resnet20_v2", "resnet20_relu_before_add"), "ResNet-20 block orderings"),
  ):
    names = [n for n in names if n in runs]
    if study not in results.get("studies", STUDIES) or not names:
      continue
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for name in names:
      r = runs[name]
      style = "--" if name.startswith("plain") else "-"
      (line,) = axes[0].plot(r["steps"], [100 * e for e in r["train_error"]], style, label=name)
      axes[1].plot(
        r["eval_steps"], [100 * e for e in r["val_error"]], style + "o", ms=3, color=line.get_color(), label=name
      )
    for ax, what in zip(
      axes, ("training error (augmented batches, 50-step mean)", "validation error (5,000 held-out images)")
    ):
      ax.set_xlabel("step (batch 128)")
      ax.set_title(what)
      ax.grid(alpha=0.3)
      ax.legend()
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, 100)
    fig.suptitle(f"{title}: {budget}")
    fig.tight_layout()
    paths.append(os.path.join(out, f"{study}.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  names = [n for n in ("plain20", "plain56", "resnet20", "resnet56") if n in runs]
  if "degradation" in results.get("studies", STUDIES) and names:
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
      r = runs[name]
      blocks = [b for b in r["grad_norm"] if b.startswith("layer")]
      cmap = plt.get_cmap("viridis")
      for i, b in enumerate(blocks):
        ax.plot(r["steps"], r["grad_norm"][b], color=cmap(i / max(len(blocks) - 1, 1)), lw=0.8)
      ax.set_yscale("log")
      ax.set_xlabel("step")
      ax.set_title(f"{name}: ||dL/dW|| per block\n(dark: first block, yellow: last)")
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gradient norm (50-step mean)")
    fig.tight_layout()
    paths.append(os.path.join(out, "block_grad_norms.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


def main(argv: list[str] | None = None) -> int:
  from resnet_jax import machine
  from resnet_jax.errors import ConfigError, parse_args

  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--data_dir", required=True, help="CIFAR-10: pickle release or train/<class>/ images")
  parser.add_argument("--epochs", type=float, default=3.0, help="the budget of every run (default 3)")
  parser.add_argument("--runs", default="degradation,orderings", help="comma-separated studies")
  parser.add_argument(
    "--workdir",
    default=os.path.join("runs", "cifar_effects"),
    help="one train.py workdir per run (resumed when present)",
  )
  parser.add_argument(
    "--out", default=os.path.join("docs", "figures", "cifar"), help="where effects.json and the figures go"
  )
  parser.add_argument("--plot_only", action="store_true", help="redraw from the finished runs")
  args = parse_args(
    parser,
    argv,
    "usage: python experiments/cifar_effects.py --data_dir DIR "
    "[--epochs E] [--runs degradation,orderings] [--workdir W] [--out O]",
  )
  studies = [s for s in args.runs.split(",") if s]
  unknown = [s for s in studies if s not in STUDIES]
  if unknown or not studies:
    raise ConfigError(f"--runs={args.runs!r}: expected a comma-separated subset of {', '.join(STUDIES)}")
  if not args.epochs > 0:
    raise ConfigError(f"--epochs={args.epochs}: expected a positive number of epochs")
  names = [n for n, (_, _, s) in RUNS.items() if set(s) & set(studies)]
  if not args.plot_only:
    from resnet_jax import host_memory

    # Before jax starts, as train.py does for the shared recipe (host_memory = "keep").
    host_memory.apply(host_memory.choose_for_config(run_config(*RUNS[names[0]][:2], args.data_dir, args.epochs)))
    from resnet_jax import train_loop

    for name in names:
      model, options, _ = RUNS[name]
      print(f"== {name}: {model} {options or ''}", flush=True)
      summary = train_loop.train_and_evaluate(
        run_config(model, options, args.data_dir, args.epochs), os.path.join(args.workdir, name)
      )
      print(
        f"{name}: validation error {1 - summary['test_accuracy']:.4f} after {summary['steps']} steps, "
        f"{summary['wall_time_s']:.0f} s",
        flush=True,
      )
  missing = [n for n in names if not os.path.isfile(os.path.join(args.workdir, n, "summary.json"))]
  if missing:
    raise ConfigError(
      f"--plot_only: no finished run for {', '.join(missing)} in {args.workdir} (run without --plot_only first)"
    )
  results = {
    "epochs": args.epochs,
    "machine": machine.one_line(),
    "studies": studies,
    "command": f"python experiments/cifar_effects.py --data_dir CIFAR10_DIR --epochs {args.epochs:g} "
    f"--runs {','.join(studies)}",
    "runs": {n: curves(os.path.join(args.workdir, n)) for n in names},
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "effects.json"), "w") as f:
    json.dump(results, f, indent=1)
  for path in plot(results, args.out):
    print(f"wrote {path}")
  for n, r in results["runs"].items():
    print(
      f"{n:<26} train error {100 * r['final_train_error']:5.1f}%  validation error {100 * r['final_val_error']:5.1f}%"
    )
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli

  run_cli(main)
