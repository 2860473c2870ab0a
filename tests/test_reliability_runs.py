"""Reliability of whole runs: NaN never kept, one run per workdir, the superseded run kept, the settings
of a resumed run, full or read-only disks, damaged run files, and SIGTERM / SIGINT.

Processes and signals are real: ``train.py`` runs in a subprocess (the helpers of
``test_reliability.py``), the lock is held by another process, the signals are sent with ``os.kill``.
Full and read-only disks are real too: a small tmpfs mounted in a private mount namespace
(``unshare``), where the machine allows it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import create_model, metrics, optim, run_setup, train_loop, train_step
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.config_check import validate_config
from resnet_jax.errors import CheckpointError, ConfigError, ModelError, WorkdirBusyError
from resnet_jax.evaluate import load_run_config

sys.path.insert(0, os.path.dirname(__file__))
from test_configs import assert_one_line_error  # noqa: E402
from test_reliability import (
  ROOT,
  TRAIN,
  assert_states_equal,
  comparable_metrics,
  restore_latest,
  snapshot,
  strict_json_lines,
  tiny_args,
  train_cli,
)
from test_train import tiny_config  # noqa: E402


def _quiet(*_):
  pass


def _copy(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  return workdir


# ----------------------------------------------------------------------------------------------
# 1. A NaN or Inf never reaches the kept state.


def _nan_update_optimizer(config, schedule):
  """adam with b1 = 1: finite loss and gradients, an update of 0/0 (what validate_config now refuses)."""
  return optax.adam(schedule, b1=1.0)


def test_nonfinite_update_is_not_applied_by_the_step():
  model = create_model("residual_mlp", num_classes=3, depth=1, dim=4, hidden=4)
  state = train_step.create_train_state(model, optax.adam(0.1, b1=1.0), (2, 2, 1), jax.random.PRNGKey(0))
  batch = {"image": jnp.ones((4, 2, 2, 1)), "label": jnp.array([0, 1, 2, 0])}
  step = jax.jit(train_step.make_train_step(3, skip_nonfinite=True))
  new, m = step(state, batch)
  assert np.isfinite(float(m["loss"])) and bool(m["grads_finite"])
  assert not bool(m["state_finite"]) and not bool(m["finite"])
  assert int(new.step) == 1
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((new.params, new.opt_state))):
    if jnp.issubdtype(jnp.result_type(a), jnp.inexact):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_update_stops_before_any_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(optim, "make_optimizer", _nan_update_optimizer)
  with pytest.raises(train_loop.TrainingDivergedError) as info:
    train_loop.train_and_evaluate(tiny_config(), str(tmp_path), log=_quiet)
  message = str(info.value)
  assert "after the update of step 1" in message and "no checkpoint was written yet" in message, message
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == []


def test_nonfinite_updates_skipped_leave_a_finite_model(tmp_path, monkeypatch):
  monkeypatch.setattr(optim, "make_optimizer", _nan_update_optimizer)
  config = tiny_config(on_nonfinite="skip")
  messages = []
  summary = train_loop.train_and_evaluate(config, str(tmp_path), log=messages.append)
  assert summary["steps"] == 8 and any("skipped" in m for m in messages)
  state, _, _ = restore_latest(tmp_path, run_setup.Setup(config))
  for leaf in jax.tree.leaves((state.params, state.opt_state, state.batch_stats)):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize(
  "overrides,needles",
  [
    ({"optimizer.name": "adamw", "optimizer.momentum": 1.0}, ["optimizer.momentum", "b1", "< 1"]),
    ({"optimizer.name": "adamw", "optimizer.b2": 1.0}, ["optimizer.b2", "< 1"]),
    ({"optimizer.learning_rate": 1e39}, ["learning_rate", "1e+39", "float32"]),
    (
      {"schedule.name": "step", "schedule.boundaries": (2.0, 4.0), "schedule.decay_factor": 1e30},
      ["decay_factor", "float32"],
    ),
  ],
)
def test_settings_that_cannot_train_are_refused(overrides, needles):
  with pytest.raises(ConfigError) as info:
    validate_config(tiny_config(**overrides))
  for needle in needles:
    assert needle in str(info.value), str(info.value)


def test_adamw_momentum_one_from_the_command_line(tmp_path):
  proc = train_cli(tmp_path / "out", *tiny_args(4), "--config.optimizer.name=adamw", "--config.optimizer.momentum=1.0")
  assert_one_line_error(proc, "config.optimizer.momentum = 1.0", "adamw")
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 2. One run per workdir.

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from resnet_jax.workdir import RunDir
    with RunDir(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(600)
""")


def _hold_lock(workdir) -> subprocess.Popen:
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_LOCK, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
  )
  assert holder.stdout.readline().strip() == "locked"
  return holder


def test_a_busy_workdir_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  holder = _hold_lock(workdir)
  try:
    before = {k: v for k, v in snapshot(workdir).items() if k != "train.lock"}
    proc = train_cli(workdir, *tiny_args(10))
    assert_one_line_error(
      proc, "in use by another training run", f"pid {holder.pid}", f"host {socket.gethostname()}", str(workdir)
    )
    assert {k: v for k, v in snapshot(workdir).items() if k != "train.lock"} == before
    with pytest.raises(WorkdirBusyError, match=f"pid {holder.pid}"):  # The library call too.
      train_loop.train_and_evaluate(load_run_config(str(workdir)), str(workdir), log=_quiet)
  finally:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
  assert (workdir / "train.lock").exists()  # Left behind by the killed process, with its pid ...
  assert json.loads((workdir / "train.lock").read_text())["pid"] == holder.pid
  proc = train_cli(workdir, *tiny_args(10))  # ... and no obstacle: the kernel released its flock.
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "from step 8" in proc.stdout
  assert not (workdir / "train.lock").exists()  # Removed at the end of a run.


def test_a_second_train_py_on_a_training_workdir_is_refused(tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(
    [sys.executable, TRAIN, f"--workdir={workdir}", *tiny_args(30)],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 240
  while first.poll() is None and time.monotonic() < deadline and not (workdir / "metrics.jsonl").exists():
    time.sleep(0.005)
  os.kill(first.pid, signal.SIGSTOP)  # Mid-training, holding the workdir, while the second starts.
  try:
    assert first.poll() is None, "the first run ended too soon"
    second = train_cli(workdir, *tiny_args(30))
  finally:
    os.kill(first.pid, signal.SIGCONT)
  assert_one_line_error(second, "in use by another training run", f"pid {first.pid}")
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  steps = [r["step"] for r in strict_json_lines(workdir / "metrics.jsonl") if r["split"] == "train"]
  assert steps == list(range(1, 31))  # One run's records, none twice.


def test_a_finished_run_without_its_checkpoints_is_not_trained_over(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  shutil.rmtree(workdir / "checkpoints")  # Removed to save space, or carried without them.
  before = snapshot(workdir)
  proc = train_cli(workdir, *tiny_args(8))
  assert_one_line_error(
    proc, f"{workdir} holds a finished run ({workdir / 'summary.json'}) but no checkpoint", "give another --workdir"
  )
  assert snapshot(workdir) == before  # Nothing written, nothing replaced.
  # With the summary moved away, as the message says, the run trains from scratch, and says that the
  # old records go.
  os.rename(workdir / "summary.json", tmp_path / "summary.json")
  old = strict_json_lines(workdir / "metrics.jsonl")
  again = train_cli(workdir, *tiny_args(8))
  assert again.returncode == 0, again.stderr[-3000:]
  said = (
    f"no checkpoint in {workdir / 'checkpoints'}: training starts at step 0 and replaces the {len(old)} "
    f"records of {workdir / 'metrics.jsonl'} (steps 1 to 8)"
  )
  assert said in again.stdout + again.stderr, again.stdout
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6", "8"]


# ----------------------------------------------------------------------------------------------
# 3. restore_step keeps the superseded run's files.


@pytest.mark.slow
def test_restore_step_keeps_the_superseded_metrics_summary_and_config(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  before = snapshot(workdir)
  proc = train_cli(workdir, *tiny_args(8), "--config.restore_step=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  kept = workdir / "checkpoints_superseded" / "run_files_after_6"
  assert str(kept) in proc.stdout, proc.stdout
  for name in ("metrics.jsonl", "summary.json", "config.json", "curves.png"):
    assert snapshot(kept)[name] == before[name], name  # As they were, byte for byte.
  assert (workdir / "checkpoints_superseded" / "8").is_dir()
  assert comparable_metrics(workdir) == comparable_metrics(finished_run)  # Steps 7, 8 recomputed.
  proc = train_cli(workdir, *tiny_args(8), "--config.restore_step=6")  # Again: a second copy.
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "checkpoints_superseded" / "run_files_after_6.1" / "metrics.jsonl").exists()
  assert snapshot(kept)["metrics.jsonl"] == before["metrics.jsonl"]


# ----------------------------------------------------------------------------------------------
# 4. Changed settings on resume.


@pytest.mark.parametrize(
  "flag,key",
  [
    ("--config.batch_size=16", "batch_size"),
    ("--config.seed=1", "seed"),
    ("--config.dataset.augment=none", "dataset.augment"),
    ("--config.model.options.activation=tanh", "model.options"),
    ("--config.dataset.crop_padding=2", "dataset.crop_padding"),
    ("--config.dataset.max_train_examples=48", "dataset.max_train_examples"),
    ("--config.dataset.cutout=2", "dataset.cutout"),
    ("--config.ema_decay=0.9", "ema_decay"),
  ],
)
def test_resume_refuses_settings_that_would_corrupt_the_run(finished_run, tmp_path, flag, key):
  workdir = _copy(finished_run, tmp_path)
  before = snapshot(workdir)
  proc = train_cli(workdir, *tiny_args(12), flag)
  assert_one_line_error(proc, f"config.{key}", "cannot change on resume", "up to step 8")
  assert snapshot(workdir) == before


def test_resume_refuses_fewer_steps_than_already_trained(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  before = snapshot(workdir)
  assert_one_line_error(train_cli(workdir, *tiny_args(6)), "6 steps", "already at step 8")
  assert snapshot(workdir) == before


def test_training_longer_follows_the_schedule_over_the_new_total_and_is_recorded(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  config_before = (workdir / "config.json").read_bytes()
  proc = train_cli(workdir, *tiny_args(12), "--config.log_every_steps=2", "--config.eval_every_steps=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "settings changed at step 8: " in proc.stdout and "num_train_steps 8 -> 12" in proc.stdout
  assert (workdir / "config.json").read_bytes() == config_before  # Still the start of the run.
  (line,) = strict_json_lines(workdir / "config_history.jsonl")
  assert line["step"] == 8
  changes = line["changes"]
  assert changes["num_train_steps"] == [8, 12] and changes["log_every_steps"] == [1, 2]
  assert changes["eval_every_steps"] == [4, 6] and changes["total_steps"] == [8, 12]
  config = load_run_config(str(workdir))  # The settings as they are now.
  assert config.num_train_steps == 12 and config.log_every_steps == 2
  setup = run_setup.Setup(config)
  assert changes["learning_rate_at_step"][1] == pytest.approx(float(setup.schedule(8)))
  records = [r for r in metrics.read_metrics(str(workdir)) if r["split"] == "train"]
  assert [r["step"] for r in records] == [*range(1, 9), 10, 12]
  # The rate of every step after 8 is the 12-step schedule's (logged at the window's last step).
  assert [r["learning_rate"] for r in records[-2:]] == [pytest.approx(float(setup.schedule(s - 1))) for s in (10, 12)]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 12 and summary["config"]["num_train_steps"] == 12


def test_harmless_changes_keep_the_resumed_run_bitwise_identical(tmp_path):
  config = tiny_config()
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  setup = run_setup.Setup(config)
  train_loop.train_and_evaluate(config, full, log=_quiet, setup=setup)
  assert train_loop.train_and_evaluate(config, split, log=_quiet, stop_at_step=4, setup=setup) is None
  changed = tiny_config(
    log_every_steps=1,
    eval_every_steps=2,
    checkpoint_every_steps=2,
    keep_checkpoints=5,
    eval_batch_size=4,
    **{"dataset.num_threads": 2},
  )
  messages = []
  train_loop.train_and_evaluate(changed, split, log=messages.append)
  assert any("settings changed at step 4" in m for m in messages), messages
  a, data_a, _ = restore_latest(full, setup)
  b, data_b, _ = restore_latest(split, setup)
  assert data_a == data_b
  assert_states_equal(a, b)
  history = strict_json_lines(os.path.join(split, "config_history.jsonl"))
  assert [h["step"] for h in history] == [4] and "learning_rate_at_step" not in history[0]["changes"]


def test_moved_data_may_resume_from_its_new_folder_other_data_may_not(tmp_path):
  from test_data import write_cifar

  first = write_cifar(str(tmp_path / "first"), per_batch=4, num_test=4)
  config = tiny_config(
    **{"dataset.name": "cifar10", "dataset.data_dir": first, "dataset.augment": "none", "num_train_steps": 4}
  )
  workdir = str(tmp_path / "run")
  train_loop.train_and_evaluate(config, workdir, log=_quiet)
  moved = str(tmp_path / "moved")
  shutil.copytree(first, moved)
  other = write_cifar(str(tmp_path / "other"), per_batch=3, num_test=4)  # 15 training images, not 20.
  before = snapshot(workdir)
  with pytest.raises(ConfigError, match="15 train examples, the run was trained with 20"):
    train_loop.train_and_evaluate(
      tiny_config(
        **{"dataset.name": "cifar10", "dataset.data_dir": other, "dataset.augment": "none", "num_train_steps": 8}
      ),
      workdir,
      log=_quiet,
    )
  assert snapshot(workdir) == before
  messages = []
  summary = train_loop.train_and_evaluate(
    tiny_config(
      **{"dataset.name": "cifar10", "dataset.data_dir": moved, "dataset.augment": "none", "num_train_steps": 8}
    ),
    workdir,
    log=messages.append,
  )
  assert summary["steps"] == 8
  (line,) = strict_json_lines(os.path.join(workdir, "config_history.jsonl"))
  assert line["step"] == 4 and line["changes"]["dataset.data_dir"] == [first, moved]


# ----------------------------------------------------------------------------------------------
# 5. One line, not a traceback, and no debris.


def _unshare_available() -> bool:
  if not shutil.which("unshare"):
    return False
  probe = subprocess.run(
    ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs none /mnt 2>/dev/null || mount -t tmpfs none "$TMPDIR"'],
    capture_output=True,
    env={**os.environ, "TMPDIR": "/tmp"},
  )
  return probe.returncode == 0


MOUNTS = pytest.mark.skipif(
  not _unshare_available(), reason="needs unprivileged mount namespaces (unshare -rm) for a real tmpfs"
)


def _on_tmpfs(
  mountpoint, command: list[str], size: str = "", copy_from=None, read_only=False, timeout: int = 300
) -> subprocess.CompletedProcess:
  """Run ``command`` with a fresh tmpfs on ``mountpoint`` (``size``, ``copy_from`` copied into
  ``mountpoint/run``, then ``read_only``), in a private mount namespace: the disk errors are the
  kernel's own."""
  os.makedirs(mountpoint, exist_ok=True)
  options = f"-o size={size}" if size else ""
  script = f'mount -t tmpfs {options} none "$1" || exit 97\n'
  if copy_from:
    script += f'mkdir "$1/run" && cp -a "{copy_from}/." "$1/run/"\n'
  if read_only:
    script += 'mount -o remount,ro "$1" || exit 97\n'
  script += 'shift; exec "$@"\n'
  proc = subprocess.run(
    ["unshare", "-rm", "sh", "-c", script, "sh", str(mountpoint), *command],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=timeout,
  )
  assert proc.returncode != 97, proc.stderr
  return proc


def _train_on_tmpfs(mountpoint, *flags, **kwargs):
  return _on_tmpfs(mountpoint, [sys.executable, TRAIN, f"--workdir={mountpoint}/run", *flags], **kwargs)


@MOUNTS
@pytest.mark.parametrize(
  "size,needle", [("4k", "config.json"), ("16k", "events.out.tfevents"), ("32k", "cannot write checkpoint")]
)
def test_full_disk_is_one_line_and_leaves_no_debris(tmp_path, size, needle):
  mnt = tmp_path / "mnt"
  command = [sys.executable, TRAIN, f"--workdir={mnt}/run", *tiny_args(8)]
  proc = _on_tmpfs(
    mnt,
    [
      "sh",
      "-c",
      '"$@"; rc=$?; find "$0" -name \'*.tmp\' -o -name checkpoints '
      "-empty -o -name '*orbax-checkpoint-tmp*' -o -name train.lock; exit $rc",
      str(mnt),
      *command,
    ],
    size=size,
  )
  found = [line for line in proc.stdout.splitlines() if line.startswith(str(mnt))]
  assert_one_line_error(proc, needle, "No space left on device", str(mnt / "run"))
  assert found == [], found  # No config.json.tmp, empty checkpoints/, partial checkpoint or lock.


@MOUNTS
def test_read_only_workdir_is_one_line(finished_run, tmp_path):
  mnt = tmp_path / "mnt"
  proc = _train_on_tmpfs(mnt, *tiny_args(12), copy_from=finished_run, read_only=True)  # A run to resume.
  assert_one_line_error(proc, str(mnt / "run" / "train.lock"), "Read-only file system")
  proc = _train_on_tmpfs(mnt, *tiny_args(12), read_only=True)  # A new run.
  assert_one_line_error(proc, str(mnt / "run"), "Read-only file system")


@MOUNTS
def test_gradflow_out_on_a_read_only_folder_fails_before_computing(tmp_path):
  mnt = tmp_path / "mnt"
  t0 = time.monotonic()
  script = os.path.join(ROOT, "experiments", "gradient_flow.py")
  proc = _on_tmpfs(mnt, [sys.executable, script, "--out", str(mnt / "figures")], read_only=True)
  assert_one_line_error(proc, str(mnt / "figures"), "Read-only file system")
  assert "gradflow:" not in proc.stderr and time.monotonic() - t0 < 60  # Nothing was computed.


def test_gradflow_out_that_cannot_be_written_fails_before_computing(tmp_path):
  from test_gradflow import script  # experiments/gradient_flow.py

  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(OSError) as info:  # A parent that is a file: the same early check.
    script.parse_args(["--out", str(blocker / "figures")])
  assert str(blocker) in str(info.value.filename)


@pytest.mark.slow
def test_damaged_metrics_lines_do_not_stop_the_run_nor_its_reruns(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  bad = [
    b"[1, 2, 3]\n",
    b"\xff\xfe not utf-8\n",
    b'{"step": "nine", "split": "train"}\n',
    b'{"split": "train", "loss": 1.0}\n',
    b'{"step": 30, "split": "train", "loss": "high"}\n',
  ]
  with open(workdir / "metrics.jsonl", "ab") as f:
    f.writelines(bad)
  for _ in range(2):  # The run trains and plots; the rerun (nothing left to train) does too.
    proc = train_cli(workdir, *tiny_args(10))
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "summary.json").exists() and (workdir / "curves.png").exists()
  rejected = (workdir / metrics.REJECTED_METRICS).read_bytes()
  assert rejected == b"".join(bad[:4])  # Kept as they were, once.
  records = strict_json_lines(workdir / "metrics.jsonl")
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 11))
  metrics.plot_curves(
    [{"step": 1, "split": "train"}, {"step": 2, "split": "test", "loss": None, "accuracy": "x"}],
    str(tmp_path / "c.png"),
  )


def test_config_json_that_is_not_an_object_is_one_line(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  (workdir / "config.json").write_text("[1, 2, 3]")
  before = snapshot(workdir)
  assert_one_line_error(
    train_cli(workdir, *tiny_args(8)), str(workdir / "config.json"), "JSON list", "expected an object"
  )
  proc = subprocess.run(
    [sys.executable, "-m", "resnet_jax.evaluate", f"--workdir={workdir}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert_one_line_error(proc, str(workdir / "config.json"), "JSON list")
  (workdir / "config.json").write_bytes(b"\xff\xfe{}")
  with pytest.raises(CheckpointError, match="UnicodeDecodeError"):
    load_run_config(str(workdir))
  (workdir / "config.json").write_text("[1, 2, 3]")
  assert snapshot(workdir) == before


@pytest.mark.parametrize(
  "name,options,needle",
  [
    ("resnet20", {"num_filters": 0}, "num_filters=0"),
    ("resnext50_32x4d", {"groups": 0}, "groups=0"),
    ("residual_mlp", {"dim": 0}, "dim=0"),
    ("resnet20", {"num_filters": -4}, "num_filters=-4"),
    ("resnet20", {"act": "relu"}, "act='relu'"),
    ("resnet20", {"num_classes": True}, "num_classes"),
    ("residual_mlp", {"depth": 1.5}, "depth=1.5"),
  ],
)
def test_create_model_rejects_bad_options(name, options, needle):
  with pytest.raises(ModelError, match=needle.replace("(", r"\(")):
    create_model(name, **options)


def test_run_cli_turns_an_os_error_into_one_line_with_the_path(tmp_path, capsys):
  import errno

  from resnet_jax.errors import run_cli

  def full_disk():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.json"))

  with pytest.raises(SystemExit) as info:
    run_cli(full_disk)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and str(tmp_path / "x.json") in err and "ENOSPC" in err, err


# ----------------------------------------------------------------------------------------------
# 6. SIGTERM and SIGINT: finish the step, checkpoint, one line, 128 + signum; the resume is exact.

SIGNAL_STEPS = 150


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  proc = train_cli(workdir, *tiny_args(SIGNAL_STEPS, checkpoint_every=50))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.parametrize(
  "signum", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def test_signal_stops_after_the_step_with_a_checkpoint_and_resumes_bitwise(uninterrupted, tmp_path, signum):
  workdir = tmp_path / "run"
  args = tiny_args(SIGNAL_STEPS, checkpoint_every=50)
  proc = subprocess.Popen(
    [sys.executable, TRAIN, f"--workdir={workdir}", *args],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count("\n") >= 12:
      break
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before the signal"
  os.kill(proc.pid, signum)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, (proc.returncode, err[-3000:])
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  name = signal.Signals(signum).name
  stopped = int(lines[0].split("after step ")[1].split()[0])
  assert lines[0].startswith(f"stopped by {name} after step {stopped} of {SIGNAL_STEPS}"), lines[0]
  assert "run the same command again" in lines[0]
  assert 8 <= stopped < SIGNAL_STEPS  # Signalled after about 10 records (train and test).
  assert Checkpointer(str(workdir / "checkpoints")).latest_step() == stopped
  assert not (workdir / "train.lock").exists()

  resumed = train_cli(workdir, *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"from step {stopped}" in resumed.stdout
  setup = run_setup.Setup(load_run_config(str(uninterrupted)))
  a, data_a, _ = restore_latest(uninterrupted, setup)
  b, data_b, _ = restore_latest(workdir, setup)
  assert int(a.step) == SIGNAL_STEPS and data_a == data_b
  assert_states_equal(a, b)
  assert comparable_metrics(workdir) == comparable_metrics(uninterrupted)
