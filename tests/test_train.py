"""Tests of the training modules (resnet_jax.optim, train_step, metrics, train_loop): schedules, optimizer
masks, loss, steps, outputs, determinism, resume."""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resnet_jax import machine, metrics, optim, run_setup, train_loop, train_step
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.config_check import base_config
from resnet_jax.errors import CheckpointError
from resnet_jax.evaluate import evaluate_workdir
from resnet_jax.models import create_model
from resnet_jax.tensorboard_events import PATTERN, read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(model: str = "residual_mlp", **overrides) -> ml_collections.ConfigDict:
  """Digits subset, batch 8, a few steps, no progress bar."""
  c = base_config()
  c.dataset.max_train_examples = 48
  c.dataset.max_test_examples = 20
  c.dataset.augment = "pad_crop"
  c.dataset.crop_padding = 1
  c.dataset.num_threads = 1
  c.model.name = model
  if model == "residual_mlp":
    c.model.options = ml_collections.ConfigDict({"depth": 2, "dim": 16, "hidden": 16})
  else:
    c.model.options = ml_collections.ConfigDict({"num_filters": 4})
  c.batch_size = 8
  c.eval_batch_size = 12
  c.num_train_steps = 8
  c.optimizer.learning_rate = 0.05
  c.schedule.warmup = 2.0
  c.schedule.unit = "steps"
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 4
  c.progress_bar = False
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _quiet(*_):
  pass


def _metrics(workdir):
  return [
    {k: v for k, v in r.items() if k not in ("images_per_sec", "wall_time_s")} for r in metrics.read_metrics(workdir)
  ]


# ----------------------------------------------------------------------------------------------
# Pieces.


def test_step_schedule_with_warmup():
  c = base_config()
  c.optimizer.learning_rate = 0.1
  c.schedule.name, c.schedule.unit, c.schedule.warmup = "step", "steps", 10.0
  c.schedule.boundaries, c.schedule.decay_factor = (100.0, 150.0), 0.1
  sched = optim.make_schedule(c, steps_per_epoch=7, total_steps=200)
  np.testing.assert_allclose(
    [sched(0), sched(5), sched(10), sched(99), sched(100), sched(149), sched(150)],
    [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001],
    rtol=1e-6,
    atol=1e-9,
  )


def test_cosine_schedule_in_epochs():
  c = base_config()
  c.optimizer.learning_rate = 0.4
  c.schedule.name, c.schedule.unit, c.schedule.warmup = "cosine", "epochs", 2.0
  sched = optim.make_schedule(c, steps_per_epoch=5, total_steps=110)
  np.testing.assert_allclose(sched(10), 0.4, rtol=1e-6)
  np.testing.assert_allclose(sched(60), 0.2, rtol=1e-5)  # half way through the 100 cosine steps
  np.testing.assert_allclose(sched(110), 0.0, atol=1e-7)


def test_decay_mask_skips_batchnorm_and_biases():
  model = create_model("resnet20", num_classes=3, num_filters=4)
  variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1)), train=False), jax.random.PRNGKey(0))
  mask = optim.decay_mask(variables["params"])
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
  }
  assert any(flat.values()) and not all(flat.values())
  for name, decayed in flat.items():
    assert decayed == name.endswith("kernel"), name


def test_sgd_weight_decay_is_added_to_the_gradient_of_kernels_only():
  c = base_config()
  c.optimizer.name, c.optimizer.momentum, c.optimizer.weight_decay = "sgd", 0.0, 0.1
  tx = optim.make_optimizer(c, optax.constant_schedule(0.5))
  params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
  grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  updates, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(
    updates, {"kernel": jnp.full((2, 2), -0.5 * (1 + 0.1 * 2.0)), "bias": jnp.full((2,), -0.5)}
  )


@pytest.mark.parametrize("name", ["nesterov", "adamw", "lars"])
def test_other_optimizers_update_finitely(name):
  c = base_config()
  c.optimizer.name = name
  tx = optim.make_optimizer(c, optax.constant_schedule(0.1))
  params = {"kernel": jnp.full((3, 2), 1.0), "bias": jnp.zeros((2,))}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) and bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


@given(st.floats(0.0, 0.5), st.integers(0, 2**31 - 1))
def test_cross_entropy_with_label_smoothing(smoothing, seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=4)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  target = np.full((4, 5), smoothing / 5)
  target[np.arange(4), labels] += 1 - smoothing
  expected = -(target * logp).sum(-1)
  got = train_step.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 5, smoothing)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters():
  c = tiny_config("resnet20", **{"model.dtype": "bfloat16"})
  model = run_setup.build_model(c, 10)
  tx = optim.make_optimizer(c, optax.constant_schedule(0.05))
  state = train_step.create_train_state(model, tx, (8, 8, 1), jax.random.PRNGKey(0))
  step = jax.jit(train_step.make_train_step(10))
  batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 1)), "label": jnp.arange(8) % 10}
  losses = []
  for _ in range(3):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20", "residual_mlp"])
def test_init_variables_is_model_init_compiled_once(name, caplog):
  """One compiled program gives model.init's variables (to the last bits of the normal samples); an equal
  model reuses it, and under jax.eval_shape it is traced, not compiled."""
  options = {"depth": 2, "dim": 16, "hidden": 16} if name == "residual_mlp" else {"num_filters": 4}
  shape = (8, 8, 1)
  model = create_model(name, num_classes=10, **options)
  key = jax.random.PRNGKey(3)
  got = train_step.init_variables(model, shape, key)
  want = model.init(key, jnp.zeros((1, *shape), jnp.float32), train=False)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  caplog.clear()
  with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
    again = train_step.init_variables(create_model(name, num_classes=10, **options), shape, key)
    abstract = jax.eval_shape(lambda k: train_step.init_variables(model, shape, k), key)
  compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  assert compiles == [], compiles
  chex.assert_trees_all_equal(again, got)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, got)


def _device(platform: str, **attributes):
  """A stand-in for a jax.Device: what compute_dtype reads (the platform, a GPU's compute capability)."""
  return types.SimpleNamespace(platform=platform, **attributes)


@pytest.mark.parametrize(
  "dtype, model, backend, devices, device, native, want",
  [
    ("float32", "resnet20", "auto", 1, _device("tpu"), True, "float32"),  # set explicitly: kept
    ("bfloat16", "resnet20", "xla", 1, _device("cpu"), False, "bfloat16"),
    ("auto", "resnet20", "auto", 8, _device("tpu"), False, "bfloat16"),
    ("auto", "resnet20", "auto", 1, _device("gpu", compute_capability="9.0"), False, "bfloat16"),
    ("auto", "resnet20", "auto", 1, _device("gpu", compute_capability="8.0"), False, "bfloat16"),
    ("auto", "resnet20", "auto", 1, _device("gpu", compute_capability="7.5"), True, "float32"),
    ("auto", "resnet20", "auto", 1, _device("gpu"), True, "float32"),  # no NVIDIA capability reported
    ("auto", "resnet20", "auto", 1, _device("cpu"), True, "bfloat16"),  # AVX-512 bf16 or AMX in oneDNN
    ("auto", "resnet20", "onednn", 1, _device("cpu"), True, "bfloat16"),
    ("auto", "resnet20", "auto", 1, _device("cpu"), False, "float32"),  # AVX2 only
    ("auto", "resnet20", "xla", 1, _device("cpu"), True, "float32"),  # XLA's CPU convolutions
    ("auto", "resnet20", "auto", 2, _device("cpu"), True, "float32"),  # several devices: XLA's
    ("auto", "residual_mlp", "auto", 1, _device("cpu"), True, "float32"),  # no convolutions
  ],
)
def test_auto_dtype_is_bfloat16_where_the_device_computes_it_natively(
  dtype, model, backend, devices, device, native, want, monkeypatch
):
  from resnet_jax import onednn_conv

  monkeypatch.setattr(onednn_conv, "implements_bfloat16", lambda: native)
  c = tiny_config(model, **{"model.dtype": dtype, "model.conv_backend": backend})
  assert run_setup.compute_dtype(c, devices, device) == want
  if device.platform == "cpu":  # the model is built with it
    built = run_setup.build_model(c, 10, devices, device)
    assert (getattr(built, "dtype", None) == jnp.bfloat16) == (want == "bfloat16")


def test_onednn_implements_bfloat16_where_the_cpu_flags_say():
  """Whether oneDNN has bfloat16 convolutions here (what model.dtype="auto" follows on a CPU) agrees with the
  CPU's own flags: never on an AVX2-only CPU or without oneDNN, always with AVX-512 bf16 or AMX."""
  from resnet_jax import onednn_conv, onednn_lib

  isa = machine.cpu_isa()
  native = onednn_conv.implements_bfloat16()
  if isa in ("AVX2", "SSE") or not onednn_lib.available():
    assert not native
  elif "bf16" in isa or "AMX" in isa:
    assert native


def test_onednn_conv_backend_trains_like_xla():
  """config.model.conv_backend="onednn": the same jitted training step, the same trajectory within float32."""
  losses = {}
  for backend in ("xla", "onednn"):
    c = tiny_config("resnet20", **{"model.conv_backend": backend})
    model = run_setup.build_model(c, 10)
    assert model.conv_backend == backend
    tx = optim.make_optimizer(c, optax.constant_schedule(0.05))
    state = train_step.create_train_state(model, tx, (8, 8, 1), jax.random.PRNGKey(0))
    step = jax.jit(train_step.make_train_step(10))
    batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 1)), "label": jnp.arange(8) % 10}
    losses[backend] = []
    for _ in range(3):
      state, m = step(state, batch)
      losses[backend].append(float(m["loss"]))
  assert losses["onednn"][-1] < losses["onednn"][0]
  np.testing.assert_allclose(losses["onednn"], losses["xla"], rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Whole runs.


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mlp_run"))
  summary = train_loop.train_and_evaluate(tiny_config(), workdir, log=_quiet)
  return workdir, summary


def test_run_writes_summary_metrics_curves_and_checkpoints(mlp_run):
  workdir, summary = mlp_run
  for key in (
    "config",
    "model",
    "parameters",
    "steps",
    "train_time_s",
    "images_per_sec",
    "final_train_loss",
    "test_accuracy",
    "best_test_accuracy",
  ):
    assert key in summary
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["steps"] == 8 == summary["steps"]
  assert summary["machine"] == machine.describe()  # every figure names the CPU it was measured on
  assert summary["parameters"] == sum(
    int(np.prod(p.shape))
    for p in jax.tree.leaves(
      create_model("residual_mlp", 10, depth=2, dim=16, hidden=16).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))[
        "params"
      ]
    )
  )
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]
  assert [r["step"] for r in records if r["split"] == "test"] == [4, 8]
  assert summary["best_test_accuracy"] == max(r["accuracy"] for r in records if r["split"] == "test")
  with open(os.path.join(workdir, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [4, 8]


def test_evaluate_reproduces_the_final_test_accuracy(mlp_run):
  workdir, summary = mlp_run
  result = evaluate_workdir(workdir)
  assert result["step"] == 8
  assert result["test_accuracy"] == summary["test_accuracy"]
  np.testing.assert_allclose(result["test_loss"], summary["test_loss"], rtol=1e-6)


def test_same_seed_gives_identical_metrics(mlp_run, tmp_path):
  workdir, _ = mlp_run
  train_loop.train_and_evaluate(tiny_config(), str(tmp_path / "again"), log=_quiet)
  assert _metrics(str(tmp_path / "again")) == _metrics(workdir)
  train_loop.train_and_evaluate(tiny_config(seed=1), str(tmp_path / "other"), log=_quiet)
  assert _metrics(str(tmp_path / "other")) != _metrics(workdir)


def test_workdir_of_another_model_is_refused(mlp_run):
  workdir, _ = mlp_run
  with pytest.raises(CheckpointError, match="residual_mlp"):
    train_loop.train_and_evaluate(tiny_config("resnet20"), workdir, log=_quiet)


@pytest.mark.parametrize("augment_on, ema_decay", [("host", 0.0), ("device", 0.0), ("host", 0.9)])
def test_resume_matches_an_uninterrupted_run_bitwise(augment_on, ema_decay, tmp_path):
  config = tiny_config("resnet20", **{"dataset.augment_on": augment_on, "ema_decay": ema_decay})
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  setup = run_setup.Setup(config)  # Shared: one compilation for the three runs.
  train_loop.train_and_evaluate(config, full, log=_quiet, setup=setup)
  assert train_loop.train_and_evaluate(config, split, log=_quiet, stop_at_step=4, setup=setup) is None
  assert Checkpointer(os.path.join(split, "checkpoints")).all_steps() == [4]
  messages = []
  train_loop.train_and_evaluate(config, split, log=messages.append, setup=setup)
  assert any("resuming" in m and "step 4" in m for m in messages)
  a, data_a, _ = Checkpointer(os.path.join(full, "checkpoints")).restore(setup.abstract_state())
  b, data_b, _ = Checkpointer(os.path.join(split, "checkpoints")).restore(setup.abstract_state())
  assert int(a.step) == int(b.step) == 8 and data_a == data_b
  assert (a.ema is None) == (b.ema is None) == (ema_decay == 0.0)
  for x, y in zip(
    jax.tree.leaves((a.params, a.batch_stats, a.opt_state, a.ema)),
    jax.tree.leaves((b.params, b.batch_stats, b.opt_state, b.ema)),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _metrics(full) == _metrics(split)


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(tmp_path):
  from resnet_jax.train_loop import TrainingDivergedError

  bad = {
    "optimizer.learning_rate": 1e30,
    "optimizer.momentum": 0.0,
    "schedule.warmup": 0.0,
    "schedule.name": "constant",
  }
  with pytest.raises(TrainingDivergedError, match=r"at step \d"):
    train_loop.train_and_evaluate(tiny_config(**bad), str(tmp_path / "stop"), log=_quiet)
  assert metrics.read_metrics(str(tmp_path / "stop"))  # What was written stays readable.
  messages = []
  summary = train_loop.train_and_evaluate(
    tiny_config(on_nonfinite="skip", **bad), str(tmp_path / "skip"), log=messages.append
  )
  assert summary["steps"] == 8 and any("skipped" in m for m in messages)


def test_evaluate_cli_reports_a_missing_run_in_one_line(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "resnet_jax.evaluate", f"--workdir={tmp_path}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "config.json" in proc.stderr


# ----------------------------------------------------------------------------------------------
# The loop's helpers: the periodic actions and the metrics writer.


@given(st.integers(1, 200), st.integers(1, 50), st.booleans())
def test_due_every_n_steps_and_whenever_also(step, every, also):
  assert train_loop.due(step, every, also) == (also or step % every == 0)


def test_strict_json_writes_nan_and_infinity_as_null_and_numpy_scalars_as_numbers():
  got = metrics.strict_json(
    {
      "a": float("nan"),
      "b": [np.float32(1.5), np.int64(3), (float("-inf"),)],
      "c": np.float64("inf"),
      "d": "x",
      "e": None,
      "f": True,
    }
  )
  assert got == {"a": None, "b": [1.5, 3, [None]], "c": None, "d": "x", "e": None, "f": True}
  assert type(got["b"][0]) is float and type(got["b"][1]) is int
  json.dumps(got, allow_nan=False)


def test_metrics_writer_writes_each_record_to_jsonl_and_tensorboard_and_resumes(tmp_path):
  workdir = str(tmp_path)
  with metrics.MetricsWriter(workdir, 0) as writer:
    assert writer.replaced == []  # nothing there yet
    for step in (2, 4, 6):
      writer.write(step, {"split": "train", "loss": float("nan") if step == 4 else 1.0 / step})
  assert [r["step"] for r in metrics.read_metrics(workdir)] == [2, 4, 6]
  assert metrics.read_metrics(workdir)[1]["loss"] is None  # NaN is not JSON: null.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write("not a record\n")
  with metrics.MetricsWriter(workdir, 4) as writer:  # A resume from step 4: the later records go.
    assert writer.rejected == 1 and [r["step"] for r in writer.records] == [2, 4] and writer.replaced == [6]
    writer.write(6, {"split": "test", "accuracy": 0.5})
  assert [(r["step"], r["split"]) for r in metrics.read_metrics(workdir)] == [(2, "train"), (4, "train"), (6, "test")]
  steps = sorted(
    e.step for path in glob.glob(os.path.join(workdir, PATTERN)) for e in read_events(path)[0] if e.HasField("summary")
  )
  assert steps == [2, 4, 6]


def test_metrics_writer_disabled_collects_records_and_writes_nothing(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), 0, enabled=False) as writer:
    writer.write(1, {"split": "train", "loss": 0.5})
  assert writer.records == [{"step": 1, "split": "train", "loss": 0.5}] and not os.listdir(tmp_path)
