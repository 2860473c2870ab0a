"""Image files: decoding with Pillow (8-bit RGB), checking, decoding many at once, and a list of files read
per batch (:class:`ImageFiles`, a streamed image folder).

16-bit greyscale images are scaled to 8 bits (``v * 255 / 65535``, rounded); 32-bit integer or float images
have no defined 8-bit scale and are a :class:`~resnet_jax.errors.DataError`, as is a file Pillow cannot read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from collections.abc import Sequence

import numpy as np

from resnet_jax.augment import fit_to_size, random_resized_crop
from resnet_jax.errors import DataError

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def open_rgb(path: str):
  """The image at ``path`` as an 8-bit RGB PIL image; 16-bit greyscale scaled by 255 / 65535."""
  from PIL import Image

  hint = "(set config.dataset.on_corrupt_image='skip' to leave unreadable files out)"
  try:
    with Image.open(path) as im:
      if im.mode in _SIXTEEN_BIT_MODES or (im.mode == "I" and im.format == "PNG"):  # PNG "I": 16 bits.
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
      if im.mode in ("I", "F"):
        raise DataError(
          f"cannot decode image {path}: its pixels are 32-bit "
          f"{'integers' if im.mode == 'I' else 'floats'} (mode {im.mode}), which have no "
          f"defined 8-bit scale; store it with 8 or 16 bits per channel {hint}"
        )
      return im.convert("RGB")
  except DataError:
    raise
  except Image.DecompressionBombError as e:
    raise DataError(f"cannot decode image {path}: {e} (Pillow's limit, PIL.Image.MAX_IMAGE_PIXELS) {hint}") from None
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


def decode_threads() -> int:
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cpus = os.cpu_count() or 1
  return max(1, min(32, cpus))


def decode_images(
  paths: Sequence[str],
  size: int,
  skip_unreadable: bool = False,
  progress: bool = True,
  desc: str = "decoding images",
  threads: int | None = None,
) -> tuple[np.ndarray, list[int]]:
  """Decode ``paths`` once, in parallel (a thread pool), into one uint8 array at the model size.

  Each image goes through :func:`fit_to_size`. Pillow decodes with the GIL released, so for large
  images the threads use the cores; for 32x32 JPEGs the per-file work that holds the GIL dominates, and
  threads help mainly while the files are read from disk (``benchmarks/data_pipeline.py`` times both).
  A progress bar (tqdm, on stderr) counts the images.

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
        out[i] = fit_to_size(open_rgb(paths[i]), size)
      except DataError:
        if not skip_unreadable:
          raise
        ok[i] = False
    return hi - lo

  pool = concurrent.futures.ThreadPoolExecutor(threads or decode_threads())
  try:
    with tqdm(
      total=n, desc=desc, unit="img", disable=not progress or n == 0, dynamic_ncols=True, file=sys.stderr
    ) as bar:
      for done in pool.map(work, range(0, n, chunk)):
        bar.update(done)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  bad = np.flatnonzero(~ok).tolist()
  return (out if not bad else out[ok]), bad


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
    return np.stack([fit_to_size(open_rgb(self.paths[int(i)]), self.size) for i in indices])

  def random_resized_crops(self, indices: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """:func:`random_resized_crop` and a random flip of each image, from its own seed."""
    images = []
    for i, seed in zip(indices, seeds):
      r = np.random.default_rng(seed)
      arr = random_resized_crop(open_rgb(self.paths[int(i)]), self.size, r)
      images.append(arr[:, ::-1] if r.random() < 0.5 else arr)
    return np.stack(images)
