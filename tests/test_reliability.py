"""Faults and bad input: a run survives kill -9, damaged checkpoints and non-finite steps, and every kind
of bad input ends in one clear error line without touching what is already written.

The command-line tests run ``train.py`` in a subprocess on a tiny residual MLP over a digits subset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax import metrics, run_setup, train_loop
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.errors import CheckpointError
from resnet_jax.evaluate import load_run_config

sys.path.insert(0, os.path.dirname(__file__))
from test_configs import assert_one_line_error  # noqa: E402
from test_data import write_cifar, write_image_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
ORBAX_TMP = ".orbax-checkpoint-tmp"  # orbax's suffix of a checkpoint folder being written.


def tiny_args(steps: int, checkpoint_every: int = 2, keep: int = 3) -> list[str]:
  """Flags for a residual MLP (1 unit of width 16) on 64 digits, batch 8, with pad-crop shifts."""
  return [
    f"--config={ROOT}/configs/residual_mlp.py",
    "--config.model.options.depth=1",
    "--config.model.options.dim=16",
    "--config.model.options.hidden=16",
    "--config.dataset.max_train_examples=64",
    "--config.dataset.max_test_examples=20",
    "--config.dataset.augment=pad_crop",
    "--config.dataset.crop_padding=1",
    "--config.dataset.num_threads=1",
    "--config.batch_size=8",
    "--config.eval_batch_size=20",
    f"--config.num_train_steps={steps}",
    f"--config.checkpoint_every_steps={checkpoint_every}",
    f"--config.keep_checkpoints={keep}",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=4",
    "--config.progress_bar=False",
  ]


def train_cli(workdir, *args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, TRAIN, f"--workdir={workdir}", *args],
    capture_output=True,
    text=True,
    cwd=str(cwd or ROOT),
    timeout=timeout,
  )


def snapshot(folder) -> dict[str, tuple[int, str]]:
  """Every file under ``folder``: relative path -> (size, sha1), to prove that nothing changed."""
  out = {}
  for path in glob.glob(os.path.join(str(folder), "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, str(folder))] = (os.path.getsize(path), hashlib.sha1(f.read()).hexdigest())
  return out


def strict_json_lines(path) -> list[dict]:
  """Parse a .jsonl file as strict JSON (NaN and Infinity are not JSON)."""

  def no_constants(name):
    raise ValueError(f"{path}: {name} is not valid JSON")

  with open(path) as f:
    return [json.loads(line, parse_constant=no_constants) for line in f]


def comparable_metrics(workdir) -> list[dict]:
  return [
    {k: v for k, v in r.items() if k not in ("images_per_sec", "wall_time_s")}
    for r in metrics.read_metrics(str(workdir))
  ]


def restore_latest(workdir, setup: run_setup.Setup):
  return Checkpointer(os.path.join(str(workdir), "checkpoints")).restore(setup.abstract_state())


def assert_states_equal(a, b) -> None:
  """Step, parameters, BatchNorm statistics and optimizer state bitwise equal."""
  assert int(a.step) == int(b.step)
  la, lb = (
    jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
    jax.tree.leaves((b.params, b.batch_stats, b.opt_state)),
  )
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------
# Faults.


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_is_bitwise_identical(tmp_path):
  steps = 40
  args = tiny_args(steps, checkpoint_every=1, keep=2)
  kill_after = random.Random().randint(2, 15)
  full, killed = tmp_path / "full", tmp_path / "killed"
  uninterrupted = subprocess.Popen(
    [sys.executable, TRAIN, f"--workdir={full}", *args],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  victim = subprocess.Popen(
    [sys.executable, TRAIN, f"--workdir={killed}", *args],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and victim.poll() is None:
    done = (
      [int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit()] if (killed / "checkpoints").is_dir() else []
    )
    if done and max(done) >= kill_after:
      break
    time.sleep(0.005)
  assert victim.poll() is None, f"the run ended before the kill (after step {kill_after})"
  os.kill(victim.pid, signal.SIGKILL)
  assert victim.wait() == -signal.SIGKILL
  killed_at = max(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert killed_at < steps, f"kill after step {kill_after} came too late"

  resumed = train_cli(killed, *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(r"resuming .* from step \d+", resumed.stdout), resumed.stdout
  out, err = uninterrupted.communicate(timeout=300)
  assert uninterrupted.returncode == 0, err[-3000:]

  setup = run_setup.Setup(load_run_config(str(full)))
  a, data_a, _ = restore_latest(full, setup)
  b, data_b, _ = restore_latest(killed, setup)
  assert int(a.step) == steps and data_a == data_b, (data_a, data_b)  # The same place in the data.
  assert_states_equal(a, b)
  assert comparable_metrics(killed) == comparable_metrics(full)

  # Run after run, in another process: the same seed and config give identical metrics.
  again = tmp_path / "again"
  train_loop.train_and_evaluate(load_run_config(str(full)), str(again), log=lambda *_: None, setup=setup)
  assert comparable_metrics(again) == comparable_metrics(full)


KILL_DURING_SAVE = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity

original = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self):  # Everything of the step is written; only the commit (a rename) is left.
  if self._final_path.name == os.environ["KILL_AT"] and self._final_path.parent.name == "checkpoints":
    os.kill(os.getpid(), signal.SIGKILL)
  return await original(self)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def kill_during_save(workdir, at_step: int) -> None:
  """Run the 8-step tiny CLI training into ``workdir``, killed (SIGKILL) while it commits the checkpoint
  of ``at_step``."""
  proc = subprocess.run(
    [sys.executable, "-c", KILL_DURING_SAVE, TRAIN, f"--workdir={workdir}", *tiny_args(8)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
    env={**os.environ, "KILL_AT": str(at_step)},
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_then_resume_from_the_newest_complete(finished_run, finished_setup, tmp_path):
  workdir = tmp_path / "run"
  kill_during_save(workdir, at_step=6)
  ckpts = workdir / "checkpoints"
  assert glob.glob(str(ckpts / f"6{ORBAX_TMP}*")), os.listdir(ckpts)  # The write was cut short.
  assert Checkpointer(str(ckpts)).all_steps() == [2, 4]
  proc = train_cli(workdir, *tiny_args(8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "from step 4" in proc.stdout, proc.stdout
  a, data_a, _ = restore_latest(finished_run, finished_setup)
  b, data_b, _ = restore_latest(workdir, finished_setup)
  assert data_a == data_b
  assert_states_equal(a, b)
  assert comparable_metrics(workdir) == comparable_metrics(finished_run)


def test_partial_checkpoint_write_is_ignored_and_resume_uses_the_newest_complete(
  finished_run, finished_setup, tmp_path
):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  ckpts = workdir / "checkpoints"
  # A run killed while writing step 8: orbax leaves its temporary folder, half written.
  shutil.move(str(ckpts / "8"), str(ckpts / f"8{ORBAX_TMP}"))
  for path in glob.glob(str(ckpts / f"8{ORBAX_TMP}" / "state" / "**" / "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
  assert Checkpointer(str(ckpts)).all_steps() == [4, 6]
  proc = train_cli(workdir, *tiny_args(8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "from step 6" in proc.stdout, proc.stdout
  assert 8 in Checkpointer(str(ckpts)).all_steps()
  a, data_a, _ = restore_latest(finished_run, finished_setup)
  b, data_b, _ = restore_latest(workdir, finished_setup)
  assert data_a == data_b
  assert_states_equal(a, b)
  assert comparable_metrics(workdir) == comparable_metrics(finished_run)


@pytest.mark.slow
def test_damaged_checkpoint_is_named_and_an_earlier_one_can_be_chosen(finished_run, finished_setup, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  ckpts = workdir / "checkpoints"
  damaged = str(ckpts / "8" / "state" / "_METADATA")
  with open(damaged, "r+b") as f:
    f.truncate(os.path.getsize(damaged) // 2)
  before = snapshot(workdir)
  proc = train_cli(workdir, *tiny_args(8))
  line = assert_one_line_error(proc, damaged, "--config.restore_step=6", "nothing was deleted")
  assert "steps [4, 6]" in line
  assert snapshot(workdir) == before  # Nothing written, moved or deleted.

  proc = train_cli(workdir, *tiny_args(8), "--config.restore_step=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "from step 6" in proc.stdout and "checkpoints_superseded" in proc.stdout, proc.stdout
  kept = workdir / "checkpoints_superseded" / "8" / "state" / "_METADATA"
  assert kept.stat().st_size == before[os.path.relpath(damaged, workdir)][0]  # Kept as it was.
  a, _, _ = restore_latest(finished_run, finished_setup)
  b, _, _ = restore_latest(workdir, finished_setup)
  assert_states_equal(a, b)  # Steps 7 and 8 trained again give the same state.
  assert comparable_metrics(workdir) == comparable_metrics(finished_run)


def test_damaged_array_data_names_the_checkpoint_and_the_array(finished_run, finished_setup, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  data_files = glob.glob(str(workdir / "checkpoints" / "8" / "state" / "**" / "d" / "*"), recursive=True)
  assert data_files
  for path in data_files:  # Every array data file of the checkpoint cut to half its size.
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  before = snapshot(workdir)
  with pytest.raises(CheckpointError) as info:
    restore_latest(workdir, finished_setup)
  message = str(info.value)
  assert str(workdir / "checkpoints" / "8") in message and "--config.restore_step=6" in message
  # From the command line: one line (no tracebacks of the reads that were still in flight).
  assert_one_line_error(
    train_cli(workdir, *tiny_args(8)), str(workdir / "checkpoints" / "8"), "--config.restore_step=6"
  )
  assert snapshot(workdir) == before


def test_restore_step_without_such_a_checkpoint_lists_the_complete_ones(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  before = snapshot(workdir)
  proc = train_cli(workdir, *tiny_args(8), "--config.restore_step=5")
  assert_one_line_error(proc, "step 5", "steps [4, 6, 8]")
  assert snapshot(workdir) == before


def test_nonfinite_step_stops_with_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  # The learning rate jumps by 1e33 after step 4: the update of step 5 overflows the weights.
  proc = train_cli(
    workdir,
    *tiny_args(8),
    "--config.schedule.name=step",
    "--config.schedule.unit=steps",
    "--config.schedule.warmup=0.0",
    "--config.schedule.boundaries=(4.0,)",
    "--config.schedule.decay_factor=1e33",
  )
  line = assert_one_line_error(proc, "on_nonfinite='skip'", "that update was not applied")
  # The jump overflows either the weights (the updated state) or, a step later, the loss.
  bad_step = int(
    re.search(
      r"non-finite (?:loss or gradient at step|parameters, optimizer state or "
      r"BatchNorm statistics after the update of step) (\d+)",
      line,
    ).group(1)
  )
  good = int(re.search(r"last good checkpoint is step (\d+)", line).group(1))
  assert 5 <= bad_step <= 8 and good < bad_step
  steps = Checkpointer(str(workdir / "checkpoints")).all_steps()
  assert steps and max(steps) == good, steps
  records = strict_json_lines(workdir / "metrics.jsonl")  # Readable, strict JSON, every line.
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, bad_step + 1))
  assert records[-1]["nonfinite_steps"] >= 1


def test_nonfinite_steps_are_skipped_by_config_and_every_output_stays_strict_json(tmp_path):
  from test_train import tiny_config

  config = tiny_config(
    on_nonfinite="skip",
    **{
      "schedule.name": "step",
      "schedule.warmup": 0.0,
      "schedule.boundaries": (4.0,),
      "schedule.decay_factor": 1e33,
      "checkpoint_every_steps": 2,
    },
  )
  messages = []
  summary = train_loop.train_and_evaluate(config, str(tmp_path), log=messages.append)
  assert summary["steps"] == 8
  warning = next(m for m in messages if "non-finite" in m)
  assert re.search(r"at steps \[\d", warning) and "skipped" in warning
  records = strict_json_lines(tmp_path / "metrics.jsonl")
  assert sum(r.get("nonfinite_steps", 0) for r in records) >= 1
  with open(tmp_path / "summary.json") as f:
    json.loads(f.read(), parse_constant=lambda name: pytest.fail(f"summary.json holds {name}"))


# ----------------------------------------------------------------------------------------------
# Bad input through the command line: exit 2, one line, nothing written over.


def test_workdir_of_another_model_is_refused_untouched(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  before = snapshot(workdir)
  proc = train_cli(workdir, f"--config={ROOT}/configs/digits.py", "--config.progress_bar=False")
  assert_one_line_error(proc, str(workdir), "residual_mlp", "resnet20", "another --workdir")
  assert snapshot(workdir) == before


def test_workdir_of_the_same_model_with_other_options_is_refused_untouched(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  before = snapshot(workdir)
  proc = train_cli(workdir, *tiny_args(8), "--config.model.options.dim=32")
  # The settings are compared before any array is read: the message names the key, both values and why.
  assert_one_line_error(
    proc, "config.model.options", "'dim': 32", "up to step 8", "cannot change on resume", "another --workdir"
  )
  assert snapshot(workdir) == before


def test_unknown_model_lists_close_names(tmp_path):
  proc = train_cli(tmp_path / "out", *tiny_args(2), "--config.model.name=residual_mpl")
  assert_one_line_error(proc, "residual_mpl", "residual_mlp")
  assert not (tmp_path / "out").exists()


def test_wrong_type_and_unknown_key(tmp_path):
  proc = train_cli(tmp_path / "out", *tiny_args(2), "--config.dataset.max_train_examples=many")
  assert_one_line_error(proc, "max_train_examples", "many")
  proc = train_cli(tmp_path / "out", *tiny_args(2), "--config.on_nan=skip")
  assert_one_line_error(proc, "unknown config key on_nan")
  assert not (tmp_path / "out").exists()


def test_images_too_small_for_the_model(tmp_path):
  proc = train_cli(tmp_path / "out", f"--config={ROOT}/configs/digits.py", "--config.model.name=resnet18")
  assert_one_line_error(proc, "resnet18", "32x32", "8x8")
  assert not (tmp_path / "out").exists()


def test_cifar_label_out_of_range(tmp_path):
  data_dir = write_cifar(str(tmp_path / "data"), "cifar10", per_batch=2, num_test=3)
  path = os.path.join(data_dir, "cifar-10-batches-py", "test_batch")
  with open(path, "rb") as f:
    d = pickle.load(f)
  d[b"labels"][1] = 10
  with open(path, "wb") as f:
    pickle.dump(d, f)
  before = snapshot(tmp_path / "data")
  proc = train_cli(
    tmp_path / "out", f"--config={ROOT}/configs/cifar10_resnet20.py", f"--config.dataset.data_dir={data_dir}"
  )
  assert_one_line_error(proc, "cifar10 test labels", ", 10]", "expected [0, 9]")
  assert snapshot(tmp_path / "data") == before and not (tmp_path / "out").exists()


def test_empty_class_folder(tmp_path):
  root = write_image_folder(str(tmp_path / "data"), per_class=2, test_per_class=1, size=(8, 8))
  os.makedirs(os.path.join(root, "train", "empty_class"))
  os.makedirs(os.path.join(root, "test", "empty_class"))
  proc = train_cli(
    tmp_path / "out", f"--config={ROOT}/configs/imagenet_resnet50.py", f"--config.dataset.data_dir={root}"
  )
  assert_one_line_error(proc, os.path.join(root, "train", "empty_class"), "no images")
  assert not (tmp_path / "out").exists()


def image_folder_args(root: str) -> list[str]:
  return [
    *tiny_args(4),
    "--config.dataset.name=image_folder",
    f"--config.dataset.data_dir={root}",
    "--config.dataset.image_size=8",
    "--config.dataset.augment=none",
    "--config.batch_size=4",
    "--config.eval_batch_size=4",
    "--config.dataset.max_train_examples=-1",
    "--config.dataset.max_test_examples=-1",
  ]


def test_corrupt_image_stops_naming_the_file(tmp_path):
  root = write_image_folder(str(tmp_path / "data"), per_class=4, test_per_class=2, size=(10, 10))
  bad = os.path.join(root, "train", "dog", "img1.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
  proc = train_cli(tmp_path / "out", *image_folder_args(root))
  assert_one_line_error(proc, bad, "on_corrupt_image='skip'")
  with open(bad, "rb") as f:
    assert f.read().endswith(b"not a jpeg")


def test_corrupt_image_is_skipped_with_a_warning_counted_in_the_summary(tmp_path):
  root = write_image_folder(str(tmp_path / "data"), per_class=4, test_per_class=2, size=(10, 10))
  bad = os.path.join(root, "train", "dog", "img1.jpg")
  with open(bad, "wb") as f:
    f.write(b"not an image at all")
  proc = train_cli(tmp_path / "out", *image_folder_args(root), "--config.dataset.on_corrupt_image=skip")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "warning" in proc.stdout and bad in proc.stdout, proc.stdout
  with open(tmp_path / "out" / "summary.json") as f:
    summary = json.load(f)
  assert summary["skipped_images"] == 1 and summary["skipped_image_files"] == [bad]
  assert os.path.exists(bad)


# ----------------------------------------------------------------------------------------------
# A torchvision state dict of the wrong architecture.


def test_torchvision_state_dict_of_another_architecture(tmp_path):
  import torch
  import torchvision

  from resnet_jax.convert import load_checkpoint

  path = str(tmp_path / "resnet18.pth")
  torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
  before = snapshot(tmp_path)
  with pytest.raises(CheckpointError) as info:
    load_checkpoint(path, "resnet34")
  message = str(info.value)
  for needle in (path, "does not fit 'resnet34'", "missing keys", "looks like a resnet18"):
    assert needle in message, message
  assert snapshot(tmp_path) == before
