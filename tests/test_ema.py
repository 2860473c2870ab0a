"""The weight average (``config.ema_decay``): its formula, that it never changes the training itself, and
that a run evaluates, resumes, predicts and fine-tunes with it."""

from __future__ import annotations

import glob
import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_jax import finetune, run_setup, train_loop, train_step
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.config_check import validate_config
from resnet_jax.errors import CheckpointError, ConfigError
from resnet_jax.evaluate import evaluate_workdir
from resnet_jax.models import create_model
from resnet_jax.predict import load_run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import tiny_config  # noqa: E402


def _quiet(*_):
  pass


def _state(ema_decay: float, seed: int = 0) -> tuple[train_step.TrainState, list[dict]]:
  """A small residual MLP with BatchNorm, its train state and a few batches of random digits-sized data."""
  model = create_model("residual_mlp", 10, depth=2, dim=16, hidden=16)
  tx = optax.sgd(0.1, momentum=0.9)
  state = train_step.create_train_state(model, tx, (8, 8, 1), jax.random.PRNGKey(seed), ema_decay=ema_decay)
  rng = np.random.default_rng(seed)
  batches = [
    {"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32), "label": rng.integers(0, 10, 8).astype(np.int32)}
    for _ in range(5)
  ]
  return state, batches


def _tracked(state: train_step.TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


@settings(max_examples=8, deadline=None)
@given(st.sampled_from([0.5, 0.9, 0.999]), st.integers(1, 5))
def test_the_average_is_the_debiased_weighted_mean_of_the_steps(decay, steps):
  """theta_bar_t = sum_k d^(t-k) (1 - d) theta_k / (1 - d^t), computed here in float64 from each step's state."""
  state, batches = _state(decay)
  step = jax.jit(train_step.make_train_step(10))
  seen = []
  for batch in batches[:steps]:
    state, _ = step(state, batch)
    seen.append(jax.tree.map(lambda x: np.asarray(x, np.float64), _tracked(state)))
  t = len(seen)
  weights = [decay ** (t - k) * (1 - decay) / (1 - decay**t) for k in range(1, t + 1)]
  assert np.isclose(sum(weights), 1.0)
  expected = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *seen)
  got = train_step.averaged_variables(state)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float64), e, rtol=2e-5, atol=1e-6)
  if t > 1:  # The average is not the last weights.
    assert any(
      not np.allclose(np.asarray(g), np.asarray(x)) for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(seen[-1]))
    )


def test_before_the_first_step_the_average_is_the_state_itself():
  state, _ = _state(0.9)
  assert int(state.ema.count) == 0
  own = train_step.averaged_variables(state.replace(ema=None))
  chex.assert_trees_all_equal(train_step.averaged_variables(state), own)


def test_the_average_never_changes_the_training():
  """Parameters, statistics and optimizer state after the same steps are bitwise those of a run without it."""
  plain, batches = _state(0.0)
  averaged, _ = _state(0.99)
  assert plain.ema is None and averaged.ema is not None
  step = jax.jit(train_step.make_train_step(10))
  for batch in batches:
    plain, m_plain = step(plain, batch)
    averaged, m_avg = step(averaged, batch)
    assert float(m_plain["loss"]) == float(m_avg["loss"])
  for a, b in zip(
    jax.tree.leaves((plain.params, plain.batch_stats, plain.opt_state)),
    jax.tree.leaves((averaged.params, averaged.batch_stats, averaged.opt_state)),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(averaged.ema.count) == len(batches)


def test_a_skipped_nonfinite_step_leaves_the_average_unchanged():
  state, batches = _state(0.9)
  step = jax.jit(train_step.make_train_step(10, skip_nonfinite=True))
  state, _ = step(state, batches[0])
  bad = dict(batches[1], image=np.full_like(batches[1]["image"], np.nan))
  after, metrics = step(state, bad)
  assert not bool(metrics["finite"])
  assert int(after.ema.count) == int(state.ema.count) == 1
  for a, b in zip(jax.tree.leaves(after.ema), jax.tree.leaves(state.ema), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, float("nan")])
def test_an_ema_decay_outside_0_to_1_is_a_config_error(decay):
  with pytest.raises(ConfigError, match=r"config.ema_decay"):
    validate_config(tiny_config(ema_decay=decay))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ema_run"))
  config = tiny_config("resnet20", ema_decay=0.8)
  summary = train_loop.train_and_evaluate(config, workdir, log=_quiet)
  return workdir, summary, config


def test_a_run_evaluates_the_average_and_reports_the_last_weights_too(ema_run):
  workdir, summary, config = ema_run
  setup = run_setup.Setup(config)
  state, _, _ = Checkpointer(os.path.join(workdir, "checkpoints")).restore(setup.abstract_state())
  assert int(state.ema.count) == 8 == summary["steps"]
  averaged = setup.evaluate(state)
  own = setup.evaluate(state.replace(ema=None))
  assert summary["test_accuracy"] == averaged["accuracy"]
  np.testing.assert_allclose(summary["test_loss"], averaged["loss"], rtol=1e-6)
  assert summary["unaveraged_test_accuracy"] == own["accuracy"]
  np.testing.assert_allclose(summary["unaveraged_test_loss"], own["loss"], rtol=1e-6)
  assert averaged["loss"] != own["loss"]  # Two different sets of weights were evaluated.
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["unaveraged_test_accuracy"] == own["accuracy"]
  result = evaluate_workdir(workdir)
  assert result["test_accuracy"] == summary["test_accuracy"]
  np.testing.assert_allclose(result["test_loss"], summary["test_loss"], rtol=1e-6)


def test_predict_and_fine_tuning_read_the_average_of_a_run(ema_run):
  workdir, _, config = ema_run
  setup = run_setup.Setup(config)
  state, _, _ = Checkpointer(os.path.join(workdir, "checkpoints")).restore(setup.abstract_state())
  expected = train_step.averaged_variables(state)
  variables, run_config = finetune.read_run_variables(workdir)
  assert run_config["ema_decay"] == 0.8
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(variables), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-7)
  _, _, predicted_with = load_run(workdir)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(predicted_with), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-7)


def test_a_run_without_its_config_json_cannot_debias_its_average(ema_run, tmp_path):
  import shutil

  workdir, _, _ = ema_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, "config.json"))
  with pytest.raises(CheckpointError, match="ema_decay"):
    finetune.read_run_variables(copy)


def test_the_decay_cannot_change_on_resume_and_an_older_run_resumes_without_it(tmp_path):
  config = tiny_config(ema_decay=0.9)
  workdir = str(tmp_path / "run")
  assert train_loop.train_and_evaluate(config, workdir, log=_quiet, stop_at_step=4) is None
  with pytest.raises(ConfigError, match=r"ema_decay = 0.5 differs from 0.9.*--config.ema_decay=0.9"):
    train_loop.train_and_evaluate(tiny_config(ema_decay=0.5), workdir, log=_quiet)
  with pytest.raises(ConfigError, match=r"ema_decay = 0.0 differs from 0.9"):
    train_loop.train_and_evaluate(tiny_config(), workdir, log=_quiet)
  # A run started before config.ema_decay existed has no such key: it had the default (none) and resumes.
  older = str(tmp_path / "older")
  assert train_loop.train_and_evaluate(tiny_config(), older, log=_quiet, stop_at_step=4) is None
  path = os.path.join(older, "config.json")
  with open(path) as f:
    saved = json.load(f)
  del saved["ema_decay"]
  with open(path, "w") as f:
    json.dump(saved, f)
  _drop_key_from_checkpoint_metadata(older, "ema_decay")
  summary = train_loop.train_and_evaluate(tiny_config(), older, log=_quiet)
  assert summary["steps"] == 8 and "unaveraged_test_accuracy" not in summary


def _drop_key_from_checkpoint_metadata(workdir: str, key: str) -> None:
  """Remove ``key`` from the run config that each checkpoint's metadata records, as an older version wrote it."""
  for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "meta", "metadata")):
    with open(path) as f:
      meta = json.load(f)
    del meta["config"][key]
    with open(path, "w") as f:
      json.dump(meta, f)


def test_debiasing_divides_by_one_minus_the_decay_to_the_count():
  moment = {"a": jnp.asarray([0.5, 1.0], jnp.float32)}
  got = train_step.debiased_average(moment, 0.9, 3)
  np.testing.assert_allclose(np.asarray(got["a"]), np.asarray([0.5, 1.0]) / (1 - 0.9**3), rtol=1e-6)
