"""Tests of resnet_jax.data, datasets, image_files and augment: digits split, CIFAR pickles and image folders
written here, augmentation, grain pipelines (determinism, checkpointable state, per-process slices) and the
errors on bad data."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import ml_collections
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resnet_jax import augment, data, datasets, image_files
from resnet_jax.config_check import base_config
from resnet_jax.errors import CheckpointError, ConfigError, DataError

# ----------------------------------------------------------------------------------------------
# Tiny datasets in each layout (also used by the training tests).


def write_cifar(
  root: str, name: str = "cifar10", per_batch: int = 4, num_test: int = 6, nested: bool = True, seed: int = 0
) -> str:
  """Write a tiny CIFAR release in the python-pickle layout; returns the data_dir to configure."""
  rng = np.random.default_rng(seed)
  num_classes = 10 if name == "cifar10" else 100
  folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
  folder = folder if nested else root
  os.makedirs(folder, exist_ok=True)
  key = b"labels" if name == "cifar10" else b"fine_labels"

  def dump(fname: str, n: int) -> None:
    d = {
      b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
      key: [int(v) for v in rng.integers(0, num_classes, size=n)],
    }
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


def write_image_folder(
  root: str, classes=("cat", "dog"), per_class: int = 3, test_per_class: int = 2, size=(20, 14), seed: int = 0
) -> str:
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
  x_train, y_train, x_test, y_test = datasets.digits_split()
  assert x_train.shape[1:] == (8, 8, 1) and x_test.shape[1:] == (8, 8, 1)
  assert x_train.shape[0] + x_test.shape[0] == 1797
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert 0.0 <= x_train.min() and x_train.max() <= 1.0
  counts = np.bincount(y_test, minlength=10)
  assert counts.max() - counts.min() <= 2


def test_digits_split_is_fixed_per_seed():
  a = datasets.digits_split(seed=0)
  b = datasets.digits_split(seed=0)
  c = datasets.digits_split(seed=1)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a[1], c[1])


def test_digits_split_rejects_bad_fraction():
  with pytest.raises(DataError, match="test_fraction"):
    datasets.digits_split(test_fraction=1.5)


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
  x_train, y_train, x_test, y_test = datasets.load_cifar(root, name)
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
    datasets.load_cifar(str(tmp_path), "cifar100")


def test_cifar_labels_out_of_range(tmp_path):
  root = write_cifar(str(tmp_path), "cifar10")
  path = os.path.join(root, "cifar-10-batches-py", "test_batch")
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  d[b"labels"][0] = 12
  with open(path, "wb") as f:
    pickle.dump(d, f)
  with pytest.raises(DataError, match="labels"):
    datasets.load_cifar(root, "cifar10")


def test_cifar_uses_documented_normalisation(tmp_path):
  root = write_cifar(str(tmp_path), "cifar10")
  ds = data.load_dataset(dataset_config(name="cifar10", data_dir=root))
  batch = ds.test_batch(np.arange(2))
  expected = (ds.test_x[:2].astype(np.float32) / 255 - np.asarray(augment.CIFAR10_MEAN, np.float32)) / np.asarray(
    augment.CIFAR10_STD, np.float32
  )
  np.testing.assert_allclose(batch["image"], expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Image folders.


def test_image_folder_scan_and_batches(tmp_path):
  root = write_image_folder(str(tmp_path), classes=("b", "a", "c"))
  paths, labels, classes = datasets.scan_image_folder(root, "train")
  assert classes == ["a", "b", "c"]
  assert len(paths) == 9 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  ds = data.load_dataset(
    dataset_config(name="image_folder", data_dir=root, image_size=12, augment="random_resized_crop_flip")
  )
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
    datasets.scan_image_folder(root, "train")


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
  out = augment.center_crop(img, 7, crop_fraction=0.875)
  assert out.shape == (7, 7, 3)
  # 7 / 0.875 = 8: the shorter side (20) goes to 8, the longer one to 16; the crop is the centre.
  ref = np.asarray(img.resize((16, 8), Image.BILINEAR))[0:7, 4:11]
  np.testing.assert_array_equal(out, ref)


@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_random_resized_crop_shape(width, height, seed):
  from PIL import Image

  img = Image.fromarray(np.zeros((height, width, 3), np.uint8))
  out = augment.random_resized_crop(img, 6, np.random.default_rng(seed))
  assert out.shape == (6, 6, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------------------------
# Augmentation.


@given(st.integers(0, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_pad_crop_flip_takes_windows_of_the_padded_image(padding, flip, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(1, 255, size=(3, 6, 5, 2), dtype=np.uint8)
  out = augment.pad_crop_flip(images, np.random.default_rng(seed + 1), padding, flip)
  assert out.shape == images.shape and out.dtype == images.dtype
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  for i in range(3):
    windows = [padded[i, dy : dy + 6, dx : dx + 5] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    windows += [w[:, ::-1] for w in windows] if flip else []
    assert any(np.array_equal(out[i], w) for w in windows)


def test_pad_crop_flip_moves_and_flips_some_images():
  images = np.random.default_rng(0).integers(1, 255, size=(64, 8, 8, 1), dtype=np.uint8)
  out = augment.pad_crop_flip(images, np.random.default_rng(1), 2, True)
  changed = [not np.array_equal(a, b) for a, b in zip(images, out)]
  assert 32 < sum(changed) < 64


def _constant_dataset(
  n: int, h: int, w: int, augment_name: str = "none", cutout: int = 0, crop_padding: int = 0
) -> data.ArrayDataset:
  """``n`` images of ``h`` x ``w`` x 2, every pixel 200 (normalised: not 0), or random with a pad-crop."""
  rng = np.random.default_rng(0)
  if augment_name == "none":
    x = np.full((n, h, w, 2), 200, np.uint8)
  else:
    x = rng.integers(1, 255, size=(n, h, w, 2), dtype=np.uint8)
  y = rng.integers(0, 3, size=n).astype(np.int32)
  return data.ArrayDataset(
    name="constant",
    num_classes=3,
    image_shape=(h, w, 2),
    mean=np.asarray([0.4, 0.6], np.float32),
    std=np.asarray([0.2, 0.3], np.float32),
    train_x=x,
    train_y=y,
    test_x=x[:4],
    test_y=y[:4],
    augment=augment_name,
    crop_padding=crop_padding,
    cutout=cutout,
  )


def _clipped(centre: int, size: int, extent: int) -> range:
  return range(max(centre - size // 2, 0), min(centre - size // 2 + size, extent))


@given(st.integers(1, 12), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_cutout_zeros_exactly_the_clipped_square_after_normalisation(size, h, w, seed):
  ds = _constant_dataset(16, h, w, cutout=size)
  image = ds.train_batch(np.arange(16), np.random.default_rng(seed))["image"]
  # augment='none' draws nothing, so the centres are the generator's first draws.
  centres = augment.cutout_draws(np.random.default_rng(seed), 16, slice(None), h, w)
  assert centres.dtype == np.int32 and ((0 <= centres) & (centres < (h, w))).all()
  plain = augment.normalize(ds.train_x[:1], ds.mean, ds.std)[0]
  assert (plain != 0).all()
  for img, (cy, cx) in zip(image, centres):
    rows, cols = _clipped(cy, size, h), _clipped(cx, size, w)
    square = np.zeros((h, w), bool)
    square[rows.start : rows.stop, cols.start : cols.stop] = True
    assert not img.view(np.uint32)[square].any()  # +0.0 in every channel: the channel mean
    np.testing.assert_array_equal(img[~square], plain[~square])  # nothing else changes
    assert square.sum() == len(rows) * len(cols) >= 1
    inside = cy - size // 2 >= 0 and cy - size // 2 + size <= h and cx - size // 2 >= 0 and cx - size // 2 + size <= w
    if inside:
      assert square.sum() == size * size


def test_cutout_covers_the_expected_fraction_on_average():
  size, h, w = 4, 8, 6
  ds = _constant_dataset(2000, h, w, cutout=size)
  image = ds.train_batch(np.arange(2000), np.random.default_rng(3))["image"]
  zeroed = (image == 0).all(axis=-1).mean()
  rows = np.mean([len(_clipped(c, size, h)) for c in range(h)])  # expected clipped height, centre uniform
  cols = np.mean([len(_clipped(c, size, w)) for c in range(w)])
  assert abs(zeroed - rows * cols / (h * w)) < 0.01
  centres = augment.cutout_draws(np.random.default_rng(3), 2000, slice(None), h, w)
  assert set(centres[:, 0]) == set(range(h)) and set(centres[:, 1]) == set(range(w))


@pytest.mark.parametrize("augment_name", ["none", "pad_crop", "pad_crop_flip"])
def test_cutout_off_draws_nothing_and_leaves_the_batch_as_it_was(augment_name):
  ds = _constant_dataset(12, 7, 5, augment_name, crop_padding=2)
  idx = np.arange(12)[::-1]
  rng = np.random.default_rng(9)
  got = ds.train_batch(idx, rng)
  ref_rng = np.random.default_rng(9)
  x = ds.train_x[idx]
  if augment_name != "none":
    x = augment.pad_crop_flip(x, ref_rng, 2, augment_name == "pad_crop_flip")
  np.testing.assert_array_equal(got["image"], augment.normalize(x, ds.mean, ds.std))
  assert rng.bit_generator.state == ref_rng.bit_generator.state  # no extra draws
  on_rng = np.random.default_rng(9)
  cut = dataclasses.replace(ds, cutout=3).train_batch(idx, on_rng)["image"]
  assert on_rng.bit_generator.state != ref_rng.bit_generator.state  # cutout does draw, after the crop:
  square = (cut == 0).all(axis=-1, keepdims=True) & (got["image"] != 0)
  assert square.any()
  np.testing.assert_array_equal(np.where(square, 0, got["image"]), cut)  # the same crops, then the squares


@given(st.integers(0, 2**31 - 1), st.integers(0, 11), st.integers(1, 12), st.sampled_from(["none", "pad_crop_flip"]))
def test_cutout_of_a_slice_is_the_slice_of_the_whole_batch(seed, lo, length, augment_name):
  ds = _constant_dataset(12, 6, 6, augment_name, cutout=3, crop_padding=1)
  idx = np.random.default_rng(seed).permutation(12)
  part = slice(lo, min(lo + length, 12))
  whole = ds.train_batch(idx, np.random.default_rng(seed))
  piece = ds.train_batch(idx, np.random.default_rng(seed), part)
  np.testing.assert_array_equal(piece["image"], whole["image"][part])
  np.testing.assert_array_equal(piece["label"], whole["label"][part])


def test_evaluation_batches_never_get_cutout():
  ds = _constant_dataset(8, 6, 6, "pad_crop_flip", cutout=6, crop_padding=1)
  batch = ds.test_batch(np.arange(4))
  np.testing.assert_array_equal(batch["image"], augment.normalize(ds.test_x, ds.mean, ds.std))


# ----------------------------------------------------------------------------------------------
# grain pipelines.


@pytest.fixture(scope="module")
def digits_ds():
  return data.load_dataset(
    dataset_config(name="digits", augment="pad_crop", crop_padding=1, max_train_examples=40, max_test_examples=10)
  )


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
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(digits_ds.train_y, minlength=10))


def assert_pipeline_resumes_exactly(ds, batch_size: int, taken: int) -> None:
  """After ``taken`` batches, a new pipeline given the saved state yields the same next 4 batches."""
  it = iter(data.train_pipeline(ds, batch_size, seed=0))
  _take(it, taken)
  state = it.get_state()
  rest = _take(it, 4)
  it2 = iter(data.train_pipeline(ds, batch_size, seed=0))
  it2.set_state(state)
  for u, v in zip(rest, _take(it2, 4)):
    np.testing.assert_array_equal(u["image"], v["image"])


def test_train_pipeline_state_resumes_exactly(digits_ds):
  assert_pipeline_resumes_exactly(digits_ds, 8, 3)


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
  parts = [
    _take(iter(data.train_pipeline(digits_ds, 8, seed=1, process_index=p, process_count=2)), 3) for p in range(2)
  ]
  for k in range(3):
    np.testing.assert_array_equal(full[k]["image"], np.concatenate([parts[0][k]["image"], parts[1][k]["image"]]))


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


# ----------------------------------------------------------------------------------------------
# Image folders in memory: decoded once, then exactly an in-memory dataset.


def folder_arrays(root: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """The images (decoded with Pillow, one by one) and labels of a split, in scan order."""
  from PIL import Image

  paths, labels, _ = datasets.scan_image_folder(root, split)
  return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]), labels


def test_small_folder_is_decoded_once_into_memory(tmp_path):
  root = write_image_folder(str(tmp_path), classes=("a", "b", "c"), per_class=5, size=(8, 8))
  ds = data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=8))
  assert ds.in_memory and ds.info["storage"] == "memory"
  x, y = folder_arrays(root)
  assert ds.train_x.dtype == np.uint8
  np.testing.assert_array_equal(ds.train_x, x)
  np.testing.assert_array_equal(ds.train_y, y)
  np.testing.assert_array_equal(ds.test_x, folder_arrays(root, "test")[0])


def test_folder_pad_crop_flip_is_applied_and_matches_the_array_code(tmp_path):
  root = write_image_folder(str(tmp_path), per_class=8, size=(8, 8))
  cfg = dataset_config(
    name="image_folder", data_dir=root, image_size=8, augment="pad_crop_flip", crop_padding=2, normalize="dataset"
  )
  ds = data.load_dataset(cfg)
  idx = np.arange(ds.num_train)[::-1]
  got = ds.train_batch(idx, np.random.default_rng(5))["image"]
  x, _ = folder_arrays(root)
  want = augment.pad_crop_flip(x[idx], np.random.default_rng(5), 2, True).astype(np.float32) / 255
  np.testing.assert_allclose(got, (want - ds.mean) / ds.std, rtol=1e-6, atol=1e-6)
  plain = (x[idx].astype(np.float32) / 255 - ds.mean) / ds.std
  assert not np.allclose(got, plain)  # The augmentation is not dropped.


@pytest.mark.parametrize("augment", ["none", "pad_crop", "pad_crop_flip"])
def test_streamed_and_in_memory_folders_give_identical_batches(tmp_path, augment):
  root = write_image_folder(str(tmp_path), per_class=6, size=(12, 10))  # Resized: not image_size.
  kw = dict(name="image_folder", data_dir=root, image_size=8, augment=augment, crop_padding=1)
  mem = data.load_dataset(dataset_config(in_memory="always", **kw))
  stream = data.load_dataset(dataset_config(in_memory="never", **kw))
  auto = data.load_dataset(dataset_config(**kw))
  assert mem.in_memory and not stream.in_memory and not auto.in_memory  # auto: 12x10 is not 8x8.
  a = _take(iter(data.train_pipeline(mem, 4, seed=3)), 5)
  b = _take(iter(data.train_pipeline(stream, 4, seed=3)), 5)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u["image"], v["image"])
    np.testing.assert_array_equal(u["label"], v["label"])
  for u, v in zip(data.eval_batches(mem, 3), data.eval_batches(stream, 3)):
    np.testing.assert_array_equal(u["image"], v["image"])


def test_load_dataset_returns_the_kind_of_its_storage(tmp_path):
  """Images in memory give an ArrayDataset, a streamed folder a FileDataset of ImageFiles; both are frozen."""
  root = write_image_folder(str(tmp_path), per_class=4, size=(8, 8))
  kw = dict(name="image_folder", data_dir=root, image_size=8)
  mem = data.load_dataset(dataset_config(in_memory="always", **kw))
  stream = data.load_dataset(dataset_config(in_memory="never", **kw))
  digits = data.load_dataset(dataset_config(name="digits"))
  assert type(mem) is data.ArrayDataset and type(digits) is data.ArrayDataset
  assert type(stream) is data.FileDataset
  assert isinstance(mem.train_x, np.ndarray) and isinstance(stream.train_x, image_files.ImageFiles)
  paths, _, _ = datasets.scan_image_folder(root, "train")
  assert stream.train_x.paths == tuple(paths) and all(type(p) is str for p in stream.train_x.paths)
  with pytest.raises(dataclasses.FrozenInstanceError):
    mem.augment = "pad_crop"


def test_in_memory_folder_pipeline_resumes_exactly(tmp_path):
  root = write_image_folder(str(tmp_path), per_class=6, size=(8, 8))
  ds = data.load_dataset(
    dataset_config(name="image_folder", data_dir=root, image_size=8, augment="pad_crop_flip", crop_padding=1)
  )
  assert_pipeline_resumes_exactly(ds, 4, 2)


def test_auto_streams_folders_over_the_memory_limit_and_says_why(tmp_path):
  root = write_image_folder(str(tmp_path), size=(8, 8))
  lines = []
  ds = data.load_dataset(
    dataset_config(name="image_folder", data_dir=root, image_size=8, in_memory_max_mb=0), log=lines.append
  )
  assert not ds.in_memory and ds.info["storage"] == "stream"
  assert len(lines) == 1 and "in_memory_max_mb" in lines[0]


def test_random_resized_crop_needs_streamed_images(tmp_path):
  from resnet_jax.config_check import validate_config

  root = write_image_folder(str(tmp_path), size=(8, 8))
  auto = data.load_dataset(
    dataset_config(name="image_folder", data_dir=root, image_size=8, augment="random_resized_crop_flip")
  )
  assert not auto.in_memory  # auto streams for it.
  with pytest.raises(ConfigError, match="random_resized_crop_flip.*in_memory=never"):
    data.load_dataset(
      dataset_config(
        name="image_folder", data_dir=root, image_size=8, augment="random_resized_crop_flip", in_memory="always"
      )
    )
  config = base_config()
  config.dataset = dataset_config(
    name="image_folder", data_dir=root, augment="random_resized_crop_flip", in_memory="always"
  )
  with pytest.raises(ConfigError, match="in_memory='always'"):
    validate_config(config)
  config.dataset = dataset_config(name="cifar10", data_dir=root, in_memory="never")
  with pytest.raises(ConfigError, match="image folders only"):
    validate_config(config)


@pytest.mark.parametrize(
  "augment_name,in_memory", [("random_resized_crop_flip", "never"), ("pad_crop_flip", "never"), ("none", "always")]
)
def test_load_dataset_cuts_out_after_any_augmentation(tmp_path, augment_name, in_memory):
  root = write_image_folder(str(tmp_path), per_class=4, size=(12, 10))
  kw = dict(name="image_folder", data_dir=root, image_size=8, augment=augment_name, in_memory=in_memory)
  plain = data.load_dataset(dataset_config(**kw), progress=False)
  cut = data.load_dataset(dataset_config(cutout=5, **kw), progress=False)
  assert (plain.cutout, cut.cutout) == (0, 5)
  idx = np.arange(cut.num_train)
  a = plain.train_batch(idx, np.random.default_rng(4))["image"]
  b = cut.train_batch(idx, np.random.default_rng(4))["image"]
  square = (b == 0).all(axis=-1) & (a != 0).any(axis=-1)
  # One square per image of at least 3 x 3 pixels (a side of 5 clipped to 8 x 8), and the same crops.
  assert all(9 <= k <= 25 for k in square.sum(axis=(1, 2)))
  np.testing.assert_array_equal(np.where(square[..., None], 0, a), b)
  for u, v in zip(data.eval_batches(plain, 3), data.eval_batches(cut, 3)):
    np.testing.assert_array_equal(u["image"], v["image"])


def test_train_pipeline_process_slices_make_the_global_batch_with_cutout(digits_ds):
  ds = dataclasses.replace(digits_ds, cutout=3)
  full = _take(iter(data.train_pipeline(ds, 8, seed=1)), 3)
  parts = [_take(iter(data.train_pipeline(ds, 8, seed=1, process_index=p, process_count=2)), 3) for p in range(2)]
  for k in range(3):
    assert (full[k]["image"] == 0).any()
    np.testing.assert_array_equal(full[k]["image"], np.concatenate([parts[0][k]["image"], parts[1][k]["image"]]))


def test_decode_images_in_parallel_keeps_the_order_and_names_the_first_bad_file(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  arrays = rng.integers(0, 256, size=(600, 4, 4, 3), dtype=np.uint8)
  paths = []
  for i, a in enumerate(arrays):
    paths.append(str(tmp_path / f"{i:04d}.png"))
    Image.fromarray(a).save(paths[-1])
  images, bad = image_files.decode_images(paths, 4, progress=False)
  np.testing.assert_array_equal(images, arrays)
  assert bad == []
  for i in (300, 520):
    with open(paths[i], "wb") as f:
      f.write(b"garbage")
  with pytest.raises(DataError, match="0300.png"):
    image_files.decode_images(paths, 4, progress=False)
  images, bad = image_files.decode_images(paths, 4, skip_unreadable=True, progress=False)
  assert bad == [300, 520]
  np.testing.assert_array_equal(images, np.delete(arrays, [300, 520], axis=0))


def test_skipped_unreadable_image_in_memory(tmp_path):
  root = write_image_folder(str(tmp_path), per_class=4, size=(8, 8))
  bad = os.path.join(root, "train", "dog", "img1.jpg")
  with open(bad, "wb") as f:
    f.write(b"not an image")
  ds = data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=8, on_corrupt_image="skip"))
  assert ds.in_memory and ds.skipped_files == [bad] and ds.num_train == 7
  assert ds.train_y.tolist() == [0] * 4 + [1] * 3
  with pytest.raises(DataError, match="img1.jpg"):
    data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=8))


# ----------------------------------------------------------------------------------------------
# Held-out validation split.


def test_holdout_mask_is_stratified_seeded_and_independent_of_order():
  labels = np.repeat(np.arange(3), [50, 30, 20])
  keys = [f"c{c}/{i}.jpg" for c, i in zip(labels, range(100))]
  mask = datasets.holdout_mask(labels, keys, 0.1, seed=0)
  assert mask.sum() == 10 and np.bincount(labels[mask]).tolist() == [5, 3, 2]
  np.testing.assert_array_equal(mask, datasets.holdout_mask(labels, keys, 10, seed=0))  # A count.
  assert not np.array_equal(mask, datasets.holdout_mask(labels, keys, 0.1, seed=1))
  order = np.random.default_rng(0).permutation(100)  # The same files listed in another order.
  shuffled = datasets.holdout_mask(labels[order], [keys[i] for i in order], 0.1, seed=0)
  assert {keys[i] for i in order[shuffled]} == {keys[i] for i in np.flatnonzero(mask)}
  # Largest remainders: 7 of (50, 30, 20) is (3.5, 2.1, 1.4) -> (4, 2, 1).
  assert np.bincount(labels[datasets.holdout_mask(labels, keys, 7)]).tolist() == [4, 2, 1]


@pytest.mark.parametrize("amount", [0.0001, 100, 1000])
def test_holdout_mask_rejects_what_cannot_be_held_out(amount):
  labels = np.repeat(np.arange(2), [98, 2])
  keys = [str(i) for i in range(100)]
  if amount < 1:
    assert datasets.holdout_mask(labels, keys, amount).sum() == 1  # At least one.
  else:
    with pytest.raises(DataError, match="holdout"):
      datasets.holdout_mask(labels, keys, amount)
  with pytest.raises(DataError, match="all 2 examples of class 1"):
    datasets.holdout_mask(labels, keys, 99)


def test_folder_without_test_split_needs_holdout_and_evaluates_on_it(tmp_path):
  root = write_image_folder(str(tmp_path), classes=("a", "b"), per_class=10, size=(8, 8))
  import shutil

  shutil.rmtree(os.path.join(root, "test"))
  with pytest.raises(DataError, match="no test/ split.*holdout"):
    data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=8))
  ds = data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=8, holdout=0.2, holdout_seed=7))
  assert ds.num_train == 16 and ds.num_test == 4 and np.bincount(ds.test_y).tolist() == [2, 2]
  x, y = folder_arrays(root)
  paths, _, _ = datasets.scan_image_folder(root, "train")
  keys = [os.path.relpath(p, os.path.join(root, "train")) for p in paths]
  mask = datasets.holdout_mask(y, keys, 0.2, seed=7)
  np.testing.assert_array_equal(ds.test_x, x[mask])
  np.testing.assert_array_equal(ds.train_x, x[~mask])
  assert ds.info["eval_split"] == "holdout"
  assert ds.info["holdout"]["keys"] == [k for k, m in zip(keys, mask) if m]
  # normalize='dataset' uses the training images only, never the held-out ones.
  stats = data.load_dataset(
    dataset_config(name="image_folder", data_dir=root, image_size=8, holdout=0.2, holdout_seed=7, normalize="dataset")
  )
  pixels = x[~mask].reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(stats.mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats.std, pixels.std(0), rtol=1e-5)
  assert stats.info["normalization"]["mean"] == stats.mean.tolist()


def test_holdout_from_cifar_pickles_and_digits(tmp_path):
  root = write_cifar(str(tmp_path), "cifar10", per_batch=8)
  x_train, y_train, _, _ = datasets.load_cifar(root)
  ds = data.load_dataset(dataset_config(name="cifar10", data_dir=root, holdout=10))
  mask = datasets.holdout_mask(y_train, [str(i) for i in range(40)], 10)
  np.testing.assert_array_equal(ds.test_x, x_train[mask])
  np.testing.assert_array_equal(ds.train_y, y_train[~mask])
  digits = data.load_dataset(dataset_config(name="digits", holdout=0.1))
  assert digits.num_test == round(0.1 * 1437) and digits.num_train == 1437 - digits.num_test


def test_config_checks_holdout(tmp_path):
  from resnet_jax.config_check import validate_config

  config = base_config()
  config.dataset.holdout = 2.5
  with pytest.raises(ConfigError, match="holdout.*whole count"):
    validate_config(config)
  config.dataset.holdout = -0.1
  with pytest.raises(ConfigError, match="holdout"):
    validate_config(config)


# ----------------------------------------------------------------------------------------------
# Normalisation statistics.


def test_channel_stats_are_exact_for_uint8_and_float():
  x = np.random.default_rng(0).integers(0, 256, size=(7, 5, 4, 3), dtype=np.uint8)
  mean, std = augment.channel_stats(x)
  ref = x.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-7)
  np.testing.assert_allclose(std, ref.std(0), rtol=1e-6)
  mean_f, std_f = augment.channel_stats(x.astype(np.float32) / 255)
  np.testing.assert_allclose(mean_f, mean, rtol=1e-6)
  np.testing.assert_allclose(std_f, std, rtol=1e-6)


def test_dataset_normalisation_of_cifar_and_streamed_folders(tmp_path):
  root = write_cifar(str(tmp_path / "c"), "cifar10")
  ds = data.load_dataset(dataset_config(name="cifar10", data_dir=root, normalize="dataset"))
  mean, std = augment.channel_stats(datasets.load_cifar(root)[0])
  np.testing.assert_array_equal(ds.mean, mean)
  np.testing.assert_array_equal(ds.std, std)
  batch = ds.train_batch(np.arange(ds.num_train), np.random.default_rng(0))["image"]
  np.testing.assert_allclose(batch.mean((0, 1, 2)), 0, atol=1e-5)
  folder = write_image_folder(str(tmp_path / "f"), per_class=4, size=(12, 10))
  streamed = data.load_dataset(
    dataset_config(name="image_folder", data_dir=folder, image_size=8, normalize="dataset", in_memory="never")
  )
  memory = data.load_dataset(
    dataset_config(name="image_folder", data_dir=folder, image_size=8, normalize="dataset", in_memory="always")
  )
  np.testing.assert_array_equal(streamed.mean, memory.mean)  # 8 images < the sample: all of them.
  np.testing.assert_array_equal(streamed.std, memory.std)
  explicit = data.load_dataset(
    dataset_config(name="image_folder", data_dir=folder, image_size=8, normalize="dataset", mean=(0.5,), std=(0.25,))
  )
  assert explicit.mean.tolist() == [0.5] * 3 and "config" in explicit.info["normalization"]["source"]


def test_evaluation_reads_the_recorded_normalisation(tmp_path):
  from resnet_jax.evaluate import load_run_config

  config = base_config()
  config.dataset.normalize = "dataset"
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config.to_dict(), f)
  with open(tmp_path / "data.json", "w") as f:
    json.dump({"normalization": {"mean": [0.25], "std": [0.125], "source": "x"}}, f)
  loaded = load_run_config(str(tmp_path))
  assert tuple(loaded.dataset.mean) == (0.25,) and tuple(loaded.dataset.std) == (0.125,)
  with open(tmp_path / "data.json", "w") as f:
    json.dump([1, 2], f)
  with pytest.raises(CheckpointError, match="data.json"):
    load_run_config(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Bad CIFAR pickles and images.


def _rewrite_batch(root: str, fname: str, change) -> str:
  path = os.path.join(root, "cifar-10-batches-py", fname)
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  with open(path, "wb") as f:
    pickle.dump(change(d), f)
  return path


@pytest.mark.parametrize(
  "change,needle",
  [
    (lambda d: {**d, b"labels": d[b"labels"][:-1]}, "holds 4 images but 3 labels"),
    (lambda d: [d[b"data"], d[b"labels"]], "holds a list"),
    (lambda d: {**d, b"data": d[b"data"].astype(np.float64)}, "dtype float64"),
    (lambda d: {**d, b"data": d[b"data"].reshape(4, 3, 32, 32)}, "shape (4, 3, 32, 32)"),
    (lambda d: {**d, b"data": d[b"data"].tolist()}, "b'data' is a list"),
    (lambda d: {**d, b"labels": "cat"}, "b'labels' is a str"),
    (lambda d: {**d, b"labels": [0.5] * 4}, "dtype float64"),
  ],
)
def test_bad_cifar_pickle_is_one_error_naming_the_file(tmp_path, change, needle):
  root = write_cifar(str(tmp_path), "cifar10")
  path = _rewrite_batch(root, "data_batch_3", change)
  with pytest.raises(DataError) as e:
    datasets.load_cifar(root, "cifar10")
  assert path in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_cifar_file_that_is_not_a_pickle(tmp_path):
  root = write_cifar(str(tmp_path), "cifar10")
  path = os.path.join(root, "cifar-10-batches-py", "test_batch")
  with open(path, "wb") as f:
    f.write(b"\x80\x04garbage")
  with pytest.raises(DataError, match="test_batch"):
    datasets.load_cifar(root, "cifar10")


def test_sixteen_bit_greyscale_png_is_scaled_to_eight_bits(tmp_path):
  from PIL import Image

  wide = np.array([[0, 257, 32768], [65535, 128, 65407]], dtype=np.uint16)
  path = str(tmp_path / "g16.png")
  Image.fromarray(wide).save(path)
  assert Image.open(path).mode.startswith("I")
  images, _ = image_files.decode_images([path], 2, progress=False)  # 3x2 -> centre crop of a resize.
  rgb = np.asarray(image_files.open_rgb(path))
  expected = np.round(wide / 65535 * 255).astype(np.uint8)
  np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, -1))
  assert images.shape == (1, 2, 2, 3)


def test_float_tiff_is_refused_in_one_line(tmp_path):
  from PIL import Image

  path = str(tmp_path / "f.tif")
  Image.fromarray(np.ones((4, 4), np.float32)).save(path)
  with pytest.raises(DataError, match=r"f.tif.*32-bit floats"):
    image_files.open_rgb(path)


def _bomb_png(path: str) -> None:
  """A PNG whose header claims 20000 x 20000 pixels (over Pillow's 2 x MAX_IMAGE_PIXELS)."""
  import struct
  import zlib

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  with open(path, "wb") as f:
    f.write(
      b"\x89PNG\r\n\x1a\n"
      + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
      + chunk(b"IDAT", zlib.compress(b"\0" * 100))
      + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_decompression_bomb_is_one_error_naming_the_file(tmp_path, in_memory):
  root = write_image_folder(str(tmp_path), per_class=2, size=(8, 8))
  bomb = os.path.join(root, "test", "cat", "bomb.png")
  _bomb_png(bomb)
  with pytest.raises(DataError, match=r"bomb.png.*decompression bomb") as e:
    ds = data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=8, in_memory=in_memory))
    list(data.eval_batches(ds, 2))
  assert "\n" not in str(e.value)
  ds = data.load_dataset(
    dataset_config(name="image_folder", data_dir=root, image_size=8, in_memory=in_memory, on_corrupt_image="skip")
  )
  assert ds.skipped_files == [bomb]


# ----------------------------------------------------------------------------------------------
# Image folders as users have them (torchvision ImageFolder conventions).


def test_hidden_entries_are_skipped_nested_images_included_and_reported(tmp_path):
  from PIL import Image

  root = write_image_folder(str(tmp_path), classes=("cat", "dog"), per_class=2, size=(8, 8))
  train = os.path.join(root, "train")
  os.makedirs(os.path.join(train, ".ipynb_checkpoints"))  # Would be class 0, shifting every label.
  with open(os.path.join(train, "dog", "._img0.png"), "wb") as f:  # macOS metadata: not an image.
    f.write(b"\x00\x05\x16\x07 AppleDouble")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(train, "cat", ".hidden.png"))
  os.makedirs(os.path.join(train, "dog", "more", "deeper"))
  for sub in ("more", os.path.join("more", "deeper")):
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(os.path.join(train, "dog", sub, "x.png"))
  with open(os.path.join(train, "dog", "notes.txt"), "w") as f:
    f.write("not an image")
  lines = []
  ds = data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=8), log=lines.append)
  assert ds.classes == ["cat", "dog"] and ds.num_train == 6
  assert ds.train_y.tolist() == [0, 0, 1, 1, 1, 1]
  paths, _, _ = datasets.scan_image_folder(root, "train")
  assert [os.path.relpath(p, train) for p in paths] == [
    "cat/img0.png",
    "cat/img1.jpg",
    "dog/img0.png",
    "dog/img1.jpg",
    "dog/more/x.png",
    "dog/more/deeper/x.png",
  ]
  assert len(lines) == 1 and "skipped 3 hidden entries" in lines[0]
  assert "1 non-image file (notes.txt)" in lines[0]
  assert ".ipynb_checkpoints" in lines[0] and train in lines[0]
  assert ds.info["scan_skipped"] == {train: {"hidden": 3, "not_images": 1}}


def test_hidden_class_in_test_split_is_not_an_unknown_class(tmp_path):
  root = write_image_folder(str(tmp_path), size=(8, 8))
  os.makedirs(os.path.join(root, "test", ".ipynb_checkpoints"))
  ds = data.load_dataset(dataset_config(name="image_folder", data_dir=root, image_size=8), log=lambda _: None)
  assert ds.num_test == 4


def test_symlink_loops_are_one_error(tmp_path):
  root = write_image_folder(str(tmp_path), size=(8, 8))
  loop = os.path.join(root, "train", "cat", "again")
  os.symlink(os.path.join(root, "train", "cat"), loop)
  with pytest.raises(DataError, match="again.*symbolic link loop") as e:
    datasets.scan_image_folder(root, "train")
  assert "\n" not in str(e.value)
  os.remove(loop)
  self_link = os.path.join(root, "train", "dog", "self.jpg")
  os.symlink(self_link, self_link)
  with pytest.raises(DataError, match="self.jpg.*(Too many levels|symbolic link)"):
    datasets.scan_image_folder(root, "train")


def test_a_run_records_its_data_and_evaluation_uses_the_recorded_normalisation(tmp_path):
  import shutil

  from PIL import Image

  from resnet_jax import train_loop
  from resnet_jax.evaluate import evaluate_workdir

  root = write_image_folder(str(tmp_path / "data"), classes=("a", "b"), per_class=8, size=(8, 8))
  shutil.rmtree(os.path.join(root, "test"))
  c = base_config()
  c.dataset = dataset_config(
    name="image_folder",
    data_dir=root,
    image_size=8,
    holdout=4,
    normalize="dataset",
    augment="pad_crop_flip",
    crop_padding=1,
    num_threads=1,
  )
  c.model.name = "residual_mlp"
  c.model.options = ml_collections.ConfigDict({"depth": 1, "dim": 16, "hidden": 16})
  c.batch_size, c.eval_batch_size, c.num_train_steps = 4, 4, 4
  c.log_every_steps, c.eval_every_steps, c.progress_bar = 2, 4, False
  workdir = str(tmp_path / "run")
  summary = train_loop.train_and_evaluate(c, workdir, log=lambda *_: None)
  with open(os.path.join(workdir, "data.json")) as f:
    info = json.load(f)
  x, y = folder_arrays(root)
  paths, _, _ = datasets.scan_image_folder(root, "train")
  keys = [os.path.relpath(p, os.path.join(root, "train")) for p in paths]
  mask = datasets.holdout_mask(y, keys, 4)
  mean, std = augment.channel_stats(x[~mask])
  assert info["normalization"]["mean"] == mean.tolist() and info["normalization"]["std"] == std.tolist()
  assert info["eval_split"] == "holdout" and info["holdout"]["images"] == 4
  assert info["storage"] == "memory" and info["train_images"] == 12
  # Training images changed after the run: the evaluation still normalises as the run did.
  changed = paths[int(np.flatnonzero(~mask)[0])]
  Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(changed, format="PNG")
  result = evaluate_workdir(workdir)
  assert result["test_accuracy"] == summary["test_accuracy"]
  np.testing.assert_allclose(result["test_loss"], summary["test_loss"], rtol=1e-6)


def test_decompression_bomb_read_by_a_pipeline_thread_is_one_line_from_train_py(tmp_path):
  import sys

  sys.path.insert(0, os.path.dirname(__file__))
  from test_configs import assert_one_line_error
  from test_reliability import image_folder_args, train_cli

  root = write_image_folder(str(tmp_path / "data"), per_class=4, test_per_class=2, size=(10, 10))
  bomb = os.path.join(root, "train", "dog", "img1.png")
  _bomb_png(bomb)  # Streamed (10x10 is not image_size): found by a grain thread reading its batch.
  proc = train_cli(tmp_path / "out", *image_folder_args(root))
  assert_one_line_error(proc, bomb, "decompression bomb")
