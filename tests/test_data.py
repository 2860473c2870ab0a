"""Tests of resnet_jax.data: digits split, CIFAR pickles and image folders written here, augmentation,
grain pipelines (determinism, checkpointable state, per-process slices) and the errors on bad data."""

from __future__ import annotations

import json
import os
import pickle

import ml_collections
import numpy as np
import pytest
from hypothesis import given, strategies as st

from resnet_jax import data
from resnet_jax.config_check import base_config
from resnet_jax.errors import DataError


# ----------------------------------------------------------------------------------------------
# Tiny datasets in each layout (also used by the training tests).


def write_cifar(root: str, name: str = "cifar10", per_batch: int = 4, num_test: int = 6,
                nested: bool = True, seed: int = 0) -> str:
  """Write a tiny CIFAR release in the python-pickle layout; returns the data_dir to configure."""
  rng = np.random.default_rng(seed)
  num_classes = 10 if name == "cifar10" else 100
  folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
  folder = folder if nested else root
  os.makedirs(folder, exist_ok=True)
  key = b"labels" if name == "cifar10" else b"fine_labels"

  def dump(fname: str, n: int) -> None:
    d = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
         key: [int(v) for v in rng.integers(0, num_classes, size=n)]}
    if name == "cifar100":
      d[b"coarse_labels"] = [0] * n
    with open(os.path.join(folder, fname), "wb") as f:
      pickle.dump(d, f)

  if name == "cifar10":
    for i in range(1, 6):
      dump(f"data_batch_{i}", per_batch)
    dump("test_batch", num_test)
  else:
    dump("train", 5 * per_batch)
    dump("test", num_test)
  return root


def write_image_folder(root: str, classes=("cat", "dog"), per_class: int = 3, test_per_class: int = 2,
                       size=(20, 14), seed: int = 0) -> str:
  """Write ``root/{train,test}/<class>/*.png|jpg`` with random RGB images; returns root."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for split, n in (("train", per_class), ("test", test_per_class)):
    for cls in classes:
      folder = os.path.join(root, split, cls)
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        ext = "png" if i % 2 == 0 else "jpg"
        Image.fromarray(arr).save(os.path.join(folder, f"img{i}.{ext}"))
  return root


def dataset_config(**kw) -> ml_collections.ConfigDict:
  c = base_config().dataset
  for k, v in kw.items():
    c[k] = v
  return c


# ----------------------------------------------------------------------------------------------
# Digits.


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


def test_digits_split_rejects_bad_fraction():
  with pytest.raises(DataError, match="test_fraction"):
    data.digits_split(test_fraction=1.5)


def test_load_digits_normalises_with_training_statistics():
  ds = data.load_dataset(dataset_config(name="digits"))
  batch = ds.train_batch(np.arange(ds.num_train), np.random.default_rng(0))
  assert abs(float(batch["image"].mean())) < 1e-4
  assert abs(float(batch["image"].std()) - 1.0) < 1e-3


# ----------------------------------------------------------------------------------------------
# CIFAR.


@pytest.mark.parametrize("name,nested", [("cifar10", True), ("cifar10", False), ("cifar100", True)])
def test_load_cifar_reads_the_pickle_layout(tmp_path, name, nested):
  root = write_cifar(str(tmp_path), name, nested=nested)
  x_train, y_train, x_test, y_test = data.load_cifar(root, name)
  assert x_train.shape == (20, 32, 32, 3) and x_train.dtype == np.uint8
  assert x_test.shape == (6, 32, 32, 3) and y_test.dtype == np.int32
  # The pickle holds channel-major rows: pixel (0, 0) of channel c is column c * 1024.
  folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
  folder = folder if nested else root
  with open(os.path.join(folder, "data_batch_1" if name == "cifar10" else "train"), "rb") as f:
    raw = pickle.load(f, encoding="bytes")
  np.testing.assert_array_equal(x_train[0, 0, 0], raw[b"data"][0, [0, 1024, 2048]])
  np.testing.assert_array_equal(x_train[0, 1, 2], raw[b"data"][0, [34, 1024 + 34, 2048 + 34]])


def test_missing_cifar_folder_names_place_and_layout(tmp_path):
  with pytest.raises(DataError) as e:
    data.load_dataset(dataset_config(name="cifar10", data_dir=str(tmp_path / "nowhere")))
  msg = str(e.value)
  assert str(tmp_path / "nowhere") in msg and "cifar-10-batches-py" in msg and "data_batch_1" in msg


def test_cifar100_missing_names_its_layout(tmp_path):
  with pytest.raises(DataError, match="cifar-100-python"):
    data.load_cifar(str(tmp_path), "cifar100")


def test_cifar_labels_out_of_range(tmp_path):
  root = write_cifar(str(tmp_path), "cifar10")
  path = os.path.join(root, "cifar-10-batches-py", "test_batch")
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  d[b"labels"][0] = 12
  with open(path, "wb") as f:
    pickle.dump(d, f)
  with pytest.raises(DataError, match="labels"):
    data.load_cifar(root, "cifar10")


def test_cifar_uses_documented_normalisation(tmp_path):
  root = write_cifar(str(tmp_path), "cifar10")
  ds = data.load_dataset(dataset_config(name="cifar10", data_dir=root))
  batch = ds.test_batch(np.arange(2))
  expected = (ds.test_x[:2].astype(np.float32) / 255 - np.asarray(data.CIFAR10_MEAN, np.float32)) / \
      np.asarray(data.CIFAR10_STD, np.float32)
  np.testing.assert_allclose(batch["image"], expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Image folders.


def test_image_folder_scan_and_batches(tmp_path):
  root = write_image_folder(str(tmp_path), classes=("b", "a", "c"))
  paths, labels, classes = data.scan_image_folder(root, "train")
  assert classes == ["a", "b", "c"]
  assert len(paths) == 9 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  ds = data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=12,
                                        augment="random_resized_crop_flip"))
  assert ds.num_classes == 3 and ds.image_shape == (12, 12, 3)
  train = ds.train_batch(np.array([0, 4, 8]), np.random.default_rng(0))
  test = ds.test_batch(np.array([0, 5]))
  assert train["image"].shape == (3, 12, 12, 3) and train["image"].dtype == np.float32
  assert test["image"].shape == (2, 12, 12, 3)
  assert train["label"].tolist() == [0, 1, 2]


def test_missing_image_folder_names_place_and_layout(tmp_path):
  with pytest.raises(DataError) as e:
    data.load_dataset(dataset_config(name="image_folder", data_dir=str(tmp_path / "imgs")))
  assert str(tmp_path / "imgs" / "train") in str(e.value) and "<class>" in str(e.value)


def test_empty_class_folder_is_an_error(tmp_path):
  root = write_image_folder(str(tmp_path))
  os.makedirs(os.path.join(root, "train", "empty"))
  with pytest.raises(DataError, match="empty.*no images"):
    data.scan_image_folder(root, "train")


def test_corrupt_image_names_the_file(tmp_path):
  root = write_image_folder(str(tmp_path))
  bad = os.path.join(root, "test", "cat", "img0.png")
  with open(bad, "wb") as f:
    f.write(b"not a png")
  ds = data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=8))
  with pytest.raises(DataError, match="img0.png"):
    ds.test_batch(np.array([0]))


def test_center_crop_is_resize_then_centre():
  from PIL import Image
  img = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3) % 251)
  out = data.center_crop(img, 7, crop_fraction=0.875)
  assert out.shape == (7, 7, 3)
  # 7 / 0.875 = 8: the shorter side (20) goes to 8, the longer one to 16; the crop is the centre.
  ref = np.asarray(img.resize((16, 8), Image.BILINEAR))[0:7, 4:11]
  np.testing.assert_array_equal(out, ref)


@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_random_resized_crop_shape(width, height, seed):
  from PIL import Image
  img = Image.fromarray(np.zeros((height, width, 3), np.uint8))
  out = data.random_resized_crop(img, 6, np.random.default_rng(seed))
  assert out.shape == (6, 6, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------------------------
# Augmentation.


@given(st.integers(0, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_pad_crop_flip_takes_windows_of_the_padded_image(padding, flip, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(1, 255, size=(3, 6, 5, 2), dtype=np.uint8)
  out = data.pad_crop_flip(images, np.random.default_rng(seed + 1), padding, flip)
  assert out.shape == images.shape and out.dtype == images.dtype
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  for i in range(3):
    windows = [padded[i, dy:dy + 6, dx:dx + 5] for dy in range(2 * padding + 1)
               for dx in range(2 * padding + 1)]
    windows += [w[:, ::-1] for w in windows] if flip else []
    assert any(np.array_equal(out[i], w) for w in windows)


def test_pad_crop_flip_moves_and_flips_some_images():
  images = np.random.default_rng(0).integers(1, 255, size=(64, 8, 8, 1), dtype=np.uint8)
  out = data.pad_crop_flip(images, np.random.default_rng(1), 2, True)
  changed = [not np.array_equal(a, b) for a, b in zip(images, out)]
  assert 32 < sum(changed) < 64


# ----------------------------------------------------------------------------------------------
# grain pipelines.


@pytest.fixture(scope="module")
def digits_ds():
  return data.load_dataset(dataset_config(name="digits", augment="pad_crop", crop_padding=1,
                                          max_train_examples=40, max_test_examples=10))


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_pipeline_is_deterministic_and_covers_each_epoch(digits_ds):
  a = _take(iter(data.train_pipeline(digits_ds, 8, seed=3)), 5)
  b = _take(iter(data.train_pipeline(digits_ds, 8, seed=3)), 5)
  c = _take(iter(data.train_pipeline(digits_ds, 8, seed=4)), 5)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u["image"], v["image"])
    np.testing.assert_array_equal(u["label"], v["label"])
  assert not all(np.array_equal(u["image"], v["image"]) for u, v in zip(a, c))
  # 40 examples, batch 8: the first 5 batches are one epoch, so every label count matches.
  labels = np.concatenate([u["label"] for u in a])
  np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                np.bincount(digits_ds.train_y, minlength=10))


def test_train_pipeline_state_resumes_exactly(digits_ds):
  it = iter(data.train_pipeline(digits_ds, 8, seed=0))
  _take(it, 3)
  state = it.get_state()
  rest = _take(it, 4)
  it2 = iter(data.train_pipeline(digits_ds, 8, seed=0))
  it2.set_state(state)
  for u, v in zip(rest, _take(it2, 4)):
    np.testing.assert_array_equal(u["image"], v["image"])


def test_train_pipeline_with_worker_processes_gives_the_same_batches(digits_ds):
  workers = iter(data.train_pipeline(digits_ds, 8, seed=2, num_workers=2))
  try:
    got = _take(workers, 4)
    state = workers.get_state()
  finally:
    workers.close()
  for u, v in zip(got, _take(iter(data.train_pipeline(digits_ds, 8, seed=2)), 4)):
    np.testing.assert_array_equal(u["image"], v["image"])
  assert json.loads(json.dumps(state)) == state  # Saved as JSON in checkpoints.


def test_train_pipeline_process_slices_make_the_global_batch(digits_ds):
  full = _take(iter(data.train_pipeline(digits_ds, 8, seed=1)), 3)
  parts = [_take(iter(data.train_pipeline(digits_ds, 8, seed=1, process_index=p, process_count=2)), 3)
           for p in range(2)]
  for k in range(3):
    np.testing.assert_array_equal(
        full[k]["image"], np.concatenate([parts[0][k]["image"], parts[1][k]["image"]]))


def test_train_pipeline_rejects_batches_larger_than_the_data(digits_ds):
  with pytest.raises(DataError, match="fewer than one batch"):
    data.train_pipeline(digits_ds, 64, seed=0)


def test_eval_batches_pad_and_mask(digits_ds):
  batches = list(data.eval_batches(digits_ds, 4))
  assert len(batches) == 3
  assert all(b["image"].shape == (4, 8, 8, 1) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [1] * 10 + [0] * 2
  labels = np.concatenate([b["label"] for b in batches])[:10]
  np.testing.assert_array_equal(labels, digits_ds.test_y)
