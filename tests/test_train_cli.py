"""train.py for a newcomer: ``--help``, ``--print_config``, and the TensorBoard event files of every run.

Event files are read back with TensorBoard's own reader (``EventFileLoader``), never with the code
that wrote them.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax import metrics, train_loop
from resnet_jax.config_check import base_config, describe_config
from resnet_jax.tensorboard_events import EventWriter

sys.path.insert(0, os.path.dirname(__file__))
from test_configs import assert_one_line_error  # noqa: E402
from test_reliability import ROOT, TRAIN, kill_during_save, tiny_args, train_cli  # noqa: E402
from test_train import tiny_config  # noqa: E402


def read_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of the event files of ``workdir``, in TensorBoard's reading order."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  from tensorboard.util import tensor_util

  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(str(workdir), "events.out.tfevents.*"))):
    for event in EventFileLoader(path).Load():
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, float(tensor_util.make_ndarray(value.tensor))))
  return out


def assert_events_match_metrics(workdir) -> None:
  """Every number of metrics.jsonl is in the event files at its step (float32), each step once, in order."""
  scalars = read_scalars(workdir)
  records = metrics.read_metrics(str(workdir))
  for split, keys in (
    ("train", ("loss", "accuracy", "learning_rate", "images_per_sec")),
    ("test", ("loss", "accuracy")),
  ):
    rs = [r for r in records if r["split"] == split]
    assert rs
    for key in keys:
      expected = [(r["step"], float(np.float32(r[key]))) for r in rs]
      assert scalars[f"{split}/{key}"] == expected, (split, key)


# ----------------------------------------------------------------------------------------------
# --help and -h.


def test_every_config_key_is_described_in_base_config():
  def keys(group, prefix=""):
    for name, value in group.items():
      yield prefix + name
      if hasattr(value, "items"):
        yield from keys(value, f"{prefix}{name}.")

  described = describe_config()
  assert sorted(k for k, _, _ in described) == sorted(keys(base_config()))
  assert [k for k, _, text in described if not text] == []  # Each key carries its comment.
  text = {k: t for k, _, t in described}
  # A comment continued on the next lines is one description; the default is base_config's.
  assert text["restore_step"].endswith("(later ones are moved to WORKDIR/checkpoints_superseded/)")
  defaults = {k: v for k, v, _ in described}
  assert defaults["optimizer.learning_rate"] == base_config().optimizer.learning_rate


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_with_usage_flags_configs_and_every_key(flag, tmp_path):
  proc = subprocess.run([sys.executable, TRAIN, flag], capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "usage: python train.py" in out
  for name in ("--config=", "--config.KEY=VALUE", "--workdir=", "--print_config", "--helpfull"):
    assert name in out, name
  lines = out.splitlines()
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):  # Each config with its one-line description.
    name = os.path.basename(path)[:-3]
    assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in lines), name
  rows = {line.split()[0]: line for line in lines if line.startswith("  ") and line.split()}
  for key in base_config():
    assert key in rows, key
  for key, default, description in describe_config():
    assert description in rows[key], key
    if not hasattr(default, "items"):
      assert f" {default!r} " in rows[key] and f" {type(default).__name__} " in rows[key], rows[key]


def test_helpfull_lists_every_flag_as_absl_does(tmp_path):
  proc = subprocess.run(
    [sys.executable, TRAIN, "--helpfull"], capture_output=True, text=True, cwd=str(tmp_path), timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("--config:", "--workdir:", "--[no]print_config:", "-h,--[no]help:", "--flagfile:"):
    assert name in proc.stdout, name


# ----------------------------------------------------------------------------------------------
# --print_config.


@pytest.mark.slow
def test_print_config_equals_the_config_json_the_run_writes(tmp_path):
  workdir = tmp_path / "run"
  args = [*tiny_args(2), "--config.optimizer.learning_rate=0.03", "--config.schedule.boundaries=(1.0,)"]
  printed = train_cli(workdir, *args, "--print_config")
  assert printed.returncode == 0, printed.stderr[-3000:]
  assert not workdir.exists()  # Nothing trained, nothing written.
  config = json.loads(printed.stdout)
  assert config["optimizer"]["learning_rate"] == 0.03 and config["batch_size"] == 8
  proc = train_cli(workdir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "config.json") as f:
    assert json.load(f) == config


@pytest.mark.parametrize(
  "override,needles",
  [
    ("--config.optimizer.lrr=0.1", ["lrr"]),
    ("--config.batch_size=0", ["batch_size", "0"]),
  ],
)
def test_print_config_with_a_bad_override_is_one_line_error(override, needles, tmp_path):
  proc = train_cli(tmp_path / "run", override, "--print_config")
  assert_one_line_error(proc, *needles)
  assert proc.stdout == ""


# ----------------------------------------------------------------------------------------------
# TensorBoard.


def test_event_files_hold_the_metrics_and_a_resumed_run_appends(tmp_path):
  config = tiny_config(log_every_steps=1)
  assert train_loop.train_and_evaluate(config, str(tmp_path), log=lambda *_: None, stop_at_step=5) is None
  assert [s for s, _ in read_scalars(tmp_path)["train/loss"]] == [1, 2, 3, 4, 5]
  train_loop.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
  assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2  # One file per process, appended.
  assert [s for s, _ in read_scalars(tmp_path)["train/loss"]] == list(range(1, 9))
  assert_events_match_metrics(tmp_path)


def test_a_resume_cuts_the_events_after_its_step_and_keeps_their_wall_times(tmp_path):
  writer = EventWriter(str(tmp_path), 0)
  for step in range(1, 7):
    writer.write({"step": step, "split": "train", "loss": float(step), "flag": True, "name": "x"})
  writer.close()
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

  (first,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  before = {e.step: e.wall_time for e in EventFileLoader(first).Load() if e.summary.value}
  with open(first, "r+b") as f:  # A kill in the middle of the last record.
    f.truncate(os.path.getsize(first) - 5)
  writer = EventWriter(str(tmp_path), 3)
  for step in range(4, 9):
    writer.write({"step": step, "split": "train", "loss": float(step)})
  writer.close()
  after = {e.step: e.wall_time for e in EventFileLoader(first).Load() if e.summary.value}
  assert after == {s: before[s] for s in (1, 2, 3)}
  assert read_scalars(tmp_path) == {"train/loss": [(s, float(s)) for s in range(1, 9)]}  # Numbers only.
  EventWriter(str(tmp_path), 0).close()  # Back to the start: no scalar left.
  assert read_scalars(tmp_path) == {}


def test_the_event_writer_does_not_import_torch():
  # tensorboardX would import torch (installed with the test extras) for tensors a run never writes.
  code = "import sys, resnet_jax.train_loop; print('torch' in sys.modules)"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow
def test_kill_and_resume_leave_no_step_duplicated_or_missing_in_the_events(tmp_path):
  workdir = tmp_path / "run"
  # Killed while committing the checkpoint of step 6: the events of steps 5 and 6 (or more) are
  # written, the resumed run starts again after step 4.
  kill_during_save(workdir, at_step=6)
  assert max(s for s, _ in read_scalars(workdir)["train/loss"]) >= 6
  proc = train_cli(workdir, *tiny_args(8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "from step 4" in proc.stdout, proc.stdout
  assert [s for s, _ in read_scalars(workdir)["train/loss"]] == list(range(1, 9))
  assert_events_match_metrics(workdir)
