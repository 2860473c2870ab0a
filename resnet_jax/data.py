"""Input data: the embedded digits set, CIFAR-10/100 pickles and image folders, as grain pipelines.

Every array this module hands out is NHWC float32 for images and int32 for labels.

Datasets (``config.dataset.name``):

- ``digits``: scikit-learn's 1,797 handwritten 8x8 digits (shipped inside scikit-learn), fixed stratified
  split (:func:`digits_split`), pixels / 16 in [0, 1].
- ``cifar10`` / ``cifar100``: the official python-pickle release, unpacked in ``data_dir``
  (``data_dir/cifar-10-batches-py/{data_batch_1..5,test_batch}`` or
  ``data_dir/cifar-100-python/{train,test}``; ``data_dir`` may also be that folder itself). Every file
  is checked: a dict with uint8 ``b'data'`` of shape (N, 3072) and N integer labels. Or the images as
  files, ``data_dir/train/<class>/*.png|jpg`` (and ``test/<class>/`` if there is one), 32x32, read as
  an image folder of 10 (100) classes; the sorted class-folder names give CIFAR-10's label order.
- ``image_folder``: ``data_dir/train/<class>/...`` and ``data_dir/test/<class>/...`` (ImageNet's usual
  layout), decoded with Pillow, with torchvision ``ImageFolder``'s conventions: classes are the sorted
  sub-folder names of ``train``; the images of a class are the files with an image extension anywhere
  below its folder (sub-folders are walked, symbolic links followed); hidden entries (names starting
  with ``.``: ``.ipynb_checkpoints``, macOS ``._*`` files) are skipped. What was skipped is reported in
  one line. 16-bit greyscale images are scaled to 8 bits (``v * 255 / 65535``, rounded).

In memory or streamed (image folders, ``config.dataset.in_memory``): a folder whose images are already
``image_size`` x ``image_size`` (checked on the headers of up to 64 files spread over the training
list) and whose decoded images (train and evaluation split, ``N * image_size**2 * 3`` bytes) take at
most ``in_memory_max_mb`` is decoded once, by a thread pool with a progress bar, into uint8 arrays
(``auto``, the default; ``always`` forces it, resizing other sizes as the evaluation does; ``never``
streams). From then on it is exactly an in-memory dataset like CIFAR: the same augmentation and
normalisation code, the same pipeline. Other folders (ImageNet) are streamed: each image is decoded
when a batch needs it. ``random_resized_crop_flip`` needs the full-size image, so ``auto`` streams
with it.

Pipelines (grain ``MapDataset``): the training set is shuffled with the run's seed, repeated with a new
order each epoch, cut into global batches (the last incomplete batch of an epoch runs into the next
epoch, so every batch has the same shape), and each batch is loaded and augmented with a
``np.random.Generator`` that grain derives from the seed and the batch index. The whole order is
therefore a pure function of (seed, step): the iterator state is just the next batch index
(``iterator.get_state()``), saved with every checkpoint.

Augmentation (``config.dataset.augment``): ``none``; ``pad_crop`` / ``pad_crop_flip`` (zero-pad
``crop_padding`` pixels per side, random crop back to the original size, random horizontal flip: the
CIFAR recipe; every dataset); ``random_resized_crop_flip`` (streamed image folders only: area scale in
[0.08, 1], aspect ratio in [3/4, 4/3], bilinear resize to ``image_size``, random flip). An image-folder
image is brought to the model size by :func:`fit_to_size`: unchanged when it is already
``image_size`` square, otherwise a resize of the shorter side to ``image_size / 0.875`` and a centre
crop of ``image_size`` (evaluation, ``none`` and ``pad_crop*``, streamed or in memory alike).

Held-out validation split (``config.dataset.holdout``, every dataset): a fraction in (0, 1) or a count
of the training images becomes the evaluation split instead of ``test`` (which is then not read), per
class in proportion to its size (:func:`holdout_mask`: the class quotas by largest remainder, and in
each class the images whose ``sha256("SEED:KEY")`` is smallest, KEY being the path below ``train/``
or the index in the training set), so the choice depends on the seed and the file names only.
``holdout=-1`` (auto) holds out :data:`AUTO_HOLDOUT` of a folder that has no ``test/`` (5,000 of
CIFAR-10's 50,000 training images), and nothing where a test split exists.

Normalisation: ``(x - mean) / std`` per channel after augmentation, with pixels in [0, 1]:

- digits: mean and std of the training split's pixels (one channel), computed at load time;
- CIFAR-10: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616);
- CIFAR-100: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762);
- image folders: the ImageNet statistics mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225);

``config.dataset.normalize='dataset'`` computes them from the training images instead (never the
held-out ones: every image in memory, or 5,000 images spread over the list of a streamed folder, each
at the model size), and ``config.dataset.mean`` / ``std`` set them. The values used are in
:attr:`Dataset.info`, which a run writes to ``WORKDIR/data.json`` for its evaluations.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pickle
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from resnet_jax.errors import ConfigError, DataError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = ("digits", "cifar10", "cifar100", "image_folder")
AUGMENTATIONS = ("none", "pad_crop", "pad_crop_flip", "random_resized_crop_flip")
ARRAY_AUGMENTATIONS = ("none", "pad_crop", "pad_crop_flip")  # What works on decoded (in-memory) images.
NORMALIZATIONS = ("default", "dataset")
IN_MEMORY = ("auto", "always", "never")
HEADER_SAMPLE = 64     # in_memory='auto': image headers read to check that the images are image_size.
STATS_SAMPLE = 5000    # normalize='dataset' on a streamed folder: training images the statistics use.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
EVAL_CROP_FRACTION = 0.875
AUTO_HOLDOUT = 0.1     # holdout=-1: the fraction of train/ held out when a folder has no test/.

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py",
                "DATA_DIR/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch} (the python "
                "pickle release, cifar-10-python.tar.gz unpacked), or the images as "
                "DATA_DIR/train/<class>/*.png|jpg"),
    "cifar100": ("cifar-100-python",
                 "DATA_DIR/cifar-100-python/{train, test} (the python pickle release, "
                 "cifar-100-python.tar.gz unpacked), or the images as DATA_DIR/train/<class>/*.png|jpg"),
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


def _unpickle(path: str) -> Any:
  try:
    with open(path, "rb") as f:
      return pickle.load(f, encoding="bytes")
  except Exception as e:  # Bad bytes raise many types (UnpicklingError, EOFError, KeyError, ...).
    raise DataError(f"cannot read CIFAR pickle file {path}: {type(e).__name__}: {e}") from None


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


def _read_cifar_file(path: str, name: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
  """One pickle file of the release: uint8 NHWC images and int32 labels, both checked."""
  d = _unpickle(path)
  expected = f"expected a dict with b'data' (uint8, shape (N, 3072)) and {label_key!r} (N integers)"
  if not isinstance(d, dict):
    raise DataError(f"{name}: {path} holds a {type(d).__name__}, {expected}")
  if b"data" not in d or label_key not in d:
    raise DataError(f"{name}: {path} lacks the keys b'data' and {label_key!r}; {expected}")
  data = d[b"data"]
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    what = (f"an array of shape {data.shape} and dtype {data.dtype}" if isinstance(data, np.ndarray)
            else f"a {type(data).__name__}")
    raise DataError(f"{name}: {path} b'data' is {what}, expected a uint8 array of shape (N, 3072)")
  raw = d[label_key]
  labels = None
  if isinstance(raw, (list, tuple, np.ndarray)):
    try:
      labels = np.asarray(raw)
    except (ValueError, TypeError):
      labels = None
  if labels is None or labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
    what = (f"an array of shape {labels.shape} and dtype {labels.dtype}" if labels is not None
            else f"a {type(raw).__name__}")
    raise DataError(f"{name}: {path} {label_key!r} is {what}, expected a list of N integers")
  if labels.shape[0] != data.shape[0]:
    raise DataError(f"{name}: {path} holds {data.shape[0]} images but {labels.shape[0]} labels "
                    f"({label_key!r}); they must match one to one")
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def load_cifar(data_dir: str, name: str = "cifar10"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """CIFAR-10 or CIFAR-100 from the official python-pickle release in ``data_dir``.

  Returns:
    ``(x_train, y_train, x_test, y_test)``: images uint8 NHWC ``(N, 32, 32, 3)``, labels int32
    (CIFAR-100: the 100 fine labels).

  Raises:
    DataError: a missing file; a file that is not such a pickle, holds images of another shape or
      type, or a different number of images and labels (the message names the file); labels out of
      range.
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
      x, y = _read_cifar_file(path, name, label_key)
      xs.append(x)
      ys.append(y)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

  x_train, y_train = read(train_files)
  x_test, y_test = read(test_files)
  num_classes = 10 if name == "cifar10" else 100
  for split, y in (("train", y_train), ("test", y_test)):
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise DataError(f"{name} {split} labels lie in [{y.min()}, {y.max()}], expected [0, {num_classes - 1}]"
                      f" (folder {folder})")
  return x_train, y_train, x_test, y_test


@dataclasses.dataclass
class FolderScan:
  """The images of one split of an image folder, and what the scan left out.

  Attributes:
    root: the split folder.
    paths: image paths, class by class, each class in torchvision's order (sorted folders, then
      sorted file names).
    labels: int32 class index of each path.
    classes: class names (sorted sub-folder names of ``train``).
    hidden: hidden entries skipped (names starting with ``.``; a hidden folder is one entry).
    not_images: files without an image extension, skipped.
  """
  root: str
  paths: list[str]
  labels: np.ndarray
  classes: list[str]
  hidden: list[str]
  not_images: list[str]

  def report(self) -> str | None:
    """One line that says what was skipped, or ``None`` when nothing was."""
    parts = []
    for one, many, items in (("hidden entry", "hidden entries", self.hidden),
                             ("non-image file", "non-image files", self.not_images)):
      if items:
        shown = ", ".join(os.path.basename(p) for p in items[:3]) + (", ..." if len(items) > 3 else "")
        parts.append(f"{len(items)} {one if len(items) == 1 else many} ({shown})")
    if not parts:
      return None
    return f"image folder {self.root}: skipped {' and '.join(parts)}"


def _stat_entry(entry: os.DirEntry) -> bool:
  """Whether ``entry`` is a folder (following links); an unreadable entry (a link loop) is a DataError."""
  try:
    return entry.is_dir()
  except OSError as e:
    raise DataError(f"cannot read {entry.path}: {e.strerror or e} (a symbolic link loop or a broken "
                    f"entry in the image folder; remove it)") from None


def _walk_class(folder: str, hidden: list[str], not_images: list[str]) -> list[str]:
  """The image files below ``folder``, sub-folders walked (links followed, each folder once)."""
  found: list[tuple[str, str]] = []
  seen: dict[tuple[int, int], str] = {}
  stack = [folder]
  while stack:
    current = stack.pop()
    try:
      st = os.stat(current)
      key = (st.st_dev, st.st_ino)
      if key in seen:
        raise DataError(f"image folder {current} is the folder {seen[key]} read already (a symbolic "
                        f"link loop or a second link to it); remove the link")
      seen[key] = current
      entries = sorted(os.scandir(current), key=lambda e: e.name)
    except OSError as e:
      raise DataError(f"cannot read image folder {current}: {e.strerror or e}") from None
    for entry in entries:
      if entry.name.startswith("."):
        hidden.append(entry.path)
      elif _stat_entry(entry):
        stack.append(entry.path)
      elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
        found.append((current, entry.name))
      else:
        not_images.append(entry.path)
  return [os.path.join(d, f) for d, f in sorted(found)]


def scan_folder(data_dir: str, split: str, classes: Sequence[str] | None = None) -> FolderScan:
  """List the images of ``data_dir/split/<class>/...`` with torchvision ``ImageFolder``'s conventions.

  Args:
    data_dir: dataset root.
    split: ``"train"`` or ``"test"``.
    classes: the class names to expect (those of the training split); ``None`` takes the sorted
      sub-folder names that are not hidden.

  Raises:
    DataError: no such folder, no class folder, a class folder without images, a test class unknown
      to the train split, a symbolic link loop.
  """
  root = os.path.join(data_dir, split)
  if not data_dir or not os.path.isdir(root):
    where = os.path.abspath(root) if data_dir else "(config.dataset.data_dir is empty)"
    raise DataError(f"image folder split {split!r} not found at {where}: expected the layout "
                    f"{IMAGE_FOLDER_LAYOUT.replace('DATA_DIR', data_dir or 'DATA_DIR')}")
  hidden: list[str] = []
  try:
    entries = sorted(os.scandir(root), key=lambda e: e.name)
  except OSError as e:
    raise DataError(f"cannot read image folder {root}: {e.strerror or e}") from None
  found = []
  for entry in entries:
    if entry.name.startswith("."):
      hidden.append(entry.path)
    elif _stat_entry(entry):
      found.append(entry.name)
  if classes is None:
    classes = found
    if not classes:
      raise DataError(f"image folder {root} has no class sub-folders: expected {IMAGE_FOLDER_LAYOUT}")
  else:
    unknown = sorted(set(found) - set(classes))
    if unknown:
      raise DataError(f"image folder {root} has classes {unknown[:5]} that the train split lacks")
  paths, labels, not_images = [], [], []
  for label, cls in enumerate(classes):
    folder = os.path.join(root, cls)
    if cls not in found:
      continue  # A test split may lack a class.
    files = _walk_class(folder, hidden, not_images)
    if not files:
      raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}, "
                      f"in it or its sub-folders)")
    paths.extend(files)
    labels.extend([label] * len(files))
  return FolderScan(root, paths, np.asarray(labels, dtype=np.int32), list(classes), hidden, not_images)


def scan_image_folder(data_dir: str, split: str, classes: Sequence[str] | None = None
                      ) -> tuple[list[str], np.ndarray, list[str]]:
  """``(paths, labels int32, classes)`` of ``data_dir/split`` (see :func:`scan_folder`)."""
  scan = scan_folder(data_dir, split, classes)
  return scan.paths, scan.labels, scan.classes


def holdout_mask(labels: np.ndarray, keys: Sequence[str], amount: float, seed: int = 0) -> np.ndarray:
  """Which training examples a held-out split takes: a fixed, seeded, stratified choice.

  ``amount`` in (0, 1) is a fraction (``round(amount * N)`` examples, at least 1), ``amount >= 1`` a
  count. Each class gets its share ``count * n_c / N`` rounded down, and the examples left over go to
  the classes with the largest remainders (ties: the lower class index). In a class, the examples
  taken are those whose ``sha256(f"{seed}:{key}")`` is smallest: the choice depends only on the
  seed, the labels and the keys (file paths below ``train/``, or indices), not on their order,
  numpy's random streams or the machine.

  Returns:
    A bool mask over the examples, True for the held-out ones.

  Raises:
    DataError: the count is 0, or not below N, or would take every example of a class.
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  count = int(round(amount * n)) if amount < 1 else int(amount)
  if amount < 1 and count == 0 and amount > 0:
    count = 1
  if not 0 < count < n:
    raise DataError(f"config.dataset.holdout = {amount!r} asks for {count} of the {n} training examples; "
                    f"hold out at least 1 and fewer than {n}")
  classes, sizes = np.unique(labels, return_counts=True)
  quotas = [count * int(s) // n for s in sizes]
  remainders = [count * int(s) % n for s in sizes]
  for c in sorted(range(len(classes)), key=lambda c: (-remainders[c], c))[:count - sum(quotas)]:
    quotas[c] += 1
  mask = np.zeros(n, dtype=bool)
  for cls, size, quota in zip(classes, sizes, quotas):
    if quota >= size:
      raise DataError(f"config.dataset.holdout = {amount!r} would hold out all {size} examples of class "
                      f"{int(cls)}; hold out fewer")
    members = np.flatnonzero(labels == cls)
    order = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).digest())
    mask[np.asarray(order[:quota], dtype=np.int64)] = True
  return mask


# ----------------------------------------------------------------------------------------------
# Augmentation and decoding.


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int, flip: bool,
                  part: slice = slice(None)) -> np.ndarray:
  """Zero-pad ``padding`` pixels per side, crop a random window of the original size, maybe flip.

  ``images`` is NHWC; each image gets its own offsets and flip. The random draws are made for all of
  ``images`` and then only ``images[part]`` is augmented and returned, so a slice of a batch is
  augmented exactly as in the whole batch (one host's share of a global batch).
  """
  return _pad_crop_flip(images[part], rng, images.shape[0], part, padding, flip)


def _pad_crop_flip(out: np.ndarray, rng: np.random.Generator, n: int, part: slice, padding: int,
                   flip: bool) -> np.ndarray:
  """:func:`pad_crop_flip` of ``out``, the ``part`` of a batch of ``n`` images (draws made for all ``n``).

  One slice copy per image (a window of the padded image, read backwards when flipped): several times
  faster than one gather over the batch.
  """
  _, h, w, _ = out.shape
  dy = rng.integers(0, 2 * padding + 1, size=n)[part]
  dx = rng.integers(0, 2 * padding + 1, size=n)[part]
  mirror = (rng.random(n) < 0.5)[part]
  padded = np.pad(out, ((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else out
  result = np.empty_like(out)
  for i in range(out.shape[0]):
    window = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    result[i] = window[:, ::-1] if flip and mirror[i] else window
  return result


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _open_rgb(path: str):
  """The image at ``path`` as an 8-bit RGB PIL image; 16-bit greyscale scaled by 255 / 65535."""
  from PIL import Image
  hint = "(set config.dataset.on_corrupt_image='skip' to leave unreadable files out)"
  try:
    with Image.open(path) as im:
      if im.mode in _SIXTEEN_BIT_MODES or (im.mode == "I" and im.format == "PNG"):  # PNG "I": 16 bits.
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
      if im.mode in ("I", "F"):
        raise DataError(f"cannot decode image {path}: its pixels are 32-bit "
                        f"{'integers' if im.mode == 'I' else 'floats'} (mode {im.mode}), which have no "
                        f"defined 8-bit scale; store it with 8 or 16 bits per channel {hint}")
      return im.convert("RGB")
  except DataError:
    raise
  except Image.DecompressionBombError as e:
    raise DataError(f"cannot decode image {path}: {e} (Pillow's limit, PIL.Image.MAX_IMAGE_PIXELS) "
                    f"{hint}") from None
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(f"cannot decode image {path}: {e} {hint}") from None


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


def fit_to_size(img, size: int) -> np.ndarray:
  """An image at the model size: unchanged when it is ``size`` x ``size``, else :func:`center_crop`."""
  if img.size == (size, size):
    return np.asarray(img, dtype=np.uint8)
  return center_crop(img, size)


def _decode_threads() -> int:
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cpus = os.cpu_count() or 1
  return max(1, min(32, cpus))


def decode_images(paths: Sequence[str], size: int, skip_unreadable: bool = False,
                  progress: bool = True, desc: str = "decoding images", threads: int | None = None
                  ) -> tuple[np.ndarray, list[int]]:
  """Decode ``paths`` once, in parallel (a thread pool), into one uint8 array at the model size.

  Each image goes through :func:`fit_to_size`. Pillow decodes with the GIL released, so the threads
  use the cores; a progress bar (tqdm, on stderr) counts the images.

  Args:
    paths: image files.
    size: model input size.
    skip_unreadable: leave files that fail to decode out (their indices are returned) instead of
      raising the DataError of the first of them (in list order).
    progress: show the progress bar.
    desc: the bar's label.
    threads: decoding threads (default: the CPUs this process may use, at most 32).

  Returns:
    ``(images uint8 (n, size, size, 3), indices of the files left out)``; the array holds only the
    decoded images, in order.
  """
  from tqdm import tqdm

  n = len(paths)
  out = np.empty((n, size, size, 3), dtype=np.uint8)
  ok = np.ones(n, dtype=bool)
  chunk = 256

  def work(lo: int) -> int:
    hi = min(n, lo + chunk)
    for i in range(lo, hi):
      try:
        out[i] = fit_to_size(_open_rgb(paths[i]), size)
      except DataError:
        if not skip_unreadable:
          raise
        ok[i] = False
    return hi - lo

  pool = concurrent.futures.ThreadPoolExecutor(threads or _decode_threads())
  try:
    with tqdm(total=n, desc=desc, unit="img", disable=not progress or n == 0, dynamic_ncols=True,
              file=sys.stderr) as bar:
      for done in pool.map(work, range(0, n, chunk)):
        bar.update(done)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  bad = np.flatnonzero(~ok).tolist()
  return (out if not bad else out[ok]), bad


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and (population) std of NHWC images, pixels in [0, 1] (uint8 is divided by 255).

  uint8 images are counted exactly (a histogram per channel); float images are summed in float64.
  """
  images = np.asarray(images)
  channels = images.shape[-1]
  flat = images.reshape(-1, channels)
  mean = np.zeros(channels)
  var = np.zeros(channels)
  for c in range(channels):
    if images.dtype == np.uint8:
      hist = np.bincount(flat[:, c], minlength=256).astype(np.float64)
      values = np.arange(256) / 255.0
      total = hist.sum()
      mean[c] = (hist * values).sum() / total
      var[c] = (hist * (values - mean[c]) ** 2).sum() / total
    else:
      x = flat[:, c].astype(np.float64)
      mean[c] = x.mean()
      var[c] = ((x - mean[c]) ** 2).mean()
  return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Datasets as index -> batch loaders.


def normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """``(x / 255 - mean) / std`` for uint8 images (``(x - mean) / std`` for floats in [0, 1]), float32.

  Computed in place on one float32 copy; training, evaluation and :mod:`resnet_jax.predict` all use it,
  so their inputs are bitwise the same.
  """
  out = np.multiply(x, np.float32(1 / 255) if x.dtype == np.uint8 else np.float32(1), dtype=np.float32)
  out -= mean
  out /= std
  return out
@dataclasses.dataclass(frozen=True)
class ImageFiles:
  """Image files decoded when a batch reads them (a streamed image folder).

  ``files[indices]`` is the uint8 images at the model size (:func:`fit_to_size`), like
  ``array[indices]`` of an in-memory dataset; :meth:`random_resized_crops` is the streamed-only
  augmentation.
  """
  paths: tuple[str, ...]
  size: int

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    return np.stack([fit_to_size(_open_rgb(self.paths[int(i)]), self.size) for i in indices])

  def random_resized_crops(self, indices: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """:func:`random_resized_crop` and a random flip of each image, from its own seed."""
    images = []
    for i, seed in zip(indices, seeds):
      r = np.random.default_rng(seed)
      arr = random_resized_crop(_open_rgb(self.paths[int(i)]), self.size, r)
      images.append(arr[:, ::-1] if r.random() < 0.5 else arr)
    return np.stack(images)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A loaded dataset: how to produce a (train or evaluation) batch of images from example indices.

  Attributes:
    name: dataset name.
    num_classes: number of classes.
    image_shape: ``(H, W, C)`` of the model input.
    mean / std: per-channel normalisation applied after augmentation (pixels in [0, 1]).
    train_x / test_x: the images: an array (uint8, or float in [0, 1]) in memory, or
      :class:`ImageFiles` (a streamed image folder); ``test_*`` is the evaluation split (the held-out
      images when ``config.dataset.holdout`` is set).
    train_y / test_y: int32 labels.
    augment: augmentation name, crop_padding: pixels of the pad-crop.
    classes: class names (image folders).
    skipped_files: unreadable images left out (``on_corrupt_image='skip'``).
    info: what a run records about its data (``WORKDIR/data.json``): the normalisation used and where
      it came from, the evaluation split, the held-out images, the storage, what the scan skipped.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  train_x: np.ndarray | ImageFiles
  train_y: np.ndarray
  test_x: np.ndarray | ImageFiles
  test_y: np.ndarray
  augment: str = "none"
  crop_padding: int = 4
  classes: list[str] | None = None
  skipped_files: list[str] = dataclasses.field(default_factory=list)
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def num_train(self) -> int:
    return int(self.train_y.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_y.shape[0])

  @property
  def in_memory(self) -> bool:
    return isinstance(self.train_x, np.ndarray)

  def _normalize(self, x: np.ndarray) -> np.ndarray:
    return normalize(x, self.mean, self.std)

  def train_batch(self, indices: np.ndarray, rng: np.random.Generator, part: slice = slice(None)
                  ) -> dict[str, np.ndarray]:
    """Load, augment and normalise the training examples ``indices[part]``.

    The augmentation of an example depends on ``rng`` and its position in ``indices`` only, so each
    host loading its ``part`` of a global batch gets what one host loading all of it would.
    """
    indices = np.asarray(indices)
    rows = indices[part]
    if self.augment == "random_resized_crop_flip":
      seeds = rng.integers(0, 2**63 - 1, size=len(indices))[part]
      x = self.train_x.random_resized_crops(rows, seeds)
    else:
      x = self.train_x[rows]
      if self.augment in ("pad_crop", "pad_crop_flip"):
        x = _pad_crop_flip(x, rng, len(indices), part, self.crop_padding,
                           flip=self.augment == "pad_crop_flip")
    return {"image": self._normalize(x), "label": self.train_y[rows]}

  def test_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Load and normalise the evaluation examples ``indices``."""
    indices = np.asarray(indices)
    return {"image": self._normalize(self.test_x[indices]), "label": self.test_y[indices]}


def _channel_stats(values: Sequence[float], channels: int, what: str) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float32).reshape(-1)
  if arr.size == 1:
    arr = np.repeat(arr, channels)
  if arr.size != channels:
    raise DataError(f"config.dataset.{what} has {arr.size} values, the images have {channels} channels")
  return arr


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Split:
  """The images (an array, or a list of files) and labels of one split, and a key per example."""
  x: Any
  y: np.ndarray
  keys: list[str]

  def take(self, keep: np.ndarray) -> "_Split":
    keep = np.asarray(keep, dtype=np.int64)
    x = self.x[keep] if isinstance(self.x, np.ndarray) else [self.x[i] for i in keep]
    return _Split(x, self.y[keep], [self.keys[i] for i in keep] if self.keys else [])


def _fixed_subset(split: _Split, n: int) -> _Split:
  """The first ``n`` examples of a fixed permutation, in their original order."""
  return split.take(np.sort(np.random.default_rng(1234).permutation(split.y.shape[0])[:n]))


def _use_memory(cfg: Any, train: list[str], test: list[str], size: int, log: Callable[[str], None]
                ) -> bool:
  """Whether an image folder is decoded once into memory (see the module docstring)."""
  mode = cfg.get("in_memory", "auto")
  if mode != "auto":
    return mode == "always"
  if cfg.augment == "random_resized_crop_flip":
    return False
  nbytes = (len(train) + len(test)) * size * size * 3
  limit_mb = cfg.get("in_memory_max_mb", 4096)
  if nbytes > limit_mb * 2**20:
    log(f"image folder {cfg.data_dir}: streamed (decoded {nbytes / 2**20:.0f} MB would exceed "
        f"config.dataset.in_memory_max_mb = {limit_mb})")
    return False
  from PIL import Image
  sample = [train[int(i)] for i in np.unique(np.linspace(0, len(train) - 1, HEADER_SAMPLE).astype(int))]
  for path in sample:
    try:
      with Image.open(path) as im:
        if im.size != (size, size):
          return False
    except Exception:  # Unreadable: decoding reports it (or skips it) with the file's name.
      pass
  return True


def _cifar_as_folder(data_dir: str, name: str) -> bool:
  """True when ``data_dir`` holds CIFAR as an image folder (``train/<class>/``) and not the pickles."""
  if not data_dir or not os.path.isdir(os.path.join(data_dir, "train")):
    return False
  try:
    _cifar_folder(data_dir, name)
  except DataError:
    return True
  return False


def _folder_splits(cfg: Any, holdout: float, size: int, log: Callable[[str], None]) -> dict:
  """The splits of an image folder (``train/<class>/``, ``test/<class>/``), as paths and labels.

  ``holdout`` < 0 (auto): a folder without ``test/`` holds out :data:`AUTO_HOLDOUT` of ``train/``,
  one with ``test/`` nothing. The holdout that applies is returned as ``raw["holdout"]``.
  """
  train = scan_folder(cfg.data_dir, "train")
  scans = [train]
  has_test = os.path.isdir(os.path.join(cfg.data_dir, "test"))
  if holdout < 0:
    holdout = 0.0 if has_test else AUTO_HOLDOUT
  if holdout > 0:
    test = _Split([], np.zeros(0, np.int32), [])
  else:
    if not has_test:
      raise DataError(f"image folder {os.path.abspath(cfg.data_dir)} has no test/ split: add "
                      f"test/<class>/ folders, or hold out part of train/ with "
                      f"--config.dataset.holdout=0.1 (a fraction) or =5000 (a count)")
    scans.append(scan_folder(cfg.data_dir, "test", train.classes))
    test = _Split(scans[1].paths, scans[1].labels, [])
  skipped = {}
  for scan in scans:
    line = scan.report()
    if line:
      log(line)
      skipped[scan.root] = {"hidden": len(scan.hidden), "not_images": len(scan.not_images)}
  root = os.path.join(cfg.data_dir, "train")
  keys = [os.path.relpath(p, root).replace(os.sep, "/") for p in train.paths]
  return dict(train=_Split(train.paths, train.labels, keys), test=test,
              num_classes=len(train.classes), shape=(size, size, 3), classes=train.classes,
              default_stats=(IMAGENET_MEAN, IMAGENET_STD), default_source="the ImageNet statistics",
              scan_skipped=skipped, folder=True, holdout=holdout)


def _load_splits(cfg: Any, holdout: float, log: Callable[[str], None]) -> dict:
  """The raw training and test splits of the dataset, what describes it, and the holdout that applies."""
  name = cfg.name
  if name == "digits":
    x_train, y_train, x_test, y_test = digits_split(seed=0, test_fraction=cfg.test_fraction)
    return dict(train=_Split(x_train, y_train, [str(i) for i in range(len(y_train))]),
                test=_Split(x_test, y_test, []), num_classes=10, shape=(8, 8, 1), classes=None,
                default_stats=None, default_source="mean / std of the training images", scan_skipped={},
                folder=False, holdout=max(holdout, 0.0))
  if name in ("cifar10", "cifar100"):
    stats = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    source = f"the published {name.upper().replace('CIFAR', 'CIFAR-')} statistics"
    num_classes = 10 if name == "cifar10" else 100
    if _cifar_as_folder(cfg.data_dir, name):  # The images as files: train/<class>/*.png|jpg.
      raw = _folder_splits(cfg, holdout, 32, log)
      if raw["num_classes"] != num_classes:
        raise DataError(f"{name}: {os.path.abspath(os.path.join(cfg.data_dir, 'train'))} has "
                        f"{raw['num_classes']} class folders, expected {num_classes}")
      return {**raw, "default_stats": stats, "default_source": source}
    x_train, y_train, x_test, y_test = load_cifar(cfg.data_dir, name)
    return dict(train=_Split(x_train, y_train, [str(i) for i in range(len(y_train))]),
                test=_Split(x_test, y_test, []), num_classes=num_classes,
                shape=(32, 32, 3), classes=None, default_stats=stats, default_source=source,
                scan_skipped={}, folder=False, holdout=max(holdout, 0.0))
  if name == "image_folder":
    return _folder_splits(cfg, holdout, int(cfg.image_size), log)
  raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def _store_folder(cfg: Any, train: _Split, test: _Split, size: int, progress: bool,
                  log: Callable[[str], None]) -> tuple[_Split, _Split, list[str]]:
  """An image folder's splits decoded into memory, or as :class:`ImageFiles`; and the files left out."""
  skip = cfg.get("on_corrupt_image", "stop") == "skip"
  if _use_memory(cfg, train.x, test.x, size, log):
    splits, skipped = [], []
    for label, split in (("train", train), ("evaluation", test)):
      images, bad = decode_images(split.x, size, skip, progress,
                                  desc=f"decoding the {label} images of {cfg.data_dir}")
      skipped += [split.x[i] for i in bad]
      kept = split.take(np.setdiff1d(np.arange(len(split.x)), bad))
      splits.append(_Split(images, kept.y, kept.keys))
    return splits[0], splits[1], skipped
  skipped = []
  if skip:  # Check every file once; leave the bad ones out.
    bad = set(unreadable_images(train.x + test.x))
    skipped = [p for p in train.x + test.x if p in bad]
    train = train.take([i for i, p in enumerate(train.x) if p not in bad])
    test = test.take([i for i, p in enumerate(test.x) if p not in bad])
  return (_Split(ImageFiles(tuple(train.x), size), train.y, train.keys),
          _Split(ImageFiles(tuple(test.x), size), test.y, test.keys), skipped)


def _normalization(cfg: Any, raw: dict, train: _Split, progress: bool
                   ) -> tuple[np.ndarray, np.ndarray, str]:
  """``(mean, std, where they come from)``: the config's, the training images', or the default."""
  channels = raw["shape"][-1]
  if len(cfg.mean):
    mean, std = _channel_stats(cfg.mean, channels, "mean"), _channel_stats(cfg.std, channels, "std")
    source = "config.dataset.mean / std"
  elif cfg.get("normalize", "default") == "dataset" or raw["default_stats"] is None:
    if train.y.size == 0:
      raise DataError(f"{cfg.name}: the training split is empty")
    if isinstance(train.x, np.ndarray):
      mean, std = channel_stats(train.x)
      source = f"mean / std of the {train.y.size} training images"
    else:
      pick = np.unique(np.linspace(0, len(train.x) - 1, min(STATS_SAMPLE, len(train.x))).astype(int))
      sample, _ = decode_images([train.x.paths[int(i)] for i in pick], raw["shape"][0],
                                cfg.get("on_corrupt_image", "stop") == "skip", progress,
                                desc="normalisation statistics")
      mean, std = channel_stats(sample)
      source = f"mean / std of {len(sample)} training images spread over the list, at the model size"
  else:
    mean = np.asarray(raw["default_stats"][0], np.float32)
    std = np.asarray(raw["default_stats"][1], np.float32)
    source = raw["default_source"]
  if np.any(std <= 0):
    raise DataError(f"the normalisation std must be positive, got {std.tolist()} ({source})")
  return mean, std, source


def load_dataset(cfg: Any, progress: bool = True, log: Callable[[str], None] | None = None) -> Dataset:
  """Load the dataset that ``cfg`` (the ``config.dataset`` ConfigDict) names.

  Steps: read the splits; hold out the validation split (``holdout``); take the fixed subsets
  (``max_train_examples``, ``max_test_examples``); decode a small image folder into memory (or check
  its files, ``on_corrupt_image='skip'``); compute the normalisation.

  Args:
    cfg: ``config.dataset``.
    progress: show a progress bar while an image folder is decoded.
    log: where the one-line notices go (what an image-folder scan skipped, why a folder is
      streamed); default stderr.

  Raises:
    DataError: missing folder or file (the message names the place and the expected layout), empty
      class folder, labels out of range, an unreadable image.
    ConfigError: an augmentation that does not apply to the dataset as loaded.
  """
  log = log or _stderr
  name = cfg.name
  holdout_seed = int(cfg.get("holdout_seed", 0))
  raw = _load_splits(cfg, float(cfg.get("holdout", 0.0)), log)
  holdout = raw["holdout"]
  train, test = raw["train"], raw["test"]
  info: dict[str, Any] = {"dataset": name, "eval_split": "test"}
  if holdout > 0:
    mask = holdout_mask(train.y, train.keys, holdout, holdout_seed)
    held = np.flatnonzero(mask)
    test, train = train.take(held), train.take(np.flatnonzero(~mask))
    info["eval_split"] = "holdout"
    info["holdout"] = {
        "images": int(held.size), "seed": holdout_seed,
        "rule": "per class, the images whose sha256('SEED:KEY') is smallest (resnet_jax.data.holdout_mask)",
        "key": "path below train/" if raw["folder"] else "index in the training set",
        "keys": test.keys}
  if cfg.max_train_examples > 0:
    train = _fixed_subset(train, int(cfg.max_train_examples))
  if cfg.max_test_examples > 0:
    test = _fixed_subset(test, int(cfg.max_test_examples))

  skipped: list[str] = []
  shape = raw["shape"]
  if raw["folder"]:
    train, test, skipped = _store_folder(cfg, train, test, shape[0], progress, log)
  in_memory = isinstance(train.x, np.ndarray)
  info["storage"] = "memory" if in_memory else "stream"
  if raw["scan_skipped"]:
    info["scan_skipped"] = raw["scan_skipped"]
  if in_memory and cfg.augment not in ARRAY_AUGMENTATIONS:
    raise ConfigError(
        f"config.dataset.augment={cfg.augment!r} needs full-size images read at each step, but "
        f"{name} is held in memory at the model size: use one of {', '.join(ARRAY_AUGMENTATIONS)}"
        + (", or --config.dataset.in_memory=never" if raw["folder"] else ""))
  mean, std, source = _normalization(cfg, raw, train, progress)
  info["normalization"] = {"mean": mean.tolist(), "std": std.tolist(), "source": source}

  num_classes = raw["num_classes"]
  if cfg.num_classes > 0:
    for split, y in (("train", train.y), ("evaluation", test.y)):
      if y.size and y.max() >= cfg.num_classes:
        raise DataError(f"{name} {split} labels reach {int(y.max())}, but config.dataset.num_classes is "
                        f"{cfg.num_classes} (labels must lie in [0, num_classes))")
    num_classes = int(cfg.num_classes)
  if train.y.size == 0 or test.y.size == 0:
    raise DataError(f"{name}: the train split has {train.y.size} and the evaluation split "
                    f"{test.y.size} examples; both need at least one")
  info.update({"train_images": int(train.y.size), "eval_images": int(test.y.size),
               "num_classes": num_classes, "image_shape": list(shape)})
  if raw["classes"] is not None:
    info["classes"] = raw["classes"]
  if skipped:
    info["unreadable_skipped"] = len(skipped)
  return Dataset(name, num_classes, shape, mean, std, train.x, train.y, test.x, test.y,
                 augment=cfg.augment, crop_padding=int(cfg.crop_padding), classes=raw["classes"],
                 skipped_files=skipped, info=info)


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
