"""Dataset archives: ``config.dataset.data_dir`` may name a tar archive instead of a folder.

A ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``/``.tbz2`` or ``.tar.xz``/``.txz`` file (CIFAR's own
``cifar-10-python.tar.gz``, or an image folder packed as ``train/<class>/*.jpg``) is unpacked once into
``UNPACK_DIR/<name>-<size>-<mtime>/`` and read from there as the folder it holds: a later run of the same
archive (same size and modification time) finds it unpacked. ``UNPACK_DIR`` is
``config.dataset.unpack_dir``, by default ``$XDG_CACHE_HOME/resnet_jax/unpacked`` (``~/.cache/...``).
A folder that holds only one sub-folder other than ``train``/``test`` (an archive of ``cifar10/train/...``,
or of ``cifar-10-batches-py/``) is the data folder's parent, and that sub-folder is read.

Only regular files and folders are unpacked; links and special files are left out (and counted). A member
whose name is absolute or climbs out of the archive's folder (``..``) is a :class:`DataError`, as is an
archive that cannot be read. The archive is unpacked into a scratch folder beside its destination and
renamed into place when complete, so an interrupted unpacking is never read, and several processes that
unpack the same archive at once (the hosts of a run on one shared disk) end up with one copy.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable

from resnet_jax.errors import DataError

SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
COMPLETE = ".unpacked"  # written last into an unpacked folder: its presence means the unpacking finished
_SPLITS = ("train", "test")
# What a damaged or foreign file raises while tarfile reads it (an OSError without errno is a bad stream).
_BAD_ARCHIVE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def is_archive(path: str) -> bool:
  """Whether ``path`` is a file named like a tar archive (:data:`SUFFIXES`)."""
  return bool(path) and path.lower().endswith(SUFFIXES) and os.path.isfile(path)


def default_unpack_dir() -> str:
  """``$XDG_CACHE_HOME/resnet_jax/unpacked``, else ``~/.cache/resnet_jax/unpacked``."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "resnet_jax", "unpacked")


def data_folder(data_dir: str, unpack_dir: str = "", log: Callable[[str], None] = print) -> str:
  """The folder to read ``data_dir`` from: ``data_dir`` itself, or where its archive is unpacked (once)."""
  if not is_archive(data_dir):
    if data_dir and os.path.isfile(data_dir):
      raise DataError(
        f"config.dataset.data_dir={data_dir!r} is a file: expected a folder, or a tar archive of one "
        f"({', '.join(SUFFIXES)})"
      )
    return data_dir
  return _inner_folder(unpacked(data_dir, unpack_dir, log))


def unpacked(archive: str, unpack_dir: str = "", log: Callable[[str], None] = print) -> str:
  """The folder holding ``archive``'s contents, unpacked now unless an earlier call has (see the module)."""
  info = os.stat(archive)
  root = os.path.abspath(os.path.expanduser(unpack_dir or default_unpack_dir()))
  name = os.path.basename(archive)
  for suffix in SUFFIXES:
    if name.lower().endswith(suffix):
      name = name[: -len(suffix)]
      break
  target = os.path.join(root, f"{name}-{info.st_size}-{info.st_mtime_ns}")
  if os.path.isfile(os.path.join(target, COMPLETE)):
    return target
  os.makedirs(root, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=root)
  try:
    log(f"unpacking {archive} into {target} (once: later runs read it from there)")
    left_out = _extract(archive, scratch)
    if left_out:
      log(f"{archive}: left out {len(left_out)} link(s) or special file(s) ({', '.join(left_out[:3])})")
    with open(os.path.join(scratch, COMPLETE), "w") as f:
      f.write(os.path.abspath(archive) + "\n")
    os.chmod(scratch, 0o755)  # mkdtemp's folder is private: the unpacked data is as readable as a folder made by hand
    try:
      os.rename(scratch, target)
    except OSError:
      if os.path.isfile(os.path.join(target, COMPLETE)):  # Another process's complete copy: use that one.
        pass
      elif not os.path.exists(target):  # Not a clash: the system's error, with its path.
        raise
      else:
        raise DataError(
          f"cannot unpack {archive} into {target}: that folder exists and is not a complete unpacking "
          f"(no {COMPLETE} file); remove it, or set config.dataset.unpack_dir to another folder"
        ) from None
  finally:
    shutil.rmtree(scratch, ignore_errors=True)  # Gone already where it was renamed into place.
  return target


def _extract(archive: str, dest: str) -> list[str]:
  """Unpack the regular files and folders of ``archive`` into ``dest``; the names of the members left out."""
  left_out = []
  try:
    with tarfile.open(archive) as tar:
      for member in tar:  # One pass: a compressed archive is read once, front to back.
        parts = member.name.replace("\\", "/").split("/")
        if member.name.startswith(("/", "\\")) or ".." in parts or (parts[0].endswith(":") and len(parts[0]) == 2):
          raise DataError(
            f"cannot unpack {archive}: its member {member.name!r} would land outside the folder it is "
            f"unpacked into; unpack it by hand and set config.dataset.data_dir to the folder"
          )
        if not (member.isfile() or member.isdir()):
          left_out.append(member.name)
          continue
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the library's own checks as well.
          tar.extract(member, dest, filter="data")
        else:
          tar.extract(member, dest)
  except _BAD_ARCHIVE as e:
    expected = f"expected a tar archive ({', '.join(SUFFIXES)})"
    reason = " ".join(str(e).split()) or type(e).__name__  # tarfile's reasons can span lines
    raise DataError(f"cannot unpack {archive}: {reason}; {expected}") from None
  except OSError as e:
    if e.errno is not None:  # Writing failed (a full disk, no permission): the system's error, with its path.
      raise
    raise DataError(f"cannot unpack {archive}: {e}; expected a tar archive ({', '.join(SUFFIXES)})") from None
  return left_out


def _inner_folder(folder: str) -> str:
  """``folder``, or the single sub-folder it holds (recursively) where that is not ``train``/``test``."""
  while True:
    entries = [e for e in os.scandir(folder) if e.name != COMPLETE]
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in _SPLITS:
      return folder
    folder = entries[0].path
