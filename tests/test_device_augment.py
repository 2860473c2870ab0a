"""Augmentation on the device (config.dataset.augment_on): the batch the jitted step makes from the host's
draws is the host pipeline's batch, a run trains the same either way, and where it does not apply it says so."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_jax import data, device_augment, metrics, run_setup, train_loop
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.errors import ConfigError

sys.path.insert(0, os.path.dirname(__file__))
from test_data import dataset_config, write_image_folder  # noqa: E402
from test_train import tiny_config  # noqa: E402


def _dataset(
  augment: str, dtype, padding: int, n: int = 40, size: int = 6, channels: int = 3, cutout: int = 0
) -> data.ArrayDataset:
  rng = np.random.default_rng(0)
  if dtype == np.uint8:
    x = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
  else:
    x = rng.random((n, size, size, channels)).astype(dtype)
  y = rng.integers(0, 5, size=n).astype(np.int32)
  return data.ArrayDataset(
    name="random",
    num_classes=5,
    image_shape=(size, size, channels),
    mean=np.asarray([0.4, 0.5, 0.6][:channels], np.float32),
    std=np.asarray([0.2, 0.25, 0.3][:channels], np.float32),
    train_x=x,
    train_y=y,
    test_x=x[:4],
    test_y=y[:4],
    augment=augment,
    crop_padding=padding,
    cutout=cutout,
  )


def _squares(centres: np.ndarray, size: int, h: int, w: int) -> np.ndarray:
  """Boolean ``[B, h, w]``: the pixels of each image's cutout square, pixel by pixel from the definition."""
  mask = np.zeros((len(centres), h, w), bool)
  for i, (cy, cx) in enumerate(centres):
    for y in range(h):
      for x in range(w):
        mask[i, y, x] = cy - size // 2 <= y < cy - size // 2 + size and cx - size // 2 <= x < cx - size // 2 + size
  return mask


@settings(max_examples=20, deadline=None)
@given(
  augment=st.sampled_from(data.ARRAY_AUGMENTATIONS),
  uint8=st.booleans(),
  padding=st.integers(0, 3),
  seed=st.integers(0, 2**31),
  part=st.sampled_from([slice(None), slice(0, 4), slice(4, 8)]),
  cutout=st.sampled_from([0, 1, 2, 3, 4, 5, 13, 40]),  # 6x6 images: squares larger than the image too
)
def test_the_device_batch_is_the_host_batch_of_the_same_draws(augment, uint8, padding, seed, part, cutout):
  ds = _dataset(augment, np.uint8 if uint8 else np.float32, padding, cutout=cutout)
  indices = np.random.default_rng(seed).permutation(ds.num_train)[:8]
  host = ds.train_batch(indices, np.random.default_rng(seed), part)
  draws = ds.train_draws(indices, np.random.default_rng(seed), part)
  assert draws["index"].dtype == np.int32 and draws["crop"].shape == (len(host["label"]), 3)
  assert ("cutout" in draws) == (cutout > 0)
  make = jax.jit(device_augment.make_batch(ds.crop_padding_used, ds.mean, ds.std, ds.cutout))
  device = make(jnp.asarray(ds.train_x), draws)
  image = np.asarray(device["image"])
  np.testing.assert_array_equal(np.asarray(device["label"]), host["label"])
  np.testing.assert_allclose(image, host["image"], rtol=1e-6, atol=1e-6)
  if cutout:
    assert draws["cutout"].dtype == np.int32 and draws["cutout"].shape == (len(host["label"]), 2)
    square = np.broadcast_to(_squares(draws["cutout"], cutout, 6, 6)[..., None], image.shape)
    # The squares: +0.0 on both sides, bit for bit; nothing else is cut.
    assert not image.view(np.uint32)[square].any() and not host["image"].view(np.uint32)[square].any()
    uncut = dataclasses.replace(ds, cutout=0).train_batch(indices, np.random.default_rng(seed), part)["image"]
    np.testing.assert_array_equal(host["image"][~square], uncut[~square])


def test_crop_draws_shift_and_mirror_every_image_on_its_own():
  ds = _dataset("pad_crop_flip", np.uint8, 2, n=400)
  crop = ds.train_draws(np.arange(400), np.random.default_rng(1))["crop"]
  assert crop[:, :2].min() == 0 and crop[:, :2].max() == 4  # every offset of the padded window
  assert 0.4 < crop[:, 2].mean() < 0.6  # about half are mirrored
  assert len({tuple(r) for r in crop}) > 40
  no_flip = _dataset("pad_crop", np.uint8, 2, n=400).train_draws(np.arange(400), np.random.default_rng(1))["crop"]
  np.testing.assert_array_equal(no_flip[:, :2], crop[:, :2])  # the same offsets, never mirrored
  assert not no_flip[:, 2].any()


@pytest.mark.parametrize(
  "model,cutout", [pytest.param("resnet20", 0, marks=pytest.mark.slow), ("residual_mlp", 0), ("residual_mlp", 3)]
)
def test_a_run_augmented_on_the_device_trains_as_on_the_host(model, cutout, tmp_path):
  runs = {}
  for where in ("host", "device"):
    config = tiny_config(
      model, **{"dataset.augment": "pad_crop_flip", "dataset.augment_on": where, "dataset.cutout": cutout}
    )
    setup = run_setup.Setup(config)
    assert setup.augment_on == where
    workdir = str(tmp_path / where)
    messages = []
    summary = train_loop.train_and_evaluate(config, workdir, log=messages.append, setup=setup)
    augment = "pad_crop_flip + cutout 3" if cutout else "pad_crop_flip"
    assert summary["augment_on"] == where and f"augmentation {augment} on the {where})" in messages[0]
    state, _, _ = Checkpointer(os.path.join(workdir, "checkpoints")).restore(setup.abstract_state())
    runs[where] = (metrics.read_metrics(workdir), jax.tree.leaves(state.params))
  (host_records, host_params), (device_records, device_params) = runs["host"], runs["device"]
  assert [r["step"] for r in host_records] == [r["step"] for r in device_records]
  for a, b in zip(host_records, device_records):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
  for a, b in zip(host_params, device_params):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_auto_augments_on_the_device_only_on_accelerators_with_images_in_memory(tmp_path):
  ds = _dataset("pad_crop_flip", np.uint8, 4)
  assert run_setup.augment_on("auto", ds, "cpu") == "host"
  assert run_setup.augment_on("auto", ds, "gpu") == "device"
  assert run_setup.augment_on("host", ds, "gpu") == "host"
  assert run_setup.augment_on("device", ds, "cpu") == "device"
  root = str(tmp_path / "folder")
  write_image_folder(root, classes=("a", "b"), per_class=3, test_per_class=1, size=(12, 12))
  streamed = data.load_dataset(
    dataset_config(name="image_folder", data_dir=root, image_size=8, in_memory="never", augment="pad_crop_flip"),
    progress=False,
  )
  assert not streamed.in_memory
  assert run_setup.augment_on("auto", streamed, "gpu") == "host"
  with pytest.raises(ConfigError, match=r"augment_on='device' needs the training images in memory.*augment_on='host'"):
    run_setup.augment_on("device", streamed, "gpu")


def test_an_unknown_augment_on_is_a_config_error():
  from resnet_jax.config_check import validate_config

  with pytest.raises(ConfigError, match="augment_on"):
    validate_config(tiny_config(**{"dataset.augment_on": "gpu"}))
