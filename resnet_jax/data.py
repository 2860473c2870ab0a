"""Input data: the embedded digits set, CIFAR-10/100 pickles and image folders, as grain pipelines.

Every array this module hands out is NHWC float32 for images and int32 for labels.
"""

from __future__ import annotations

import numpy as np

from resnet_jax.errors import DataError


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
