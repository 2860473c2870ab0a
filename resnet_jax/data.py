"""Input data: the embedded digits set, CIFAR-10/100 pickles and image folders, as grain pipelines.

Every array this module hands out is NHWC float32 for images and int32 for labels.

Datasets (``config.dataset.name``):

- ``digits``: scikit-learn's 1,797 handwritten 8x8 digits (shipped inside scikit-learn), fixed stratified
  split (:func:`digits_split`), pixels / 16 in [0, 1].
- ``cifar10`` / ``cifar100``: the official python-pickle release, unpacked in ``data_dir``
  (``data_dir/cifar-10-batches-py/{data_batch_1..5,test_batch}`` or
  ``data_dir/cifar-100-python/{train,test}``; ``data_dir`` may also be that folder itself).
- ``image_folder``: ``data_dir/train/<class>/*.{jpg,jpeg,png,...}`` and ``data_dir/test/<class>/...``
  (ImageNet's usual layout), decoded with Pillow. Classes are the sorted sub-folder names of ``train``.

Pipelines (grain ``MapDataset``): the training set is shuffled with the run's seed, repeated with a new
order each epoch, cut into global batches (the last incomplete batch of an epoch runs into the next
epoch, so every batch has the same shape), and each batch is loaded and augmented with a
``np.random.Generator`` that grain derives from the seed and the batch index. The whole order is
therefore a pure function of (seed, step): the iterator state is just the next batch index
(``iterator.get_state()``), saved with every checkpoint.

Augmentation (``config.dataset.augment``): ``none``; ``pad_crop`` / ``pad_crop_flip`` (zero-pad
``crop_padding`` pixels per side, random crop back to the original size, random horizontal flip: the
CIFAR recipe); ``random_resized_crop_flip`` (image folders: area scale in [0.08, 1], aspect ratio in
[3/4, 4/3], bilinear resize to ``image_size``, random flip). Image folders are evaluated with a
resize of the shorter side to ``image_size / 0.875`` and a centre crop of ``image_size``.

Normalisation: ``(x - mean) / std`` per channel after augmentation, with pixels in [0, 1]:

- digits: mean and std of the training split's pixels (one channel), computed at load time;
- CIFAR-10: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616);
- CIFAR-100: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762);
- image folders: the ImageNet statistics mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225);

unless ``config.dataset.mean`` / ``config.dataset.std`` are given.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any, Iterator, Sequence

import numpy as np

from resnet_jax.errors import DataError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = ("digits", "cifar10", "cifar100", "image_folder")
AUGMENTATIONS = ("none", "pad_crop", "pad_crop_flip", "random_resized_crop_flip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
EVAL_CROP_FRACTION = 0.875

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py",
                "DATA_DIR/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch} (the python "
                "pickle release, cifar-10-python.tar.gz unpacked)"),
    "cifar100": ("cifar-100-python",
                 "DATA_DIR/cifar-100-python/{train, test} (the python pickle release, "
                 "cifar-100-python.tar.gz unpacked)"),
}
IMAGE_FOLDER_LAYOUT = ("DATA_DIR/train/<class>/*.jpg|png and DATA_DIR/test/<class>/*.jpg|png "
                       "(one sub-folder per class, the same class names in both)")


def digits_split(seed: int = 0, test_fraction: float = 0.2
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as a fixed stratified split.

  Pixels are divided by 16 so that images lie in [0, 1].

  Args:
    seed: seed of the split (the same seed always gives the same split).
    test_fraction: fraction of the images (per class) put into the test set, in (0, 1).

  Returns:
    ``(x_train, y_train, x_test, y_test)``: images float32 ``(N, 8, 8, 1)``, labels int32 ``(N,)``.
  """
  if not 0.0 < float(test_fraction) < 1.0:
    raise DataError(f"digits_split: test_fraction must lie in (0, 1), got {test_fraction!r}")
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  return (np.ascontiguousarray(x_train), np.ascontiguousarray(y_train),
          np.ascontiguousarray(x_test), np.ascontiguousarray(y_test))


# ----------------------------------------------------------------------------------------------
# Loading the raw datasets.


def _unpickle(path: str) -> dict:
  try:
    with open(path, "rb") as f:
      return pickle.load(f, encoding="bytes")
  except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
    raise DataError(f"cannot read CIFAR pickle file {path}: {e}") from None


def _cifar_folder(data_dir: str, name: str) -> str:
  """The folder holding the pickles: ``data_dir/<release folder>`` or ``data_dir`` itself."""
  folder, layout = CIFAR_LAYOUT[name]
  marker = "data_batch_1" if name == "cifar10" else "train"
  for candidate in (os.path.join(data_dir, folder), data_dir):
    if data_dir and os.path.isfile(os.path.join(candidate, marker)):
      return candidate
  where = os.path.abspath(data_dir) if data_dir else "(config.dataset.data_dir is empty)"
  raise DataError(
      f"{name} not found in {where}: expected {layout.replace('DATA_DIR', data_dir or 'DATA_DIR')}; "
      f"set --config.dataset.data_dir to the folder that holds it (no download is attempted)")


def load_cifar(data_dir: str, name: str = "cifar10"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """CIFAR-10 or CIFAR-100 from the official python-pickle release in ``data_dir``.

  Returns:
    ``(x_train, y_train, x_test, y_test)``: images uint8 NHWC ``(N, 32, 32, 3)``, labels int32
    (CIFAR-100: the 100 fine labels).
  """
  if name not in CIFAR_LAYOUT:
    raise DataError(f"unknown CIFAR variant {name!r}: expected one of {sorted(CIFAR_LAYOUT)}")
  folder = _cifar_folder(data_dir, name)
  if name == "cifar10":
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files, label_key = ["test_batch"], b"labels"
  else:
    train_files, test_files, label_key = ["train"], ["test"], b"fine_labels"

  def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for fname in files:
      path = os.path.join(folder, fname)
      if not os.path.isfile(path):
        raise DataError(f"{name}: missing file {path}; expected the layout {CIFAR_LAYOUT[name][1]}")
      d = _unpickle(path)
      if b"data" not in d or label_key not in d:
        raise DataError(f"{name}: {path} lacks the keys b'data' and {label_key!r}")
      data = np.asarray(d[b"data"], dtype=np.uint8)
      if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{name}: {path} holds data of shape {data.shape}, expected (N, 3072)")
      xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
      ys.append(np.asarray(d[label_key], dtype=np.int32))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

  x_train, y_train = read(train_files)
  x_test, y_test = read(test_files)
  num_classes = 10 if name == "cifar10" else 100
  for split, y in (("train", y_train), ("test", y_test)):
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise DataError(f"{name} {split} labels lie in [{y.min()}, {y.max()}], expected [0, {num_classes - 1}]"
                      f" (folder {folder})")
  return x_train, y_train, x_test, y_test


def scan_image_folder(data_dir: str, split: str, classes: Sequence[str] | None = None
                      ) -> tuple[list[str], np.ndarray, list[str]]:
  """List ``data_dir/split/<class>/<image>`` files.

  Args:
    data_dir: dataset root.
    split: ``"train"`` or ``"test"``.
    classes: the class names to expect (those of the training split); ``None`` takes the sorted
      sub-folder names.

  Returns:
    ``(paths, labels int32, classes)``, paths sorted by class then file name.
  """
  root = os.path.join(data_dir, split)
  if not data_dir or not os.path.isdir(root):
    where = os.path.abspath(root) if data_dir else "(config.dataset.data_dir is empty)"
    raise DataError(f"image folder split {split!r} not found at {where}: expected the layout "
                    f"{IMAGE_FOLDER_LAYOUT.replace('DATA_DIR', data_dir or 'DATA_DIR')}")
  found = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if classes is None:
    classes = found
    if not classes:
      raise DataError(f"image folder {root} has no class sub-folders: expected {IMAGE_FOLDER_LAYOUT}")
  else:
    unknown = sorted(set(found) - set(classes))
    if unknown:
      raise DataError(f"image folder {root} has classes {unknown[:5]} that the train split lacks")
  paths, labels = [], []
  for label, cls in enumerate(classes):
    folder = os.path.join(root, cls)
    if not os.path.isdir(folder):
      continue  # A test split may lack a class.
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    paths.extend(os.path.join(folder, f) for f in files)
    labels.extend([label] * len(files))
  return paths, np.asarray(labels, dtype=np.int32), list(classes)


# ----------------------------------------------------------------------------------------------
# Augmentation and decoding.


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int, flip: bool,
                  part: slice = slice(None)) -> np.ndarray:
  """Zero-pad ``padding`` pixels per side, crop a random window of the original size, maybe flip.

  ``images`` is NHWC; each image gets its own offsets and flip. The random draws are made for all of
  ``images`` and then only ``images[part]`` is augmented and returned, so a slice of a batch is
  augmented exactly as in the whole batch (one host's share of a global batch).
  """
  n, h, w, _ = images.shape
  dy = rng.integers(0, 2 * padding + 1, size=n)[part]
  dx = rng.integers(0, 2 * padding + 1, size=n)[part]
  mirror = (rng.random(n) < 0.5)[part]
  out = images[part]
  m = out.shape[0]
  if padding > 0:
    padded = np.pad(out, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = dy[:, None] + np.arange(h)[None, :]  # (m, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (m, w)
    out = padded[np.arange(m)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if flip:
    out = np.where(mirror[:, None, None, None], out[:, :, ::-1], out)
  return out


def _open_rgb(path: str):
  from PIL import Image
  try:
    with Image.open(path) as im:
      return im.convert("RGB")
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(f"cannot decode image {path}: {e} (set config.dataset.on_corrupt_image='skip' to "
                    f"leave unreadable files out)") from None


def unreadable_images(paths: Sequence[str]) -> list[str]:
  """The files of ``paths`` that Pillow cannot identify or whose data fails its integrity check."""
  from PIL import Image
  bad = []
  for path in paths:
    try:
      with Image.open(path) as im:
        im.verify()
    except Exception:  # Pillow raises many types on bad data (OSError, SyntaxError, struct.error, ...).
      bad.append(path)
  return bad


def random_resized_crop(img, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """torchvision's RandomResizedCrop on a PIL image: a random area/aspect window resized to ``size``."""
  from PIL import Image
  width, height = img.size
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      x0 = int(rng.integers(0, width - w + 1))
      y0 = int(rng.integers(0, height - h + 1))
      break
  else:  # Fall back to a centre crop of the whole image at the clamped aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
      w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
      w, h = int(round(height * ratio[1])), height
    else:
      w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
  crop = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
  return np.asarray(crop, dtype=np.uint8)


def center_crop(img, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
  """Resize the shorter side to ``size / crop_fraction`` (bilinear), then crop the centre ``size`` square."""
  from PIL import Image
  width, height = img.size
  short = max(size, int(round(size / crop_fraction)))
  if width <= height:
    new_w, new_h = short, max(short, int(round(height * short / width)))
  else:
    new_w, new_h = max(short, int(round(width * short / height))), short
  img = img.resize((new_w, new_h), Image.BILINEAR)
  x0, y0 = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(img.crop((x0, y0, x0 + size, y0 + size)), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Datasets as index -> batch loaders.


@dataclasses.dataclass
class Dataset:
  """A loaded dataset: how to produce a (train or test) batch of images from example indices.

  Attributes:
    name: dataset name.
    num_classes: number of classes.
    image_shape: ``(H, W, C)`` of the model input.
    num_train / num_test: number of examples.
    mean / std: per-channel normalisation applied after augmentation (pixels in [0, 1]).
    train_x / train_y / test_x / test_y: in-memory arrays (uint8 or float in [0, 1]), or
    train_files / test_files: image paths (image folders).
    augment: augmentation name, crop_padding: pixels of the pad-crop.
    classes: class names (image folders).
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  train_y: np.ndarray
  test_y: np.ndarray
  train_x: np.ndarray | None = None
  test_x: np.ndarray | None = None
  train_files: list[str] | None = None
  test_files: list[str] | None = None
  augment: str = "none"
  crop_padding: int = 4
  classes: list[str] | None = None
  skipped_files: list[str] = dataclasses.field(default_factory=list)

  @property
  def num_train(self) -> int:
    return int(self.train_y.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_y.shape[0])

  def _normalize(self, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    if self.train_files is not None or (self.train_x is not None and self.train_x.dtype == np.uint8):
      x = x / np.float32(255.0)
    return (x - self.mean) / self.std

  def train_batch(self, indices: np.ndarray, rng: np.random.Generator, part: slice = slice(None)
                  ) -> dict[str, np.ndarray]:
    """Load, augment and normalise the training examples ``indices[part]``.

    The augmentation of an example depends on ``rng`` and its position in ``indices`` only, so each
    host loading its ``part`` of a global batch gets what one host loading all of it would.
    """
    indices = np.asarray(indices)
    if self.train_files is None:
      if self.augment in ("pad_crop", "pad_crop_flip"):
        x = pad_crop_flip(self.train_x[indices], rng, self.crop_padding,
                          flip=self.augment == "pad_crop_flip", part=part)
      else:
        x = self.train_x[indices[part]]
    else:
      size = self.image_shape[0]
      seeds = rng.integers(0, 2**63 - 1, size=len(indices))[part]
      images = []
      for i, seed in zip(indices[part], seeds):
        img = _open_rgb(self.train_files[int(i)])
        if self.augment == "random_resized_crop_flip":
          r = np.random.default_rng(seed)
          arr = random_resized_crop(img, size, r)
          if r.random() < 0.5:
            arr = arr[:, ::-1]
        else:
          arr = center_crop(img, size)
        images.append(arr)
      x = np.stack(images)
    return {"image": self._normalize(x), "label": self.train_y[indices[part]]}

  def test_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Load and normalise the test examples ``indices`` (image folders: centre crop)."""
    indices = np.asarray(indices)
    if self.test_files is None:
      x = self.test_x[indices]
    else:
      size = self.image_shape[0]
      x = np.stack([center_crop(_open_rgb(self.test_files[int(i)]), size) for i in indices])
    return {"image": self._normalize(x), "label": self.test_y[indices]}


def _channel_stats(values: Sequence[float], channels: int, what: str) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float32).reshape(-1)
  if arr.size == 1:
    arr = np.repeat(arr, channels)
  if arr.size != channels:
    raise DataError(f"config.dataset.{what} has {arr.size} values, the images have {channels} channels")
  return arr


def load_dataset(cfg: Any) -> Dataset:
  """Load the dataset that ``cfg`` (the ``config.dataset`` ConfigDict) names.

  Raises:
    DataError: missing folder or file (the message names the place and the expected layout), empty
      class folder, labels out of range.
  """
  name = cfg.name
  if name == "digits":
    x_train, y_train, x_test, y_test = digits_split(seed=0, test_fraction=cfg.test_fraction)
    mean = np.asarray([x_train.mean()], np.float32)
    std = np.asarray([x_train.std()], np.float32)
    ds = Dataset(name, 10, (8, 8, 1), mean, std, y_train, y_test, x_train, x_test)
  elif name in ("cifar10", "cifar100"):
    x_train, y_train, x_test, y_test = load_cifar(cfg.data_dir, name)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    ds = Dataset(name, 10 if name == "cifar10" else 100, (32, 32, 3), np.asarray(mean, np.float32),
                 np.asarray(std, np.float32), y_train, y_test, x_train, x_test)
  elif name == "image_folder":
    train_files, y_train, classes = scan_image_folder(cfg.data_dir, "train")
    test_files, y_test, _ = scan_image_folder(cfg.data_dir, "test", classes)
    skipped: list[str] = []
    if cfg.get("on_corrupt_image", "stop") == "skip":  # Check every file once; leave the bad ones out.
      bad = set(unreadable_images(train_files + test_files))
      skipped = [p for p in train_files + test_files if p in bad]
      keep_train = [i for i, p in enumerate(train_files) if p not in bad]
      keep_test = [i for i, p in enumerate(test_files) if p not in bad]
      train_files, y_train = [train_files[i] for i in keep_train], y_train[keep_train]
      test_files, y_test = [test_files[i] for i in keep_test], y_test[keep_test]
    size = int(cfg.image_size)
    ds = Dataset(name, len(classes), (size, size, 3), np.asarray(IMAGENET_MEAN, np.float32),
                 np.asarray(IMAGENET_STD, np.float32), y_train, y_test,
                 train_files=train_files, test_files=test_files, classes=classes, skipped_files=skipped)
  else:
    raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
  channels = ds.image_shape[-1]
  if len(cfg.mean):
    ds.mean = _channel_stats(cfg.mean, channels, "mean")
  if len(cfg.std):
    ds.std = _channel_stats(cfg.std, channels, "std")
  if np.any(ds.std <= 0):
    raise DataError(f"config.dataset.std must be positive, got {ds.std.tolist()}")
  ds.augment = cfg.augment
  ds.crop_padding = int(cfg.crop_padding)
  if cfg.num_classes > 0:
    for split, y in (("train", ds.train_y), ("test", ds.test_y)):
      if y.size and y.max() >= cfg.num_classes:
        raise DataError(f"{name} {split} labels reach {int(y.max())}, but config.dataset.num_classes is "
                        f"{cfg.num_classes} (labels must lie in [0, num_classes))")
    ds.num_classes = int(cfg.num_classes)
  # Subsets (for quick runs and tests): the first examples of a fixed permutation.
  if cfg.max_train_examples > 0:
    _subset(ds, "train", int(cfg.max_train_examples))
  if cfg.max_test_examples > 0:
    _subset(ds, "test", int(cfg.max_test_examples))
  if ds.num_train == 0 or ds.num_test == 0:
    raise DataError(f"{name}: the train split has {ds.num_train} and the test split {ds.num_test} "
                    f"examples; both need at least one")
  return ds


def _subset(ds: Dataset, split: str, n: int) -> None:
  y = getattr(ds, f"{split}_y")
  keep = np.sort(np.random.default_rng(1234).permutation(y.shape[0])[:n])
  setattr(ds, f"{split}_y", y[keep])
  for attr in (f"{split}_x", f"{split}_files"):
    value = getattr(ds, attr)
    if value is not None:
      setattr(ds, attr, value[keep] if isinstance(value, np.ndarray) else [value[i] for i in keep])


# ----------------------------------------------------------------------------------------------
# grain pipelines.


def train_pipeline(ds: Dataset, global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1, num_threads: int = 2, num_workers: int = 0):
  """The training batches as a grain ``IterDataset``: an endless sequence of global batches.

  Each process loads its ``global_batch / process_count`` slice of every global batch. The order
  of examples and the augmentation are a pure function of ``seed`` and the batch index, so
  ``iterator.get_state()`` / ``set_state()`` resume exactly.

  Args:
    ds: the dataset.
    global_batch: examples per step over all processes and devices.
    seed: shuffling and augmentation seed.
    process_index / process_count: this host's slice of each batch.
    num_threads: grain read threads in this process.
    num_workers: grain worker processes (``mp_prefetch``); 0 loads in this process.
  """
  import grain

  if global_batch % process_count:
    raise DataError(f"global batch {global_batch} is not divisible by the {process_count} processes")
  if ds.num_train < global_batch:
    raise DataError(f"{ds.name}: the training set has {ds.num_train} examples, fewer than one batch "
                    f"of {global_batch}")
  local = global_batch // process_count
  lo = process_index * local

  def load(indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return ds.train_batch(np.asarray(indices), rng, slice(lo, lo + local))

  pipeline = (grain.MapDataset.range(ds.num_train)
              .shuffle(seed=seed)
              .repeat()
              .batch(global_batch, drop_remainder=True)
              .random_map(load, seed=seed + 1))
  iter_ds = pipeline.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads),
                                                       prefetch_buffer_size=max(2, 2 * num_threads)))
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (their defaults here).
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter_ds


def eval_batches(ds: Dataset, batch_size: int, process_index: int = 0, process_count: int = 1,
                 num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """The test set in order, in batches of ``batch_size`` padded to full size.

  Each batch carries ``mask`` (1 for real examples, 0 for padding) so that a jit-compiled evaluation
  step sees one shape only. Each process loads its slice of every batch.
  """
  import grain

  n = ds.num_test
  num_batches = -(-n // batch_size)
  local = batch_size // process_count
  lo = process_index * local

  def load(b: int) -> dict[str, np.ndarray]:
    idx = np.arange(b * batch_size, (b + 1) * batch_size)[lo:lo + local]
    mask = (idx < n).astype(np.float32)
    batch = ds.test_batch(np.minimum(idx, n - 1))
    batch["mask"] = mask
    return batch

  pipeline = grain.MapDataset.range(num_batches).map(load)
  yield from pipeline.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads),
                                                        prefetch_buffer_size=max(2, 2 * num_threads)))
