"""``benchmarks/gpu_cifar.sh``, run as its CPU dry run (``ALLOW_CPU=1``) on a tiny CIFAR-10 folder the test
writes: both runs train (two steps per call), the loop timings run, the results land in ``OUT_DIR`` as a few
small files, and the workdirs (with their checkpoints) in ``RUNS_DIR``. The script is what a GPU session
runs, unattended, so it must not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cifar_folder(path):
  """10 classes x 15 images: 135 training images after the 10% hold-out, one batch of 128."""
  rng = np.random.default_rng(0)
  for k in range(10):
    os.makedirs(path / "train" / f"class{k}")
    for i in range(15):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path / "train" / f"class{k}" / f"{i}.png")
  return path


def _script(data, **env):
  env = {**os.environ, "ALLOW_CPU": "1", "SKIP_INSTALL": "1", "PYTHON": sys.executable, **env}
  return subprocess.run(
    ["bash", "benchmarks/gpu_cifar.sh", str(data)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )


@pytest.mark.slow
def test_dry_run_writes_the_results_apart_from_the_runs(tmp_path):
  data = _cifar_folder(tmp_path / "cifar")
  out, runs = tmp_path / "out", tmp_path / "runs"
  p = _script(
    data,
    FAST_EPOCHS="2",
    PAPER_STEPS="2",
    STEPS_PER_CALL="2",
    RUNS="calls,fast,paper",
    CALLS="1 3",
    CALL_STEPS="2",
    OUT_DIR=str(out),
    RUNS_DIR=str(runs),
  )
  assert p.returncode == 0 and "== gpu_cifar: PASS" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
  assert "== jax " in p.stdout and "== devices:" in p.stdout
  assert sorted(os.listdir(out)) == [
    "cifar10_fast.time",
    "cifar10_fast_gpu.json",
    "cifar10_fast_gpu.png",
    "cifar10_resnet20.time",
    "cifar10_resnet20_gpu_metrics.jsonl",
    "cifar10_resnet20_gpu_summary.json",
    "train_loop_cifar10_resnet20_calls_of_1.json",
    "train_loop_cifar10_resnet20_calls_of_3.json",
  ]
  for k in (1, 3):
    loop = json.loads((out / f"train_loop_cifar10_resnet20_calls_of_{k}.json").read_text())
    assert (loop["model"], loop["steps_per_call"], loop["steps_timed"]) == ("resnet20", k, 2)
    assert loop["ms_per_step"]["train_py"] > 0
  fast = json.loads((out / "cifar10_fast_gpu.json").read_text())
  assert (fast["model"], fast["steps"], fast["epochs"]) == ("resnet20", 2, 2.0)
  paper = json.loads((out / "cifar10_resnet20_gpu_summary.json").read_text())
  assert (paper["model"], paper["steps"], paper["platform"]) == ("resnet20", 2, "cpu")
  assert paper["config"]["steps_per_call"] == 2
  records = [json.loads(line) for line in (out / "cifar10_resnet20_gpu_metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in records) == 2
  assert all(float((out / f"{name}.time").read_text()) > 0 for name in ("cifar10_fast", "cifar10_resnet20"))
  for run in ("cifar10_fast", "cifar10_resnet20"):
    assert os.listdir(runs / run / "checkpoints")
  # The same command again: the finished runs are not run again.
  again = _script(data, FAST_EPOCHS="2", PAPER_STEPS="2", RUNS="fast,paper", OUT_DIR=str(out), RUNS_DIR=str(runs))
  assert again.returncode == 0 and "== gpu_cifar: PASS" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
  for run in ("cifar10_fast", "cifar10_resnet20"):
    assert f"== {run}: finished already ({runs / run / 'summary.json'}), not run again" in again.stdout


@pytest.mark.slow
def test_a_run_stopped_at_the_time_limit_travels_in_parts_and_resumes_on_the_next_machine(tmp_path):
  """TIME_LIMIT stops the paper run with a checkpoint and the script goes on to pack it (PACK_RUNS) into
  OUT_DIR; the next call, with another RUNS_DIR (a bare machine) and RUNS_IN, resumes it from there."""
  data = _cifar_folder(tmp_path / "cifar")
  common = {"RUNS": "paper", "PAPER_STEPS": "100000", "TIME_LIMIT": "60", "PACK_RUNS": "1", "PART_MIB": "1"}
  first = _script(data, OUT_DIR=str(tmp_path / "out1"), RUNS_DIR=str(tmp_path / "runs1"), **common)
  assert first.returncode == 0 and "== gpu_cifar: PASS" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
  assert "== cifar10_resnet20: stopped at TIME_LIMIT=60 s" in first.stdout
  assert (
    "not finished within TIME_LIMIT (stopped with a checkpoint, or not started; the same command goes on): "
    "cifar10_resnet20" in first.stdout
  )
  (step,) = os.listdir(tmp_path / "runs1" / "cifar10_resnet20" / "checkpoints")  # SIGTERM's checkpoint
  assert 0 < int(step) < 100000
  parts = sorted(os.listdir(tmp_path / "out1"))
  assert "cifar10_resnet20_gpu_summary.json" not in parts  # Unfinished: no summary.
  packed = [p for p in parts if p.startswith("runs.tar.gz.")]
  assert len(packed) >= 2 and all(os.path.getsize(tmp_path / "out1" / p) <= 2**20 for p in packed), parts

  saved = tmp_path / "carried"  # What the next lease carries: the parts alone.
  os.makedirs(saved)
  for p in packed:
    os.rename(tmp_path / "out1" / p, saved / p)
  second = _script(
    data, OUT_DIR=str(tmp_path / "out2"), RUNS_DIR=str(tmp_path / "runs2"), RUNS_IN=f"{saved}/runs.tar.gz.*", **common
  )
  assert second.returncode == 0 and "== gpu_cifar: PASS" in second.stdout, second.stdout[-3000:] + second.stderr[-3000:]
  assert "unpacked 1 workdirs into" in second.stdout
  assert f"resuming {tmp_path / 'runs2' / 'cifar10_resnet20'} from step {step}" in second.stdout + second.stderr
  steps = sorted(int(s) for s in os.listdir(tmp_path / "runs2" / "cifar10_resnet20" / "checkpoints"))
  assert steps[-1] > int(step)
