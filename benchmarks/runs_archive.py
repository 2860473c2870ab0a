"""Carry training runs from one machine to another: pack a folder of ``train.py`` workdirs into a few files,
and unpack them into the same folder elsewhere, where the same command resumes each unfinished run.

usage: python benchmarks/runs_archive.py pack RUNS_DIR OUT_PREFIX [--part_mib 15] [--drop_finished_checkpoints]
       python benchmarks/runs_archive.py unpack RUNS_DIR PART...

A lent machine starts bare and returns only a few files of limited size, so a run longer than one lease
(He et al.'s Table 6 on a GPU, say) goes on only if its workdir travels. ``pack`` writes every workdir
under ``RUNS_DIR`` (a folder holding a ``config.json``, at any depth) as one gzip-compressed tar, cut into
parts ``OUT_PREFIX.00``, ``OUT_PREFIX.01``, ... of at most ``--part_mib`` MiB each. Of each workdir's
checkpoints it keeps only the newest complete one, which is all a resumed run reads. With
``--drop_finished_checkpoints`` a finished run (one with ``summary.json``) keeps none, only the metrics,
summary and config its results are read from: for a tool that never runs a finished run again
(``experiments/he_table.py`` and ``benchmarks/gpu_cifar.sh`` skip them), since ``train.py`` in a workdir
without a checkpoint trains from step 0. orbax's unfinished checkpoint folders and the run's lock are left out.

``unpack`` joins the parts (all of them, numbered from 00 without a gap, else a one-line error naming the
missing part) and extracts regular files and folders only, into a scratch folder beside ``RUNS_DIR``; each
workdir is then moved into place, unless ``RUNS_DIR`` already holds a workdir of that name, which is kept
(a machine that kept its runs since the archive was made has them at least as far along). A workdir may
move: a resumed run reads its checkpoints relative to the workdir, and its data from
``config.dataset.data_dir`` as given to the resuming command.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # The repository, when run from a clone without install.

USAGE = (
  "usage: python benchmarks/runs_archive.py pack RUNS_DIR OUT_PREFIX [--part_mib 15] "
  "[--drop_finished_checkpoints] | unpack RUNS_DIR PART..."
)
LEFT_OUT = ("train.lock",)  # A run's lock: held only while the run is in progress.
PART_NAME = re.compile(r"(.*)\.(\d{2,})")  # PREFIX.NN: a part's prefix and number


def workdirs(runs_dir: str) -> list[str]:
  """The ``train.py`` workdirs under ``runs_dir`` (folders holding ``config.json``), relative, sorted."""
  found = []
  for folder, subfolders, files in os.walk(runs_dir):
    if "config.json" in files:
      found.append(os.path.relpath(folder, runs_dir))
      subfolders[:] = []  # A workdir holds no other workdir.
    else:
      subfolders.sort()
  return sorted(found)


def packed_files(runs_dir: str, drop_finished_checkpoints: bool = False) -> list[str]:
  """The files of ``runs_dir``'s workdirs that ``pack`` writes, relative to ``runs_dir``.

  Per workdir: everything but its lock, orbax's unfinished checkpoint folders and every checkpoint but
  the newest complete one (none of a finished run with ``drop_finished_checkpoints``)."""
  chosen = []
  for rel in workdirs(runs_dir):
    root = os.path.join(runs_dir, rel)
    ckpt_dir = os.path.join(root, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []
    finished = os.path.isfile(os.path.join(root, "summary.json"))
    keep = {str(steps[-1])} if steps and not (finished and drop_finished_checkpoints) else set()
    for folder, subfolders, files in os.walk(root):
      subfolders.sort()
      if os.path.abspath(folder) == os.path.abspath(ckpt_dir):
        subfolders[:] = [s for s in subfolders if s in keep]
      for name in sorted(files):
        if name not in LEFT_OUT:
          chosen.append(os.path.relpath(os.path.join(folder, name), runs_dir))
  return chosen


class _Parts:
  """A write-only stream cut into files ``prefix.00``, ``prefix.01``, ... of at most ``part_bytes`` each."""

  def __init__(self, prefix: str, part_bytes: int):
    self.prefix, self.part_bytes = prefix, part_bytes
    self.paths: list[str] = []
    self._file = None
    self._left = 0

  def write(self, data: bytes) -> int:
    view = memoryview(data)
    while view:
      if self._left == 0:
        self._next()
      n = min(self._left, len(view))
      self._file.write(view[:n])
      self._left -= n
      view = view[n:]
    return len(data)

  def _next(self) -> None:
    if self._file is not None:
      self._file.close()
    self.paths.append(f"{self.prefix}.{len(self.paths):02d}")
    self._file = open(self.paths[-1], "wb")
    self._left = self.part_bytes

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is None:
      self._next()  # An empty archive still has its part 00.
    self._file.close()


def pack(runs_dir: str, prefix: str, part_bytes: int, drop_finished_checkpoints: bool = False) -> list[str]:
  """Write ``runs_dir``'s workdirs (:func:`packed_files`) as a tar.gz cut into parts; returns their paths.

  Parts ``prefix.NN`` left by an earlier pack with the same prefix are removed first, so that ``unpack
  prefix.*`` never joins parts of two archives."""
  from resnet_jax.errors import ConfigError

  if not os.path.isdir(runs_dir):
    raise ConfigError(f"pack: {runs_dir} is not a folder; expected a folder of train.py workdirs")
  if os.path.isfile(os.path.join(runs_dir, "config.json")):
    parent = os.path.dirname(os.path.abspath(runs_dir))
    raise ConfigError(f"pack: {runs_dir} is a workdir itself; give the folder that holds it ({parent})")
  if part_bytes < 1024:
    raise ConfigError(f"pack: parts of {part_bytes} bytes; expected at least 1 KiB")
  files = packed_files(runs_dir, drop_finished_checkpoints)
  if not files:
    raise ConfigError(f"pack: no train.py workdir (a folder with config.json) under {runs_dir}")
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  for old in _numbered_parts(prefix):
    os.remove(old)
  parts = _Parts(prefix, part_bytes)
  # gzip level 1: checkpoints are float arrays, which compress little at any level. (tarfile's own "w|gz"
  # takes no level before Python 3.12.)
  with gzip.GzipFile(fileobj=parts, mode="wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
    for rel in files:
      tar.add(os.path.join(runs_dir, rel), arcname=rel, recursive=False)
  parts.close()
  return parts.paths


def _numbered_parts(prefix: str) -> list[str]:
  folder, base = os.path.split(os.path.abspath(prefix))
  if not os.path.isdir(folder):
    return []
  matches = [(n, PART_NAME.fullmatch(n)) for n in os.listdir(folder)]
  return sorted(os.path.join(folder, n) for n, m in matches if m and m.group(1) == base)


class _Joined:
  """A read-only stream over the parts, in order."""

  def __init__(self, paths: list[str]):
    self._paths = list(paths)
    self._file = None

  def read(self, size: int = -1) -> bytes:
    while True:
      if self._file is None:
        if not self._paths:
          return b""
        self._file = open(self._paths.pop(0), "rb")
      data = self._file.read(size)
      if data or size == 0:
        return data
      self._file.close()
      self._file = None


def ordered_parts(paths: list[str]) -> list[str]:
  """``paths`` in their numbered order; a duplicate, a gap or a name without a number is a ConfigError."""
  from resnet_jax.errors import ConfigError

  numbered = {}
  for p in paths:
    m = PART_NAME.fullmatch(p)
    if not m:
      raise ConfigError(f"unpack: {p} is not a part written by pack (expected a name ending in .00, .01, ...)")
    numbered.setdefault(int(m.group(2)), []).append(p)
  for n, same in numbered.items():
    if len(same) > 1:
      raise ConfigError(f"unpack: {', '.join(same)} are all part {n:02d}; give the parts of one archive")
  missing = [n for n in range(max(numbered) + 1) if n not in numbered]
  if missing:
    first = next(iter(numbered.values()))[0]
    raise ConfigError(
      f"unpack: part {missing[0]:02d} of {first[: first.rfind('.')]} is missing; give every part, from 00 on"
    )
  return [numbered[n][0] for n in sorted(numbered)]


def unpack(runs_dir: str, paths: list[str], log=print) -> list[str]:
  """Extract the parts' workdirs into ``runs_dir``; returns the workdirs moved into place (relative).

  A workdir that ``runs_dir`` already holds is kept, and the archive's copy dropped (logged)."""
  from resnet_jax.errors import ConfigError

  for p in paths:
    if not os.path.isfile(p):
      raise ConfigError(f"unpack: {p} does not exist; expected a part written by pack")
  ordered = ordered_parts(paths)
  os.makedirs(runs_dir, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=".unpack-", dir=runs_dir)
  moved = []
  try:
    try:
      with tarfile.open(fileobj=_Joined(ordered), mode="r|gz") as tar:
        for member in tar:
          if not (member.isfile() or member.isdir()):
            raise ConfigError(f"unpack: {member.name} in {ordered[0]} is not a file or folder; pack writes only those")
          if os.path.isabs(member.name) or ".." in member.name.split("/"):
            raise ConfigError(f"unpack: {member.name} in {ordered[0]} lies outside the folder; pack writes none such")
          # Python's own check as well, where it has one (3.11.4 and newer).
          tar.extract(member, scratch, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
      if isinstance(e, OSError) and e.errno is not None:
        raise  # The disk, not the archive: the system's reason, with its path.
      raise ConfigError(f"unpack: cannot read {', '.join(ordered)} as one archive written by pack ({e})") from None
    for rel in workdirs(scratch):
      dest = os.path.join(runs_dir, rel)
      if os.path.exists(dest):
        log(f"unpack: kept {dest}, which was here already (the archive's copy dropped)")
        continue
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.rename(os.path.join(scratch, rel), dest)
      moved.append(rel)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return moved


def main(argv: list[str] | None = None) -> int:
  from resnet_jax.errors import ConfigError, parse_args

  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  sub = parser.add_subparsers(dest="verb", required=True)
  p = sub.add_parser("pack", help="RUNS_DIR's workdirs into OUT_PREFIX.00, .01, ...")
  p.add_argument("runs_dir")
  p.add_argument("prefix")
  p.add_argument("--part_mib", type=float, default=15.0, help="the largest part, in MiB (default 15)")
  p.add_argument("--drop_finished_checkpoints", action="store_true", help="no checkpoint of a finished run")
  u = sub.add_parser("unpack", help="the parts' workdirs into RUNS_DIR")
  u.add_argument("runs_dir")
  u.add_argument("parts", nargs="+")
  args = parse_args(parser, argv, USAGE)
  if args.verb == "pack":
    if not args.part_mib > 0:
      raise ConfigError(f"--part_mib={args.part_mib}: expected a positive size in MiB")
    paths = pack(args.runs_dir, args.prefix, int(args.part_mib * 2**20), args.drop_finished_checkpoints)
    size = sum(os.path.getsize(p) for p in paths)
    print(f"packed {len(workdirs(args.runs_dir))} workdirs of {args.runs_dir} into {len(paths)} parts, {size:,} bytes:")
    for path in paths:
      print(f"  {path}")
  else:
    moved = unpack(args.runs_dir, args.parts)
    print(f"unpacked {len(moved)} workdirs into {args.runs_dir}: {', '.join(moved) or 'none'}")
  return 0


if __name__ == "__main__":
  from resnet_jax.errors import run_cli

  run_cli(main)
