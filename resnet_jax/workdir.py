"""The training workdir: one run at a time, the settings of a resumed run, and what is kept aside.

- :class:`RunDir`: the workdir of a running ``train_and_evaluate``. It holds an exclusive
  ``flock`` on ``WORKDIR/train.lock`` for the whole run, so a second run on the same workdir is
  refused in one line naming the process (pid, host) that holds it. The operating system releases
  the lock when its process ends in any way (``kill -9`` included), so a lock left by a dead process
  never blocks the next run. On failure it removes what it created and left empty (the workdir, its
  ``checkpoints/`` folder), so a refused run leaves no debris.
- :func:`check_resume`: the settings policy of a resumed run (see docs/reliability.md): what would
  corrupt the run is refused, what is legitimate is allowed and returned as a list of changes, which
  :func:`record_settings` appends to ``WORKDIR/config_history.jsonl`` with the step from which they
  apply. ``WORKDIR/config.json`` is written once, by the run's first start, and never rewritten.
- :func:`set_aside_run_files`: ``config.restore_step`` keeps the superseded run's metrics, summary,
  config and settings history next to its superseded checkpoints.
- :func:`read_json_object`: a JSON file that must hold an object, read with a one-line error.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

from resnet_jax.errors import CheckpointError, ConfigError, WorkdirBusyError
from resnet_jax.metrics import is_number, read_metrics, write_json

LOCK_NAME = "train.lock"
HISTORY_NAME = "config_history.jsonl"
SUPERSEDED = "checkpoints_superseded"

# Settings a resumed run may not change: the data it reads, the order it reads it in, the model and
# the optimizer's state and weight average. ``dataset.data_dir`` and ``dataset.on_corrupt_image`` may
# change (a moved copy of the same data) when the example and class counts stay those of the checkpoint.
FIXED = (
  "seed",
  "batch_size",
  "model.name",
  "model.options",
  "model.dtype",
  "optimizer.name",
  "ema_decay",
  "dataset.name",
  "dataset.image_size",
  "dataset.num_classes",
  "dataset.test_fraction",
  "dataset.augment",
  "dataset.crop_padding",
  "dataset.cutout",
  "dataset.mean",
  "dataset.std",
  "dataset.max_train_examples",
  "dataset.max_test_examples",
  "dataset.num_workers",
)
WHY_FIXED = {
  "seed": "it sets the order of the training examples and their augmentation",
  "batch_size": "the saved position in the data is a batch index of the old batch size (examples "
  "would be read twice or skipped) and the optimizer was tuned to it",
  "optimizer.name": "the saved optimizer state belongs to the old optimizer",
  "ema_decay": "the saved weight average was built with the old decay (a run without one has none to go on with)",
  "dataset.num_workers": "the saved position of the data iterator is in another format with worker processes",
  "model.": "the checkpoint's parameters belong to the old model",
  "dataset.": "the run must go on reading the same examples, transformed the same way, from its saved "
  "position (and its test accuracies must stay comparable)",
}
NOT_A_SETTING = (
  "restore_step",  # Instructions to this start, not settings of the run.
  "distributed.coordinator_address",
  "distributed.process_id",
  "distributed.init_timeout_s",
  "distributed.heartbeat_timeout_s",
)


# ----------------------------------------------------------------------------------------------
# The lock.


class RunDir:
  """Context manager: the workdir of one run, created if needed and locked for the run's duration.

  Args:
    workdir: the folder (absolute path).
    lock: take the lock (the main process of a multi-host run only).
  """

  def __init__(self, workdir: str, lock: bool = True):
    self.workdir = workdir
    self.lock_path = os.path.join(workdir, LOCK_NAME)
    self._lock = lock
    self._fd: int | None = None
    self._created: list[str] = []

  def __enter__(self) -> RunDir:
    for path in (self.workdir, os.path.join(self.workdir, "checkpoints")):
      if not os.path.exists(path):
        self._created.append(path)
    os.makedirs(self.workdir, exist_ok=True)
    if self._lock:
      try:
        self._fd = acquire_lock(self.lock_path)
      except BaseException:
        self._remove_empty_created()
        raise
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._fd is not None:
      release_lock(self.lock_path, self._fd)
      self._fd = None
    if exc_type is not None:
      self._remove_empty_created()

  def _remove_empty_created(self) -> None:
    for path in reversed(self._created):  # checkpoints/ first, then the workdir.
      try:
        os.rmdir(path)  # Only if empty: nothing written by anyone is removed.
      except OSError:
        pass


def acquire_lock(path: str) -> int:
  """An exclusive ``flock`` on ``path`` (created), holding ``{"pid", "host", "started"}``; its fd.

  Raises:
    WorkdirBusyError: a live process holds it; the message names that process.
  """
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusyError(
        f"workdir {os.path.dirname(path)} is in use by another training run ({holder}, lock "
        f"{path}): wait for it to end, stop it, or use another --workdir"
      ) from None
    except BaseException:
      os.close(fd)
      raise
    try:  # The holder we waited on may have removed the file: then lock the new one.
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    info = json.dumps(
      {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    ).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info + b"\n", 0)
  except OSError as e:
    os.close(fd)
    raise OSError(e.errno, e.strerror, path) from None
  return fd


def release_lock(path: str, fd: int) -> None:
  """Remove the lock file (while still holding it) and release it."""
  try:
    os.unlink(path)
  except OSError:
    pass
  os.close(fd)


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode())
    return f"pid {int(info['pid'])} on host {info['host']}, started {info.get('started', '?')}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that is starting (pid not yet written)"


# ----------------------------------------------------------------------------------------------
# Reading what a run wrote.


def read_json_object(path: str, what: str) -> dict:
  """The JSON object in ``path``; a file that is unreadable, not UTF-8, not JSON or not an object is a
  :class:`CheckpointError` naming the file (``what`` says what it should be)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    value = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e} (expected {what})") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object ({what})")
  return value


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; ``model.options`` stays one value (a dict)."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    if isinstance(v, dict) and f"{prefix}{k}" != "model.options":
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _plain(value: Any) -> Any:
  """The JSON form of a config value (tuples as lists), as a checkpoint's metadata holds it."""
  return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------------------------
# The settings of a resumed run.


def check_resume(
  saved: dict,
  config: Any,
  counts: dict[str, int],
  total_steps: Callable[[Any], int],
  schedule: Callable[[Any], Callable[[int], float]],
  step: int,
) -> list[dict]:
  """The setting changes of a run resumed from the checkpoint of ``step``; refuse the harmful ones.

  Args:
    saved: the checkpoint's metadata (``"config"``: the settings the run had at ``step``; and the
      dataset's ``num_train``, ``num_test``, ``num_classes``).
    config: the new config.
    counts: ``num_train``, ``num_test``, ``num_classes`` of the dataset as loaded now.
    total_steps: the number of training steps a config trains for.
    schedule: the learning-rate schedule of a config.
    step: the restored step.

  Returns:
    One ``{"key", "before", "after"}`` per changed setting (``"learning_rate"`` at ``step`` as well,
    where it changes). Empty when nothing changed or the checkpoint holds no config.

  Raises:
    ConfigError: a change that would corrupt the run (one line naming the key, both values and why).
  """
  import ml_collections

  old_dict = saved.get("config")
  if not isinstance(old_dict, dict):
    return []
  from resnet_jax.config_check import base_config

  new_dict = _plain(config.to_dict())
  # A key the checkpoint's config lacks was added after the run started: the run had its default.
  old = {**flatten(_plain(base_config().to_dict())), **flatten(old_dict)}
  new = flatten(new_dict)
  changes = [
    {"key": k, "before": old.get(k), "after": new.get(k)}
    for k in sorted(set(old) | set(new))
    if k not in NOT_A_SETTING and old.get(k) != new.get(k)
  ]
  _refuse_fixed_changes(changes, step)
  _refuse_other_data(saved, counts, old, new, step)
  old_config = ml_collections.ConfigDict(old_dict)
  new_total = total_steps(config)
  if new_total < step:
    raise ConfigError(
      f"this config trains for {new_total} steps, but the run is already at step {step} "
      f"(config.num_train_steps / num_epochs); nothing would be trained: resume with "
      f"at least {step} steps, or --config.restore_step=N to go back to checkpoint N"
    )
  if changes:
    try:
      old_lr, new_lr = float(schedule(old_config)(step)), float(schedule(config)(step))
    except Exception:  # noqa: BLE001 -- an old config this version cannot build a schedule from.
      old_lr = new_lr = None
    if old_lr is not None and old_lr != new_lr:
      changes.append({"key": "learning_rate_at_step", "before": old_lr, "after": new_lr})
    if total_steps(old_config) != new_total:
      changes.append({"key": "total_steps", "before": total_steps(old_config), "after": new_total})
  return changes


def _refuse_fixed_changes(changes: list[dict], step: int) -> None:
  """Raise ConfigError for the first of ``changes`` to a setting in FIXED (naming both values and why)."""
  for c in changes:
    if c["key"] in FIXED:
      why = WHY_FIXED.get(c["key"]) or WHY_FIXED[c["key"].split(".")[0] + "."]
      old_flag = (
        f"--config.{c['key']}={_flag_value(c['before'])}" if not isinstance(c["before"], dict) else "the old value"
      )
      raise ConfigError(
        f"config.{c['key']} = {c['after']!r} differs from {c['before']!r}, the value this run was "
        f"trained with up to step {step}: it cannot change on resume ({why}); train with the new value "
        f"in another --workdir, or resume with {old_flag}"
      )


def _refuse_other_data(saved: dict, counts: dict[str, int], old: dict, new: dict, step: int) -> None:
  """Raise ConfigError when the dataset's example or class counts differ from those of the checkpoint."""
  for name in ("num_train", "num_test", "num_classes"):
    if name in saved and saved[name] != counts[name]:
      raise ConfigError(
        f"the dataset now has {counts[name]} {name.replace('num_', '')} "
        f"{'examples' if name != 'num_classes' else ''}, the run was trained with {saved[name]} up "
        f"to step {step} (config.dataset.data_dir {old.get('dataset.data_dir')!r} -> "
        f"{new.get('dataset.data_dir')!r}): a resumed run must read the same data; use another "
        f"--workdir".replace("  ", " ")
      )


def _flag_value(value: Any) -> str:
  if isinstance(value, list):
    return repr(tuple(value))
  return value if isinstance(value, str) else repr(value)


def describe_changes(changes: list[dict]) -> str:
  def show(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else repr(v)

  return ", ".join(f"{c['key']} {show(c['before'])} -> {show(c['after'])}" for c in changes)


def record_settings(
  workdir: str, config: Any, step: int, changes: list[dict], first_config: dict | None = None
) -> None:
  """Write ``config.json`` if the workdir has none; keep the history lines before ``step`` and append
  ``changes`` (if any) as the line of ``step``.

  ``config.json`` describes the run from its start and is never rewritten: a new one is written only
  when there is none (a new run: ``config``; a resumed run without one: ``first_config``, the settings
  of its checkpoint). A resume from step N drops the history lines of steps >= N (written by a run
  whose work after N is recomputed now; :func:`set_aside_run_files` keeps them for ``restore_step``).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    write_json(path, first_config if first_config is not None else config.to_dict())
  history = os.path.join(workdir, HISTORY_NAME)
  lines = [r for r in read_history(workdir) if r["step"] < step]
  if changes:
    lines.append(
      {
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "changes": {c["key"]: [c["before"], c["after"]] for c in changes},
      }
    )
  if not lines and not os.path.exists(history):
    return
  tmp = history + ".tmp"
  try:
    with open(tmp, "w") as f:
      for r in lines:
        f.write(json.dumps(r, allow_nan=False) + "\n")
    os.replace(tmp, history)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def read_history(workdir: str) -> list[dict]:
  """The lines of ``WORKDIR/config_history.jsonl`` that are records (``step`` a number, ``changes`` an
  object); other lines are left out."""
  out = []
  path = os.path.join(workdir, HISTORY_NAME)
  if not os.path.exists(path):
    return out
  with open(path, "rb") as f:
    for line in f:
      try:
        r = json.loads(line.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError):
        continue
      if isinstance(r, dict) and is_number(r.get("step")) and isinstance(r.get("changes"), dict):
        out.append(r)
  return out


def current_settings(workdir: str, first: dict) -> dict:
  """``first`` (config.json) with every recorded change applied: the settings the run has now."""
  flat = flatten(first)
  for r in read_history(workdir):
    for key, pair in r["changes"].items():
      if key in flat and isinstance(pair, list) and len(pair) == 2:
        flat[key] = pair[1]
  out: dict = {}
  for key, value in flat.items():
    node = out
    *path, last = key.split(".")
    for p in path:
      node = node.setdefault(p, {})
    node[last] = value
  return out


# ----------------------------------------------------------------------------------------------
# restore_step: the superseded run's files.


def set_aside_run_files(workdir: str, step: int, moved: list[int]) -> str | None:
  """Keep the run files of a run superseded by a resume from ``step``; returns the folder or None.

  ``metrics.jsonl``, ``config_history.jsonl`` and ``config.json`` are copied (the resumed run keeps
  the part up to ``step``), ``summary.json`` and ``curves.png`` are moved (they describe the
  superseded end), all into ``WORKDIR/checkpoints_superseded/run_files_after_<step>/`` (``.1``,
  ``.2``, ... when that exists). Nothing is kept when there was nothing after ``step`` (no checkpoint
  ``moved`` aside, no metrics record or settings change after it).
  """
  later = [r for r in read_metrics(workdir) if r["step"] > step]
  history_later = [r for r in read_history(workdir) if r["step"] >= step]
  superseded = os.path.join(workdir, SUPERSEDED)
  if not later and not history_later and not moved:
    return None
  target = os.path.join(superseded, f"run_files_after_{step}")
  n = 1
  while os.path.exists(target):
    target, n = os.path.join(superseded, f"run_files_after_{step}.{n}"), n + 1
  os.makedirs(target)
  for name in ("metrics.jsonl", HISTORY_NAME, "config.json"):
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copy2(os.path.join(workdir, name), os.path.join(target, name))
  for name in ("summary.json", "curves.png"):
    if os.path.exists(os.path.join(workdir, name)):
      shutil.move(os.path.join(workdir, name), os.path.join(target, name))
  return target
