"""Several training steps per compiled call (``config.steps_per_call``): the run trains as with one step per
call (the same batches in the same order, records, evaluations and checkpoints at the same steps, the
same numbers to float rounding), calls end at every periodic action, and a run interrupted between two of
its calls resumes bitwise."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

from resnet_jax import metrics, run_setup, time_budget, train_loop
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.config_check import validate_config
from resnet_jax.errors import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import tiny_config  # noqa: E402


def _quiet(*_):
  pass


def _config(steps_per_call: int, model: str = "residual_mlp", **overrides):
  """11 steps; records every 5, evaluations and checkpoints every 4: periodic actions at steps 4, 5, 8,
  10, 11, so that calls of 3 steps must end early."""
  settings = {"log_every_steps": 5, "eval_every_steps": 4, "checkpoint_every_steps": 4, **overrides}
  return tiny_config(
    model, num_train_steps=11, keep_checkpoints=10, steps_per_call=steps_per_call, log_grad_norms=True, **settings
  )


def _records(workdir):
  return [
    {k: v for k, v in r.items() if k not in ("images_per_sec", "wall_time_s")} for r in metrics.read_metrics(workdir)
  ]


def _counting(setup):
  """``setup`` whose :meth:`train_call` records how many batches each call takes."""
  calls, call = [], setup.train_call

  def counted(state, batches):
    calls.append(len(batches))
    return call(state, batches)

  setup.train_call = counted
  return setup, calls


def _state(workdir, setup, step=None):
  return Checkpointer(os.path.join(workdir, "checkpoints")).restore(setup.abstract_state(), step)


@pytest.mark.parametrize(
  "model, augment_on, ema_decay",
  [
    ("residual_mlp", "host", 0.5),
    ("resnet9", "device", 0.0),  # a convolutional network with BatchNorm, its batches made on the device
    pytest.param("resnet20", "device", 0.0, marks=pytest.mark.slow),  # the paper's net: 2.3 times as long (22 s)
  ],
)
def test_several_steps_per_call_train_as_one_step_per_call(model, augment_on, ema_decay, tmp_path):
  overrides = {"dataset.augment_on": augment_on, "ema_decay": ema_decay}
  one_setup, one_calls = _counting(run_setup.Setup(_config(1, model, **overrides)))
  three_setup, three_calls = _counting(run_setup.Setup(_config(3, model, **overrides)))
  one = train_loop.train_and_evaluate(one_setup.config, str(tmp_path / "one"), log=_quiet, setup=one_setup)
  three = train_loop.train_and_evaluate(three_setup.config, str(tmp_path / "three"), log=_quiet, setup=three_setup)

  assert one_calls == [1] * 11
  assert three_calls == [3, 1, 1, 3, 2, 1]  # Up to 3 steps, ending at 4, 5, 8, 10 and 11.
  assert three["steps"] == one["steps"] == 11
  a, b = _records(tmp_path / "one"), _records(tmp_path / "three")
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  assert [r["step"] for r in a if r["split"] == "test"] == [4, 8, 11]
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    assert x.get("nonfinite_steps") == y.get("nonfinite_steps")
    for key in x:
      if key not in ("step", "split"):
        np.testing.assert_allclose(y[key], x[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} at step {x['step']}")
  for step in (4, 8, 11):  # The same checkpoints: state, data iterator position.
    sa, da, _ = _state(tmp_path / "one", one_setup, step)
    sb, db, _ = _state(tmp_path / "three", three_setup, step)
    assert int(sa.step) == int(sb.step) == step and da == db
    for x, y in zip(
      jax.tree.leaves((sa.params, sa.batch_stats, sa.ema)),
      jax.tree.leaves((sb.params, sb.batch_stats, sb.ema)),
      strict=True,
    ):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_a_run_stopped_within_its_calls_resumes_bitwise(tmp_path):
  config = _config(3, eval_every_steps=100, checkpoint_every_steps=100, log_every_steps=100)
  setup, calls = _counting(run_setup.Setup(config))
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  train_loop.train_and_evaluate(config, full, log=_quiet, setup=setup)
  assert calls == [3, 3, 3, 2]
  del calls[:]
  assert train_loop.train_and_evaluate(config, split, log=_quiet, stop_at_step=7, setup=setup) is None
  train_loop.train_and_evaluate(config, split, log=_quiet, setup=setup)
  assert calls == [3, 3, 1, 3, 1]  # Stopped after 7, resumed from its checkpoint: other calls, same steps.
  a, data_a, _ = _state(full, setup)
  b, data_b, _ = _state(split, setup)
  assert int(a.step) == int(b.step) == 11 and data_a == data_b
  for x, y in zip(
    jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
    jax.tree.leaves((b.params, b.batch_stats, b.opt_state)),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  test = [[r for r in _records(w) if r["split"] == "test"] for w in (full, split)]
  assert test[0] == test[1] and len(test[0]) == 1


def test_the_time_budget_times_the_steps_as_the_run_calls_them(tmp_path):
  setup, calls = _counting(run_setup.Setup(_config(4)))
  timings = time_budget.measure(setup, str(tmp_path), warmup_steps=2, min_seconds=0.0)
  assert set(calls) == {4} and len(calls) == 1 + 1 + 1  # the first (compiling) call, the warmup, 4 >= 3 steps
  assert timings.step_s > 0 and timings.compile_s >= 0


def test_train_call_takes_one_batch_or_up_to_steps_per_call():
  one, four = run_setup.Setup(_config(1)), run_setup.Setup(_config(4))
  it = one.train_iterator()
  batches = [next(it) for _ in range(5)]
  with pytest.raises(ValueError, match="expected 1"):
    one.train_call(one.init_state(_quiet), batches[:2])
  with pytest.raises(ValueError, match="expected 1 to 4"):
    four.train_call(four.init_state(_quiet), batches)
  _, stacked = four.train_call(four.init_state(_quiet), batches[:2])
  assert stacked["loss"].shape == (4,) and np.all(np.asarray(stacked["loss"])[2:] == 0)


@pytest.mark.parametrize("value", [0, -2])
def test_steps_per_call_must_be_a_positive_integer(value):
  with pytest.raises(ConfigError, match="steps_per_call"):
    validate_config(tiny_config(steps_per_call=value))


def test_steps_per_call_may_change_on_resume(tmp_path):
  one, three = _config(1), _config(3)
  workdir = str(tmp_path / "run")
  assert train_loop.train_and_evaluate(one, workdir, log=_quiet, stop_at_step=5) is None
  messages = []
  summary = train_loop.train_and_evaluate(three, workdir, log=messages.append)
  assert summary["steps"] == 11 and summary["config"]["steps_per_call"] == 3
  assert any("settings changed at step 5" in m and "steps_per_call" in m for m in messages), messages
  train_loop.train_and_evaluate(one, str(tmp_path / "plain"), log=_quiet)
  a, b = _records(tmp_path / "plain"), _records(workdir)
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5, atol=1e-6)


def test_a_warning_where_xla_compiles_the_cpu_convolutions_inside_the_loop():
  warn = run_setup.steps_per_call_warning
  assert "steps_per_call = 4 with XLA's convolutions on the CPU" in warn(
    _config(4, "resnet20", **{"model.conv_backend": "xla"}), "cpu"
  )
  assert warn(_config(4, "resnet20"), "cpu", device_count=2)  # auto means XLA on several devices
  assert warn(_config(4, "resnet20"), "cpu") is None  # oneDNN's convolutions on one device
  assert warn(_config(1, "resnet20", **{"model.conv_backend": "xla"}), "cpu") is None
  assert warn(_config(4, "resnet20", **{"model.conv_backend": "xla"}), "gpu") is None
  assert warn(_config(4, "residual_mlp"), "cpu", device_count=2) is None  # no convolutions
