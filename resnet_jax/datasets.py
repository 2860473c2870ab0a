"""The datasets as they lie on disk: the splits of each dataset and folder layout, and the held-out split.

Every loader returns NHWC images (uint8, or float32 in [0, 1] for the digits) or a list of image files, and
int32 labels. :mod:`resnet_jax.data` turns what :func:`load_splits` returns into a dataset with batches.

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
  one line.

For these three ``data_dir`` may also be a tar archive of the folder (CIFAR's ``cifar-10-python.tar.gz``
as published, say), unpacked once into ``config.dataset.unpack_dir`` (:mod:`resnet_jax.archives`).

Held-out validation split (``config.dataset.holdout``, every dataset): a fraction in (0, 1) or a count
of the training images becomes the evaluation split instead of ``test`` (which is then not read), per
class in proportion to its size (:func:`holdout_mask`: the class quotas by largest remainder, and in
each class the images whose ``sha256("SEED:KEY")`` is smallest, KEY being the path below ``train/``
or the index in the training set), so the choice depends on the seed and the file names only.
``holdout=-1`` (auto) holds out :data:`AUTO_HOLDOUT` of a folder that has no ``test/`` (5,000 of
CIFAR-10's 50,000 training images), and nothing where a test split exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from resnet_jax import archives
from resnet_jax.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD
from resnet_jax.errors import DataError

DATASETS = ("digits", "cifar10", "cifar100", "image_folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
AUTO_HOLDOUT = 0.1  # holdout=-1: the fraction of train/ held out when a folder has no test/.

CIFAR_LAYOUT = {
  "cifar10": (
    "cifar-10-batches-py",
    "DATA_DIR/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch} (the python "
    "pickle release, cifar-10-python.tar.gz unpacked), or the images as "
    "DATA_DIR/train/<class>/*.png|jpg",
  ),
  "cifar100": (
    "cifar-100-python",
    "DATA_DIR/cifar-100-python/{train, test} (the python pickle release, "
    "cifar-100-python.tar.gz unpacked), or the images as DATA_DIR/train/<class>/*.png|jpg",
  ),
}
IMAGE_FOLDER_LAYOUT = (
  "DATA_DIR/train/<class>/*.jpg|png and DATA_DIR/test/<class>/*.jpg|png "
  "(one sub-folder per class, the same class names in both)"
)


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
  x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
  return (
    np.ascontiguousarray(x_train),
    np.ascontiguousarray(y_train),
    np.ascontiguousarray(x_test),
    np.ascontiguousarray(y_test),
  )


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
    f"set --config.dataset.data_dir to the folder that holds it, or to the release's .tar.gz itself (no "
    f"download is attempted)"
  )


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
    what = (
      f"an array of shape {data.shape} and dtype {data.dtype}"
      if isinstance(data, np.ndarray)
      else f"a {type(data).__name__}"
    )
    raise DataError(f"{name}: {path} b'data' is {what}, expected a uint8 array of shape (N, 3072)")
  raw = d[label_key]
  labels = None
  if isinstance(raw, (list, tuple, np.ndarray)):
    try:
      labels = np.asarray(raw)
    except (ValueError, TypeError):
      labels = None
  if labels is None or labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
    what = (
      f"an array of shape {labels.shape} and dtype {labels.dtype}" if labels is not None else f"a {type(raw).__name__}"
    )
    raise DataError(f"{name}: {path} {label_key!r} is {what}, expected a list of N integers")
  if labels.shape[0] != data.shape[0]:
    raise DataError(
      f"{name}: {path} holds {data.shape[0]} images but {labels.shape[0]} labels "
      f"({label_key!r}); they must match one to one"
    )
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def load_cifar(data_dir: str, name: str = "cifar10") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
      raise DataError(
        f"{name} {split} labels lie in [{y.min()}, {y.max()}], expected [0, {num_classes - 1}] (folder {folder})"
      )
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
    for one, many, items in (
      ("hidden entry", "hidden entries", self.hidden),
      ("non-image file", "non-image files", self.not_images),
    ):
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
    raise DataError(
      f"cannot read {entry.path}: {e.strerror or e} (a symbolic link loop or a broken "
      f"entry in the image folder; remove it)"
    ) from None


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
        raise DataError(
          f"image folder {current} is the folder {seen[key]} read already (a symbolic "
          f"link loop or a second link to it); remove the link"
        )
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
    raise DataError(
      f"image folder split {split!r} not found at {where}: expected the layout "
      f"{IMAGE_FOLDER_LAYOUT.replace('DATA_DIR', data_dir or 'DATA_DIR')}"
    )
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
      raise DataError(
        f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}, in it or its sub-folders)"
      )
    paths.extend(files)
    labels.extend([label] * len(files))
  return FolderScan(root, paths, np.asarray(labels, dtype=np.int32), list(classes), hidden, not_images)


def scan_image_folder(
  data_dir: str, split: str, classes: Sequence[str] | None = None
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
    raise DataError(
      f"config.dataset.holdout = {amount!r} asks for {count} of the {n} training examples; "
      f"hold out at least 1 and fewer than {n}"
    )
  classes, sizes = np.unique(labels, return_counts=True)
  quotas = [count * int(s) // n for s in sizes]
  remainders = [count * int(s) % n for s in sizes]
  for c in sorted(range(len(classes)), key=lambda c: (-remainders[c], c))[: count - sum(quotas)]:
    quotas[c] += 1
  mask = np.zeros(n, dtype=bool)
  for cls, size, quota in zip(classes, sizes, quotas):
    if quota >= size:
      raise DataError(
        f"config.dataset.holdout = {amount!r} would hold out all {size} examples of class {int(cls)}; hold out fewer"
      )
    members = np.flatnonzero(labels == cls)
    order = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).digest())
    mask[np.asarray(order[:quota], dtype=np.int64)] = True
  return mask


# ----------------------------------------------------------------------------------------------
# The splits of a dataset.


@dataclasses.dataclass(frozen=True)
class Split:
  """The images and labels of one split, and a key per example (what :func:`holdout_mask` hashes).

  ``x`` is an array of images, or an object array of image file paths; both are indexed alike.
  """

  x: np.ndarray
  y: np.ndarray
  keys: list[str]

  def take(self, keep: np.ndarray) -> Split:
    keep = np.asarray(keep, dtype=np.int64)
    return Split(self.x[keep], self.y[keep], [self.keys[i] for i in keep] if self.keys else [])


def fixed_subset(split: Split, n: int) -> Split:
  """The first ``n`` examples of a fixed permutation, in their original order."""
  return split.take(np.sort(np.random.default_rng(1234).permutation(split.y.shape[0])[:n]))


def _index_keys(n: int) -> list[str]:
  return [str(i) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Splits:
  """The raw training and test splits of a dataset and what describes it.

  Attributes:
    train / test: the splits (``test`` is empty when a held-out split replaces it).
    num_classes: classes of the dataset.
    shape: ``(H, W, C)`` of the model input.
    classes: class names (image folders), else None.
    default_stats: the published ``(mean, std)``, or None where the training images give them.
    default_source: where the default statistics come from, in words.
    scan_skipped: per split folder, the hidden entries and non-image files the scan left out.
    folder: whether the images are files (an image folder) rather than arrays.
    holdout: the held-out amount that applies (0: none).
  """

  train: Split
  test: Split
  num_classes: int
  shape: tuple[int, int, int]
  classes: list[str] | None
  default_stats: tuple[Sequence[float], Sequence[float]] | None
  default_source: str
  scan_skipped: dict
  folder: bool
  holdout: float


def _cifar_as_folder(data_dir: str, name: str) -> bool:
  """True when ``data_dir`` holds CIFAR as an image folder (``train/<class>/``) and not the pickles."""
  if not data_dir or not os.path.isdir(os.path.join(data_dir, "train")):
    return False
  try:
    _cifar_folder(data_dir, name)
  except DataError:
    return True
  return False


def folder_holdout(data_dir: str, holdout: float) -> float:
  """The holdout that applies to the image folder ``data_dir``: ``holdout`` itself, or for ``holdout`` < 0
  (auto) :data:`AUTO_HOLDOUT` of ``train/`` when the folder has no ``test/``, and nothing when it has one."""
  if holdout >= 0:
    return holdout
  return 0.0 if os.path.isdir(os.path.join(data_dir, "test")) else AUTO_HOLDOUT


def _folder_splits(cfg: Any, holdout: float, size: int, log: Callable[[str], None]) -> Splits:
  """The splits of an image folder (``train/<class>/``, ``test/<class>/``), as paths and labels.

  ``holdout`` < 0 (auto): a folder without ``test/`` holds out :data:`AUTO_HOLDOUT` of ``train/``,
  one with ``test/`` nothing. The holdout that applies is returned as ``Splits.holdout``.
  """
  train = scan_folder(cfg.data_dir, "train")
  scans = [train]
  has_test = os.path.isdir(os.path.join(cfg.data_dir, "test"))
  holdout = folder_holdout(cfg.data_dir, holdout)
  if holdout > 0:
    test = Split(np.empty(0, dtype=object), np.zeros(0, np.int32), [])
  else:
    if not has_test:
      raise DataError(
        f"image folder {os.path.abspath(cfg.data_dir)} has no test/ split: add "
        f"test/<class>/ folders, or hold out part of train/ with "
        f"--config.dataset.holdout=0.1 (a fraction) or =5000 (a count)"
      )
    scans.append(scan_folder(cfg.data_dir, "test", train.classes))
    test = Split(_paths(scans[1].paths), scans[1].labels, [])
  skipped = {}
  for scan in scans:
    line = scan.report()
    if line:
      log(line)
      skipped[scan.root] = {"hidden": len(scan.hidden), "not_images": len(scan.not_images)}
  root = os.path.join(cfg.data_dir, "train")
  keys = [os.path.relpath(p, root).replace(os.sep, "/") for p in train.paths]
  return Splits(
    Split(_paths(train.paths), train.labels, keys),
    test,
    len(train.classes),
    (size, size, 3),
    train.classes,
    (IMAGENET_MEAN, IMAGENET_STD),
    "the ImageNet statistics",
    skipped,
    True,
    holdout,
  )


def _paths(paths: list[str]) -> np.ndarray:
  """File paths as a 1-D object array (indexed like an array of images)."""
  out = np.empty(len(paths), dtype=object)
  out[:] = paths
  return out


def _cifar_splits(cfg: Any, holdout: float, log: Callable[[str], None]) -> Splits:
  """CIFAR-10 or CIFAR-100: the pickles, or the images as an image folder of 32x32 files."""
  name = cfg.name
  stats = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
  source = f"the published {name.upper().replace('CIFAR', 'CIFAR-')} statistics"
  num_classes = 10 if name == "cifar10" else 100
  if _cifar_as_folder(cfg.data_dir, name):  # The images as files: train/<class>/*.png|jpg.
    raw = _folder_splits(cfg, holdout, 32, log)
    if raw.num_classes != num_classes:
      raise DataError(
        f"{name}: {os.path.abspath(os.path.join(cfg.data_dir, 'train'))} has "
        f"{raw.num_classes} class folders, expected {num_classes}"
      )
    return dataclasses.replace(raw, default_stats=stats, default_source=source)
  x_train, y_train, x_test, y_test = load_cifar(cfg.data_dir, name)
  return Splits(
    Split(x_train, y_train, _index_keys(len(y_train))),
    Split(x_test, y_test, []),
    num_classes,
    (32, 32, 3),
    None,
    stats,
    source,
    {},
    False,
    max(holdout, 0.0),
  )


def load_splits(cfg: Any, holdout: float, log: Callable[[str], None]) -> Splits:
  """The raw training and test splits of the dataset ``cfg`` (``config.dataset``) names.

  ``holdout`` is ``config.dataset.holdout`` (< 0: auto); the amount that applies is ``Splits.holdout``.
  ``log`` receives the one-line notices (what an image-folder scan skipped).
  """
  name = cfg.name
  if name == "digits":
    x_train, y_train, x_test, y_test = digits_split(seed=0, test_fraction=cfg.test_fraction)
    return Splits(
      Split(x_train, y_train, _index_keys(len(y_train))),
      Split(x_test, y_test, []),
      10,
      (8, 8, 1),
      None,
      None,
      "mean / std of the training images",
      {},
      False,
      max(holdout, 0.0),
    )
  if name in ("cifar10", "cifar100", "image_folder"):
    folder = archives.data_folder(cfg.data_dir, cfg.get("unpack_dir", ""), log)
    if folder != cfg.data_dir:  # A tar archive, unpacked: read the folder it holds.
      cfg = cfg.copy_and_resolve_references()
      cfg.data_dir = folder
  if name in ("cifar10", "cifar100"):
    return _cifar_splits(cfg, holdout, log)
  if name == "image_folder":
    return _folder_splits(cfg, holdout, int(cfg.image_size), log)
  raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
