"""Classify image files with a trained run or a weights file: the top-k classes with their probabilities.

  python -m resnet_jax.predict --workdir=RUN img1.jpg img2.png folder/ ... [--top-k=5] [--json]
  python -m resnet_jax.predict --weights=resnet50.safetensors --model=resnet50 img.jpg [--labels=names.txt]

With ``--workdir`` the images get the preprocessing of that run's evaluation (:mod:`resnet_jax.data`):
image folders a resize of the shorter side to ``image_size / 0.875`` and a centre crop of ``image_size``,
CIFAR a resize to 32x32, digits a grey-scale resize to 8x8 in [0, 1]; then the run's normalisation. Class
names are the run's (image folders: the sub-folders of ``DATA_DIR/train``; CIFAR-10's and the digits' names;
else ``class N``). With ``--weights`` (a torchvision state dict) the preprocessing is ImageNet's (224
pixels, ImageNet statistics) unless ``--image-size`` says otherwise. Folders are searched recursively for
image files. A missing or unreadable image, or a bad weights file, is one ``error:`` line and exit status 2.

The same in Python: :func:`load_predictor` and :meth:`Predictor.predict` / :meth:`Predictor.classify`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from resnet_jax import augment, datasets
from resnet_jax.errors import ConfigError, DataError, parse_args, run_cli

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclasses.dataclass
class Preprocessing:
  """How an image file becomes a model input: the evaluation path of the run's dataset.

  Attributes:
    kind: ``"center_crop"`` (image folders, ImageNet), ``"resize"`` (CIFAR) or ``"digits"`` (8x8 grey).
    size: the model's input height and width.
    mean / std: per-channel normalisation of pixels in [0, 1].
  """

  kind: str
  size: int
  mean: np.ndarray
  std: np.ndarray

  @property
  def channels(self) -> int:
    return 1 if self.kind == "digits" else 3

  def load(self, path: str) -> np.ndarray:
    """The normalised ``(H, W, C)`` float32 input for the image file ``path``."""
    from PIL import Image

    if not os.path.isfile(path):
      raise DataError(f"image not found: {path}")
    try:
      with Image.open(path) as im:
        im.load()
        img = im.convert("L" if self.kind == "digits" else "RGB")
    except Exception as e:  # Pillow raises many types on bad data (OSError, SyntaxError, ...)
      raise DataError(f"cannot read image {path}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if self.kind == "center_crop":
      x = augment.center_crop(img, self.size)
    else:
      if img.size != (self.size, self.size):
        img = img.resize((self.size, self.size), Image.BILINEAR)
      x = np.asarray(img, dtype=np.uint8)
      if x.ndim == 2:
        x = x[..., None]
    return augment.normalize(x, self.mean, self.std)


@dataclasses.dataclass
class Predictor:
  """A model with its variables, preprocessing and class names. Build one with :func:`load_predictor`."""

  model: Any
  variables: dict
  preprocessing: Preprocessing
  class_names: list[str]
  batch_size: int = 32

  def __post_init__(self):
    import jax

    self._apply = jax.jit(lambda v, x: jax.nn.softmax(self.model.apply(v, x, train=False).astype("float32")))

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """Class probabilities ``(N, classes)`` of preprocessed images ``(N, H, W, C)`` (in batches)."""
    out = []
    for i in range(0, len(images), self.batch_size):
      out.append(np.asarray(self._apply(self.variables, images[i : i + self.batch_size])))
    return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

  def predict(self, paths: Sequence[str]) -> np.ndarray:
    """Class probabilities ``(N, classes)`` of image files (every file is read first: a bad one raises
    :class:`~resnet_jax.errors.DataError` before any work)."""
    images = np.stack([self.preprocessing.load(p) for p in paths]) if len(paths) else np.zeros((0,))
    return self.probabilities(images)

  def classify(self, paths: Sequence[str], top_k: int = 5) -> list[dict]:
    """For each file ``{"path", "top": [(class name, probability), ...]}``, most probable first."""
    probs = self.predict(list(paths))
    k = max(1, min(int(top_k), probs.shape[-1] if probs.ndim == 2 else 1))
    results = []
    for path, p in zip(paths, probs):
      order = np.argsort(-p, kind="stable")[:k]
      results.append({"path": path, "top": [(self.class_names[int(i)], float(p[i])) for i in order]})
    return results


def expand_paths(items: Sequence[str]) -> list[str]:
  """Files as given and the image files under each folder (recursively, sorted)."""
  paths = []
  for item in items:
    if os.path.isdir(item):
      found = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(item)
        for f in files
        if f.lower().endswith(datasets.IMAGE_EXTENSIONS)
      )
      if not found:
        raise DataError(f"folder {item} holds no image files ({', '.join(datasets.IMAGE_EXTENSIONS)})")
      paths.extend(found)
    elif os.path.exists(item):
      paths.append(item)
    else:
      raise DataError(f"image not found: {item}")
  return paths


def _recorded_classes(workdir: str) -> list[str] | None:
  """``WORKDIR/data.json``'s class names (written by the run for an image folder), or ``None``."""
  from resnet_jax.evaluate import recorded_data

  classes = (recorded_data(workdir) or {}).get("classes")
  return [str(c) for c in classes] if isinstance(classes, list) else None


def _run_class_names(config, num_classes: int, workdir: str) -> list[str]:
  """The run's class names: those its ``data.json`` recorded (an image folder's, even where the data has
  moved or was a tar archive), else the data folder's, CIFAR-10's or the digits', else ``class i``."""
  ds = config.dataset
  names = _recorded_classes(workdir)
  if names is None:
    if ds.name == "image_folder" and os.path.isdir(os.path.join(ds.data_dir, "train")):
      names = sorted(e.name for e in os.scandir(os.path.join(ds.data_dir, "train")) if e.is_dir())
    elif ds.name == "cifar10":
      names = list(CIFAR10_CLASSES)
    elif ds.name == "digits":
      names = [str(i) for i in range(10)]
  names = list(names or [])
  return names[:num_classes] + [f"class {i}" for i in range(len(names), num_classes)]


def run_preprocessing(config) -> Preprocessing:
  """The evaluation preprocessing of a run's ``config.dataset``."""
  ds = config.dataset
  if ds.name == "image_folder":
    kind, size, mean, std = "center_crop", int(ds.image_size), augment.IMAGENET_MEAN, augment.IMAGENET_STD
  elif ds.name in ("cifar10", "cifar100"):
    kind, size = "resize", 32
    mean, std = (
      (augment.CIFAR10_MEAN, augment.CIFAR10_STD)
      if ds.name == "cifar10"
      else (augment.CIFAR100_MEAN, augment.CIFAR100_STD)
    )
  else:  # digits: the training split's statistics, as data.load_dataset computes them
    x_train = datasets.digits_split(seed=0, test_fraction=ds.test_fraction)[0]
    kind, size, mean, std = "digits", 8, (float(x_train.mean()),), (float(x_train.std()),)
  channels = 1 if kind == "digits" else 3
  if len(ds.mean):
    mean = ds.mean
  if len(ds.std):
    std = ds.std
  mean = np.broadcast_to(np.asarray(mean, np.float32).reshape(-1), (channels,)).copy()
  std = np.broadcast_to(np.asarray(std, np.float32).reshape(-1), (channels,)).copy()
  return Preprocessing(kind, size, mean, std)


def load_run(workdir: str):
  """``(config, model, variables)`` of the newest checkpoint of the ``train.py`` run in ``workdir``
  (model in float32 on XLA's convolutions, the head sized from the checkpoint)."""
  from resnet_jax import finetune, run_setup
  from resnet_jax.evaluate import load_run_config

  config = load_run_config(workdir)
  variables, _ = finetune.read_run_variables(workdir)
  head = finetune.head_name(variables["params"])
  num_classes = int(np.shape(variables["params"][head]["kernel"])[-1]) if head else 0
  config.model.dtype = "float32"
  config.model.conv_backend = "xla"
  model = run_setup.build_model(config, num_classes)
  if not variables["batch_stats"]:
    variables = {"params": variables["params"]}
  return config, model, variables


def load_weights_file(weights: str, model_name: str):
  """``(model, variables)`` from a torchvision state dict file for the registered ``model_name``."""
  from resnet_jax import convert, models

  variables = convert.load_checkpoint(weights, model_name)
  num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[-1])
  return models.create_model(model_name, num_classes=num_classes), variables


def load_predictor(
  workdir: str | None = None,
  weights: str | None = None,
  model: str | None = None,
  image_size: int | None = None,
  labels: Sequence[str] | None = None,
  batch_size: int = 32,
) -> Predictor:
  """A :class:`Predictor` for a run (``workdir``) or a weights file (``weights`` + ``model``)."""
  if bool(workdir) == bool(weights):
    raise ConfigError("give either a run's workdir or a weights file (with its model name), not both")
  if workdir:
    config, net, variables = load_run(workdir)
    prep = run_preprocessing(config)
    if image_size:
      prep.size = int(image_size)
    num_classes = net.num_classes
    names = _run_class_names(config, num_classes, workdir)
  else:
    if not model:
      raise ConfigError("a weights file needs its model name (--model=NAME, e.g. resnet50)")
    net, variables = load_weights_file(weights, model)
    prep = Preprocessing(
      "center_crop",
      int(image_size or 224),
      np.asarray(augment.IMAGENET_MEAN, np.float32),
      np.asarray(augment.IMAGENET_STD, np.float32),
    )
    num_classes = net.num_classes
    names = [f"class {i}" for i in range(num_classes)]
  if labels is not None:
    labels = list(labels)
    if len(labels) != num_classes:
      raise ConfigError(f"{len(labels)} class names given for a model of {num_classes} classes")
    names = labels
  return Predictor(net, variables, prep, names, batch_size)


def main(argv: list[str]) -> int:
  import argparse

  parser = argparse.ArgumentParser(prog="python -m resnet_jax.predict", description=__doc__.split("\n")[0])
  parser.add_argument("images", nargs="+", help="image files and folders")
  parser.add_argument("--workdir", help="output folder of a train.py run")
  parser.add_argument("--weights", help="a torchvision state dict (.pth/.pt/.safetensors/.npz)")
  parser.add_argument("--model", help="the model of --weights (e.g. resnet50)")
  parser.add_argument("--image-size", type=int, default=None, help="input size (default: the run's, or 224)")
  parser.add_argument("--labels", help="text file with one class name per line")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--json", action="store_true", help="one JSON object per image")
  args = parse_args(
    parser,
    argv,
    "usage: python -m resnet_jax.predict (--workdir=RUN | --weights=FILE --model=NAME) IMAGE_OR_FOLDER ...",
  )
  if args.top_k < 1 or args.batch_size < 1:
    raise ConfigError("--top-k and --batch-size must be positive")
  labels = None
  if args.labels:
    if not os.path.isfile(args.labels):
      raise ConfigError(f"--labels file not found: {args.labels}")
    with open(args.labels) as f:
      labels = [line.strip() for line in f if line.strip()]
  paths = expand_paths(args.images)
  predictor = load_predictor(args.workdir, args.weights, args.model, args.image_size, labels, args.batch_size)
  for result in predictor.classify(paths, args.top_k):
    if args.json:
      print(json.dumps({"path": result["path"], "top": [{"class": c, "probability": p} for c, p in result["top"]]}))
    else:
      print(result["path"] + "\t" + "  ".join(f"{c} {p:.4f}" for c, p in result["top"]))
  return 0


if __name__ == "__main__":
  run_cli(main, sys.argv[1:])
