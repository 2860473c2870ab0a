"""``benchmarks/train_loop.py``: the host's share of a training step, on an image folder the test writes,
with the batches augmented on the device (the path a GPU run takes). No timing assertions: the machine
running the tests is shared, so only the structure and consistency of the output are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_loop.py")


def run_script(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def write_folder(root, per_class: int = 3) -> None:
  """CIFAR-10's layout: ten class folders of 32x32 images."""
  rng = np.random.default_rng(0)
  for c in (f"class{k}" for k in range(10)):
    os.makedirs(root / "train" / c)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")


@pytest.mark.slow  # about 40 s: ResNet-20's step compiled alone and inside the loop of steps_per_call
def test_times_each_host_part_of_the_step_on_a_folder_augmented_on_the_device(tmp_path):
  write_folder(tmp_path)
  out = tmp_path / "loop.json"
  p = run_script(
    "--config", "configs/cifar10_fast.py", "--data_dir", str(tmp_path), "--augment_on", "device",
    "--batch_size", "4", "--steps", "3", "--steps_per_call", "2", "--json", str(out),
  )  # fmt: skip
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert res == json.loads(p.stdout)
  assert (res["model"], res["dataset"], res["batch"], res["steps_timed"]) == ("resnet20", "cifar10", 4, 3)
  assert res["augment_on"] == "device" and res["machine"]["backend"] == "cpu"
  assert res["steps_per_call"] == 2 and res["train_py_first_window_s"] > 0  # of the train_py run
  assert res["conv_backend"] == "auto"
  assert res["host_memory"] in ("keep", "default") and res["compute_dtype"] in ("float32", "bfloat16")
  loops = ["loop_in_flight_1", "loop_in_flight_2", "loop_in_flight_4", "train_py"]
  parts = ["draws", "transfer", "dispatch", "same_batch", *loops]
  assert list(res["ms_per_step"]) == parts
  assert all(res["ms_per_step"][k] > 0 for k in parts)
  # Waiting for the steps at the end can only add to the time of calling them.
  assert res["ms_per_step"]["same_batch"] >= res["ms_per_step"]["dispatch"]
  assert res["compile_and_first_step_s"] > 0 and res["setup_s"] > 0


def test_bad_input_is_one_line_and_status_2(tmp_path):
  p = run_script("--config", "configs/cifar10_fast.py", "--steps", "0")
  assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--steps 0" in p.stderr, p.stderr
  p = run_script("--config", str(tmp_path / "missing.py"))
  assert p.returncode == 2 and p.stderr.count("\n") == 1 and "missing.py" in p.stderr, p.stderr
  write_folder(tmp_path, per_class=2)
  p = run_script("--config", "configs/cifar10_fast.py", "--data_dir", str(tmp_path), "--steps", "1")
  assert p.returncode == 2 and p.stderr.count("\n") == 1 and "batch" in p.stderr, p.stderr
