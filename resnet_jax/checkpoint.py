"""Training checkpoints with orbax: the whole train state, the data iterator state and run metadata.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,meta}``:

- ``state``: the :class:`~resnet_jax.train_step.TrainState` pytree (step, params, optimizer state,
  BatchNorm statistics), saved with ``orbax.checkpoint.args.StandardSave``;
- ``data``: the grain iterator state (``iterator.get_state()``, JSON), so a resumed run reads the
  same batches as an uninterrupted one;
- ``meta``: JSON run metadata (the config, the best test accuracy so far, the training time so far).

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
during a write leaves the previous checkpoints intact and the partial one is ignored; the manager
keeps the last ``keep`` complete checkpoints.

A checkpoint that cannot be read (a damaged or truncated file) raises :class:`CheckpointError` naming
the file and the earlier checkpoints; ``config.restore_step`` resumes from one of them, and
:meth:`Checkpointer.set_aside_after` moves the later ones out of the way (nothing is deleted).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

import jax

from resnet_jax.errors import CheckpointError


class Checkpointer:
  """Saves and restores training checkpoints under ``directory`` (keeps the last ``keep``)."""

  def __init__(self, directory: str, keep: int = 3):
    import orbax.checkpoint as ocp

    self.directory = os.path.abspath(directory)
    self._ocp = ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or ``None``."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Write the checkpoint of ``step`` (overwriting nothing; a step saved already is skipped)."""
    ocp = self._ocp
    if step in self._manager.all_steps():
      return
    error = None
    with _held_stderr() as held:  # orbax's threads log the failure of each write, with tracebacks.
      try:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
      except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise ValueError, OSError, ...
        reason = _storage_error(e)
        if reason is None:
          raise
        logging.getLogger("asyncio").disabled = True
        _settle_after_failed_read(self._manager, e)
        held.drop()
        removed = self._remove_partial(step)
        earlier = self.all_steps_on_disk()
        error = CheckpointError(
            f"cannot write checkpoint {os.path.join(self.directory, str(step))}: {reason}"
            f"{'; its partial folder was removed' if removed else ''}; "
            + (f"the earlier checkpoints (steps {earlier}) are intact: free space and run the same "
               f"command again to resume" if earlier else "no earlier checkpoint was written"))
    if error is not None:
      raise error

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

    Args:
      target_state: a state of the same structure (its shapes, dtypes and shardings are used).
      step: the step to restore.

    Raises:
      CheckpointError: no checkpoint, or one that cannot be read or does not fit ``target_state``
        (the message names the folder).
    """
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no complete checkpoint of step {step} in {self.directory}; complete "
                            f"checkpoints: steps {self.all_steps()}")
    path = os.path.join(self.directory, str(step))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    error = None
    with _held_stderr() as held:
      mismatch = _shape_mismatch(os.path.join(path, "state"), abstract)
      if mismatch:  # Checked from the metadata, before any array is read.
        held.drop()
        raise CheckpointError(f"checkpoint {path} holds a train state of another shape than this "
                              f"config's model and optimizer ({mismatch}): it belongs to a run of "
                              f"another configuration; use another --workdir (nothing was changed)")
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises many types (ValueError, KeyError, OSError, ...).
        # The other arrays' reads fail too; their futures would log tracebacks via asyncio when collected.
        logging.getLogger("asyncio").disabled = True
        error = self._restore_error(path, step, e)
        _settle_after_failed_read(self._manager, e)
        held.drop()
    if error is not None:
      raise error
    return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

  def _restore_error(self, path: str, step: int, e: BaseException) -> CheckpointError:
    """The CheckpointError for a failed restore of ``path``: another configuration, or a damaged file."""
    text = " ".join(" ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None).split())
    if re.search(r"stored shape|tree structures do not match|dtype mismatch", text):
      return CheckpointError(f"checkpoint {path} holds a train state of another shape than this config's "
                             f"model and optimizer ({text[:200]}): it belongs to a run of another "
                             f"configuration; use another --workdir (nothing was changed)")
    earlier = [s for s in self.all_steps() if s < step]
    hint = (f"; to resume from the previous complete checkpoint, run again with "
            f"--config.restore_step={earlier[-1]} (earlier checkpoints: steps {earlier}; nothing "
            f"was deleted)" if earlier else "; there is no earlier checkpoint (nothing was deleted)")
    detail = " ".join(str(e).split())[:200]
    return CheckpointError(f"cannot restore checkpoint {path}: damaged file {_damaged_file(path, e)}: "
                           f"{type(e).__name__}: {detail}{hint}")

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


class _held_stderr:
  """Hold what is written to file descriptor 2 inside the block; write it out at the end unless dropped.

  When one array of a checkpoint cannot be read, orbax closes its event loop while tensorstore is
  still finishing the other reads, and their callbacks print "Event loop is closed" tracebacks
  straight to stderr. Those are noise next to the one error message that follows: a failed restore
  drops them; a successful one writes out whatever was held (warnings are not lost).
  """

  def __enter__(self) -> "_held_stderr":
    import sys
    import tempfile
    sys.stderr.flush()
    self._file = tempfile.TemporaryFile()
    self._saved = os.dup(2)
    os.dup2(self._file.fileno(), 2)
    self._keep = True
    return self

  def drop(self) -> None:
    self._keep = False

  def __exit__(self, *exc) -> None:
    import sys
    sys.stderr.flush()
    os.dup2(self._saved, 2)
    os.close(self._saved)
    if self._keep:
      self._file.seek(0)
      text = self._file.read().decode(errors="replace")
      if text:
        sys.stderr.write(text)
        sys.stderr.flush()
    self._file.close()


def _settle_after_failed_read(manager: Any, error: BaseException, seconds: float = 0.5) -> None:
  """Close ``manager``, free ``error``'s frames and give the reads still in flight a moment to end.

  See :class:`_held_stderr`: this runs while stderr is held.
  """
  import gc
  import time
  try:
    manager.close()
  except Exception:  # noqa: BLE001 -- the restore error is the one to report.
    pass
  for x in (error, error.__cause__, error.__context__):
    if x is not None:
      x.__traceback__ = None
  gc.collect()
  time.sleep(seconds)


_STORAGE = re.compile(r"No space left on device|Read-only file system|Permission denied|Disk quota exceeded|"
                      r"File too large|Input/output error")


def _storage_error(e: BaseException) -> str | None:
  """The system's reason when ``e`` is a failure of the storage (full disk, read-only, permission),
  e.g. ``No space left on device (writing .../d/9b8a...)``; ``None`` for any other error."""
  text = " ".join(" ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None).split())
  if isinstance(e, OSError) and e.strerror:
    return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
  found = _STORAGE.search(text)
  if not found:
    return None
  files = re.findall(r'(?:Failed writing|local file|file): "([^"]+)"', text)
  return found.group(0) + (f" (writing {files[-1]})" if files else "")


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


def _shape_mismatch(state_dir: str, abstract: Any) -> str | None:
  """How the arrays saved in ``state_dir`` differ from ``abstract`` (names, shapes), or ``None``.

  ``None`` too when the metadata cannot be read: the restore itself then reports the damage.
  """
  import orbax.checkpoint as ocp
  from etils import epath
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    saved = {_path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(
        metadata, is_leaf=lambda x: hasattr(x, "shape"))}
  except Exception:  # noqa: BLE001 -- unreadable metadata is reported by the restore.
    return None
  wanted = {_path_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
  problems = [f"{n} saved {saved[n]}, expected {wanted[n]}" for n in sorted(set(saved) & set(wanted))
              if saved[n] != wanted[n]]
  problems += [f"{n} not in the checkpoint" for n in sorted(set(wanted) - set(saved))]
  problems += [f"{n} not in this model" for n in sorted(set(saved) - set(wanted))]
  if not problems:
    return None
  problems.sort(key=lambda text: not text.startswith("params"))  # Parameters first (stable sort).
  more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
  return "; ".join(problems[:3]) + more


def _damaged_file(step_dir: str, error: BaseException) -> str:
  """The file of ``step_dir`` that ``error`` points at: a path in the message, else a bad JSON file."""
  text = str(error)
  for cause in (error.__cause__, error.__context__):
    if cause is not None:
      text += " " + str(cause)
  named = re.findall(r'local file "([^"]+)"', text)
  files = [p for p in named if os.path.isfile(p)]
  if files:
    return files[-1]
  for root, _, files in sorted(os.walk(step_dir)):
    for name in sorted(files):
      if name in ("_METADATA", "metadata", "_CHECKPOINT_METADATA", "_sharding"):
        path = os.path.join(root, name)
        try:
          with open(path) as f:
            json.load(f)
        except (OSError, ValueError):
          return path
  folders = [p for p in named if os.path.isdir(p)]
  arrays = re.findall(r'Error reading "([^"/]+)', text)
  if folders:
    return f"in {folders[-1]}" + (f" (array {arrays[-1]})" if arrays else "")
  return f"(one of the files in {step_dir})"
