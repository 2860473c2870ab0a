"""Training checkpoints with orbax: the whole train state, the data iterator state and run metadata.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,meta}``:

- ``state``: the :class:`~resnet_jax.train_step.TrainState` pytree (step, params, optimizer state,
  BatchNorm statistics, and the weight average with ``config.ema_decay > 0``), saved with
  ``orbax.checkpoint.args.StandardSave``;
- ``data``: the grain iterator state (``iterator.get_state()``, JSON), so a resumed run reads the
  same batches as an uninterrupted one;
- ``meta``: JSON run metadata (the config, the best test accuracy so far, the training time so far).

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
during a write leaves the previous checkpoints intact and the partial one is ignored; the manager
keeps the last ``keep`` complete checkpoints.

Before any array is read, a restore compares the checkpoint's metadata (orbax's tree metadata of the
``state`` item: each array's path, shape and dtype) with the target state: a checkpoint of another
configuration is a :class:`CheckpointError` naming the checkpoint, the arrays, what was stored and
what was expected. A checkpoint that cannot be read (a damaged, truncated or missing file) raises
:class:`CheckpointError` naming the checkpoint, the file where it can be told, and the earlier
checkpoints; ``config.restore_step`` resumes from one of them, and :meth:`Checkpointer.set_aside_after`
moves the later ones out of the way (nothing is deleted). A write that fails for lack of storage (a
full disk, a read-only folder, a permission) is a :class:`CheckpointError` with the system's reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from typing import Any, Self

import jax
import numpy as np

from resnet_jax.errors import CheckpointError, drop_error_records, stray_async_errors_silenced


class Checkpointer:
  """Saves and restores training checkpoints under ``directory`` (keeps the last ``keep``)."""

  def __init__(self, directory: str, keep: int = 3):
    import orbax.checkpoint as ocp

    self.directory = os.path.abspath(directory)
    self._ocp = ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    # The items' handlers, named up front, let the manager read a step's metadata before restoring it.
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or ``None``."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Write the checkpoint of ``step`` (overwriting nothing; a step saved already is skipped).

    Raises:
      CheckpointError: the storage refused the write (a full disk, a read-only folder, a permission):
        the message gives the system's reason; the partial folder is removed, earlier checkpoints stay.
    """
    ocp = self._ocp
    if step in self._manager.all_steps():
      return
    error = None
    with _held_log_records("absl") as held:  # orbax's writer threads log each failed write, with tracebacks.
      try:
        with stray_async_errors_silenced():
          self._manager.save(
            step,
            args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
          )
          self._manager.wait_until_finished()
      except Exception as e:  # orbax and tensorstore raise ValueError, OSError, ...
        reason = _storage_error(e, self.directory, _nbytes(state))
        if reason is None:
          raise  # Not the storage: a bug, with its traceback (and the held records written out).
        held.drop()
        drop_storage_refused_records()  # Writer threads still running may log theirs after this block.
        error = self._write_error(step, reason)
    if error is not None:
      raise error

  def _write_error(self, step: int, reason: str) -> CheckpointError:
    """The CheckpointError of a write of ``step`` refused by the storage; removes its partial folder."""
    removed = self._remove_partial(step)
    earlier = self.all_steps_on_disk()
    return CheckpointError(
      f"cannot write checkpoint {os.path.join(self.directory, str(step))}: {reason}"
      f"{'; its partial folder was removed' if removed else ''}; "
      + (
        f"the earlier checkpoints (steps {earlier}) are intact: free space and run the same command again to resume"
        if earlier
        else "no earlier checkpoint was written"
      )
    )

  def all_steps_on_disk(self) -> list[int]:
    """Steps of the complete checkpoint folders (read from the folder, not the manager)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  def _remove_partial(self, step: int) -> bool:
    """Remove orbax's temporary folder of the failed write of ``step`` (never a complete checkpoint)."""
    removed = False
    for name in os.listdir(self.directory):
      if name.startswith(f"{step}.orbax-checkpoint-tmp"):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        removed = True
    return removed

  def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
    """Restore ``(state, data_state, meta)`` of ``step`` (default: the newest complete checkpoint).

    The checkpoint's metadata is compared with ``target_state`` first: a checkpoint of another
    configuration is refused before any array is read.

    Args:
      target_state: a state of the same structure (its shapes, dtypes and shardings are used).
      step: the step to restore.

    Raises:
      CheckpointError: no checkpoint, or one that cannot be read or does not fit ``target_state``
        (the message names the folder, and the arrays that do not fit).
    """
    ocp = self._ocp
    step = self._complete_step(step)
    path = os.path.join(self.directory, str(step))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    mismatch = _mismatch(self._stored_arrays(path, step), abstract)
    if mismatch:
      raise CheckpointError(
        f"checkpoint {path} holds a train state of another shape than this "
        f"config's model and optimizer ({mismatch}): it belongs to a run of "
        f"another configuration; use another --workdir (nothing was changed)"
      )
    try:
      with stray_async_errors_silenced():
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
          ),
        )
    except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise ValueError, OSError, KeyError, ...
      raise self._damaged(path, step, e, f"in {os.path.join(path, 'state')} (the arrays' files)") from None
    return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

  def _complete_step(self, step: int | None) -> int:
    """``step``, or the newest complete checkpoint's when it is ``None``; a CheckpointError when there is none."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(
        f"no complete checkpoint of step {step} in {self.directory}; complete checkpoints: steps {self.all_steps()}"
      )
    return step

  def read_meta(self, step: int | None = None) -> tuple[int, dict]:
    """``(step, meta)``: the run metadata alone of the checkpoint of ``step`` (default: the newest complete
    one), without reading any array: what a resume checks before it restores the state.

    Raises:
      CheckpointError: no such checkpoint, or its metadata cannot be read (naming the file).
    """
    step = self._complete_step(step)
    path = os.path.join(self.directory, str(step))
    try:
      with stray_async_errors_silenced():
        restored = self._manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 -- orbax raises ValueError, OSError, JSONDecodeError, ...
      raise self._damaged(path, step, e, f"in {os.path.join(path, 'meta')} (the run metadata)") from None
    return step, dict(restored["meta"] or {})

  def _stored_arrays(self, path: str, step: int) -> dict[str, tuple] | None:
    """``{array name: (shape, dtype)}`` of the train state in the checkpoint of ``step``, read from orbax's
    tree metadata (no array is read); ``None`` when the checkpoint has no tree metadata."""
    try:
      with stray_async_errors_silenced():
        metadata = self._manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise ValueError, JSONDecodeError, ...
      raise self._damaged(path, step, e, f"in {os.path.join(path, 'state')} (the arrays' files)") from None
    if metadata is None:
      return None
    return {
      _path_name(p): (getattr(m, "shape", None), getattr(m, "dtype", None))
      for p, m in jax.tree_util.tree_leaves_with_path(metadata, is_leaf=lambda x: hasattr(x, "shape"))
    }

  def _damaged(self, path: str, step: int, e: BaseException, where: str) -> CheckpointError:
    """The CheckpointError of the checkpoint ``path`` that failed to read with ``e``: the file that our
    own check finds missing or unreadable, else ``where`` (the part whose read failed)."""
    earlier = [s for s in self.all_steps() if s < step]
    hint = (
      f"; to resume from the previous complete checkpoint, run again with "
      f"--config.restore_step={earlier[-1]} (earlier checkpoints: steps {earlier}; nothing "
      f"was deleted)"
      if earlier
      else "; there is no earlier checkpoint (nothing was deleted)"
    )
    detail = " ".join(str(e).split())[:200]
    return CheckpointError(
      f"cannot restore checkpoint {path}: damaged file {_bad_file(path) or where}: {type(e).__name__}: {detail}{hint}"
    )

  def set_aside_after(self, step: int, folder: str) -> list[int]:
    """Move the checkpoints later than ``step`` into ``folder/<step>`` (kept, not deleted).

    A run resumed from an earlier checkpoint (``config.restore_step``) writes its own checkpoints of
    those steps; the old ones stay in ``folder`` for inspection. Returns the steps moved.
    """
    later = [s for s in self.all_steps() if s > step]
    for s in later:
      target = os.path.join(folder, str(s))
      n = 1
      while os.path.exists(target):  # Never write over an earlier set-aside copy.
        target, n = os.path.join(folder, f"{s}.{n}"), n + 1
      os.makedirs(folder, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(s)), target)
    if later:
      self._manager.reload()
    return later

  def reload(self) -> None:
    """Read the folder again (after another process moved checkpoints)."""
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()


class _held_log_records(logging.Filter):
  """Hold the records of the logger ``name`` inside the block; log them at the end unless dropped.

  orbax's writer threads log every failed write with its traceback through absl's logger. After a write
  that the storage refused, the one CheckpointError says it all and they are dropped; after a
  successful save, or a failure that is a bug, they are logged as usual.
  """

  def __init__(self, name: str):
    super().__init__()
    self._logger = logging.getLogger(name)
    self._records: list[logging.LogRecord] = []
    self._keep = True

  def filter(self, record: logging.LogRecord) -> bool:
    self._records.append(record)
    return False

  def drop(self) -> None:
    self._keep = False

  def __enter__(self) -> Self:
    self._logger.addFilter(self)
    return self

  def __exit__(self, *exc) -> None:
    self._logger.removeFilter(self)
    if self._keep:
      for record in self._records:
        self._logger.handle(record)


STORAGE_REFUSED = "a write the storage refused"  # the reason of the absl filter below
_REFUSALS = tuple(os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM))


def _names_a_refused_write(error: BaseException) -> bool:
  """Whether ``error``, its cause or its context says that the storage refused a write (:data:`_REFUSALS`)."""
  text = " ".join(str(x) for x in (error, error.__cause__, error.__context__) if x is not None)
  return any(reason in text for reason in _REFUSALS)


def drop_storage_refused_records() -> None:
  """From now on, drop orbax's writer-thread records of writes that the storage refused.

  A checkpoint is written by several orbax threads; when the storage refuses a write, the first failure
  reaches :meth:`Checkpointer.save`, which reports it as one :class:`CheckpointError`, while the other
  threads may still be running and log their own failures, with tracebacks, through absl after the save
  has returned (:class:`_held_log_records` only holds the records logged inside it). This filter on the
  ``absl`` logger (:func:`resnet_jax.errors.drop_error_records`) drops the records whose exception names a
  refused write (no space, a quota, a read-only file system, a permission); every other record, with or
  without an exception, goes through. Installed once per process.
  """
  drop_error_records("absl", STORAGE_REFUSED, _names_a_refused_write)


def _storage_error(e: BaseException, directory: str, needed: int) -> str | None:
  """The system's reason when the failed write ``e`` was refused by the storage, e.g. ``No space left on
  device``; ``None`` for any other failure.

  An ``OSError`` among ``e`` and its causes gives it (its ``strerror`` and file). tensorstore reports
  its writes' failures as ``ValueError``, so otherwise the folder is asked: a read-only file system, a
  folder this process may not write, less free space than the state's ``needed`` bytes, or a small test
  write that fails.
  """
  for x in (e, e.__cause__, e.__context__):
    if isinstance(x, OSError) and x.strerror:
      return x.strerror + (f" ({x.filename})" if x.filename else "")
  try:
    fs = os.statvfs(directory)
  except OSError as x:
    return x.strerror
  free = fs.f_bavail * fs.f_frsize
  if fs.f_flag & os.ST_RDONLY:
    return os.strerror(errno.EROFS)
  if not os.access(directory, os.W_OK):
    return f"{os.strerror(errno.EACCES)} ({directory})"
  if free < needed:
    return f"{os.strerror(errno.ENOSPC)} ({free} bytes free in {directory}, the train state takes {needed})"
  probe = os.path.join(directory, f".write-test-{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(bytes(4096))
      f.flush()
      os.fsync(f.fileno())
  except OSError as x:
    return x.strerror
  finally:
    with contextlib.suppress(OSError):
      os.unlink(probe)
  return None


def _nbytes(tree: Any) -> int:
  """Bytes of the arrays of ``tree``."""
  return sum(int(getattr(a, "nbytes", 0)) for a in jax.tree.leaves(tree))


def _path_name(path: tuple) -> str:
  """orbax's dotted name of a pytree path, e.g. ``opt_state.1.0.trace.embed.bias``."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _describe(shape: Any, dtype: Any) -> str:
  """``(3, 3) float32``: an array's shape and dtype as a message names them (``?`` where unknown)."""
  return (f"{tuple(shape)}" if shape is not None else "?") + " " + (np.dtype(dtype).name if dtype is not None else "?")


def _mismatch(stored: dict[str, tuple] | None, abstract: Any) -> str | None:
  """How the arrays of a checkpoint (``stored``: dotted name -> (shape, dtype)) differ from those of
  ``abstract`` (names, shapes, dtypes), parameters first and at most three named, or ``None`` when they
  fit or nothing was stored to compare with."""
  if stored is None:
    return None
  saved = {n: _describe(*v) for n, v in stored.items()}
  wanted = {_path_name(p): _describe(a.shape, a.dtype) for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
  problems = [
    f"{n} saved {saved[n]}, expected {wanted[n]}" for n in sorted(set(saved) & set(wanted)) if saved[n] != wanted[n]
  ]
  problems += [f"{n} not in the checkpoint" for n in sorted(set(wanted) - set(saved))]
  problems += [f"{n} not in this model" for n in sorted(set(saved) - set(wanted))]
  if not problems:
    return None
  problems.sort(key=lambda text: not text.startswith("params"))  # Parameters first (stable sort).
  more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
  return "; ".join(problems[:3]) + more


# The files of a checkpoint folder that must exist, and those that hold JSON.
_REQUIRED = ("state/_METADATA", "state/manifest.ocdbt", "data/metadata", "meta/metadata")
_JSON_FILES = ("_METADATA", "metadata", "_CHECKPOINT_METADATA", "_sharding")


def _bad_file(step_dir: str) -> str | None:
  """The first file of the checkpoint ``step_dir`` that is missing, or holds JSON that does not parse;
  ``None`` when every such file is there and parses (then the arrays' data is the damaged part)."""
  for name in _REQUIRED:
    path = os.path.join(step_dir, name)
    if not os.path.isfile(path):
      return f"{path} (missing)"
  for root, _, files in sorted(os.walk(step_dir)):
    for name in sorted(files):
      if name in _JSON_FILES:
        path = os.path.join(root, name)
        try:
          with open(path, "rb") as f:
            json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
          return path
  return None
