"""Checkpointer on a small pytree: a checkpoint that does not fit the target is refused from its metadata
(paths, shapes, dtypes) before any array is read; a damaged or missing file is named; the reads left in
flight by a failed restore print nothing."""

import gc
import glob
import logging
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import errors
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.errors import CheckpointError


def _state(kernel_shape=(4, 3), step_dtype=jnp.int32, extra=False):
  params = {"dense": {"kernel": jnp.ones(kernel_shape), "bias": jnp.arange(3, dtype=jnp.float32)}}
  if extra:
    params["head"] = {"kernel": jnp.zeros((3, 2))}
  return {"params": params, "step": jnp.asarray(5, step_dtype), "opt": (jnp.ones(2), {"mu": jnp.ones((4, 3))})}


@pytest.fixture
def saved(tmp_path):
  """A checkpoint folder with steps 2 and 4 of ``_state()``."""
  folder = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(folder)
  for step in (2, 4):
    ckpt.save(step, _state(), {"position": step}, {"best": 0.5})
  ckpt.close()
  return folder


def _refused(folder: str, target) -> str:
  """The message of the CheckpointError of restoring ``target``, checked to come before any array read."""
  ckpt = Checkpointer(folder)

  def no_read(*args, **kwargs):
    raise AssertionError("the arrays were read")

  ckpt._manager.restore = no_read
  with pytest.raises(CheckpointError) as info:
    ckpt.restore(target)
  ckpt.close()
  return str(info.value)


def test_restore_round_trip(saved):
  state, data, meta = Checkpointer(saved).restore(_state())
  assert data == {"position": 4} and meta == {"best": 0.5}
  np.testing.assert_array_equal(np.asarray(state["params"]["dense"]["bias"]), np.arange(3))


def test_another_shape_names_the_array_what_was_stored_and_what_is_expected(saved):
  message = _refused(saved, _state(kernel_shape=(5, 3)))
  assert os.path.join(saved, "4") in message and "another configuration" in message
  assert "params.dense.kernel saved (4, 3) float32, expected (5, 3) float32" in message


def test_another_dtype_is_refused(saved):
  message = _refused(saved, _state(step_dtype=jnp.float32))
  assert "step saved () int32, expected () float32" in message


def test_another_structure_is_refused(saved):
  message = _refused(saved, _state(extra=True))
  assert "params.head.kernel not in the checkpoint" in message
  target = _state()
  del target["params"]["dense"]["bias"]
  assert "params.dense.bias not in this model" in _refused(saved, target)


@pytest.mark.parametrize("name", ["data/metadata", "state/manifest.ocdbt"])
def test_missing_file_is_named(saved, name):
  os.remove(os.path.join(saved, "4", name))
  with pytest.raises(CheckpointError) as info:
    Checkpointer(saved).restore(_state())
  assert f"{os.path.join(saved, '4', name)} (missing)" in str(info.value)
  assert "--config.restore_step=2" in str(info.value)


def test_garbled_json_file_is_named(saved):
  path = os.path.join(saved, "4", "meta", "metadata")
  with open(path, "wb") as f:
    f.write(b'{"best": \xff')
  with pytest.raises(CheckpointError, match="damaged file " + path):
    Checkpointer(saved).restore(_state())


def _recording_hook():
  seen = []

  def hook(unraisable):
    seen.append(unraisable)

  return seen, hook


def test_failed_reads_in_flight_print_nothing(tmp_path, monkeypatch):
  seen, hook = _recording_hook()
  monkeypatch.setattr(sys, "unraisablehook", hook)
  folder = str(tmp_path / "checkpoints")
  state = {f"w{i}": jnp.full((64, 64), i, jnp.float32) for i in range(20)}  # Many reads at once.
  ckpt = Checkpointer(folder)
  ckpt.save(1, state, {}, {})
  ckpt.restore(state)
  assert sys.unraisablehook is hook  # A restore that succeeds leaves the hook as it was.
  for path in glob.glob(os.path.join(folder, "1", "state", "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 16)
  for _ in range(3):  # Whether reads are still in flight when the first fails depends on timing.
    with pytest.raises(CheckpointError, match=os.path.join(folder, "1")):
      ckpt.restore(state)
  ckpt.close()
  time.sleep(0.5)  # The reads left in flight end (and call back) meanwhile.
  gc.collect()
  assert seen == []
  sys.unraisablehook(type("Args", (), {"exc_value": RuntimeError("another error")})())
  assert len(seen) == 1  # Every other unraisable exception still reaches the hook before.


def test_silenced_block_removes_its_hook_when_it_ends_without_error(monkeypatch):
  seen, hook = _recording_hook()
  monkeypatch.setattr(sys, "unraisablehook", hook)
  with errors.stray_async_errors_silenced():
    sys.unraisablehook(type("Args", (), {"exc_value": RuntimeError("Event loop is closed")})())
  assert sys.unraisablehook is hook and seen == []


def test_writer_threads_failing_at_exit_after_a_reported_error_print_nothing(monkeypatch):
  """A writer thread that outlives a failed write fails at interpreter shutdown ("cannot schedule new
  futures"): after the failure, the thread hook drops that one error; any other thread error still shows."""
  import threading

  seen, hook = _recording_hook()
  monkeypatch.setattr(threading, "excepthook", hook)
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  monkeypatch.setattr(logging.getLogger("asyncio"), "disabled", False)

  def fail(message):
    t = threading.Thread(target=lambda: (_ for _ in ()).throw(RuntimeError(message)))
    t.start()
    t.join()

  fail("cannot schedule new futures after interpreter shutdown")
  assert len(seen) == 1  # Before any failed checkpoint operation, nothing is dropped.
  with pytest.raises(OSError), errors.stray_async_errors_silenced():
    raise OSError(28, "No space left on device")
  fail("cannot schedule new futures after interpreter shutdown")
  fail("Event loop is closed")
  assert len(seen) == 1
  fail("another error")
  assert len(seen) == 2 and str(seen[-1].exc_value) == "another error"


def test_writer_thread_records_of_a_refused_write_are_dropped_and_other_errors_are_logged(caplog, monkeypatch):
  """A refused write is reported once by Checkpointer.save; orbax's other writer threads may log theirs,
  with tracebacks, after save has returned. Those records are dropped; every other one is logged."""
  from absl import logging as absl_logging

  from resnet_jax.checkpoint import STORAGE_REFUSED, drop_storage_refused_records

  absl = logging.getLogger("absl")
  monkeypatch.setattr(absl, "filters", list(absl.filters))  # The filter ends with this test.
  drop_storage_refused_records()
  drop_storage_refused_records()  # Once per process, however often it is called.
  assert sum(getattr(f, "reason", None) == STORAGE_REFUSED for f in absl.filters) == 1
  refused = (
    'RESOURCE_EXHAUSTED: Error opening "zarr" driver: Failed writing: "/run/d/0144": Failed to write 184 bytes '
    "to file 19: No space left on device [os_error_code='28']"
  )
  for error in (ValueError(refused), OSError(30, os.strerror(30), "/run"), ValueError("a bug in a writer thread")):
    try:
      raise error
    except Exception:
      absl_logging.exception("_SignalingThread.run() raised an exception")
  absl_logging.warning("a record without an exception")
  logged = [(r.exc_info[1].args[0] if r.exc_info else r.getMessage()) for r in caplog.records]
  assert logged == ["a bug in a writer thread", "a record without an exception"]
