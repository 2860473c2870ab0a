"""Pretrained on CIFAR-10 photographs, fine-tuned on the handwritten digits, against training from scratch.

usage: python experiments/transfer_digits.py --weights c10_r20.safetensors [--model resnet20]
           [--train_sizes 100,1437] [--seeds 0,1,2] [--steps 300] [--workdir runs/transfer_digits]
           [--out docs/figures/cifar]

``--weights`` is a torchvision-layout state dict written from a CIFAR-10 run, e.g.
``python -m resnet_jax.finetune --workdir=runs/cifar10_fast --out=c10_r20.safetensors``. The digits
(scikit-learn's 8x8 images, the fixed split of the digits config: 1,437 training and 360 test images)
are written once as an image folder of 32x32 RGB PNGs (bilinear upsampling) under ``--workdir``. Each
arm trains the same model with the same recipe (batch 32, SGD 0.9, lr 0.05 with 10 warmup steps and a
cosine decay over ``--steps`` steps, weight decay 1e-4, 2-pixel pad-crop, CIFAR-10's normalisation)
and differs only in its start: the CIFAR-10 weights with a new 10-class head (``pretrained``), or a
random initialisation (``scratch``). ``--train_sizes`` takes fixed subsets of the training split
(``dataset.max_train_examples``: the first N of a fixed permutation; the rest is not used). Writes
OUT/transfer_digits.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # The repository, when run from a clone without install.
sys.path.insert(0, HERE)


def write_digits_folder(root: str) -> str:
  """The digits split as ``root/{train,test}/<digit>/<index>.png`` (32x32 RGB); kept when present."""
  import numpy as np
  from PIL import Image

  from resnet_jax.datasets import digits_split

  if os.path.isdir(os.path.join(root, "test")):
    return root
  x_train, y_train, x_test, y_test = digits_split()
  for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
    for i, (x, y) in enumerate(zip(xs, ys)):
      folder = os.path.join(root, split, str(int(y)))
      os.makedirs(folder, exist_ok=True)
      img = Image.fromarray(np.round(x[..., 0] * 255).astype(np.uint8))
      img.resize((32, 32), Image.BILINEAR).convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))
  return root


def arm_config(data_dir: str, model: str, weights: str, train_size: int, steps: int, seed: int):
  """One arm: the shared recipe, started from ``weights`` ("" = random initialisation)."""
  from resnet_jax.augment import CIFAR10_MEAN, CIFAR10_STD
  from resnet_jax.config_check import base_config

  c = base_config()
  c.seed = seed
  c.dataset.name = "image_folder"
  c.dataset.data_dir = data_dir
  c.dataset.image_size = 32
  c.dataset.augment = "pad_crop"
  c.dataset.crop_padding = 2
  c.dataset.mean, c.dataset.std = tuple(CIFAR10_MEAN), tuple(CIFAR10_STD)
  c.dataset.max_train_examples = train_size
  c.model.name = model
  c.finetune.weights = weights
  c.finetune.reset_head = bool(weights)  # a new 10-class head for the new task
  c.finetune.backbone_lr_scale = 1.0
  c.batch_size = 32
  c.eval_batch_size = 120
  c.num_train_steps = steps
  c.optimizer.learning_rate = 0.05
  c.optimizer.weight_decay = 1e-4
  c.schedule.name, c.schedule.unit, c.schedule.warmup = "cosine", "steps", 10.0
  c.log_every_steps = 50
  c.eval_every_steps = steps
  c.progress_bar = False
  return c


def main(argv: list[str] | None = None) -> int:
  from resnet_jax import machine
  from resnet_jax.errors import ConfigError, parse_args

  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--weights", required=True, help="torchvision-layout weights trained on CIFAR-10")
  parser.add_argument("--model", default="resnet20", help="the model the weights belong to")
  parser.add_argument("--train_sizes", default="100,1437", help="training images per run")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=300, help="SGD steps of every run")
  parser.add_argument("--workdir", default=os.path.join("runs", "transfer_digits"))
  parser.add_argument("--out", default=os.path.join("docs", "figures", "cifar"))
  args = parse_args(
    parser,
    argv,
    "usage: python experiments/transfer_digits.py --weights FILE "
    "[--model resnet20] [--train_sizes 100,1437] [--seeds 0,1,2] [--steps 300]",
  )
  try:
    sizes = [int(v) for v in args.train_sizes.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
  except ValueError:
    raise ConfigError(
      f"--train_sizes={args.train_sizes!r} --seeds={args.seeds!r}: expected comma-separated integers"
    ) from None
  if not os.path.isfile(args.weights):
    raise ConfigError(
      f"--weights={args.weights}: no such file (write one with python -m "
      f"resnet_jax.finetune --workdir=RUN --out=FILE.safetensors)"
    )
  from resnet_jax import host_memory

  # Before jax starts, as train.py does: every arm shares the batch and image size that auto decides from.
  host_memory.apply(host_memory.choose_for_config(arm_config("", args.model, "", sizes[0], args.steps, seeds[0])))
  from resnet_jax import train_loop

  data_dir = write_digits_folder(os.path.join(args.workdir, "digits_png"))
  rows = []
  for size in sizes:
    for arm, weights in (("pretrained", os.path.abspath(args.weights)), ("scratch", "")):
      for seed in seeds:
        config = arm_config(data_dir, args.model, weights, size, args.steps, seed)
        summary = train_loop.train_and_evaluate(
          config, os.path.join(args.workdir, f"{arm}_n{size}_s{seed}"), log=lambda *_: None
        )
        rows.append(
          {
            "arm": arm,
            "train_size": size,
            "seed": seed,
            "test_accuracy": summary["test_accuracy"],
            "final_train_loss": summary["final_train_loss"],
          }
        )
        print(f"{arm:<10} {size:>5} images  seed {seed}: test accuracy {summary['test_accuracy']:.4f}", flush=True)
  table = {}
  for size in sizes:
    for arm in ("pretrained", "scratch"):
      accs = [r["test_accuracy"] for r in rows if r["arm"] == arm and r["train_size"] == size]
      table[f"{arm}_{size}"] = {"mean": statistics.mean(accs), "min": min(accs), "max": max(accs)}
  result = {
    "machine": machine.one_line(),
    "model": args.model,
    "steps": args.steps,
    "seeds": seeds,
    "weights": os.path.basename(args.weights),
    "runs": rows,
    "summary": table,
    "command": f"python experiments/transfer_digits.py --weights {os.path.basename(args.weights)} "
    f"--model {args.model} --train_sizes {args.train_sizes} --seeds {args.seeds} "
    f"--steps {args.steps}",
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "transfer_digits.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"\n{'training images':>16} {'pretrained':>22} {'scratch':>22}   (test accuracy, mean [min, max])")
  for size in sizes:
    cells = [table[f"{arm}_{size}"] for arm in ("pretrained", "scratch")]
    print(
      f"{size:>16} " + " ".join(f"{100 * c['mean']:>8.2f}% [{100 * c['min']:.1f}, {100 * c['max']:.1f}]" for c in cells)
    )
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli

  run_cli(main)
