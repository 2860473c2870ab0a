"""``config.dataset.data_dir`` as a tar archive (resnet_jax.archives): the same dataset as the folder it
holds, unpacked once, and the errors of bad archives; archives the tests write themselves."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

from resnet_jax import archives, data, predict, train_loop
from resnet_jax.errors import DataError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_data import dataset_config, write_cifar, write_image_folder  # noqa: E402
from test_train import tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pack(folder: str, archive: str, arcname: str = "") -> str:
  """``folder``'s contents as the tar archive ``archive`` (compressed as its name says), under ``arcname``."""
  mode = {"gz": "w:gz", "tgz": "w:gz", "bz2": "w:bz2", "xz": "w:xz"}.get(archive.rsplit(".", 1)[-1], "w")
  with tarfile.open(archive, mode) as tar:
    for name in sorted(os.listdir(folder)):
      tar.add(os.path.join(folder, name), arcname=os.path.join(arcname, name) if arcname else name)
  return archive


def same_dataset(a, b) -> None:
  np.testing.assert_array_equal(a.train_x, b.train_x)
  np.testing.assert_array_equal(a.train_y, b.train_y)
  np.testing.assert_array_equal(a.test_x, b.test_x)
  np.testing.assert_array_equal(a.test_y, b.test_y)
  assert (a.num_classes, a.mean.tolist(), a.std.tolist()) == (b.num_classes, b.mean.tolist(), b.std.tolist())


@pytest.mark.parametrize("suffix", ["tar", "tar.gz", "tgz", "tar.bz2", "tar.xz"])
def test_an_image_folder_archive_is_the_folder_it_holds(tmp_path, suffix):
  folder = write_image_folder(str(tmp_path / "folder"), size=(32, 32))
  archive = pack(folder, str(tmp_path / f"images.{suffix}"))
  kw = {"name": "image_folder", "image_size": 32, "augment": "pad_crop_flip", "holdout": 2}
  from_folder = data.load_dataset(dataset_config(data_dir=folder, **kw), progress=False)
  unpack = str(tmp_path / "unpacked")
  from_archive = data.load_dataset(dataset_config(data_dir=archive, unpack_dir=unpack, **kw), progress=False)
  same_dataset(from_folder, from_archive)
  assert from_archive.info["holdout"]["keys"] == from_folder.info["holdout"]["keys"]  # the same held-out files
  (only,) = os.listdir(unpack)
  assert only.startswith("images-") and os.path.isfile(os.path.join(unpack, only, archives.COMPLETE))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_the_cifar_release_archive_as_published_is_read_as_its_pickles(tmp_path, name):
  release = write_cifar(str(tmp_path / "release"), name=name)  # release/cifar-10-batches-py/... as unpacked
  archive = pack(release, str(tmp_path / f"{name.replace('cifar', 'cifar-')}-python.tar.gz"))
  from_folder = data.load_dataset(dataset_config(name=name, data_dir=release), progress=False)
  from_archive = data.load_dataset(
    dataset_config(name=name, data_dir=archive, unpack_dir=str(tmp_path / "u")), progress=False
  )
  same_dataset(from_folder, from_archive)


def test_a_single_top_folder_is_entered_but_not_train(tmp_path):
  folder = write_image_folder(str(tmp_path / "folder"), size=(32, 32))
  nested = pack(folder, str(tmp_path / "nested.tar"), arcname="my_data/v1")  # my_data/v1/{train,test}/...
  assert archives.data_folder(nested, str(tmp_path / "u")).endswith(os.path.join("my_data", "v1"))
  only_train = str(tmp_path / "flat.tar")
  with tarfile.open(only_train, "w") as tar:  # train/ alone at the top: the folder is the data folder
    tar.add(os.path.join(folder, "train"), arcname="train")
  unpacked = archives.data_folder(only_train, str(tmp_path / "u"))
  assert os.listdir(os.path.join(unpacked, "train")) == os.listdir(os.path.join(folder, "train"))


def test_an_archive_is_unpacked_once_and_again_when_it_changes(tmp_path):
  folder = write_image_folder(str(tmp_path / "folder"))
  archive = pack(folder, str(tmp_path / "images.tar.gz"))
  unpack, said = str(tmp_path / "u"), []
  first = archives.data_folder(archive, unpack, said.append)
  marker = os.path.join(first, archives.COMPLETE)
  made = os.stat(marker).st_mtime_ns
  assert archives.data_folder(archive, unpack, said.append) == first
  assert os.stat(marker).st_mtime_ns == made and len(said) == 1 and "unpacking" in said[0]
  os.utime(archive, ns=(made + 10**9, made + 10**9))  # touched: another archive now
  second = archives.data_folder(archive, unpack, said.append)
  assert second != first and len(said) == 2
  assert sorted(os.listdir(unpack)) == sorted(os.path.basename(f) for f in (first, second))  # no scratch left


def test_processes_unpacking_one_archive_at_once_share_one_copy(tmp_path):
  folder = write_image_folder(str(tmp_path / "folder"), per_class=40)
  archive = pack(folder, str(tmp_path / "images.tar.gz"))
  unpack, results, errors = str(tmp_path / "u"), [], []

  def run():
    try:
      results.append(archives.data_folder(archive, unpack, lambda _: None))
    except Exception as e:  # noqa: BLE001 (reported below)
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(set(results)) == 1
  assert os.listdir(unpack) == [os.path.basename(results[0])]  # no scratch folder left behind
  assert sorted(os.listdir(os.path.join(results[0], "train", "cat"))) == sorted(
    os.listdir(os.path.join(folder, "train", "cat"))
  )


def add_bytes(
  tar: tarfile.TarFile, name: str, payload: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
  info = tarfile.TarInfo(name)
  info.type, info.linkname = kind, link
  info.size = len(payload) if kind == tarfile.REGTYPE else 0
  tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("name", ["../escape.txt", "/abs/escape.txt", "train/../../escape.txt"])
def test_a_member_outside_the_folder_is_refused_and_nothing_is_left(tmp_path, name):
  archive = str(tmp_path / "evil.tar")
  with tarfile.open(archive, "w") as tar:
    add_bytes(tar, "train/a/ok.txt")
    add_bytes(tar, name)
  unpack = str(tmp_path / "deep" / "u")
  with pytest.raises(DataError, match="outside the folder") as e:
    archives.data_folder(archive, unpack)
  assert name in str(e.value)
  assert os.listdir(unpack) == [] and not os.path.exists(tmp_path / "escape.txt")
  assert not os.path.exists(tmp_path / "deep" / "escape.txt")


def test_links_and_special_files_are_left_out_and_counted(tmp_path):
  archive = str(tmp_path / "links.tar")
  with tarfile.open(archive, "w") as tar:
    add_bytes(tar, "train/a/ok.txt", b"data")
    add_bytes(tar, "train/a/link.txt", kind=tarfile.SYMTYPE, link="/etc/passwd")
    add_bytes(tar, "train/a/hard.txt", kind=tarfile.LNKTYPE, link="train/a/ok.txt")
    add_bytes(tar, "train/a/fifo", kind=tarfile.FIFOTYPE)
  said = []
  folder = archives.data_folder(archive, str(tmp_path / "u"), said.append)
  assert os.listdir(os.path.join(folder, "train", "a")) == ["ok.txt"]
  assert any("left out 3 link(s) or special file(s)" in s for s in said)


def test_an_existing_incomplete_folder_is_not_read(tmp_path):
  folder = write_image_folder(str(tmp_path / "folder"))
  archive = pack(folder, str(tmp_path / "images.tar"))
  unpack = tmp_path / "u"
  info = os.stat(archive)
  stale = unpack / f"images-{info.st_size}-{info.st_mtime_ns}"
  os.makedirs(stale / "train" / "half")
  with pytest.raises(DataError, match="not a complete unpacking"):
    archives.data_folder(archive, str(unpack))
  assert os.listdir(unpack) == [stale.name]


def test_a_damaged_archive_or_a_plain_file_is_a_data_error(tmp_path):
  bad = tmp_path / "broken.tar.gz"
  bad.write_bytes(os.urandom(2000))
  with pytest.raises(DataError, match=r"cannot unpack .*broken.tar.gz.*expected a tar archive"):
    archives.data_folder(str(bad), str(tmp_path / "u"))
  assert os.listdir(tmp_path / "u") == []
  truncated = tmp_path / "cut.tar.gz"
  whole = pack(write_image_folder(str(tmp_path / "folder")), str(tmp_path / "whole.tar.gz"))
  truncated.write_bytes(open(whole, "rb").read()[:-200])
  with pytest.raises(DataError, match="cannot unpack"):
    archives.data_folder(str(truncated), str(tmp_path / "u"))
  plain = tmp_path / "notes.txt"
  plain.write_text("not data")
  with pytest.raises(DataError, match="is a file: expected a folder, or a tar archive"):
    data.load_dataset(dataset_config(name="image_folder", data_dir=str(plain)), progress=False)


def test_train_py_reports_a_damaged_archive_in_one_line(tmp_path):
  bad = tmp_path / "cifar.tar.gz"
  bad.write_bytes(b"\x1f\x8b" + os.urandom(100))  # a gzip header, then garbage
  p = subprocess.run(
    [
      sys.executable, "train.py", "--config=configs/cifar10_resnet20.py", f"--config.dataset.data_dir={bad}",
      f"--config.dataset.unpack_dir={tmp_path / 'u'}", f"--workdir={tmp_path / 'run'}",
    ],
    capture_output=True, text=True, timeout=300, cwd=ROOT,
  )  # fmt: skip
  assert p.returncode == 2, p.stderr
  lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "cannot unpack" in lines[0] and "cifar.tar.gz" in lines[0], p.stderr
  assert "Traceback" not in p.stderr


def test_a_run_trained_from_an_archive_names_its_classes_when_the_data_is_gone(tmp_path):
  folder = write_image_folder(str(tmp_path / "folder"), classes=("ant", "bee", "cat"), size=(16, 16))
  archive = pack(folder, str(tmp_path / "insects.tar.gz"))
  unpack = str(tmp_path / "u")
  overrides = {
    "dataset.name": "image_folder", "dataset.data_dir": archive, "dataset.unpack_dir": unpack,
    "dataset.image_size": 16, "dataset.augment": "none", "num_train_steps": 2, "batch_size": 3,
    "eval_batch_size": 3, "dataset.max_train_examples": -1, "dataset.max_test_examples": -1,
  }  # fmt: skip
  workdir = str(tmp_path / "run")
  train_loop.train_and_evaluate(tiny_config("resnet20", **overrides), workdir, log=lambda *_: None)
  os.remove(archive)
  shutil.rmtree(unpack)
  assert predict.load_predictor(workdir=workdir).class_names == ["ant", "bee", "cat"]
