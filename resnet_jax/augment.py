"""Augmentation and normalisation of NHWC image batches (numpy on the host), and the normalisation statistics.

Augmentation (``config.dataset.augment``): ``none``; ``pad_crop`` / ``pad_crop_flip`` (zero-pad
``crop_padding`` pixels per side, random crop back to the original size, random horizontal flip: the
CIFAR recipe; every dataset, :func:`pad_crop_flip`); ``random_resized_crop_flip`` (streamed image folders
only, :func:`random_resized_crop`: area scale in [0.08, 1], aspect ratio in [3/4, 4/3], bilinear resize to
``image_size``, random flip). An image-folder image is brought to the model size by :func:`fit_to_size`:
unchanged when it is already ``image_size`` square, otherwise a resize of the shorter side to
``image_size / 0.875`` and a centre crop of ``image_size`` (evaluation, ``none`` and ``pad_crop*``, streamed
or in memory alike).

Cutout (``config.dataset.cutout``, DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural
Networks with Cutout"): after any of these augmentations and after normalisation, one square of
``cutout`` x ``cutout`` pixels per training image is set to zero, i.e. to the channel mean; its centre is
uniform over the image's pixels and it is clipped at the border (:func:`cutout_draws`, :func:`cutout`).
0 (the default) turns it off. Evaluation batches never get it.

Normalisation (:func:`normalize`): ``(x - mean) / std`` per channel after augmentation, with pixels in
[0, 1]:

- digits: mean and std of the training split's pixels (one channel), computed at load time;
- CIFAR-10: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616);
- CIFAR-100: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762);
- image folders: the ImageNet statistics mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225);

``config.dataset.normalize='dataset'`` computes them from the training images instead
(:func:`channel_stats`), and ``config.dataset.mean`` / ``std`` set them (see :func:`resnet_jax.data.load_dataset`).
"""

from __future__ import annotations

import numpy as np

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTATIONS = ("none", "pad_crop", "pad_crop_flip", "random_resized_crop_flip")
ARRAY_AUGMENTATIONS = ("none", "pad_crop", "pad_crop_flip")  # What works on decoded (in-memory) images.
NORMALIZATIONS = ("default", "dataset")
EVAL_CROP_FRACTION = 0.875


def pad_crop_flip(
  images: np.ndarray, rng: np.random.Generator, padding: int, flip: bool, part: slice = slice(None)
) -> np.ndarray:
  """Zero-pad ``padding`` pixels per side, crop a random window of the original size, maybe flip.

  ``images`` is NHWC; each image gets its own offsets and flip. The random draws are made for all of
  ``images`` and then only ``images[part]`` is augmented and returned, so a slice of a batch is
  augmented exactly as in the whole batch (one host's share of a global batch).
  """
  return pad_crop_flip_part(images[part], rng, images.shape[0], part, padding, flip)


def pad_crop_flip_part(
  out: np.ndarray, rng: np.random.Generator, n: int, part: slice, padding: int, flip: bool
) -> np.ndarray:
  """:func:`pad_crop_flip` of ``out``, the ``part`` of a batch of ``n`` images (draws made for all ``n``).

  One slice copy per image (a window of the padded image, read backwards when flipped): several times
  faster than one gather over the batch.
  """
  _, h, w, _ = out.shape
  crop = crop_draws(rng, n, part, padding, flip)
  padded = np.pad(out, ((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else out
  result = np.empty_like(out)
  for i, (dy, dx, mirror) in enumerate(crop):
    window = padded[i, dy : dy + h, dx : dx + w]
    result[i] = window[:, ::-1] if mirror else window
  return result


def crop_draws(rng: np.random.Generator, n: int, part: slice, padding: int, flip: bool) -> np.ndarray:
  """The random draws of :func:`pad_crop_flip` for the ``part`` of a batch of ``n``: int32 rows
  ``(dy, dx, mirror)``, the window's offsets in the padded image (in ``[0, 2 * padding]``) and whether it
  is flipped (always 0 without ``flip``; the flip draws are made either way, so ``flip`` does not change
  the offsets). The host (:func:`pad_crop_flip_part`) and the device
  (:func:`resnet_jax.device_augment.make_batch`) augment with the same draws.
  """
  dy = rng.integers(0, 2 * padding + 1, size=n)[part]
  dx = rng.integers(0, 2 * padding + 1, size=n)[part]
  mirror = (rng.random(n) < 0.5)[part] & flip
  return np.stack([dy, dx, mirror], axis=1).astype(np.int32)


def cutout_draws(rng: np.random.Generator, n: int, part: slice, h: int, w: int) -> np.ndarray:
  """The random draws of :func:`cutout` for the ``part`` of a batch of ``n`` images of ``h`` x ``w``: int32
  rows ``(cy, cx)``, each square's centre, uniform over the image's pixels (``[0, h)`` x ``[0, w)``).

  Made for all ``n`` images and then sliced, like :func:`crop_draws`, so one host's share of a global
  batch is cut as in the whole batch. :meth:`resnet_jax.data.Dataset.train_batch` draws them from the
  batch's generator after the crop's draws, and only when cutout is on. The host (:func:`cutout`) and
  the device (:func:`resnet_jax.device_augment.make_batch`) cut with the same draws.
  """
  cy = rng.integers(0, h, size=n)[part]
  cx = rng.integers(0, w, size=n)[part]
  return np.stack([cy, cx], axis=1).astype(np.int32)


def cutout(x: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
  """Cutout (DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks with
  Cutout") of the NHWC batch ``x``, in place: in image ``i``, every channel of rows
  ``[cy - size // 2, cy - size // 2 + size)`` and columns ``[cx - size // 2, cx - size // 2 + size)``,
  clipped to the image, is set to 0, ``(cy, cx) = centres[i]`` (:func:`cutout_draws`). A square may
  thus lie partly outside the image; it covers ``size * size`` pixels when it lies inside. Applied to
  normalised images, 0 is the channel mean. Returns ``x``.

  One slice assignment per image: several times faster than a boolean mask over the batch.
  """
  if size <= 0:
    return x
  _, h, w, _ = x.shape
  for i, (cy, cx) in enumerate(centres.tolist()):
    top, left = cy - size // 2, cx - size // 2
    x[i, max(top, 0) : max(min(top + size, h), 0), max(left, 0) : max(min(left + size, w), 0)] = 0
  return x


def random_resized_crop(
  img, size: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> np.ndarray:
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


def normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """``(x / 255 - mean) / std`` for uint8 images (``(x - mean) / std`` for floats in [0, 1]), float32.

  Computed in place on one float32 copy; training, evaluation and :mod:`resnet_jax.predict` all use it,
  so their inputs are bitwise the same.
  """
  out = np.multiply(x, np.float32(1 / 255) if x.dtype == np.uint8 else np.float32(1), dtype=np.float32)
  out -= mean
  out /= std
  return out
