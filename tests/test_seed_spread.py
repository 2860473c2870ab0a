"""``experiments/seed_spread.py``: one train.py command per seed, and the spread of their accuracies."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_reliability import ROOT, tiny_args  # noqa: E402

SCRIPT = os.path.join(ROOT, "experiments", "seed_spread.py")


def _script(*args, cwd):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_each_seed_trains_its_own_run_and_the_spread_is_theirs(tmp_path):
  runs, out = tmp_path / "runs", tmp_path / "spread.json"
  args = ["--seeds", "0,2", "--workdir", str(runs), "--out", str(out), "--", *tiny_args(6)]
  proc = _script(*args, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["seeds"] == [0, 2] and result["train_args"] == tiny_args(6)
  summaries = []
  for seed, row in zip((0, 2), result["runs"], strict=True):
    with open(runs / f"seed{seed}" / "summary.json") as f:
      summary = json.load(f)
    summaries.append(summary)
    assert summary["config"]["seed"] == seed and summary["steps"] == row["steps"] == 6
    assert (row["seed"], row["final_accuracy"], row["best_accuracy"]) == (
      seed,
      summary["test_accuracy"],
      summary["best_test_accuracy"],
    )
    assert row["command_wall_time_s"] > 0 and row["run_wall_time_s"] == summary["wall_time_s"]
  # Two seeds: two initialisations (the runs differ, so the spread measures something).
  assert summaries[0]["final_train_loss"] != summaries[1]["final_train_loss"]
  finals = [s["test_accuracy"] for s in summaries]
  assert result["final_accuracy"] == pytest.approx(
    {"min": min(finals), "mean": statistics.fmean(finals), "max": max(finals), "std": statistics.stdev(finals)}
  )
  assert f"final accuracy {100 * min(finals):.2f}% to {100 * max(finals):.2f}%" in proc.stdout
  assert result["machine"] and result["command"].startswith("python experiments/seed_spread.py --seeds 0,2 ")
  # The same command again resumes the finished runs: the same result, nothing trained again.
  again = _script(*args, cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert [r["final_accuracy"] for r in json.loads(out.read_text())["runs"]] == finals


def test_seeds_are_ranges_and_lists():
  import importlib.util

  spec = importlib.util.spec_from_file_location("seed_spread", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.parse_seeds("0-2,5") == [0, 1, 2, 5] and module.parse_seeds("7") == [7]
  assert module.spread([0.5]) == {"min": 0.5, "mean": 0.5, "max": 0.5, "std": 0.0}


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--seeds", "3-1"], "--seeds='3-1': expected distinct non-negative seeds"),
    (["--seeds", "0,0"], "--seeds='0,0'"),
    (["--seeds", "a"], "--seeds='a'"),
    (["--seeds", "0", "--", "--config.batch_size=-1"], "seed 0: train.py ended with status 2: error: "),
    (["--bogus"], "usage: python experiments/seed_spread.py"),
  ],
)
def test_bad_input_is_one_line(args, needle, tmp_path):
  proc = _script(*args, cwd=tmp_path)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
