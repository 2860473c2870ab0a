"""``benchmarks/runs_archive.py``: runs packed on one machine resume on another, in another folder, and end
bit for bit as the uninterrupted run; the parts are what a lease returns (small, numbered, complete)."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from resnet_jax import metrics, run_setup, train_loop
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.errors import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "runs_archive.py")


def _module():
  spec = importlib.util.spec_from_file_location("runs_archive", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


runs_archive = _module()


def _quiet(*_):
  pass


def _config():
  """12 steps, checkpoints every 3 (four kept), evaluations every 6."""
  return tiny_config(num_train_steps=12, checkpoint_every_steps=3, eval_every_steps=6, keep_checkpoints=4)


def _records(workdir):
  return [
    {k: v for k, v in r.items() if k not in ("images_per_sec", "wall_time_s")} for r in metrics.read_metrics(workdir)
  ]


def _cli(*args, cwd=None):
  return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_a_run_packed_mid_way_resumes_elsewhere_and_ends_as_the_uninterrupted_run(tmp_path):
  setup = run_setup.Setup(_config())
  full = str(tmp_path / "full")
  train_loop.train_and_evaluate(setup.config, full, log=_quiet, setup=setup)
  here = tmp_path / "machine1" / "runs"
  stopped, done = here / "table" / "resnet_a", here / "done"
  assert train_loop.train_and_evaluate(setup.config, str(stopped), log=_quiet, stop_at_step=9, setup=setup) is None
  train_loop.train_and_evaluate(setup.config, str(done), log=_quiet, setup=setup)
  assert sorted(os.listdir(stopped / "checkpoints")) == ["3", "6", "9"]

  def checkpoints(files, workdir):
    prefix = os.path.join(workdir, "checkpoints") + os.sep
    return {f[len(prefix) :].split(os.sep)[0] for f in files if f.startswith(prefix)}

  files = runs_archive.packed_files(str(here))  # Each run's newest checkpoint only.
  assert checkpoints(files, os.path.join("table", "resnet_a")) == {"9"} and checkpoints(files, "done") == {"12"}
  dropped = runs_archive.packed_files(str(here), drop_finished_checkpoints=True)
  assert checkpoints(dropped, os.path.join("table", "resnet_a")) == {"9"} and checkpoints(dropped, "done") == set()
  assert {os.path.join("done", n) for n in ("summary.json", "metrics.jsonl", "config.json")} <= set(dropped)

  out = tmp_path / "out"
  proc = _cli("pack", here, out / "runs.tar.gz", "--part_mib", 32 / 1024, "--drop_finished_checkpoints")  # 32 KiB
  assert proc.returncode == 0, proc.stderr
  parts = sorted(os.listdir(out))
  assert len(parts) >= 3 and parts == [f"runs.tar.gz.{i:02d}" for i in range(len(parts))], parts
  assert all(os.path.getsize(out / p) <= 32 * 1024 for p in parts)
  assert all(os.path.getsize(out / p) == 32 * 1024 for p in parts[:-1])

  there = tmp_path / "machine2" / "other_runs"  # Another machine: another folder, nothing in it yet.
  proc = _cli("unpack", there, *sorted(out.glob("runs.tar.gz.*"), reverse=True))  # Any order of the parts.
  assert proc.returncode == 0, proc.stderr
  assert "unpacked 2 workdirs" in proc.stdout
  assert sorted(os.listdir(there)) == ["done", "table"]  # The scratch folder is gone.
  moved = there / "table" / "resnet_a"
  assert sorted(os.listdir(moved / "checkpoints")) == ["9"]
  train_loop.train_and_evaluate(setup.config, str(moved), log=_quiet, setup=setup)

  target = setup.abstract_state()
  a, data_a, _ = Checkpointer(os.path.join(full, "checkpoints")).restore(target)
  b, data_b, _ = Checkpointer(str(moved / "checkpoints")).restore(target)
  assert int(a.step) == int(b.step) == 12 and data_a == data_b
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _records(full) == _records(moved)
  assert _records(there / "done") == _records(done)


def test_unpack_keeps_a_workdir_that_is_already_there(tmp_path):
  runs = tmp_path / "runs"
  for name in ("a", "b"):
    os.makedirs(runs / name)
    (runs / name / "config.json").write_text("{}")
    (runs / name / "metrics.jsonl").write_text(f"archived {name}\n")
  (runs / "a" / "train.lock").write_text("")  # A run's lock never travels.
  parts = runs_archive.pack(str(runs), str(tmp_path / "p"), 1 << 20)
  assert [os.path.basename(p) for p in parts] == ["p.00"]
  there = tmp_path / "there"
  os.makedirs(there / "a")
  (there / "a" / "metrics.jsonl").write_text("newer\n")
  notes = []
  assert runs_archive.unpack(str(there), parts, log=notes.append) == ["b"]
  assert (there / "a" / "metrics.jsonl").read_text() == "newer\n" and not (there / "a" / "config.json").exists()
  assert (there / "b" / "metrics.jsonl").read_text() == "archived b\n" and not (there / "b" / "train.lock").exists()
  assert len(notes) == 1 and f"kept {there / 'a'}" in notes[0]
  # Packing again with the same prefix replaces every earlier part, so that a glob never mixes two archives.
  (tmp_path / "p.07").write_bytes(b"stale")
  assert runs_archive.pack(str(runs), str(tmp_path / "p"), 1 << 20) == parts and not (tmp_path / "p.07").exists()


def test_unpack_refuses_a_missing_part_a_stray_name_and_a_foreign_member(tmp_path):
  runs = tmp_path / "runs"
  os.makedirs(runs / "a")
  (runs / "a" / "config.json").write_text("{}")
  (runs / "a" / "blob").write_bytes(np.random.default_rng(0).bytes(5000))  # Incompressible: several parts.
  parts = runs_archive.pack(str(runs), str(tmp_path / "p"), 1024)
  assert len(parts) >= 4
  with pytest.raises(ConfigError, match=r"part 01 of .*p is missing"):
    runs_archive.unpack(str(tmp_path / "x"), [parts[0], *parts[2:]])
  with pytest.raises(ConfigError, match=r"not a part written by pack"):
    runs_archive.unpack(str(tmp_path / "x"), [*parts, str(runs / "a" / "blob")])
  with pytest.raises(ConfigError, match=r"cannot read .* as one archive"):
    runs_archive.unpack(str(tmp_path / "x"), parts[:-1])  # Truncated: the last part left out.
  # A link in a foreign archive is refused, and nothing of it lands.
  evil = io.BytesIO()
  with tarfile.open(fileobj=evil, mode="w:gz") as tar:
    link = tarfile.TarInfo("a/config.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(link)
  (tmp_path / "evil.00").write_bytes(evil.getvalue())
  with pytest.raises(ConfigError, match=r"a/config.json in .*evil.00 is not a file or folder"):
    runs_archive.unpack(str(tmp_path / "x"), [str(tmp_path / "evil.00")])
  # So is a file placed outside the folder.
  evil = io.BytesIO()
  with tarfile.open(fileobj=evil, mode="w:gz") as tar:
    tar.addfile(tarfile.TarInfo("../escaped"), io.BytesIO(b""))
  (tmp_path / "climb.00").write_bytes(evil.getvalue())
  with pytest.raises(ConfigError, match=r"\.\./escaped in .*climb.00 lies outside the folder"):
    runs_archive.unpack(str(tmp_path / "x"), [str(tmp_path / "climb.00")])
  assert os.listdir(tmp_path / "x") == [] and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize(
  "args, needle",
  [
    (["pack", "nope", "out/p"], "pack: nope is not a folder"),
    (["pack", ".", "out/p", "--part_mib", "0"], "--part_mib=0.0: expected a positive size"),
    (["unpack", "runs", "nope.00"], "unpack: nope.00 does not exist"),
    (["unpack", "runs"], "usage: python benchmarks/runs_archive.py"),
  ],
)
def test_bad_input_is_one_line(args, needle, tmp_path):
  proc = _cli(*args, cwd=tmp_path)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr


def test_pack_refuses_a_folder_without_runs_a_workdir_itself_and_tiny_parts(tmp_path):
  with pytest.raises(ConfigError, match="no train.py workdir"):
    runs_archive.pack(str(tmp_path), str(tmp_path / "p"), 1024)
  os.makedirs(tmp_path / "runs" / "a")
  (tmp_path / "runs" / "a" / "config.json").write_text("{}")
  with pytest.raises(
    ConfigError, match=rf"runs/a is a workdir itself; give the folder that holds it \({tmp_path}/runs\)"
  ):
    runs_archive.pack(str(tmp_path / "runs" / "a"), str(tmp_path / "p"), 1024)
  with pytest.raises(ConfigError, match="parts of 1000 bytes; expected at least 1 KiB"):
    runs_archive.pack(str(tmp_path / "runs"), str(tmp_path / "p"), 1000)
