"""A train.py CIFAR config trained by PyTorch on the same batches: the reference accuracy of a recipe.

usage: python experiments/torch_reference.py --config configs/cifar10_fast.py --data_dir DIR
           [--epochs E] [--dtype float32|bfloat16|auto] [--out docs/figures/cifar] [--name NAME]

What is shared with ``train.py``, so that only the network and optimizer implementations differ:

- the data: ``resnet_jax.data.load_dataset`` and ``train_pipeline`` with the config's seed give the very
  same training batches (order, augmentation, normalisation) and the same evaluation split;
- the learning rate of every step: ``resnet_jax.optim.make_schedule``;
- the evaluation: the config's evaluation cadence and, with ``eval_flip``, the mean of each image's and
  its mirror image's logits.

PyTorch side: the model of ``benchmarks/torch_models.py`` (the same architecture, written independently),
initialised as ``resnet_jax.models`` does (He normal, fan_out, for convolutions; the torch default for the
linear head; the last BN scale of each residual block at 0 unless the config's ``zero_init_residual`` is
False), ``torch.optim.SGD`` with momentum (Nesterov for ``nesterov``) and L2 weight decay on the
kernels only, cross-entropy with the config's label smoothing, bfloat16 through ``torch.autocast``.

Writes OUT/NAME.json with the same fields as ``experiments/time_to_accuracy.py`` (the curve of validation
accuracy against wall time, everything included), so the two can be read side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # The repository, when run from a clone without install.
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, HERE)


def check_supported(cfg) -> None:
  """A ConfigError unless the PyTorch reference implements ``cfg``'s dataset, model and optimizer."""
  import torch_models

  from resnet_jax.errors import ConfigError

  name = cfg.model.name
  if cfg.dataset.name not in ("cifar10", "cifar100"):
    raise ConfigError(f"config.dataset.name = {cfg.dataset.name!r}: the PyTorch reference trains cifar10/cifar100")
  if not torch_models.has_counterpart(name) or name in torch_models.TORCHVISION_NAMES:
    raise ConfigError(
      f"config.model.name = {name!r}: the PyTorch reference implements the CIFAR ResNets and plain nets "
      "(resnet20..110, plain20..110)"
    )
  unknown = sorted(set(cfg.model.options) - {"zero_init_residual"})
  if unknown:
    raise ConfigError(f"config.model.options {unknown}: the PyTorch reference implements zero_init_residual only")
  if cfg.optimizer.name not in torch_models.SGD_OPTIMIZERS:
    raise ConfigError(
      f"config.optimizer.name = {cfg.optimizer.name!r}: the PyTorch reference implements "
      f"{', '.join(torch_models.SGD_OPTIMIZERS)}"
    )
  if cfg.num_train_steps > 0:
    raise ConfigError("config.num_train_steps is set: the PyTorch reference counts training in num_epochs")


def build_model(cfg, num_classes: int):
  """The PyTorch counterpart of ``cfg.model`` (:func:`check_supported`), initialised the way
  ``resnet_jax.models`` initialises it."""
  import torch
  import torch_models
  from torch import nn

  name = cfg.model.name
  model = torch_models.create_torch_model(name, num_classes)
  zero_init = dict(cfg.model.options).get("zero_init_residual", name.startswith("resnet"))
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if hasattr(m, "bn2") and zero_init:
      nn.init.zeros_(m.bn2.weight)
  return model.to(memory_format=torch.channels_last)


def to_torch(images):
  """NHWC float32 numpy images as an NCHW tensor in channels-last memory (no copy of the pixels)."""
  import torch

  return torch.from_numpy(images).permute(0, 3, 1, 2)


def evaluate(model, ds, cfg, autocast) -> float:
  """Accuracy on the evaluation split, with the config's flip test-time augmentation."""
  import torch

  from resnet_jax import data

  model.eval()
  correct = 0.0
  with torch.no_grad(), autocast():
    for batch in data.eval_batches(ds, int(cfg.eval_batch_size)):
      x = to_torch(batch["image"])
      logits = model(x).float()
      if cfg.eval_flip:
        logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
      hit = (logits.argmax(1).numpy() == batch["label"]).astype("float64")
      correct += float((hit * batch["mask"]).sum())
  model.train()
  return correct / ds.num_test


def main(argv: list[str] | None = None) -> int:
  import numpy as np
  import torch_models
  from time_to_accuracy import time_to_accuracy

  from resnet_jax import data, machine, optim, run_setup
  from resnet_jax.config_check import load_config_file
  from resnet_jax.errors import ConfigError, parse_args

  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", required=True, help="a train.py config file, such as configs/cifar10_fast.py")
  parser.add_argument("--data_dir", required=True, help="CIFAR as the pickle release or train/<class>/*.jpg")
  parser.add_argument("--epochs", type=float, default=0.0, help="config.num_epochs (default: the config's)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="", help="default: the config's")
  parser.add_argument("--target", type=float, default=0.91, help="accuracy to reach (default 0.91)")
  parser.add_argument("--out", default=os.path.join("docs", "figures", "cifar"))
  parser.add_argument("--name", default="", help="file name (default: CONFIG_torch)")
  args = parse_args(
    parser,
    argv,
    "usage: python experiments/torch_reference.py --config FILE --data_dir DIR [--epochs E] "
    "[--dtype float32|bfloat16|auto] [--out DIR] [--name NAME]",
  )
  started = time.perf_counter()
  cfg = load_config_file(args.config)
  cfg.dataset.data_dir = args.data_dir
  if args.epochs:
    cfg.num_epochs = args.epochs
  if args.dtype:
    cfg.model.dtype = args.dtype
  check_supported(cfg)
  cfg.model.dtype = run_setup.compute_dtype(cfg)  # "auto": what train.py would compute in on this machine

  import torch

  threads = machine.available_cpus()
  torch.set_num_threads(threads)
  torch.manual_seed(int(cfg.seed))
  bf16 = cfg.model.dtype == "bfloat16"

  def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

  ds = data.load_dataset(cfg.dataset, progress=False)
  steps_per_epoch = ds.num_train // int(cfg.batch_size)
  total_steps = int(round(float(cfg.num_epochs) * steps_per_epoch))
  schedule = optim.make_schedule(cfg, steps_per_epoch, total_steps)
  lrs = np.asarray([float(schedule(s)) for s in range(total_steps)])
  model = build_model(cfg, ds.num_classes)
  opt = torch_models.torch_sgd(model, cfg.optimizer)
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing))
  batches = iter(data.train_pipeline(ds, int(cfg.batch_size), int(cfg.seed), num_threads=int(cfg.dataset.num_threads)))

  records = []
  train_started, train_seconds = None, 0.0
  model.train()
  for step in range(total_steps):
    batch = next(batches)
    if step == 1:  # Images/s of the steady state: from the second step on.
      train_started = time.perf_counter()
    for group in opt.param_groups:
      group["lr"] = lrs[step]
    x, y = to_torch(batch["image"]), torch.from_numpy(batch["label"].astype(np.int64))
    with autocast():
      loss = loss_fn(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    done = step + 1
    if done % int(cfg.eval_every_steps) == 0 or done == total_steps:
      if not torch.isfinite(loss):
        raise ConfigError(f"the PyTorch reference diverged at step {done} (loss {float(loss)})")
      pause = time.perf_counter()
      train_seconds += pause - train_started
      accuracy = evaluate(model, ds, cfg, autocast)
      wall = time.perf_counter() - started
      records.append(
        {"split": "test", "step": done, "epoch": done / steps_per_epoch, "accuracy": accuracy, "wall_time_s": wall}
      )
      print(f"step {done}/{total_steps} epoch {done / steps_per_epoch:.1f}: {100 * accuracy:.2f}% at {wall:.0f} s")
      train_started = time.perf_counter()

  curve = time_to_accuracy(records, args.target)
  name = args.name or os.path.splitext(os.path.basename(args.config))[0] + "_torch"
  result = {
    "name": name,
    "implementation": f"PyTorch {torch.__version__} (experiments/torch_reference.py)",
    "machine": machine.one_line(),
    "dtype": cfg.model.dtype,
    "model": cfg.model.name,
    "parameters": sum(p.numel() for p in model.parameters()),
    "steps": total_steps,
    "epochs": float(cfg.num_epochs),
    "final_accuracy": records[-1]["accuracy"],
    "best_accuracy": max(r["accuracy"] for r in records),
    "total_wall_time_s": time.perf_counter() - started,
    "train_images_per_sec": (total_steps - 1) * int(cfg.batch_size) / train_seconds,
    "recipe": {
      k: cfg[k].to_dict() if hasattr(cfg[k], "to_dict") else cfg[k]
      for k in ("batch_size", "num_epochs", "optimizer", "schedule", "label_smoothing", "eval_flip")
    },
    "eval_split": data.eval_split_name(ds.info),
    **curve,
  }
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"{name}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{name}: {100 * result['final_accuracy']:.2f}% after {result['total_wall_time_s'] / 60:.1f} min; wrote {path}")
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli

  run_cli(main)
