"""A train.py CIFAR config trained by PyTorch: the reference accuracy of a recipe.

usage: python experiments/torch_reference.py --config configs/cifar10_fast.py --data_dir DIR
           [--epochs E] [--dtype float32|bfloat16|auto] [--seed S] [--pipeline resnet_jax|torchvision]
           [--out docs/figures/cifar] [--name NAME]

What is shared with ``train.py``, so that only the network and optimizer implementations differ:

- the data, with ``--pipeline resnet_jax`` (the default): ``resnet_jax.data.load_dataset`` and
  ``train_pipeline`` with the config's seed give the very same training batches (order, augmentation,
  normalisation) and the same evaluation split. ``--pipeline torchvision`` reads an image folder with
  torchvision instead (:func:`torchvision_data`): its own decoding, shuffling, augmentation and
  normalisation, and only the choice of the held-out images shared (``resnet_jax.datasets.holdout_mask``),
  so that both evaluate on the same images;
- the learning rate of every step: ``resnet_jax.optim.make_schedule``;
- the evaluation: the config's evaluation cadence and test-time augmentation (``eval_flip``,
  ``eval_translate``), the views weighted as ``resnet_jax.train_step.eval_logits`` weights them.

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
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # The repository, when run from a clone without install.
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, HERE)


PIPELINES = ("resnet_jax", "torchvision")


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
  if float(cfg.get("ema_decay", 0)):
    raise ConfigError(f"config.ema_decay = {cfg.ema_decay}: the PyTorch reference keeps no weight average; set it to 0")
  if cfg.get("finetune") and cfg.finetune.get("weights"):
    raise ConfigError(f"config.finetune.weights = {cfg.finetune.weights!r}: the PyTorch reference trains from scratch")


def evaluation_steps(cfg, steps_per_epoch: int, total_steps: int) -> list[int]:
  """The steps after which ``train.py`` evaluates: every ``eval_every_steps`` (-1: every epoch) and the last."""
  every = int(cfg.eval_every_steps) if cfg.eval_every_steps > 0 else steps_per_epoch
  return sorted({*range(every, total_steps + 1, every), total_steps})


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


def eval_logits(model, x, flip: bool, translate: int):
  """The logits of the NCHW images ``x`` under the test-time augmentation of
  ``resnet_jax.train_step.eval_logits``, in PyTorch:

    logits = 1/2 v(x) + 1/4 v(shift(x, n)) + 1/4 v(shift(x, -n)),   v(x) = (f(x) + f(mirror x)) / 2

  (``v = f`` without ``flip``; no shifted views for ``translate = 0``), the shifted images cut from ``x``
  padded by reflection."""
  import torch
  import torch.nn.functional as F

  def f(images):  # bfloat16 logits (autocast) summed in float32; float64 kept
    logits = model(images)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))

  def view(images):
    logits = f(images)
    if flip:  # NCHW: the width is the last axis.
      logits = (logits + f(torch.flip(images, dims=[3]))) / 2
    return logits

  logits = view(x)
  if translate:
    n = int(translate)
    h, w = x.shape[2:]
    padded = F.pad(x, (n, n, n, n), mode="reflect")
    shifted = (view(padded[:, :, :h, :w]) + view(padded[:, :, 2 * n :, 2 * n :])) / 2
    logits = (logits + shifted) / 2
  return logits


def evaluate(model, batches, num_examples: int, flip: bool, translate: int, autocast) -> float:
  """Accuracy over ``batches`` of ``(images, labels, weights)`` (weight 0: padding), each batch scored by
  :func:`eval_logits`."""
  import torch

  model.eval()
  correct = 0.0
  with torch.no_grad(), autocast():
    for x, labels, weights in batches:
      logits = eval_logits(model, x, flip, translate)
      correct += float(((logits.argmax(1).numpy() == labels) * weights).sum())
  model.train()
  return correct / num_examples


@dataclasses.dataclass
class Data:
  """What the training loop needs of a pipeline: ``train`` yields ``(images, labels)`` tensors forever,
  ``eval_batches()`` the evaluation split as ``(images, labels, weights)``; images NCHW, channels-last."""

  num_train: int
  num_classes: int
  num_eval: int
  eval_split: str
  train: Iterator
  eval_batches: Callable[[], Iterator]
  details: dict


def resnet_jax_data(cfg) -> Data:
  """The batches of ``train.py`` itself: ``resnet_jax.data`` with the config's seed."""
  import numpy as np
  import torch

  from resnet_jax import data

  ds = data.load_dataset(cfg.dataset, progress=False)
  batches = data.train_pipeline(ds, int(cfg.batch_size), int(cfg.seed), num_threads=int(cfg.dataset.num_threads))
  train = ((to_torch(b["image"]), torch.from_numpy(b["label"].astype(np.int64))) for b in batches)

  def eval_batches():
    for b in data.eval_batches(ds, int(cfg.eval_batch_size)):
      yield to_torch(b["image"]), b["label"], b["mask"].astype("float64")

  details = {"pipeline": "resnet_jax (resnet_jax.data.train_pipeline, the batches of train.py)"}
  return Data(ds.num_train, ds.num_classes, ds.num_test, data.eval_split_name(ds.info), train, eval_batches, details)


def torchvision_data(cfg) -> Data:
  """An image folder read by torchvision alone: the recipe's data without ``resnet_jax.data``.

  ``torchvision.datasets.ImageFolder`` decodes ``DIR/train`` (and ``DIR/test`` when there is one and no
  holdout is asked for); each image once, into a uint8 tensor. The training images are normalised by their
  own per-channel mean and standard deviation, computed here, and augmented per image by
  ``transforms.RandomCrop(size, padding=crop_padding)`` (zero padding) and ``RandomHorizontalFlip`` as the
  config's ``dataset.augment`` says; a ``DataLoader`` reshuffles them every epoch (``torch.Generator``
  seeded with the config's seed) and drops the last partial batch, as ``train.py`` does. Shared with
  ``train.py``: which images are held out (``resnet_jax.datasets.holdout_mask``, the config's
  ``dataset.holdout`` and ``holdout_seed``), so that the accuracies are on the same images.
  """
  import numpy as np
  import torch
  from torchvision import datasets as tv_datasets
  from torchvision import transforms

  from resnet_jax.datasets import folder_holdout, holdout_mask
  from resnet_jax.errors import ConfigError

  ds_cfg = cfg.dataset
  root = os.path.join(ds_cfg.data_dir, "train")
  if not os.path.isdir(root):
    raise ConfigError(
      f"--pipeline torchvision reads an image folder: {os.path.abspath(root)} is not a directory "
      "(the pickle release works with --pipeline resnet_jax)"
    )
  if ds_cfg.augment not in ("none", "pad_crop", "pad_crop_flip") or int(ds_cfg.get("cutout", 0)):
    raise ConfigError(
      f"config.dataset.augment = {ds_cfg.augment!r}, cutout = {ds_cfg.get('cutout', 0)}: --pipeline torchvision "
      "implements none, pad_crop and pad_crop_flip without cutout"
    )
  for key in ("max_train_examples", "max_test_examples"):
    if int(ds_cfg.get(key, -1)) > 0:
      raise ConfigError(f"config.dataset.{key} = {ds_cfg[key]}: --pipeline torchvision reads every image; set it to -1")

  def decode(folder: str):
    found = tv_datasets.ImageFolder(folder)
    to_tensor = transforms.PILToTensor()
    images = [to_tensor(found.loader(path)) for path, _ in found.samples]
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1:
      raise ConfigError(f"{os.path.abspath(folder)}: images of several sizes {sorted(sizes)}; expected one size")
    keys = [os.path.relpath(path, folder).replace(os.sep, "/") for path, _ in found.samples]
    return torch.stack(images), torch.tensor(found.targets), keys, found.classes

  images, labels, keys, classes = decode(root)
  test_dir = os.path.join(ds_cfg.data_dir, "test")
  holdout = folder_holdout(ds_cfg.data_dir, float(ds_cfg.holdout))
  if holdout > 0:
    held = torch.from_numpy(holdout_mask(labels.numpy(), keys, holdout, int(ds_cfg.get("holdout_seed", 0))))
    eval_images, eval_labels = images[held], labels[held]
    images, labels = images[~held], labels[~held]
    eval_split = f"{int(held.sum()):,} held-out images"
  elif os.path.isdir(test_dir):
    eval_images, eval_labels, _, test_classes = decode(test_dir)
    if test_classes != classes:
      raise ConfigError(f"{os.path.abspath(test_dir)}: classes {test_classes}, expected those of train/: {classes}")
    eval_split = "test split"
  else:
    raise ConfigError(f"{os.path.abspath(ds_cfg.data_dir)} has no test/: hold out part of train/ (dataset.holdout)")

  sums = torch.zeros(2, images.shape[1], dtype=torch.float64)
  for chunk in torch.split(images, 4096):
    values = chunk.double() / 255
    sums += torch.stack([values.sum((0, 2, 3)), (values * values).sum((0, 2, 3))])
  count = images.shape[0] * images.shape[2] * images.shape[3]
  mean = sums[0] / count
  std = (sums[1] / count - mean * mean).sqrt()
  size = images.shape[-1]
  steps = [transforms.ConvertImageDtype(torch.float32), transforms.Normalize(mean.tolist(), std.tolist())]
  augment = []
  if ds_cfg.augment in ("pad_crop", "pad_crop_flip"):
    augment.append(transforms.RandomCrop(size, padding=int(ds_cfg.crop_padding)))
  if ds_cfg.augment == "pad_crop_flip":
    augment.append(transforms.RandomHorizontalFlip())
  train_transform, eval_transform = transforms.Compose([*augment, *steps]), transforms.Compose(steps)

  class Augmented(torch.utils.data.Dataset):
    def __len__(self):
      return len(labels)

    def __getitem__(self, i):
      return train_transform(images[i]), labels[i]

  generator = torch.Generator().manual_seed(int(cfg.seed))
  loader = torch.utils.data.DataLoader(
    Augmented(), batch_size=int(cfg.batch_size), shuffle=True, drop_last=True, generator=generator
  )

  def forever():
    while True:
      for x, y in loader:
        yield x.contiguous(memory_format=torch.channels_last), y

  def eval_batches():
    n = int(cfg.eval_batch_size)
    for start in range(0, len(eval_labels), n):
      x = eval_transform(eval_images[start : start + n]).contiguous(memory_format=torch.channels_last)
      y = eval_labels[start : start + n].numpy()
      yield x, y, np.ones(len(y))

  details = {
    "pipeline": "torchvision (ImageFolder, RandomCrop, RandomHorizontalFlip, DataLoader)",
    "normalization": {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]},
  }
  return Data(len(labels), len(classes), len(eval_labels), eval_split, forever(), eval_batches, details)


def main(argv: list[str] | None = None) -> int:
  import numpy as np
  import torch_models
  from time_to_accuracy import run_machine, time_to_accuracy

  from resnet_jax import machine, optim, run_setup
  from resnet_jax.config_check import load_config_file
  from resnet_jax.errors import ConfigError, parse_args

  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", required=True, help="a train.py config file, such as configs/cifar10_fast.py")
  parser.add_argument("--data_dir", required=True, help="CIFAR as the pickle release or train/<class>/*.jpg")
  parser.add_argument("--epochs", type=float, default=0.0, help="config.num_epochs (default: the config's)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="", help="default: the config's")
  parser.add_argument("--seed", type=int, default=None, help="config.seed (default: the config's)")
  parser.add_argument(
    "--pipeline",
    choices=PIPELINES,
    default="resnet_jax",
    help="the input pipeline: train.py's own batches (default), or torchvision's reading of an image folder",
  )
  parser.add_argument("--target", type=float, default=0.91, help="accuracy to reach (default 0.91)")
  parser.add_argument("--out", default=os.path.join("docs", "figures", "cifar"))
  parser.add_argument("--name", default="", help="file name (default: CONFIG_torch)")
  args = parse_args(
    parser,
    argv,
    "usage: python experiments/torch_reference.py --config FILE --data_dir DIR [--epochs E] "
    "[--dtype float32|bfloat16|auto] [--seed S] [--pipeline resnet_jax|torchvision] [--out DIR] [--name NAME]",
  )
  started = time.perf_counter()
  cfg = load_config_file(args.config)
  cfg.dataset.data_dir = args.data_dir
  if args.epochs:
    cfg.num_epochs = args.epochs
  if args.dtype:
    cfg.model.dtype = args.dtype
  if args.seed is not None:
    cfg.seed = args.seed
  check_supported(cfg)
  if cfg.get("time_budget_minutes", 0.0) > 0:  # train.py's wall clock; the reference trains the epochs it is given
    print(
      f"note: config.time_budget_minutes = {cfg.time_budget_minutes:g} is train.py's and does not apply here: "
      f"this trains the config's {cfg.num_epochs:g} epochs (--epochs for fewer)",
      file=sys.stderr,
    )
    cfg.time_budget_minutes = 0.0
  cfg.model.dtype = run_setup.compute_dtype(cfg)  # "auto": what train.py would compute in on this machine

  import torch

  threads = machine.available_cpus()
  torch.set_num_threads(threads)
  torch.manual_seed(int(cfg.seed))
  bf16 = cfg.model.dtype == "bfloat16"

  def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

  ds = torchvision_data(cfg) if args.pipeline == "torchvision" else resnet_jax_data(cfg)
  steps_per_epoch = ds.num_train // int(cfg.batch_size)
  total_steps = optim.total_train_steps(cfg, steps_per_epoch)
  schedule = optim.make_schedule(cfg, steps_per_epoch, total_steps)
  evaluations = set(evaluation_steps(cfg, steps_per_epoch, total_steps))
  lrs = np.asarray([float(schedule(s)) for s in range(total_steps)])
  model = build_model(cfg, ds.num_classes)
  opt = torch_models.torch_sgd(model, cfg.optimizer)
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing))

  records = []
  train_started, train_seconds = None, 0.0
  model.train()
  for step in range(total_steps):
    x, y = next(ds.train)
    if step == 1:  # Images/s of the steady state: from the second step on.
      train_started = time.perf_counter()
    for group in opt.param_groups:
      group["lr"] = lrs[step]
    with autocast():
      loss = loss_fn(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    done = step + 1
    if done in evaluations:
      if not torch.isfinite(loss):
        raise ConfigError(f"the PyTorch reference diverged at step {done} (loss {float(loss)})")
      pause = time.perf_counter()
      train_seconds += pause - train_started
      accuracy = evaluate(
        model, ds.eval_batches(), ds.num_eval, bool(cfg.eval_flip), int(cfg.get("eval_translate", 0)), autocast
      )
      wall = time.perf_counter() - started
      records.append(
        {"split": "test", "step": done, "epoch": done / steps_per_epoch, "accuracy": accuracy, "wall_time_s": wall}
      )
      print(f"step {done}/{total_steps} epoch {done / steps_per_epoch:.1f}: {100 * accuracy:.2f}% at {wall:.0f} s")
      train_started = time.perf_counter()

  curve = time_to_accuracy(records, args.target)
  details = machine.describe()
  name = args.name or os.path.splitext(os.path.basename(args.config))[0] + "_torch"
  result = {
    "name": name,
    "implementation": f"PyTorch {torch.__version__} (experiments/torch_reference.py)",
    "machine": run_machine(details),
    "machine_details": details,
    "dtype": cfg.model.dtype,
    "seed": int(cfg.seed),
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
    "eval_translate": int(cfg.get("eval_translate", 0)),
    "eval_split": ds.eval_split,
    **ds.details,
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
