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


@pytest.mark.slow
def test_dry_run_writes_the_results_apart_from_the_runs(tmp_path):
  rng = np.random.default_rng(0)
  data = tmp_path / "cifar"
  for k in range(10):  # 10 classes x 15 images: 135 training images after the 10% hold-out, one batch of 128
    os.makedirs(data / "train" / f"class{k}")
    for i in range(15):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / "train" / f"class{k}" / f"{i}.png")
  out, runs = tmp_path / "out", tmp_path / "runs"
  env = {
    **os.environ,
    "ALLOW_CPU": "1",
    "SKIP_INSTALL": "1",
    "FAST_EPOCHS": "2",
    "PAPER_STEPS": "2",
    "STEPS_PER_CALL": "2",
    "RUNS": "calls,fast,paper",
    "CALLS": "1 3",
    "CALL_STEPS": "2",
    "OUT_DIR": str(out),
    "RUNS_DIR": str(runs),
    "PYTHON": sys.executable,
  }
  p = subprocess.run(
    ["bash", "benchmarks/gpu_cifar.sh", str(data)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
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
