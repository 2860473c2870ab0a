"""Input data: a loaded dataset (in memory, or image files read per batch) and its grain pipelines.

Every array this module hands out is NHWC float32 for images and int32 for labels. The modules below it:
:mod:`resnet_jax.datasets` (the splits of each dataset on disk, the held-out split),
:mod:`resnet_jax.image_files` (decoding image files) and :mod:`resnet_jax.augment` (augmentation,
normalisation and its statistics).

In memory or streamed (image folders, ``config.dataset.in_memory``): a folder whose images are already
``image_size`` x ``image_size`` (checked on the headers of up to 64 files spread over the training
list) and whose decoded images (train and evaluation split, ``N * image_size**2 * 3`` bytes) take at
most ``in_memory_max_mb`` is decoded once, by a thread pool with a progress bar, into uint8 arrays
(``auto``, the default; ``always`` forces it, resizing other sizes as the evaluation does; ``never``
streams). From then on it is exactly an in-memory dataset like CIFAR (:class:`ArrayDataset`): the same
augmentation and normalisation code, the same pipeline. Other folders (ImageNet) are streamed
(:class:`FileDataset`): each image is decoded when a batch needs it. ``random_resized_crop_flip`` needs the
full-size image, so ``auto`` streams with it.

Pipelines (grain ``MapDataset``): the training set is shuffled with the run's seed, repeated with a new
order each epoch, cut into global batches (the last incomplete batch of an epoch runs into the next
epoch, so every batch has the same shape), and each batch is loaded and augmented with a
``np.random.Generator`` that grain derives from the seed and the batch index. The order is grain's
``shuffle(seed).repeat().batch()``, computed a whole epoch at a time (:mod:`resnet_jax.index_shuffle`:
the same indices, for a small fraction of the host time of grain's per-example shuffle). The whole order is
therefore a pure function of (seed, step): the iterator state is just the next batch index
(``iterator.get_state()``), saved with every checkpoint.

Normalisation statistics (see :mod:`resnet_jax.augment` for the defaults):
``config.dataset.normalize='dataset'`` computes them from the training images (never the held-out ones:
every image in memory, or 5,000 images spread over the list of a streamed folder, each at the model
size), and ``config.dataset.mean`` / ``std`` set them. The values used are in :attr:`Dataset.info`,
which a run writes to ``WORKDIR/data.json`` for its evaluations.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from resnet_jax.augment import (
  ARRAY_AUGMENTATIONS,
  channel_stats,
  crop_draws,
  cutout,
  cutout_draws,
  normalize,
  pad_crop_flip_part,
)
from resnet_jax.datasets import Split, Splits, fixed_subset, holdout_mask, load_splits
from resnet_jax.errors import ConfigError, DataError
from resnet_jax.image_files import ImageFiles, decode_images, unreadable_images
from resnet_jax.index_shuffle import shuffled_batch

IN_MEMORY = ("auto", "always", "never")
AUGMENT_ON = ("auto", "host", "device")  # config.dataset.augment_on (resnet_jax.run_setup.augment_on)
HEADER_SAMPLE = 64  # in_memory='auto': image headers read to check that the images are image_size.
STATS_SAMPLE = 5000  # normalize='dataset' on a streamed folder: training images the statistics use.


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A loaded dataset: how to produce a (train or evaluation) batch of images from example indices.

  Two kinds: :class:`ArrayDataset` (the images in memory) and :class:`FileDataset` (image files decoded
  when a batch reads them); :func:`load_dataset` picks one.

  Attributes:
    name: dataset name.
    num_classes: number of classes.
    image_shape: ``(H, W, C)`` of the model input.
    mean / std: per-channel normalisation applied after augmentation (pixels in [0, 1]).
    train_x / test_x: the images: an array (uint8, or float in [0, 1]) in memory, or
      :class:`~resnet_jax.image_files.ImageFiles` (a streamed image folder); ``test_*`` is the evaluation
      split (the held-out images when ``config.dataset.holdout`` is set).
    train_y / test_y: int32 labels.
    augment: augmentation name, crop_padding: pixels of the pad-crop.
    cutout: side of the square each training image loses after normalisation
      (:func:`resnet_jax.augment.cutout`); 0: none.
    classes: class names (image folders).
    skipped_files: unreadable images left out (``on_corrupt_image='skip'``).
    info: what a run records about its data (``WORKDIR/data.json``): the normalisation used and where
      it came from, the evaluation split, the held-out images, the storage, what the scan skipped.
  """

  in_memory: ClassVar[bool] = True

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
  cutout: int = 0
  classes: list[str] | None = None
  skipped_files: list[str] = dataclasses.field(default_factory=list)
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def num_train(self) -> int:
    return int(self.train_y.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_y.shape[0])

  def train_batch(
    self, indices: np.ndarray, rng: np.random.Generator, part: slice = slice(None)
  ) -> dict[str, np.ndarray]:
    """Load, augment and normalise the training examples ``indices[part]``.

    The augmentation of an example depends on ``rng`` and its position in ``indices`` only, so each
    host loading its ``part`` of a global batch gets what one host loading all of it would. With
    :attr:`cutout`, its squares are cut from the normalised images, drawn from ``rng`` after the
    augmentation's draws (none are drawn without it).
    """
    indices = np.asarray(indices)
    rows = indices[part]
    x = self._augmented(rows, rng, len(indices), part)
    image = normalize(x, self.mean, self.std)
    if self.cutout > 0:
      cutout(image, cutout_draws(rng, len(indices), part, *self.image_shape[:2]), self.cutout)
    return {"image": image, "label": self.train_y[rows]}

  def _augmented(self, rows: np.ndarray, rng: np.random.Generator, n: int, part: slice) -> np.ndarray:
    """The training images ``rows``, the ``part`` of a batch of ``n``, augmented (draws made for all ``n``)."""
    x = self.train_x[rows]
    if self.augment in ("pad_crop", "pad_crop_flip"):
      x = pad_crop_flip_part(x, rng, n, part, self.crop_padding, flip=self.augment == "pad_crop_flip")
    return x

  @property
  def crop_padding_used(self) -> int:
    """The padding of the pad-crop this dataset's augmentation applies (0: none)."""
    return self.crop_padding if self.augment in ("pad_crop", "pad_crop_flip") else 0

  @property
  def augmentable_on_device(self) -> bool:
    """Whether :func:`resnet_jax.device_augment.make_batch` can make this dataset's training batches:
    images in memory, augmentation ``none`` or a pad-crop."""
    return self.in_memory and self.augment in ARRAY_AUGMENTATIONS

  def check_augmentable_on_device(self) -> None:
    """A ConfigError that says why, unless :attr:`augmentable_on_device`."""
    if not self.augmentable_on_device:
      raise ConfigError(
        f"config.dataset.augment_on='device' needs the training images in memory and an augmentation of "
        f"{ARRAY_AUGMENTATIONS}; {self.name} is {'held in memory' if self.in_memory else 'streamed'} with "
        f"augment={self.augment!r}: use augment_on='host'"
      )

  def train_draws(
    self, indices: np.ndarray, rng: np.random.Generator, part: slice = slice(None)
  ) -> dict[str, np.ndarray]:
    """What :meth:`train_batch` would draw for ``indices[part]``, without the images: ``index`` (int32),
    ``label`` and ``crop`` (int32 ``(dy, dx, mirror)`` rows, :func:`resnet_jax.augment.crop_draws`),
    and with :attr:`cutout` ``cutout`` (int32 ``(cy, cx)`` rows, :func:`resnet_jax.augment.cutout_draws`).
    :func:`resnet_jax.device_augment.make_batch` turns them into that very batch on the device.
    """
    self.check_augmentable_on_device()
    indices = np.asarray(indices)
    rows = indices[part]
    if self.augment == "none":
      crop = np.zeros((len(rows), 3), np.int32)
    else:
      crop = crop_draws(rng, len(indices), part, self.crop_padding, flip=self.augment == "pad_crop_flip")
    draws = {"index": rows.astype(np.int32), "label": self.train_y[rows], "crop": crop}
    if self.cutout > 0:
      draws["cutout"] = cutout_draws(rng, len(indices), part, *self.image_shape[:2])
    return draws

  def test_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Load and normalise the evaluation examples ``indices``."""
    indices = np.asarray(indices)
    return {"image": normalize(self.test_x[indices], self.mean, self.std), "label": self.test_y[indices]}


class ArrayDataset(Dataset):
  """A dataset whose images are arrays in memory (digits, CIFAR, a decoded image folder)."""

  in_memory: ClassVar[bool] = True

  @staticmethod
  def training_stats(x: np.ndarray, skip_unreadable: bool, progress: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """``(mean, std, where they come from)`` of every training image."""
    mean, std = channel_stats(x)
    return mean, std, f"mean / std of the {len(x)} training images"


class FileDataset(Dataset):
  """A dataset whose images are files decoded when a batch reads them (a streamed image folder).

  Adds ``random_resized_crop_flip``, which needs the full-size image.
  """

  in_memory: ClassVar[bool] = False

  def _augmented(self, rows: np.ndarray, rng: np.random.Generator, n: int, part: slice) -> np.ndarray:
    if self.augment != "random_resized_crop_flip":
      return super()._augmented(rows, rng, n, part)
    seeds = rng.integers(0, 2**63 - 1, size=n)[part]
    return self.train_x.random_resized_crops(rows, seeds)

  @staticmethod
  def training_stats(x: ImageFiles, skip_unreadable: bool, progress: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """``(mean, std, where they come from)`` of :data:`STATS_SAMPLE` training images spread over the list."""
    pick = np.unique(np.linspace(0, len(x) - 1, min(STATS_SAMPLE, len(x))).astype(int))
    sample, _ = decode_images(
      [x.paths[int(i)] for i in pick], x.size, skip_unreadable, progress, desc="normalisation statistics"
    )
    mean, std = channel_stats(sample)
    return mean, std, f"mean / std of {len(sample)} training images spread over the list, at the model size"


def _channel_stats(values: Sequence[float], channels: int, what: str) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float32).reshape(-1)
  if arr.size == 1:
    arr = np.repeat(arr, channels)
  if arr.size != channels:
    raise DataError(f"config.dataset.{what} has {arr.size} values, the images have {channels} channels")
  return arr


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _use_memory(cfg: Any, train: Sequence[str], test: Sequence[str], size: int, log: Callable[[str], None]) -> bool:
  """Whether an image folder is decoded once into memory (see the module docstring)."""
  mode = cfg.get("in_memory", "auto")
  if mode != "auto":
    return mode == "always"
  if cfg.augment == "random_resized_crop_flip":
    return False
  nbytes = (len(train) + len(test)) * size * size * 3
  limit_mb = cfg.get("in_memory_max_mb", 4096)
  if nbytes > limit_mb * 2**20:
    log(
      f"image folder {cfg.data_dir}: streamed (decoded {nbytes / 2**20:.0f} MB would exceed "
      f"config.dataset.in_memory_max_mb = {limit_mb})"
    )
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


def _store_folder(
  cfg: Any, train: Split, test: Split, size: int, progress: bool, log: Callable[[str], None]
) -> tuple[type[Dataset], Split, Split, list[str]]:
  """An image folder's splits decoded into memory (:class:`ArrayDataset`) or as :class:`ImageFiles`
  (:class:`FileDataset`); and the files left out."""
  skip = cfg.get("on_corrupt_image", "stop") == "skip"
  if _use_memory(cfg, train.x, test.x, size, log):
    splits, skipped = [], []
    for label, split in (("train", train), ("evaluation", test)):
      images, bad = decode_images(split.x, size, skip, progress, desc=f"decoding the {label} images of {cfg.data_dir}")
      skipped += [split.x[i] for i in bad]
      kept = split.take(np.setdiff1d(np.arange(len(split.x)), bad))
      splits.append(Split(images, kept.y, kept.keys))
    return ArrayDataset, splits[0], splits[1], skipped
  skipped = []
  if skip:  # Check every file once; leave the bad ones out.
    paths = list(train.x) + list(test.x)
    bad = set(unreadable_images(paths))
    skipped = [p for p in paths if p in bad]
    train = train.take([i for i, p in enumerate(train.x) if p not in bad])
    test = test.take([i for i, p in enumerate(test.x) if p not in bad])
  return (
    FileDataset,
    Split(ImageFiles(tuple(train.x), size), train.y, train.keys),
    Split(ImageFiles(tuple(test.x), size), test.y, test.keys),
    skipped,
  )


def _normalization(
  cfg: Any, raw: Splits, kind: type[Dataset], train: Split, progress: bool
) -> tuple[np.ndarray, np.ndarray, str]:
  """``(mean, std, where they come from)``: the config's, the training images', or the default."""
  channels = raw.shape[-1]
  if len(cfg.mean):
    mean, std = _channel_stats(cfg.mean, channels, "mean"), _channel_stats(cfg.std, channels, "std")
    source = "config.dataset.mean / std"
  elif cfg.get("normalize", "default") == "dataset" or raw.default_stats is None:
    if train.y.size == 0:
      raise DataError(f"{cfg.name}: the training split is empty")
    mean, std, source = kind.training_stats(train.x, cfg.get("on_corrupt_image", "stop") == "skip", progress)
  else:
    mean = np.asarray(raw.default_stats[0], np.float32)
    std = np.asarray(raw.default_stats[1], np.float32)
    source = raw.default_source
  if np.any(std <= 0):
    raise DataError(f"the normalisation std must be positive, got {std.tolist()} ({source})")
  return mean, std, source


def _evaluation_split(raw: Splits, seed: int) -> tuple[Split, Split, dict | None]:
  """``(train, evaluation split, what data.json records of the held-out images or None)``."""
  train = raw.train
  if raw.holdout <= 0:
    return train, raw.test, None
  mask = holdout_mask(train.y, train.keys, raw.holdout, seed)
  held = np.flatnonzero(mask)
  test = train.take(held)
  record = {
    "images": int(held.size),
    "seed": seed,
    "rule": "per class, the images whose sha256('SEED:KEY') is smallest (resnet_jax.datasets.holdout_mask)",
    "key": "path below train/" if raw.folder else "index in the training set",
    "keys": test.keys,
  }
  return train.take(np.flatnonzero(~mask)), test, record


def _num_classes(cfg: Any, raw: Splits, train: Split, test: Split) -> int:
  """The classes of the model: ``config.dataset.num_classes`` when set (checked against the labels), else
  the dataset's; both splits must hold examples."""
  num_classes = raw.num_classes
  if cfg.num_classes > 0:
    for split, y in (("train", train.y), ("evaluation", test.y)):
      if y.size and y.max() >= cfg.num_classes:
        raise DataError(
          f"{cfg.name} {split} labels reach {int(y.max())}, but config.dataset.num_classes is "
          f"{cfg.num_classes} (labels must lie in [0, num_classes))"
        )
    num_classes = int(cfg.num_classes)
  if train.y.size == 0 or test.y.size == 0:
    raise DataError(
      f"{cfg.name}: the train split has {train.y.size} and the evaluation split "
      f"{test.y.size} examples; both need at least one"
    )
  return num_classes


def _info(
  cfg: Any,
  raw: Splits,
  kind: type[Dataset],
  held_out: dict | None,
  normalization: tuple,
  sizes: tuple[int, int],
  num_classes: int,
  skipped: list[str],
) -> dict[str, Any]:
  """What a run records about its data (:attr:`Dataset.info`, ``WORKDIR/data.json``)."""
  mean, std, source = normalization
  info: dict[str, Any] = {"dataset": cfg.name, "eval_split": "test" if held_out is None else "holdout"}
  if held_out is not None:
    info["holdout"] = held_out
  info["storage"] = "memory" if kind.in_memory else "stream"
  if raw.scan_skipped:
    info["scan_skipped"] = raw.scan_skipped
  info["normalization"] = {"mean": mean.tolist(), "std": std.tolist(), "source": source}
  info.update(
    {"train_images": sizes[0], "eval_images": sizes[1], "num_classes": num_classes, "image_shape": list(raw.shape)}
  )
  if raw.classes is not None:
    info["classes"] = raw.classes
  if skipped:
    info["unreadable_skipped"] = len(skipped)
  return info


def eval_split_name(info: dict[str, Any]) -> str:
  """What a run evaluated on, in words, from its :attr:`Dataset.info` (``WORKDIR/data.json``).

  ``"5,000 held-out images"`` where the evaluations ran on images held out of the training split (their
  number from ``info["holdout"]``), else ``"test split"``.
  """
  if info.get("eval_split") == "holdout":
    return f"{info['holdout']['images']:,} held-out images"
  return "test split"


def load_dataset(cfg: Any, progress: bool = True, log: Callable[[str], None] | None = None) -> Dataset:
  """Load the dataset that ``cfg`` (the ``config.dataset`` ConfigDict) names.

  Steps: read the splits (:func:`resnet_jax.datasets.load_splits`); hold out the validation split
  (``holdout``); take the fixed subsets (``max_train_examples``, ``max_test_examples``); decode a small
  image folder into memory (or check its files, ``on_corrupt_image='skip'``); compute the normalisation.

  Args:
    cfg: ``config.dataset``.
    progress: show a progress bar while an image folder is decoded.
    log: where the one-line notices go (what an image-folder scan skipped, why a folder is
      streamed); default stderr.

  Returns:
    An :class:`ArrayDataset` (images in memory) or a :class:`FileDataset` (a streamed image folder).

  Raises:
    DataError: missing folder or file (the message names the place and the expected layout), empty
      class folder, labels out of range, an unreadable image.
    ConfigError: an augmentation that does not apply to the dataset as loaded.
  """
  log = log or _stderr
  raw = load_splits(cfg, float(cfg.get("holdout", 0.0)), log)
  train, test, held_out = _evaluation_split(raw, int(cfg.get("holdout_seed", 0)))
  if cfg.max_train_examples > 0:
    train = fixed_subset(train, int(cfg.max_train_examples))
  if cfg.max_test_examples > 0:
    test = fixed_subset(test, int(cfg.max_test_examples))
  kind, skipped = ArrayDataset, []
  if raw.folder:
    kind, train, test, skipped = _store_folder(cfg, train, test, raw.shape[0], progress, log)
  if kind.in_memory and cfg.augment not in ARRAY_AUGMENTATIONS:
    raise ConfigError(
      f"config.dataset.augment={cfg.augment!r} needs full-size images read at each step, but "
      f"{cfg.name} is held in memory at the model size: use one of {', '.join(ARRAY_AUGMENTATIONS)}"
      + (", or --config.dataset.in_memory=never" if raw.folder else "")
    )
  normalization = _normalization(cfg, raw, kind, train, progress)
  num_classes = _num_classes(cfg, raw, train, test)
  info = _info(cfg, raw, kind, held_out, normalization, (int(train.y.size), int(test.y.size)), num_classes, skipped)
  return kind(
    cfg.name,
    num_classes,
    raw.shape,
    normalization[0],
    normalization[1],
    train.x,
    train.y,
    test.x,
    test.y,
    augment=cfg.augment,
    crop_padding=int(cfg.crop_padding),
    cutout=int(cfg.get("cutout", 0)),
    classes=raw.classes,
    skipped_files=skipped,
    info=info,
  )


# ----------------------------------------------------------------------------------------------
# grain pipelines.


def train_pipeline(
  ds: Dataset,
  global_batch: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 2,
  num_workers: int = 0,
  on_device: bool = False,
):
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
    on_device: yield :meth:`Dataset.train_draws` (indices, labels, crop and cutout draws) instead of images, for
      a step that makes the batch on the device (:mod:`resnet_jax.device_augment`).
  """
  import grain

  if global_batch % process_count:
    raise DataError(f"global batch {global_batch} is not divisible by the {process_count} processes")
  if ds.num_train < global_batch:
    raise DataError(f"{ds.name}: the training set has {ds.num_train} examples, fewer than one batch of {global_batch}")
  local = global_batch // process_count
  lo = process_index * local

  read = ds.train_draws if on_device else ds.train_batch

  def load(indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return read(np.asarray(indices), rng, slice(lo, lo + local))

  if not 0 <= seed < 2**32:
    raise ConfigError(f"seed {seed}: the shuffle needs a seed in [0, 2**32)")
  n = ds.num_train
  # Batch b of grain's range(n).shuffle(seed).repeat().batch(global_batch), as many batches as that has.
  pipeline = (
    grain.MapDataset.range(sys.maxsize // global_batch)
    .map(lambda b: shuffled_batch(n, seed, global_batch, b))
    .random_map(load, seed=seed + 1)
  )
  iter_ds = pipeline.to_iter_dataset(
    grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(2, 2 * num_threads))
  )
  if num_workers > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (their defaults here).
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter_ds


def eval_batches(
  ds: Dataset, batch_size: int, process_index: int = 0, process_count: int = 1, num_threads: int = 2
) -> Iterator[dict[str, np.ndarray]]:
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
    idx = np.arange(b * batch_size, (b + 1) * batch_size)[lo : lo + local]
    mask = (idx < n).astype(np.float32)
    batch = ds.test_batch(np.minimum(idx, n - 1))
    batch["mask"] = mask
    return batch

  pipeline = grain.MapDataset.range(num_batches).map(load)
  yield from pipeline.to_iter_dataset(
    grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(2, 2 * num_threads))
  )
