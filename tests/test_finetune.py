"""Fine-tuning (resnet_jax.finetune, config.finetune): loading, head replacement, frozen parts, resume."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import finetune, optim, run_setup, train_loop
from resnet_jax.config_check import base_config
from resnet_jax.errors import CheckpointError
from resnet_jax.models import create_model

sys.path.insert(0, os.path.dirname(__file__))
from test_train import tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _variables(num_classes=10, num_filters=4, seed=0):
  """Variables of a narrow CIFAR ResNet-20 for 8x8x1 digits, with random BatchNorm statistics."""
  model = create_model("resnet20", num_classes=num_classes, num_filters=num_filters)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), shapes["params"])
  stats = jax.tree_util.tree_map_with_path(
    lambda p, a: (rng.uniform(0.5, 1.5, a.shape) if p[-1].key == "var" else rng.normal(0, 0.1, a.shape)).astype(
      np.float32
    ),
    shapes["batch_stats"],
  )
  return {"params": params, "batch_stats": stats}


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_equal(a, b, skip=()):
  fa, fb = _flat(a), _flat(b)
  assert set(fa) == set(fb)
  for k in fa:
    if not any(s in k for s in skip):
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(variables, .npz path, .safetensors path) of a 10-class model."""
  folder = tmp_path_factory.mktemp("weights")
  v = _variables()
  paths = []
  for ext in (".npz", ".safetensors"):
    path = str(folder / f"r20{ext}")
    finetune.save_weights(v, path)
    paths.append(path)
  return v, *paths


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_loaded_weights_equal_the_files(source, ext):
  v, npz, st = source
  fresh = _variables(seed=1)
  loaded = finetune.load_initial_variables(npz if ext == ".npz" else st, fresh, log=lambda *_: None)
  _assert_equal(loaded, v)


def test_torchvision_pth_file_loads_like_convert():
  import tempfile

  import torch  # the [torch] extra of the test command installs it: a failure, never a skip
  import torchvision.models as torchvision_models

  from resnet_jax import convert

  tv = torchvision_models.resnet18(num_classes=1000)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "r18.pth")
    torch.save(tv.state_dict(), path)
    target = jax.eval_shape(
      create_model("resnet18", num_classes=1000).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    target = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target)
    loaded = finetune.load_initial_variables(path, target, log=lambda *_: None)
    _assert_equal(loaded, convert.load_checkpoint(path, "resnet18"))


def test_head_is_replaced_when_the_class_count_differs(source):
  v, npz, _ = source
  fresh = _variables(num_classes=12, seed=1)
  notes = []
  loaded = finetune.load_initial_variables(npz, fresh, log=notes.append)
  assert loaded["params"]["fc"]["kernel"].shape == (16, 12)
  _assert_equal(loaded["params"]["fc"], fresh["params"]["fc"])  # the fresh head, untouched
  _assert_equal(
    {k: x for k, x in loaded["params"].items() if k != "fc"}, {k: x for k, x in v["params"].items() if k != "fc"}
  )
  _assert_equal(loaded["batch_stats"], v["batch_stats"])
  assert any("new head for 12 classes" in n and "10 classes" in n for n in notes)
  # reset_head: a new head even for the same class count.
  same = finetune.load_initial_variables(npz, _variables(seed=2), reset_head=True, log=lambda *_: None)
  _assert_equal(same["params"]["fc"], _variables(seed=2)["params"]["fc"])
  # A headless target takes the backbone and leaves the head out.
  headless = jax.eval_shape(
    create_model("resnet20", num_classes=0, num_filters=4).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1))
  )
  headless = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), headless)
  loaded = finetune.load_initial_variables(npz, headless, log=lambda *_: None)
  assert "fc" not in loaded["params"]
  _assert_equal(loaded["params"], {k: x for k, x in v["params"].items() if k != "fc"})


def test_mismatch_is_one_line_naming_the_first_bad_key(source, tmp_path):
  _, npz, _ = source
  wider = _variables(num_filters=8, seed=1)
  with pytest.raises(CheckpointError) as e:
    finetune.load_initial_variables(npz, wider, "model resnet20", log=lambda *_: None)
  msg = str(e.value)
  assert "\n" not in msg and npz in msg
  assert "first bad key 'bn1.bias' has shape (4,) in the file, the model expects (8,)" in msg
  # A state dict of another architecture: the first tensor the model lacks is named.
  other = dict(np.load(npz))
  other["layer4.0.conv1.weight"] = np.zeros((2, 2, 3, 3), np.float32)
  path = str(tmp_path / "extra.npz")
  np.savez(path, **other)
  with pytest.raises(CheckpointError, match="first bad key 'layer4.0.conv1.weight' in the file is not a tensor"):
    finetune.load_initial_variables(path, _variables(seed=1), log=lambda *_: None)
  del other["layer4.0.conv1.weight"], other["layer1.0.bn1.running_var"]
  np.savez(path, **other)
  with pytest.raises(CheckpointError, match="first bad key 'layer1.0.bn1.running_var' is missing from the file"):
    finetune.load_initial_variables(path, _variables(seed=1), log=lambda *_: None)
  for bad, needle in ((str(tmp_path / "none.npz"), "not found"), (str(tmp_path / "w.txt"), "unknown format")):
    if bad.endswith(".txt"):
      open(bad, "w").write("x")
    with pytest.raises(CheckpointError, match=needle):
      finetune.load_initial_variables(bad, _variables(), log=lambda *_: None)
  junk = str(tmp_path / "junk.safetensors")
  open(junk, "wb").write(b"not a safetensors file")
  with pytest.raises(CheckpointError, match="cannot read"):
    finetune.load_initial_variables(junk, _variables(), log=lambda *_: None)


def test_backbone_learning_rate_scale_and_freeze_via_multi_transform():
  params = {"conv1": {"kernel": jnp.ones((2, 2))}, "fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates = {}
  for name, overrides in (
    ("plain", {}),
    ("scaled", {"finetune.backbone_lr_scale": 0.1}),
    ("frozen", {"finetune.freeze_backbone": True}),
  ):
    c = tiny_config("resnet20", **{"optimizer.momentum": 0.0, "optimizer.weight_decay": 0.0, **overrides})
    tx = finetune.make_optimizer(c, optax.constant_schedule(0.5), optim.make_optimizer)
    updates[name], _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["plain"]["conv1"]["kernel"], -0.5)
  np.testing.assert_allclose(updates["scaled"]["conv1"]["kernel"], -0.05, rtol=1e-6)
  np.testing.assert_array_equal(updates["frozen"]["conv1"]["kernel"], 0.0)
  for name in updates:  # the head always trains at the schedule's rate
    np.testing.assert_allclose(updates[name]["fc"]["kernel"], -0.5)
  assert finetune.param_labels(params) == {"conv1": {"kernel": "backbone"}, "fc": {"kernel": "head", "bias": "head"}}


def test_frozen_parts_stay_bitwise_and_a_resume_does_not_reload_the_weights(source, tmp_path):
  v, npz, _ = source
  weights = str(tmp_path / "start.npz")
  with open(npz, "rb") as f, open(weights, "wb") as g:
    g.write(f.read())
  c = tiny_config(
    "resnet20",
    **{
      "finetune.weights": weights,
      "finetune.freeze_backbone": True,
      "finetune.freeze_batch_stats": True,
      "dataset.num_classes": 12,
    },
  )
  workdir = str(tmp_path / "run")
  notes = []
  setup = run_setup.Setup(c)
  assert train_loop.train_and_evaluate(c, workdir, log=notes.append, stop_at_step=4, setup=setup) is None
  assert any("new head for 12 classes" in n for n in notes)
  with open(weights, "wb") as f:  # a resume that read the weights again would fail on this file
    f.write(b"overwritten")
  notes.clear()
  summary = train_loop.train_and_evaluate(c, workdir, log=notes.append, setup=setup)
  assert summary["steps"] == 8 and any("resuming" in n for n in notes)
  assert not any("fine-tuning from" in n for n in notes)
  final, _ = finetune.read_run_variables(workdir)
  _assert_equal(
    {k: x for k, x in final["params"].items() if k != "fc"}, {k: x for k, x in v["params"].items() if k != "fc"}
  )
  _assert_equal(final["batch_stats"], v["batch_stats"])
  fresh_head = _variables(num_classes=12)["params"]["fc"]["kernel"].shape
  assert final["params"]["fc"]["kernel"].shape == fresh_head
  # The head did train.
  start = create_model("resnet20", num_classes=12, num_filters=4).init(jax.random.key(c.seed), jnp.zeros((1, 8, 8, 1)))
  assert not np.array_equal(final["params"]["fc"]["kernel"], start["params"]["fc"]["kernel"])
  # The run's workdir is itself a source: its variables load exactly, and the run's model name is checked.
  loaded = finetune.load_initial_variables(workdir, _variables(num_classes=12, seed=3), log=lambda *_: None)
  _assert_equal(loaded, final)
  with pytest.raises(CheckpointError, match=r"\(model resnet20\) do not fit .* first bad key params/bn1/bias"):
    finetune.load_initial_variables(workdir, _variables(num_filters=8), log=lambda *_: None)


def test_cli_wrong_weights_file_is_one_line_and_exit_2(source, tmp_path):
  _, npz, _ = source
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "train.py"),
      f"--workdir={tmp_path / 'run'}",
      "--config.model.name=resnet32",
      f"--config.finetune.weights={npz}",
      "--config.num_train_steps=1",
      "--config.progress_bar=False",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in r.stderr
  assert "do not fit model resnet32: first bad key" in lines[0] and npz in lines[0]


def test_config_keys_are_checked():
  from resnet_jax.config_check import validate_config
  from resnet_jax.errors import ConfigError

  c = base_config()
  c.finetune.backbone_lr_scale = 0.0
  with pytest.raises(ConfigError, match="config.finetune.backbone_lr_scale"):
    validate_config(c)
