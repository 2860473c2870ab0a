"""Training checkpoints with orbax: the whole train state, the data iterator state and run metadata.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,meta}``:

- ``state``: the :class:`~resnet_jax.train_lib.TrainState` pytree (step, params, optimizer state,
  BatchNorm statistics), saved with ``orbax.checkpoint.args.StandardSave``;
- ``data``: the grain iterator state (``iterator.get_state()``, JSON), so a resumed run reads the
  same batches as an uninterrupted one;
- ``meta``: JSON run metadata (the config, the best test accuracy so far, the training time so far).

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
during a write leaves the previous checkpoints intact and the partial one is ignored; the manager
keeps the last ``keep`` complete checkpoints.
"""

from __future__ import annotations

import os
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
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

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
    path = os.path.join(self.directory, str(step))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types (ValueError, KeyError, OSError, ...).
      others = [s for s in self.all_steps() if s != step]
      hint = f"; earlier checkpoints: steps {others}" if others else ""
      raise CheckpointError(f"cannot restore checkpoint {path}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from e
    return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

  def close(self) -> None:
    self._manager.close()
