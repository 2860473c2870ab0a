"""Several devices and several processes: the data-parallel mesh and what a multi-host run agrees on.

Data parallelism uses ``jax.sharding``: a 1-D ``Mesh`` over all devices named ``"batch"``
(:class:`DataParallel`), the batch sharded along it and the state replicated, so XLA computes means
(loss, BatchNorm statistics) over the global batch and all-reduces the gradients. Several processes (one
per host, ``config.distributed``) share that mesh: they connect (:func:`maybe_initialize_distributed`),
check that they run the same config and see the same checkpoints, stop after the same step on a signal
(:func:`agree_on_signal`), and an error in one process ends every process (:func:`end_process_on_error`;
docs/multi-host.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.errors import DistributedError, Interrupted, ResNetJaxError, drop_error_records


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize`` when ``config.distributed.initialize`` (multi-host runs), then a check
  that every process runs the same config.

  The connection waits ``distributed.init_timeout_s`` for every process; a process without a
  heartbeat for ``distributed.heartbeat_timeout_s`` counts as dead (where the installed jax takes that
  setting). On CPU the cross-process collectives are gloo's. Every process then compares a fingerprint
  of its config (all keys but ``distributed.process_id``) with the others'.

  Raises:
    DistributedError: the processes cannot connect in time (a wrong coordinator address, a process
      that did not start, a mismatched ``num_processes``), or their configs differ.
  """
  import inspect

  d = config.distributed
  if not d.initialize or getattr(jax.distributed, "is_initialized", lambda: False)():
    return
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  kwargs: dict[str, Any] = {"initialization_timeout": int(d.init_timeout_s)}
  if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
    kwargs["heartbeat_timeout_seconds"] = int(d.heartbeat_timeout_s)
  if d.coordinator_address:
    kwargs.update(coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id)
    where = f"process {d.process_id} of {d.num_processes}, coordinator {d.coordinator_address}"
  else:
    where = "addresses auto-detected from the cluster environment"
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001 -- jax raises RuntimeError, ValueError or its runtime error.
    raise DistributedError(
      f"jax.distributed.initialize failed ({where}; config.distributed.init_timeout_s = "
      f"{d.init_timeout_s}): {_first_line(e)}; every process needs the same "
      f"coordinator_address (process 0's host and a free port) and num_processes, and its own "
      f"process_id in [0, num_processes)"
    ) from None
  drop_lost_process_tracebacks()
  try:
    check_same_config(config)
  except DistributedError:
    raise  # Every process raises it (they compared the same numbers) and leaves normally.
  except BaseException:  # noqa: BLE001 -- e.g. a process lost meanwhile: this first collective fails.
    with end_process_on_error():
      raise


LOST_PROCESS = "a lost process"  # the reason of the absl filter below


def drop_lost_process_tracebacks() -> None:
  """Keep orbax's checkpoint threads from logging a traceback when another process has died.

  A checkpoint save ends with a barrier across the processes, run by an orbax thread; when another
  process dies meanwhile, the thread logs the failed collective with its traceback (absl
  ``logging.exception``) and keeps the error for the main thread, which reports it in one line
  (:func:`end_process_on_error`). This filter on the ``absl`` logger
  (:func:`resnet_jax.errors.drop_error_records`) drops those records only; every other record, with or
  without an exception, still goes through. Installed once per process.
  """
  drop_error_records("absl", LOST_PROCESS, _lost_a_process)


def _lost_a_process(e: BaseException) -> bool:
  """Whether ``e`` is a collective or coordination failure (another process died or is unreachable)."""
  text = " ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
  return isinstance(e, getattr(jax.errors, "JaxRuntimeError", ())) or bool(
    re.search(r"[Gg]loo|Connection (closed|reset) by peer|DEADLINE_EXCEEDED|UNAVAILABLE|coordination service", text)
  )


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def check_same_config(config: ml_collections.ConfigDict) -> None:
  """Every process of a multi-host run must train the same config (all but ``distributed.process_id``)."""
  import zlib

  from jax.experimental import multihost_utils

  plain = json.loads(json.dumps(config.to_dict(), default=str))
  plain["distributed"].pop("process_id", None)
  fingerprint = zlib.crc32(json.dumps(plain, sort_keys=True).encode()) & 0x7FFFFFFF
  local = np.asarray([fingerprint, config.distributed.num_processes], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), 2)
  n = jax.process_count()
  if len(set(gathered[:, 1].tolist())) > 1 or (config.distributed.coordinator_address and int(gathered[0, 1]) != n):
    raise DistributedError(
      f"config.distributed.num_processes differs between the processes (process 0..{n - 1} gave "
      f"{gathered[:, 1].tolist()}; {n} connected): give every process the same num_processes"
    )
  differ = [i for i in range(n) if gathered[i, 0] != gathered[0, 0]]
  if differ:
    raise DistributedError(
      f"the config of process(es) {differ} differs from process 0's: every process of a run must "
      f"get the same config and flags (only config.distributed.process_id differs)"
    )


def check_shared_checkpoints(ckpt: Any) -> None:
  """Every process of a multi-host run must see the same checkpoints: one folder on shared storage."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  latest = ckpt.latest_step()
  seen = (
    np.asarray(multihost_utils.process_allgather(np.asarray(-1 if latest is None else latest, np.int32)))
    .ravel()
    .tolist()
  )
  if len(set(seen)) > 1:
    raise DistributedError(
      f"the processes see different newest checkpoints in {ckpt.directory} (process 0..{len(seen) - 1}: "
      f"steps {[s if s >= 0 else None for s in seen]}): --workdir must be one folder on storage that "
      f"every host shares (a network file system or a bucket)"
    )


def agree_on_signal(signals: Any) -> int | None:
  """The signal that stops the run after this step (``None``: none), the same in every process.

  ``signals`` is the :class:`resnet_jax.interrupt.StopOnSignal` of this process. In a multi-host run a
  signal to one process stops all of them after the same step (one arriving meanwhile counts at the next
  step); it is recorded in ``signals`` of the processes that did not receive it.
  """
  if jax.process_count() == 1:
    return signals.received
  from jax.experimental import multihost_utils

  got = int(np.max(multihost_utils.process_allgather(np.asarray(signals.received or 0, np.int32)))) or None
  if got is not None and signals.received is None:
    signals.received = got
  return got


class DataParallel:
  """A 1-D mesh over every device, axis ``"batch"``: batches sharded, the state replicated."""

  def __init__(self, devices: list | None = None):
    self.devices = list(devices if devices is not None else jax.devices())
    self.mesh = Mesh(np.asarray(self.devices), ("batch",))
    self.batch = NamedSharding(self.mesh, P("batch"))
    self.stacked = NamedSharding(self.mesh, P(None, "batch"))  # several batches, one per step of a call
    self.replicated = NamedSharding(self.mesh, P())

  def put_batch(self, batch: dict) -> dict:
    """This process's slice of a global batch -> a global ``jax.Array`` sharded over ``"batch"``."""
    return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(v)) for k, v in batch.items()}

  def put_batches(self, batches: list[dict], length: int) -> dict:
    """This process's slices of several global batches, stacked -> global ``jax.Array`` of ``length``
    batches, axis 1 sharded over ``"batch"``; fewer than ``length`` are padded with the last (not to be used)."""
    padded = list(batches) + [batches[-1]] * (length - len(batches))
    return {
      k: jax.make_array_from_process_local_data(self.stacked, np.stack([np.asarray(b[k]) for b in padded]))
      for k in batches[0]
    }

  def replicate(self, tree: Any) -> Any:
    return jax.device_put(tree, self.replicated)

  def replicate_host_array(self, x: np.ndarray) -> jax.Array:
    """``x``, which every process holds whole, as one array replicated on every device of the mesh."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

  def jit_train_step(self, step: Callable, replicated_args: int = 0, stacked: bool = False) -> Callable:
    """``step(state, batch, *more)`` jitted: the state replicated and donated, the batch sharded, and
    ``replicated_args`` more arguments replicated (the training images of augmentation on the device).
    ``stacked``: ``batch`` holds several batches (:meth:`put_batches`)."""
    return jax.jit(
      step,
      in_shardings=(self.replicated, self.stacked if stacked else self.batch) + (self.replicated,) * replicated_args,
      out_shardings=(self.replicated, self.replicated),
      donate_argnums=(0,),
    )

  def jit_eval_step(self, step: Callable) -> Callable:
    return jax.jit(step, in_shardings=(self.replicated, self.batch), out_shardings=self.replicated)


@contextlib.contextmanager
def end_process_on_error():
  """In a run of several processes, an error (but an :class:`Interrupted`, which every process raises
  after the same step) ends this process at once, after one ``error: process I of N: ...`` line.

  A process that returned normally would wait in jax's shutdown barrier for the others while they wait
  for it in their next collective. Ending at once closes its connections: the others' collectives fail
  and they stop the same way, or after ``distributed.heartbeat_timeout_s`` where they were not in one.
  """
  if jax.process_count() == 1:
    yield
    return
  try:
    yield
  except Interrupted:
    raise
  except BaseException as e:  # noqa: BLE001 -- every error ends the process.
    import sys
    import traceback

    from resnet_jax.errors import describe_os_error

    where = f"process {jax.process_index()} of {jax.process_count()}"
    code = 1
    if isinstance(e, ResNetJaxError):
      line, code = f"{where}: {e}", 2
    elif isinstance(e, OSError):
      line, code = f"{where}: cannot read or write {describe_os_error(e)}", 2
    elif _lost_a_process(e):
      line = (
        f"{where}: a computation across the processes failed: another process stopped or cannot be "
        f"reached ({_first_line(e)}); start every process again with the same command to resume "
        f"from the newest complete checkpoint"
      )
    elif isinstance(e, KeyboardInterrupt):
      line, code = f"{where}: interrupted", 130
    elif isinstance(e, SystemExit):
      line, code = f"{where}: exit {e.code}", e.code if isinstance(e.code, int) else 1
    else:  # A bug: keep its traceback.
      traceback.print_exc()
      line = f"{where}: {type(e).__name__} (traceback above)"
    sys.stdout.flush()
    print("error: " + " ".join(line.split()), file=sys.stderr, flush=True)
    os._exit(code)
