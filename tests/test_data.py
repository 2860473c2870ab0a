"""Tests of resnet_jax.data: the digits split."""

import numpy as np

from resnet_jax import data


def test_digits_split_shapes_range_and_stratification():
  x_train, y_train, x_test, y_test = data.digits_split()
  assert x_train.shape[1:] == (8, 8, 1) and x_test.shape[1:] == (8, 8, 1)
  assert x_train.shape[0] + x_test.shape[0] == 1797
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert 0.0 <= x_train.min() and x_train.max() <= 1.0
  counts = np.bincount(y_test, minlength=10)
  assert counts.max() - counts.min() <= 2


def test_digits_split_is_fixed_per_seed():
  a = data.digits_split(seed=0)
  b = data.digits_split(seed=0)
  c = data.digits_split(seed=1)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a[1], c[1])
