"""config.time_budget_minutes (resnet_jax.time_budget): the steps that fit, the schedule shortened with
them, the choice recorded and kept on resume, and a run of the chosen config equal to the budgeted run."""

from __future__ import annotations

import json
import os
import sys

import ml_collections
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resnet_jax import metrics, optim, time_budget, train_loop
from resnet_jax.config_check import base_config, validate_config
from resnet_jax.errors import ConfigError
from resnet_jax.time_budget import Timings, run_cost, scale_to_steps, steps_that_fit

sys.path.insert(0, os.path.dirname(__file__))
from test_configs import assert_one_line_error  # noqa: E402
from test_reliability import tiny_args, train_cli  # noqa: E402
from test_train import tiny_config  # noqa: E402

timings = st.builds(
  Timings,
  step_s=st.floats(1e-3, 10.0),
  compile_s=st.floats(0.0, 60.0),
  eval_s=st.floats(0.0, 60.0),
  checkpoint_s=st.floats(0.0, 10.0),
)


@given(
  t=timings,
  budget=st.floats(1.0, 1e5),
  elapsed=st.floats(0.0, 1e3),
  total=st.integers(1, 100_000),
  eval_every=st.integers(1, 5000),
  ckpt_every=st.integers(1, 5000),
  margin=st.floats(0.0, 0.5),
)
def test_steps_that_fit_are_the_most_that_fit(t, budget, elapsed, total, eval_every, ckpt_every, margin):
  n = steps_that_fit(budget, elapsed, t, total, eval_every, ckpt_every, margin)
  left = (1 - margin) * budget - elapsed - t.compile_s
  assert 0 <= n <= total
  assert n == 0 or run_cost(n, t, eval_every, ckpt_every) <= left
  assert n == total or run_cost(n + 1, t, eval_every, ckpt_every) > left
  more = steps_that_fit(2 * budget, elapsed, t, total, eval_every, ckpt_every, margin)
  assert more >= n


def test_run_cost_counts_the_evaluation_and_checkpoint_after_the_last_step():
  t = Timings(step_s=1.0, compile_s=0.0, eval_s=10.0, checkpoint_s=100.0)
  assert run_cost(0, t, 4, 8) == 0.0
  assert run_cost(8, t, 4, 8) == 8 + 2 * 10 + 100
  assert run_cost(9, t, 4, 8) == 9 + 3 * 10 + 2 * 100  # steps 4, 8, 9 evaluate; 8 and 9 save


def _schedule(c: ml_collections.ConfigDict, steps_per_epoch: int):
  total = optim.total_train_steps(c, steps_per_epoch)
  return total, optim.make_schedule(c, steps_per_epoch, total)


@pytest.mark.parametrize("name,warmup,boundaries", [("linear", 5.0, ()), ("step", 1.0, (20.0, 40.0))])
def test_the_shortened_schedule_has_the_shape_of_the_configs(name, warmup, boundaries):
  c = base_config()
  c.num_epochs, c.schedule.name, c.schedule.warmup, c.schedule.boundaries = 50.0, name, warmup, boundaries
  per_epoch = 100
  total, full = _schedule(c, per_epoch)
  short_c = scale_to_steps(c, 1250, total)
  validate_config(short_c)
  n, short = _schedule(short_c, per_epoch)
  assert n == 1250 and short_c.num_epochs == pytest.approx(12.5)
  assert short_c.schedule.warmup == pytest.approx(warmup / 4)
  assert short_c.schedule.boundaries == pytest.approx(tuple(b / 4 for b in boundaries))
  for k in range(0, n, 25):  # The short schedule at step k is the full one at 4k.
    assert float(short(k)) == pytest.approx(float(full(4 * k)), abs=1e-6), k
  assert float(short(0)) == 0.0 and float(short(n)) == pytest.approx(float(full(total)), abs=1e-6)


def test_a_resume_keeps_the_lengths_that_the_budget_chose_and_only_those():
  c = base_config()
  c.time_budget_minutes = 45.0
  chosen = scale_to_steps(c, 700, 2000)
  saved = chosen.to_dict()
  saved["optimizer"]["learning_rate"] = 7.0  # not a length: stays as the config says
  resolved = time_budget.resolve_on_resume(c, saved)
  assert resolved.num_train_steps == 700 and resolved.num_epochs == chosen.num_epochs
  assert resolved.schedule.warmup == chosen.schedule.warmup
  assert resolved.optimizer.learning_rate == c.optimizer.learning_rate
  other = base_config()
  other.time_budget_minutes = 30.0  # another budget, or none: the config as it is
  assert time_budget.resolve_on_resume(other, saved).to_dict() == other.to_dict()
  assert time_budget.resolve_on_resume(base_config(), saved).to_dict() == base_config().to_dict()


@pytest.mark.parametrize("key,value", [("time_budget_minutes", -1.0), ("time_budget_margin", 0.6)])
def test_bad_budget_settings_are_refused(key, value):
  c = base_config()
  c[key] = value
  with pytest.raises(ConfigError, match=key):
    validate_config(c)


def _train(config, workdir, **kwargs):
  return train_loop.train_and_evaluate(config, str(workdir), log=lambda *_: None, **kwargs)


def _trained(workdir) -> list[tuple]:
  """Every record of the run's metrics.jsonl but its timings: (step, split, loss, accuracy, learning rate)."""
  return [
    (r["step"], r["split"], r["loss"], r["accuracy"], r.get("learning_rate"))
    for r in metrics.read_metrics(str(workdir))
  ]


@pytest.mark.slow  # about a minute: the budgeted run, then the same steps again without a budget
def test_a_budget_shortens_the_run_to_what_fits_and_equals_a_run_of_the_config_it_chose(tmp_path):
  # 100,000 steps take about 4 minutes here (2-3 ms each); a budget of 30 s holds far fewer, and leaves time to train
  # where loading and compiling are slow (10 s before the first step on a loaded machine, and as much again
  # predicted for compiling the chosen config).
  config = tiny_config(num_train_steps=100_000, eval_every_steps=500, checkpoint_every_steps=500, log_every_steps=50)
  config.schedule.warmup = 10_000.0
  config.optimizer.learning_rate = 0.01  # a lower peak: the run may reach it and stay there for hundreds of steps
  config.time_budget_minutes = 0.5
  summary = _train(config, tmp_path / "budget")
  record = json.loads((tmp_path / "budget" / time_budget.BUDGET_FILE).read_text())
  chosen = json.loads((tmp_path / "budget" / "config.json").read_text())
  steps = record["steps"]
  assert 1 <= steps < 100_000 and record["config_steps"] == 100_000
  assert summary["steps"] == steps and chosen["num_train_steps"] == steps
  assert chosen["schedule"]["warmup"] == pytest.approx(10_000.0 * steps / 100_000)
  assert summary["wall_time_s"] <= 2 * record["budget_s"]  # what it predicted, give or take the machine's moods
  assert record["predicted_wall_time_s"] <= record["budget_s"]
  assert not (tmp_path / "budget" / time_budget.PROBE_DIR).exists()

  # The same steps with no budget: the run of the config it chose, equal to the last bit.
  plain = ml_collections.ConfigDict(chosen)
  plain.time_budget_minutes = 0.0
  again = _train(plain, tmp_path / "plain")
  assert again["steps"] == steps and again["test_accuracy"] == summary["test_accuracy"]
  trained = _trained(tmp_path / "budget")
  assert trained == _trained(tmp_path / "plain") and trained[-1][0] == steps


@pytest.mark.slow  # about 30 s: the resumed run trains for what is left of its half-minute budget
def test_an_interrupted_budgeted_run_resumes_with_its_steps_and_measures_nothing_again(tmp_path):
  config = tiny_config(num_train_steps=100_000, eval_every_steps=500, checkpoint_every_steps=4, log_every_steps=4)
  config.optimizer.learning_rate = 0.01
  # Enough for more than 4 steps where loading and compiling are slow (the oldest releases on a loaded
  # 2-core machine took 10 s before the first step, and predicted 10 s more for compiling it again).
  config.time_budget_minutes = 0.5
  assert _train(config, tmp_path / "run", stop_at_step=4) is None
  record_file = tmp_path / "run" / time_budget.BUDGET_FILE
  first = record_file.read_text()
  steps = json.loads(first)["steps"]
  assert 4 < steps < 100_000  # the budget chose its steps, fewer than the config's
  summary = _train(config, tmp_path / "run")
  assert summary["steps"] == steps
  assert record_file.read_text() == first


def test_a_budget_that_holds_every_step_changes_nothing(tmp_path):
  config = tiny_config(num_train_steps=8)
  config.time_budget_minutes = 30.0
  summary = _train(config, tmp_path / "run")
  record = json.loads((tmp_path / "run" / time_budget.BUDGET_FILE).read_text())
  assert summary["steps"] == record["steps"] == record["config_steps"] == 8
  assert json.loads((tmp_path / "run" / "config.json").read_text())["num_train_steps"] == 8


def test_train_py_refuses_a_budget_spent_before_the_first_step_in_one_line(tmp_path):
  proc = train_cli(tmp_path / "run", *tiny_args(steps=50), "--config.time_budget_minutes=0.001")
  assert_one_line_error(proc, "time_budget_minutes = 0.001", "leaves no time to train")
