"""``resnet_jax.index_shuffle``: the training order a whole epoch at a time, index for index the order of
grain's ``MapDataset.range(n).shuffle(seed).repeat().batch(batch)`` that it replaces (grain's public API is
the reference), and the training pipeline built on it yields the batches of the grain-only pipeline."""

from __future__ import annotations

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_jax import data
from resnet_jax.config_check import base_config
from resnet_jax.errors import ConfigError
from resnet_jax.index_shuffle import epoch_order, index_shuffle, seed_seq_words, shuffled_batch


def grain_order(n: int, seed: int) -> np.ndarray:
  """Epoch 0 of grain's shuffle: ``index_shuffle(i, n - 1, seed)`` for every ``i``."""
  shuffled = grain.MapDataset.range(n).shuffle(seed=seed)
  return np.array([shuffled[i] for i in range(n)])


@pytest.mark.parametrize(
  ("n", "seed"),
  [
    (1, 0),
    (2, 5),  # blocks far larger than the data: long cycle walks
    (10, 0),
    (135, 2),
    (1797, 3),
    (45000, 0),
    (65536, 7),  # max_index 2**16 - 1: the 16-bit block exactly
    (65537, 1),  # max_index 2**16: grain's block size for it (ceil(log2(65536)) = 16) is kept
    (70000, 2**32 - 1),  # the largest seed
    (300000, 11),  # a block of 2 x 10 bits
  ],
)
def test_index_shuffle_is_graines_permutation(n, seed):
  got = index_shuffle(np.arange(n), n - 1, seed)
  np.testing.assert_array_equal(got, grain_order(n, seed))
  if n < 65537:  # a permutation (grain's own block for 2**16 + 1 values is not one)
    np.testing.assert_array_equal(np.sort(got), np.arange(n))


def test_large_blocks_walk_without_the_table():
  """Above 2**22 values every index walks on its own (no table); a sample of them against grain."""
  n, seed = 2**22 + 5, 4
  idx = np.arange(0, n, 997)
  shuffled = grain.MapDataset.range(n).shuffle(seed=seed)
  np.testing.assert_array_equal(index_shuffle(idx, n - 1, seed), [shuffled[int(i)] for i in idx])


def test_seed_seq_words_are_cpps():
  # std::seed_seq{seed}.generate() of 4 words, printed by a C++ program built with g++ (libstdc++).
  assert seed_seq_words(0, 4) == [2963817213, 69796629, 1973464570, 532167439]
  assert seed_seq_words(1, 4) == [1304574429, 1385991880, 1625791478, 1649374289]
  assert seed_seq_words(2**32 - 1, 4) == [3258260622, 2976084991, 227751652, 537413182]


@settings(max_examples=30, deadline=None)
@given(
  n=st.integers(1, 400),
  seed=st.integers(0, 2**32 - 1),
  batch=st.integers(1, 64),
  b=st.one_of(st.integers(0, 50), st.integers(0, 10**12)),
)
def test_shuffled_batch_is_graines_batch(n, seed, batch, b):
  batch = min(batch, n)
  batched = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(batch, drop_remainder=True)
  np.testing.assert_array_equal(shuffled_batch(n, seed, batch, b), np.asarray(batched[b]))


def test_every_epoch_has_its_own_order_and_is_computed_once():
  epoch_order.cache_clear()
  batches = [shuffled_batch(100, 3, 30, b) for b in range(10)]  # 300 positions: three epochs
  stream = np.concatenate(batches)
  epochs = stream.reshape(3, 100)
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(100))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert epoch_order.cache_info().misses == 3


def test_train_pipeline_yields_the_grain_only_pipelines_batches():
  """The same indices and the same augmentation draws as ``range.shuffle.repeat.batch.random_map``."""
  c = base_config().dataset
  c.update({"name": "digits", "augment": "pad_crop_flip", "crop_padding": 2, "max_train_examples": 100})
  ds = data.load_dataset(c, progress=False)
  seed, batch = 7, 32  # 100 examples: batches run across epochs

  def load(indices, rng):
    return ds.train_batch(np.asarray(indices), rng, slice(0, batch))

  reference = (
    grain.MapDataset.range(ds.num_train)
    .shuffle(seed=seed)
    .repeat()
    .batch(batch, drop_remainder=True)
    .random_map(load, seed=seed + 1)
  )
  it = iter(data.train_pipeline(ds, batch, seed, num_threads=1))
  for b in range(12):
    got, want = next(it), reference[b]
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["image"], want["image"])


def test_a_seed_the_shuffle_cannot_take_is_a_config_error():
  c = base_config().dataset
  c.update({"name": "digits", "max_train_examples": 40})
  ds = data.load_dataset(c, progress=False)
  with pytest.raises(ConfigError, match=r"seed -1: the shuffle needs a seed in \[0, 2\*\*32\)"):
    data.train_pipeline(ds, 8, -1)
