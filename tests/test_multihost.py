"""Multi-host training, for real: several processes on this machine, each with its own CPU devices,
joined by ``jax.distributed`` (coordinator on a free localhost port, gloo collectives); see
tests/multihost.py. Every test has a deadline, and every process it starts is killed at the end.

- 2 processes x 2 devices train exactly as 1 process x 4 devices and as 1 x 1 (to the tolerance of
  tests/test_multidevice.py); each process loads only its slice of every global batch, and an
  evaluation counts every test example once;
- a run stopped at a checkpoint and resumed on 2 processes ends bitwise equal to an uninterrupted one;
  resumed on 1 process x 4 devices or on 4 processes x 1 device, it reads the same global batches;
- a process killed with SIGKILL stops the others within a bounded time with one ``error:`` line, and
  the next launch resumes from the newest complete checkpoint;
- bad distributed settings (process id out of range, a coordinator nobody listens on, mismatched
  num_processes) end every process with one ``error:`` line and a non-zero status.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
import portpicker
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost  # noqa: E402
from multihost import Processes, child_argvs, child_outputs, describe, distributed_flags  # noqa: E402
from test_train import tiny_config  # noqa: E402

from resnet_jax import data as data_lib  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # every test here; the longer ones set their own

# As tests/test_multidevice.py: the losses of another device layout agree to float tolerance.
LOSS_RTOL, LOSS_ATOL = 2e-5, 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-4, 2e-5


def _config():
  """8 steps of resnet20 (4 filters) on 48 digits, global batch 8; evaluation of the 20 test digits in
  batches of 12 (the last one padded) at steps 4 and 8, with checkpoints there."""
  return tiny_config("resnet20", num_train_steps=8, log_every_steps=1, eval_every_steps=4, checkpoint_every_steps=4)


# ----------------------------------------------------------------------------------------------
# The slices of each process (in-process: the pipelines are pure functions of process index/count).


@pytest.mark.parametrize("processes", [2, 4])
def test_train_slices_are_disjoint_and_cover_the_global_batch(processes):
  ds = data_lib.load_dataset(tiny_config().dataset, progress=False)
  whole = iter(data_lib.train_pipeline(ds, 8, 3, 0, 1, num_threads=1))
  parts = [iter(data_lib.train_pipeline(ds, 8, 3, p, processes, num_threads=1)) for p in range(processes)]
  for _ in range(8):  # more than one epoch of 48 / 8 batches
    batch = next(whole)
    slices = [next(it) for it in parts]
    assert all(len(s["label"]) == 8 // processes for s in slices)
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), batch[key])
    rows = [{x.tobytes() for x in s["image"]} for s in slices]
    assert sum(len(r) for r in rows) == len(set().union(*rows)) == 8  # disjoint, and all of the batch


@pytest.mark.parametrize("processes,batch", [(2, 12), (4, 12), (3, 9), (2, 40)])
def test_evaluation_slices_count_every_example_once(processes, batch):
  ds = data_lib.load_dataset(tiny_config().dataset, progress=False)  # 20 test examples
  assert ds.num_test == 20
  whole = ds.test_batch(np.arange(ds.num_test))["image"]
  seen = []
  for p in range(processes):
    for b in data_lib.eval_batches(ds, batch, p, processes, num_threads=1):
      assert len(b["mask"]) == batch // processes
      for x, m in zip(b["image"], b["mask"]):
        if m:
          seen.append(int(np.flatnonzero((whole == x).all(axis=(1, 2, 3)))[0]))
  assert sorted(seen) == list(range(ds.num_test))


# ----------------------------------------------------------------------------------------------
# Equivalence and checkpoints across processes.


def _spec(workdir, **kw):
  return {"config": _config().to_dict(), "workdir": str(workdir), **kw}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """2 processes x 2 devices (8 steps), and alone: 1 process on 4 and on 1 device, run side by side;
  then 2 x 2 stopped at the checkpoint of step 4."""
  tmp = tmp_path_factory.mktemp("multihost")
  two = child_argvs(_spec(tmp / "two", batches=2, evaluate_init=True), 2, str(tmp / "two.json"))
  one = child_argvs(_spec(tmp / "one", batches=2, evaluate_init=True, device_counts=[4, 1]), 1, str(tmp / "one.json"))
  with Processes(two, 2, str(tmp), "two") as ps2, Processes(one, 4, str(tmp), "one") as ps1:
    r2, r1 = ps2.wait(240), ps1.wait(240)
  assert all(r.returncode == 0 for r in r2 + r1), describe(r2 + r1)
  stop = child_argvs(_spec(tmp / "stopped", stop_at_step=4), 2, str(tmp / "stop.json"))
  stopped = multihost.run(stop, 2, str(tmp), timeout=180, name="stop")
  return {"tmp": tmp, "two": child_outputs(r2), "one": child_outputs(r1)[0], "stopped": child_outputs(stopped)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_train_as_one(runs):
  two, one = runs["two"], runs["one"]
  assert [(o["process_index"], o["process_count"], o["devices"], o["local_devices"]) for o in two] == [
    (0, 2, 4, 2),
    (1, 2, 4, 2),
  ]
  assert (one["4"]["devices"], one["1"]["devices"]) == (4, 1)
  loss = two[0]["train_loss"]
  assert len(loss) == 8 and two[0]["train_steps"] == list(range(1, 9))
  for alone in (one["4"], one["1"]):
    np.testing.assert_allclose(loss, alone["train_loss"], rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert [t[2] for t in two[0]["test"]] == [t[2] for t in alone["test"]]
    for a, b in zip(two[0]["params"], alone["params"]):
      np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL)
  assert two[0]["state"] == two[1]["state"]  # The replicated state is the same in both processes.


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_process_loads_its_slice_and_evaluation_counts_each_example_once(runs):
  two, one = runs["two"], runs["one"]["4"]
  for k in range(2):
    whole = one["batches"][k]
    mine = [o["batches"][k] for o in two]
    assert [len(m["rows"]) for m in mine] == [4, 4]
    assert mine[0]["rows"] + mine[1]["rows"] == whole["rows"]  # disjoint slices, covering the batch
    assert not set(mine[0]["rows"]) & set(mine[1]["rows"])
    assert mine[0]["label"] + mine[1]["label"] == whole["label"]
  for o in two:  # 20 test examples in batches of 12: the second batch has 8, 6 + 2 over the processes.
    assert o["eval_init"]["count"] == 20
    np.testing.assert_allclose(o["eval_init"]["loss"], one["eval_init"]["loss"], rtol=1e-5)
    assert o["eval_init"]["accuracy"] == one["eval_init"]["accuracy"]


def _resume(runs, name, processes, devices, timeout=240):
  tmp = runs["tmp"]
  workdir = tmp / name
  shutil.copytree(tmp / "stopped", workdir)
  argvs = child_argvs(_spec(workdir), processes, str(tmp / f"{name}.json"))
  results = multihost.run(argvs, devices, str(tmp), timeout=timeout, name=name)
  return child_outputs(results)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_on_two_processes_is_bitwise_equal_to_an_uninterrupted_run(runs):
  stopped = runs["stopped"]
  assert [(o["step"], o["finished"]) for o in stopped] == [(4, False), (4, False)]
  assert stopped[0]["train_loss"] == runs["two"][0]["train_loss"][:4]
  resumed = _resume(runs, "resumed2", 2, 2)
  ref = runs["two"][0]
  assert [o["step"] for o in resumed] == [8, 8]
  assert resumed[0]["state"] == resumed[1]["state"] == ref["state"]
  assert resumed[0]["train_loss"] == ref["train_loss"]
  assert resumed[0]["test"] == ref["test"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_with_four_steps_per_call_train_as_one_step_per_call(runs):
  tmp = runs["tmp"]
  config = _config()
  config.steps_per_call = config.log_every_steps = 4  # Steps 1-4 and 5-8, one call each, one record each.
  spec = {"config": config.to_dict(), "workdir": str(tmp / "calls")}
  out = child_outputs(multihost.run(child_argvs(spec, 2, str(tmp / "calls.json")), 2, str(tmp), timeout=240))
  alone = runs["one"]["1"]  # One step per call, one record per step.
  assert [o["step"] for o in out] == [8, 8] and out[0]["state"] == out[1]["state"]
  np.testing.assert_allclose(
    out[0]["train_loss"], np.reshape(alone["train_loss"], (2, 4)).mean(1), rtol=LOSS_RTOL, atol=LOSS_ATOL
  )
  assert [t[2] for t in out[0]["test"]] == [t[2] for t in alone["test"]]
  for a, b in zip(out[0]["params"], alone["params"], strict=True):
    np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("processes,devices", [(1, 4), (4, 1)])
def test_resume_on_another_number_of_processes_reads_the_same_batches(runs, processes, devices):
  """The global batch of each step is a function of the seed and the step only; the number of
  processes only says which process loads which slice. On the same 4 devices the run goes on as it
  would have on 2 processes."""
  resumed = _resume(runs, f"resumed{processes}x{devices}", processes, devices)
  ref = runs["two"][0]
  assert [o["step"] for o in resumed] == [8] * processes
  assert all(o["data_state"] == resumed[0]["data_state"] for o in resumed)
  np.testing.assert_allclose(resumed[0]["train_loss"], ref["train_loss"], rtol=LOSS_RTOL, atol=LOSS_ATOL)
  assert resumed[0]["train_loss"][:4] == ref["train_loss"][:4]  # kept from the first 4 steps
  assert [t[2] for t in resumed[0]["test"]] == [t[2] for t in ref["test"]]
  for a, b in zip(resumed[0]["params"], ref["params"]):
    np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL)


# ----------------------------------------------------------------------------------------------
# Failures: train.py, as a user runs it.


def _train_argv(config_path, workdir, *flags):
  return [sys.executable, multihost.TRAIN, f"--config={config_path}", f"--workdir={workdir}", *flags]


def _one_error_line(result):
  lines = result.error_lines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Check failed" not in result.stderr, result.stderr[-3000:]
  return lines[0]


def test_a_checkpoint_thread_traceback_for_a_lost_process_is_dropped_and_other_errors_are_logged(caplog):
  """orbax's checkpoint thread logs the barrier that failed when another process died (with traceback);
  the main thread reports that error in one line, so the record is dropped. Other errors still log."""
  from absl import logging as absl_logging

  from resnet_jax.distributed import LOST_PROCESS, drop_lost_process_tracebacks

  drop_lost_process_tracebacks()
  drop_lost_process_tracebacks()  # Once per process, however often it is called.
  absl = logging.getLogger("absl").filters
  assert sum(getattr(f, "reason", None) == LOST_PROCESS for f in absl) == 1
  for message in (
    "UNKNOWN: Gloo AllGather failed: [pair.cc:538] Read error [127.0.0.1]:35513: Connection reset by peer",
    "a bug in a checkpoint thread",
  ):
    try:
      raise ValueError(message)
    except ValueError:
      absl_logging.exception("_SignalingThread.run() raised an exception")
  logged = [r.exc_info[1].args[0] for r in caplog.records if r.exc_info]
  assert logged == ["a bug in a checkpoint thread"]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_others_and_the_next_launch_resumes(tmp_path, victim):
  config = tiny_config(
    num_train_steps=100000, log_every_steps=5, eval_every_steps=100000, checkpoint_every_steps=5, keep_checkpoints=2
  )
  path = multihost.write_config(str(tmp_path / "config.py"), config)
  workdir = tmp_path / "run"
  port = portpicker.pick_unused_port()
  argvs = [_train_argv(path, workdir, *distributed_flags(port, i, 2, heartbeat_s=10)) for i in range(2)]
  ckpts = workdir / "checkpoints"
  with Processes(argvs, 1, str(tmp_path), "run") as ps:
    deadline = time.monotonic() + 180
    while (
      time.monotonic() < deadline
      and not (ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts)))
      and all(c is None for c in ps.poll())
    ):
      time.sleep(0.2)
    assert all(c is None for c in ps.poll()), describe(ps.results())
    assert ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts)), "no checkpoint in 180 s"
    killed_at = time.monotonic() - ps.start_time
    ps.kill(victim)
    results = ps.wait(killed_at + 60, stop_all_on_failure=False)
  survivor = results[1 - victim]
  assert survivor.returncode not in (None, 0), describe(results)
  assert survivor.seconds - killed_at < 45, describe(results)
  line = _one_error_line(survivor)
  assert line.startswith(f"error: process {1 - victim} of 2:"), line

  steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  newest = steps[-1]
  port = portpicker.pick_unused_port()
  again = [
    _train_argv(path, workdir, *distributed_flags(port, i, 2), f"--config.num_train_steps={newest + 3}")
    for i in range(2)
  ]
  results = multihost.run(again, 1, str(tmp_path), timeout=180, name="again")
  assert f"from step {newest}" in results[0].stdout, results[0].stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == newest + 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("after_s", [pytest.param(2, marks=pytest.mark.slow), 6])
def test_a_process_killed_during_start_up_ends_the_other_with_one_line(tmp_path, after_s):
  """Process 1 killed during its start (importing, connecting, loading, compiling): process 0 ends
  within the initialization or heartbeat timeout (5 s each here), with one line instead of jax's stack
  dump. The run is long enough (100000 steps) that no machine finishes it before the kill."""
  config = tiny_config(
    num_train_steps=100000,
    log_every_steps=100,
    eval_every_steps=100000,
    checkpoint_every_steps=100000,
    on_nonfinite="skip",
    **{"optimizer.learning_rate": 0.01},
  )
  path = multihost.write_config(str(tmp_path / "config.py"), config)
  port = portpicker.pick_unused_port()
  argvs = [
    _train_argv(path, tmp_path / "run", *distributed_flags(port, i, 2, timeout_s=5, heartbeat_s=5)) for i in range(2)
  ]
  with Processes(argvs, 1, str(tmp_path)) as ps:
    time.sleep(after_s)
    ps.kill(1)
    results = ps.wait(60, stop_all_on_failure=False)
  survivor = results[0]
  assert survivor.returncode not in (None, 0), describe(results)
  assert survivor.seconds < 45, describe(results)
  assert _one_error_line(survivor).startswith("error: process 0 of 2: "), describe(results)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path):
  config = tiny_config(
    num_train_steps=100000,
    log_every_steps=5,
    eval_every_steps=100000,
    checkpoint_every_steps=50,
    on_nonfinite="skip",
    **{"optimizer.learning_rate": 0.01},
  )
  path = multihost.write_config(str(tmp_path / "config.py"), config)
  workdir = tmp_path / "run"
  port = portpicker.pick_unused_port()
  argvs = [_train_argv(path, workdir, *distributed_flags(port, i, 2)) for i in range(2)]
  with Processes(argvs, 1, str(tmp_path), "run") as ps:
    deadline = time.monotonic() + 180
    while (
      time.monotonic() < deadline and not (workdir / "metrics.jsonl").is_file() and all(c is None for c in ps.poll())
    ):
      time.sleep(0.2)
    while (
      time.monotonic() < deadline and not (workdir / "metrics.jsonl").read_text() and all(c is None for c in ps.poll())
    ):
      time.sleep(0.2)
    assert all(c is None for c in ps.poll()), describe(ps.results())
    ps.kill(1, signal.SIGTERM)
    results = ps.wait(time.monotonic() - ps.start_time + 60, stop_all_on_failure=False)
  assert [r.returncode for r in results] == [143, 143], describe(results)
  lines = [r.stderr.strip().splitlines()[-1] for r in results]
  steps = [int(re.search(r"stopped by SIGTERM after step (\d+) of 100000", l).group(1)) for l in lines]
  assert steps[0] == steps[1], lines
  assert (workdir / "checkpoints" / str(steps[0])).is_dir()


def test_process_id_out_of_range_is_refused_before_connecting(tmp_path):
  path = multihost.write_config(str(tmp_path / "config.py"), tiny_config())
  argv = _train_argv(path, tmp_path / "run", *distributed_flags(portpicker.pick_unused_port(), 2, 2))
  with Processes([argv], 1, str(tmp_path)) as ps:
    [result] = ps.wait(60)
  assert result.returncode == 2, describe([result])
  line = _one_error_line(result)
  assert "config.distributed.process_id = 2 with num_processes = 2" in line
  assert "[0, num_processes)" in line


@pytest.mark.parametrize("address", ["localhost", "localhost:99999", "host:port"])
def test_malformed_coordinator_address_is_refused_before_connecting(tmp_path, address):
  path = multihost.write_config(str(tmp_path / "config.py"), tiny_config())
  flags = [
    f if "coordinator_address" not in f else f"--config.distributed.coordinator_address={address}"
    for f in distributed_flags(1, 0, 2)
  ]
  with Processes([_train_argv(path, tmp_path / "run", *flags)], 1, str(tmp_path)) as ps:
    [result] = ps.wait(60)
  assert result.returncode == 2, describe([result])
  assert "expected HOST:PORT" in _one_error_line(result)


@pytest.mark.timeout(120)
def test_coordinator_nobody_listens_on_ends_within_the_initialization_timeout(tmp_path):
  """Process 1 of 2 pointed at a port where no coordinator runs."""
  path = multihost.write_config(str(tmp_path / "config.py"), tiny_config())
  flags = distributed_flags(portpicker.pick_unused_port(), 1, 2, timeout_s=3)
  with Processes([_train_argv(path, tmp_path / "run", *flags)], 1, str(tmp_path)) as ps:
    [result] = ps.wait(60)
  assert result.returncode not in (None, 0), describe([result])  # 134: jax's runtime aborts it
  assert result.seconds < 40, describe([result])
  line = _one_error_line(result)
  assert line.startswith("error: process 1 of 2: jax's distributed runtime ended this process"), line
  assert "not every process connected to the coordinator localhost:" in line, line


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("counts", [(2, 3), (3, 2)])
def test_mismatched_num_processes_ends_every_process(tmp_path, counts):
  """Process 0 and process 1 disagree on num_processes: when process 0 (the coordinator) expects
  more, nobody connects in time; when it expects fewer, the configs differ."""
  path = multihost.write_config(str(tmp_path / "config.py"), tiny_config())
  port = portpicker.pick_unused_port()
  argvs = [
    _train_argv(path, tmp_path / "run", *distributed_flags(port, i, n, timeout_s=5)) for i, n in enumerate(counts)
  ]
  with Processes(argvs, 1, str(tmp_path)) as ps:
    # Each ends within seconds of its init timeout on an idle machine; the margin is for a loaded one.
    results = ps.wait(150, stop_all_on_failure=False)
  assert all(r.returncode not in (None, 0) for r in results), describe(results)
  for r in results:
    line = _one_error_line(r)
    assert re.search(r"num_processes|jax.distributed.initialize failed", line), line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_time_budget_gives_every_process_the_steps_that_process_0_chose(tmp_path):
  """Two processes measure the machine with the same collective steps, train the steps process 0 chose
  (fewer than the config's), and end together."""
  config = tiny_config(
    "resnet20", num_train_steps=100000, log_every_steps=50, eval_every_steps=1000, checkpoint_every_steps=1000
  )
  config.time_budget_minutes = 0.75
  path = multihost.write_config(str(tmp_path / "config.py"), config)
  workdir = tmp_path / "run"
  port = portpicker.pick_unused_port()
  argvs = [_train_argv(path, workdir, *distributed_flags(port, i, 2)) for i in range(2)]
  results = multihost.run(argvs, 1, str(tmp_path), timeout=240, name="budget")
  assert all(r.returncode == 0 for r in results), describe(results)
  record = json.loads((workdir / "time_budget.json").read_text())
  summary = json.loads((workdir / "summary.json").read_text())
  assert 1 <= record["steps"] < 100000 and summary["steps"] == record["steps"]
  assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == record["steps"]
  assert not (workdir / ".time_budget_probe").exists()
