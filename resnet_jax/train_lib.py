"""jit-compiled, data-parallel training of the library's models with optax, orbax and grain.

:func:`train_and_evaluate` runs a whole training job from a config (see
:func:`resnet_jax.config_check.base_config` for every key) and writes into ``workdir``:

- ``config.json``: the config the run started with (written once); ``config_history.jsonl``: the
  settings changed by later resumes, with their steps (:mod:`resnet_jax.workdir`);
- ``metrics.jsonl``: one JSON record per log step (``"split": "train"``) and per evaluation
  (``"split": "test"``);
- ``events.out.tfevents.*``: the same records as TensorBoard scalars (:mod:`resnet_jax.tensorboard_events`);
- ``checkpoints/<step>/``: orbax checkpoints (state, data iterator state, metadata), the last K kept;
- ``summary.json``: config, model, parameters, steps, train_time_s, images_per_sec,
  final_train_loss, test_accuracy, best_test_accuracy (and a few more);
- ``curves.png``: loss and accuracy against step, train and test.

Running again with the same ``workdir`` resumes from its newest checkpoint. A run holds the lock
``train.lock`` of its workdir while it trains, and stops after a step with a checkpoint on SIGTERM or
SIGINT.

The training step (:func:`make_train_step`) is one ``jax.jit`` function: forward pass in train mode
(BatchNorm statistics of the global batch, updated in the step), softmax cross-entropy with optional
label smoothing, gradients, the optax update (weight decay on kernels only: BatchNorm scales/offsets
and biases, every parameter with fewer than 2 dimensions, are not decayed), with the state donated.
Data parallelism uses ``jax.sharding``: a 1-D ``Mesh`` over all devices named ``"batch"``, the batch
sharded along it and the state replicated, so XLA computes means (loss, BatchNorm statistics) over
the global batch and all-reduces the gradients. Several processes (one per host, ``config.distributed``)
share that mesh: each loads its slice of every batch, process 0 writes the outputs, and an error in one
process ends every process (docs/multi-host.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import data as data_lib
from resnet_jax import finetune
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.config_check import validate_config
from resnet_jax.errors import (CheckpointError, ConfigError, DistributedError, Interrupted, ModelError,
                               ResNetJaxError)
from resnet_jax.tensorboard_events import EventWriter
from resnet_jax.workdir import read_json_object


class TrainingDivergedError(ResNetJaxError):
  """A non-finite loss or gradient stopped the run (``config.on_nonfinite = "stop"``)."""


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, opt_state) plus the BatchNorm statistics."""
  batch_stats: Any = None


# ----------------------------------------------------------------------------------------------
# Model, schedule, optimizer.


def build_model(config: ml_collections.ConfigDict, num_classes: int, device_count: int = 1):
  """``create_model(config.model.name, num_classes, **config.model.options)`` with the compute dtype and
  the convolution backend.

  ``conv_backend="auto"`` means XLA's convolutions when the step runs on several devices: a oneDNN custom
  call is not partitioned by XLA, so each device would gather the whole batch and convolve all of it.
  """
  from resnet_jax import models

  options = config.model.options.to_dict() if hasattr(config.model.options, "to_dict") else dict(
      config.model.options)
  if config.model.dtype == "bfloat16":
    options["dtype"] = jnp.bfloat16
    options.setdefault("param_dtype", jnp.float32)
  if "conv_backend" in models.model_options(config.model.name):
    backend = config.model.conv_backend
    options["conv_backend"] = "xla" if backend == "auto" and device_count > 1 else backend
  return models.create_model(config.model.name, num_classes=num_classes, **options)


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
                  ) -> optax.Schedule:
  """The learning-rate schedule: linear warmup from 0, then constant, step decay, cosine or linear to 0.

  ``config.schedule.warmup`` and ``boundaries`` are in ``config.schedule.unit`` (steps or epochs).
  Step decay multiplies the rate by ``decay_factor`` at each boundary.
  """
  sch = config.schedule
  unit = steps_per_epoch if sch.unit == "epochs" else 1
  peak = float(config.optimizer.learning_rate)
  warmup = min(int(round(sch.warmup * unit)), max(total_steps - 1, 0))
  if sch.name == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup, 1))
  elif sch.name == "linear":
    main = optax.linear_schedule(peak, 0.0, transition_steps=max(total_steps - warmup, 1))
  elif sch.name == "step":
    scales: dict[int, float] = {}
    for b in sch.boundaries:
      at = max(int(round(b * unit)) - warmup, 1)
      scales[at] = scales.get(at, 1.0) * float(sch.decay_factor)
    main = optax.piecewise_constant_schedule(peak, scales)
  else:
    main = optax.constant_schedule(peak)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """``config.num_train_steps``, or ``config.num_epochs`` epochs of ``steps_per_epoch`` (at least 1)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def decay_mask(params: Any) -> Any:
  """True for the parameters that get weight decay: kernels (>= 2 dims); False for BN and biases."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """sgd / nesterov (L2 weight decay added to the gradient, torch style), adamw (decoupled), lars."""
  opt = config.optimizer
  wd = float(opt.weight_decay)
  if opt.name in ("sgd", "nesterov"):
    return optax.chain(
        optax.add_decayed_weights(wd, mask=decay_mask),
        optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.name == "nesterov"))
  if opt.name == "adamw":
    return optax.adamw(schedule, b1=opt.momentum, b2=opt.b2, eps=opt.eps, weight_decay=wd,
                       mask=decay_mask)
  if opt.name == "lars":
    return optax.lars(schedule, weight_decay=wd, weight_decay_mask=decay_mask,
                      trust_coefficient=opt.lars_trust_coefficient, trust_ratio_mask=decay_mask,
                      momentum=opt.momentum)
  raise ConfigError(f"config.optimizer.name={opt.name!r}: expected sgd, nesterov, adamw or lars")


def create_train_state(model: Any, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                       key: jax.Array, apply_fn: Callable | None = None) -> TrainState:
  """Initialise parameters and BatchNorm statistics on a dummy batch and wrap them with ``tx``.

  ``apply_fn`` replaces ``model.apply`` in the state (fine-tuning with frozen BatchNorm statistics).
  """
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  # Eager on purpose: each op is compiled once per process and shared by every later init of the
  # same shapes, where a jit of a fresh closure would recompile the whole initialiser each time.
  variables = model.init(key, dummy, train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState.create(apply_fn=apply_fn or model.apply, params=params, tx=tx, batch_stats=batch_stats)


# ----------------------------------------------------------------------------------------------
# Steps.


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example softmax cross-entropy in float32; targets ``(1 - s) onehot + s / num_classes``."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing > 0:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _variables(params: Any, batch_stats: Any) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(num_classes: int, label_smoothing: float = 0.0, skip_nonfinite: bool = True,
                    grad_norms: bool = False) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The (un-jitted) training step ``(state, batch) -> (state, metrics)``.

  metrics: ``loss`` (mean cross-entropy of the batch), ``accuracy``, ``finite`` (1 when the loss, every
  gradient and every floating-point array of the updated state, parameters, optimizer state and
  BatchNorm statistics, are finite), ``grads_finite`` (the loss and gradients alone),
  ``state_finite`` (the updated state alone). With
  ``skip_nonfinite`` a non-finite step leaves the state unchanged, so a NaN or Inf never reaches the
  state that is kept (and checkpointed). With ``grad_norms``, ``grad_norm``: for each top-level
  module of the parameters (``conv1``, ``layer1_0``, ..., ``fc``: the stem, each block, the head), the
  L2 norm of the loss's gradient with respect to its parameters (:func:`module_grad_norms`).
  """
  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    def loss_fn(params):
      logits, updates = state.apply_fn(_variables(params, state.batch_stats), batch["image"],
                                       train=True, mutable=["batch_stats"])
      loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads,
                                      batch_stats=updates.get("batch_stats", state.batch_stats))
    state_finite = all_finite((new_state.params, new_state.opt_state, new_state.batch_stats))
    grads_finite = jnp.isfinite(loss) & all_finite(grads)
    finite = grads_finite & state_finite
    if skip_nonfinite:  # Keep the old parameters and optimizer state; the step count still advances.
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = new_state.replace(step=state.step + 1)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics = {"loss": loss, "accuracy": accuracy, "finite": finite,
               "state_finite": state_finite, "grads_finite": grads_finite}
    if grad_norms:
      metrics["grad_norm"] = module_grad_norms(grads)
    return new_state, metrics
  return train_step


def module_grad_norms(grads: Any) -> dict[str, jax.Array]:
  """``{name: ||dL/dtheta_name||_2}`` for each top-level entry of the gradient tree (one per block)."""
  return {name: jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(sub)))
          for name, sub in grads.items()}


def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point leaf of ``tree`` is finite (integer leaves, e.g. counts, are)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.asarray(checks)) if checks else jnp.asarray(True)


def make_eval_step(num_classes: int, flip: bool = False) -> Callable[[TrainState, dict], dict]:
  """The (un-jitted) evaluation step: sums of loss and correct predictions over ``batch["mask"]``.

  With ``flip`` the logits are the mean of the image's and its mirror image's (test-time flip).
  """
  def eval_step(state: TrainState, batch: dict) -> dict:
    variables = _variables(state.params, state.batch_stats)
    logits = state.apply_fn(variables, batch["image"], train=False)
    if flip:  # NHWC: axis 2 is the width.
      logits = (logits + state.apply_fn(variables, batch["image"][:, :, ::-1], train=False)) / 2
    mask = batch["mask"]
    loss = cross_entropy(logits, batch["label"], num_classes)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
  return eval_step


# ----------------------------------------------------------------------------------------------
# Devices.


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
    kwargs.update(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                  process_id=d.process_id)
    where = (f"process {d.process_id} of {d.num_processes}, coordinator {d.coordinator_address}")
  else:
    where = "addresses auto-detected from the cluster environment"
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001 -- jax raises RuntimeError, ValueError or its runtime error.
    raise DistributedError(
        f"jax.distributed.initialize failed ({where}; config.distributed.init_timeout_s = "
        f"{d.init_timeout_s}): {_first_line(e)}; every process needs the same "
        f"coordinator_address (process 0's host and a free port) and num_processes, and its own "
        f"process_id in [0, num_processes)") from None
  try:
    _check_same_config(config)
  except DistributedError:
    raise  # Every process raises it (they compared the same numbers) and leaves normally.
  except BaseException:  # noqa: BLE001 -- e.g. a process lost meanwhile: this first collective fails.
    with _end_process_on_error():
      raise


def _lost_a_process(e: BaseException) -> bool:
  """Whether ``e`` is a collective or coordination failure (another process died or is unreachable)."""
  text = " ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
  return isinstance(e, getattr(jax.errors, "JaxRuntimeError", ())) or bool(re.search(
      r"[Gg]loo|Connection (closed|reset) by peer|DEADLINE_EXCEEDED|UNAVAILABLE|coordination service",
      text))


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _check_same_config(config: ml_collections.ConfigDict) -> None:
  """Every process of a multi-host run must train the same config (all but ``distributed.process_id``)."""
  import zlib
  from jax.experimental import multihost_utils

  plain = json.loads(json.dumps(config.to_dict(), default=str))
  plain["distributed"].pop("process_id", None)
  fingerprint = zlib.crc32(json.dumps(plain, sort_keys=True).encode()) & 0x7FFFFFFF
  local = np.asarray([fingerprint, config.distributed.num_processes], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), 2)
  n = jax.process_count()
  if len(set(gathered[:, 1].tolist())) > 1 or (config.distributed.coordinator_address
                                               and int(gathered[0, 1]) != n):
    raise DistributedError(
        f"config.distributed.num_processes differs between the processes (process 0..{n - 1} gave "
        f"{gathered[:, 1].tolist()}; {n} connected): give every process the same num_processes")
  differ = [i for i in range(n) if gathered[i, 0] != gathered[0, 0]]
  if differ:
    raise DistributedError(
        f"the config of process(es) {differ} differs from process 0's: every process of a run must "
        f"get the same config and flags (only config.distributed.process_id differs)")


def _check_shared_checkpoints(ckpt: Checkpointer) -> None:
  """Every process of a multi-host run must see the same checkpoints: one folder on shared storage."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  latest = ckpt.latest_step()
  seen = np.asarray(multihost_utils.process_allgather(np.asarray(-1 if latest is None else latest,
                                                                 np.int32))).ravel().tolist()
  if len(set(seen)) > 1:
    raise DistributedError(
        f"the processes see different newest checkpoints in {ckpt.directory} (process 0..{len(seen) - 1}: "
        f"steps {[s if s >= 0 else None for s in seen]}): --workdir must be one folder on storage that "
        f"every host shares (a network file system or a bucket)")


def _any_process(signum: int | None) -> int | None:
  """The signal number one of the processes received (``None`` when none did): every process of a
  multi-host run stops after the same step."""
  if jax.process_count() == 1:
    return signum
  from jax.experimental import multihost_utils
  got = int(np.max(multihost_utils.process_allgather(np.asarray(signum or 0, np.int32))))
  return got or None


class DataParallel:
  """A 1-D mesh over every device, axis ``"batch"``: batches sharded, the state replicated."""

  def __init__(self, devices: list | None = None):
    self.devices = list(devices if devices is not None else jax.devices())
    self.mesh = Mesh(np.asarray(self.devices), ("batch",))
    self.batch = NamedSharding(self.mesh, P("batch"))
    self.replicated = NamedSharding(self.mesh, P())

  def put_batch(self, batch: dict) -> dict:
    """This process's slice of a global batch -> a global ``jax.Array`` sharded over ``"batch"``."""
    return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(v)) for k, v in batch.items()}

  def replicate(self, tree: Any) -> Any:
    return jax.device_put(tree, self.replicated)

  def jit_train_step(self, step: Callable) -> Callable:
    return jax.jit(step, in_shardings=(self.replicated, self.batch),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))

  def jit_eval_step(self, step: Callable) -> Callable:
    return jax.jit(step, in_shardings=(self.replicated, self.batch), out_shardings=self.replicated)


def evaluate_state(eval_step: Callable, state: TrainState, ds: data_lib.Dataset, batch_size: int,
                   dp: DataParallel, num_threads: int = 2) -> dict[str, float]:
  """Loss and accuracy of ``state`` on the whole test set."""
  totals = None
  for batch in data_lib.eval_batches(ds, batch_size, jax.process_index(), jax.process_count(),
                                     num_threads):
    out = eval_step(state, dp.put_batch(batch))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count,
          "count": int(totals["count"])}


def count_parameters(params: Any) -> int:
  return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------
# Outputs.


def _metrics_lines(workdir: str) -> list[tuple[bytes, dict | None]]:
  """Each line of ``WORKDIR/metrics.jsonl`` with its record, or ``None`` where it is not one: not
  UTF-8, not JSON, not an object, or without a finite numeric ``step`` (e.g. a line cut by a kill)."""
  from resnet_jax.workdir import is_number
  path = os.path.join(workdir, "metrics.jsonl")
  out: list[tuple[bytes, dict | None]] = []
  if os.path.exists(path):
    with open(path, "rb") as f:
      for line in f:
        try:
          r = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
          r = None
        out.append((line, r if isinstance(r, dict) and is_number(r.get("step")) else None))
  return out


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``WORKDIR/metrics.jsonl``; lines that are not records are left out (see
  :func:`_metrics_lines`)."""
  return [r for _, r in _metrics_lines(workdir) if r is not None]


REJECTED_METRICS = "metrics_rejected_lines.txt"


def _rewrite_metrics(workdir: str, upto_step: int) -> tuple[list[dict], int]:
  """Keep only the records up to ``upto_step`` (a resumed run recomputes the later ones).

  Lines that are not records are moved, as they were, to ``WORKDIR/metrics_rejected_lines.txt``
  (appended), except a last line cut short by a kill. Returns the records kept and the number of
  lines moved.
  """
  lines = _metrics_lines(workdir)
  records = [r for _, r in lines if r is not None and r["step"] <= upto_step]
  rejected = [line for i, (line, r) in enumerate(lines)
              if r is None and (line.endswith(b"\n") or i < len(lines) - 1)]
  path = os.path.join(workdir, "metrics.jsonl")
  if rejected:
    with open(os.path.join(workdir, REJECTED_METRICS), "ab") as f:
      f.write(b"".join(x if x.endswith(b"\n") else x + b"\n" for x in rejected))
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(_strict_json(r), allow_nan=False) + "\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return records, len(rejected)


def _number(v: Any) -> float:
  """``v`` as a float for a plot: NaN where it is not a number (``null``, a string, missing)."""
  return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def plot_curves(records: list[dict], path: str, title: str = "") -> None:
  """Loss and accuracy against step, train and test, into ``path`` (matplotlib, Agg backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  for split, style in (("train", "-"), ("test", "o-")):
    rs = [r for r in records if r.get("split") == split]
    if not rs:
      continue
    steps = [_number(r.get("step")) for r in rs]
    ax_loss.plot(steps, [_number(r.get("loss")) for r in rs], style, label=split, markersize=3)
    ax_acc.plot(steps, [_number(r.get("accuracy")) for r in rs], style, label=split, markersize=3)
  for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()
  ax_loss.set_yscale("log")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def _strict_json(obj: Any) -> Any:
  """``obj`` with every non-finite float replaced by ``None`` (NaN and Infinity are not JSON)."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_strict_json(v) for v in obj]
  return obj


def _write_json(path: str, obj: Any) -> None:
  """Write ``obj`` to ``path`` through a temporary file renamed when complete (removed on failure; an
  OSError names the file)."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(_strict_json(obj), f, indent=2, allow_nan=False)
    os.replace(tmp, path)
  except OSError as e:
    raise OSError(e.errno, e.strerror, e.filename or tmp) from None
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


# ----------------------------------------------------------------------------------------------
# The job.


class Setup:
  """Everything a run needs, built from a validated config: model, data, steps, jitted functions."""

  def __init__(self, config: ml_collections.ConfigDict, devices: list | None = None):
    self.config = config
    self.dp = DataParallel(devices)
    validate_config(config, device_count=len(self.dp.devices))
    self.data = data_lib.load_dataset(config.dataset, progress=config.progress_bar)
    self.model = build_model(config, self.data.num_classes, len(self.dp.devices))
    min_size = getattr(self.model, "min_input_size", None)
    if min_size and min(self.data.image_shape[:2]) < min_size:
      raise ModelError(f"model {config.model.name} needs images of at least {min_size}x{min_size}, "
                       f"the dataset gives {self.data.image_shape[0]}x{self.data.image_shape[1]}")
    self.steps_per_epoch = self.data.num_train // config.batch_size
    if self.steps_per_epoch < 1:
      raise ConfigError(f"config.batch_size = {config.batch_size} exceeds the {self.data.num_train} "
                        f"training examples of {config.dataset.name}")
    self.total_steps = total_train_steps(config, self.steps_per_epoch)
    self.eval_every = (config.eval_every_steps if config.eval_every_steps > 0 else self.steps_per_epoch)
    self.checkpoint_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                             else self.eval_every)
    self.schedule = make_schedule(config, self.steps_per_epoch, self.total_steps)
    self.tx = finetune.make_optimizer(config, self.schedule, make_optimizer)  # make_optimizer unless split
    self.apply_fn = finetune.make_apply_fn(config, self.model)
    self.train_step = self.dp.jit_train_step(make_train_step(
        self.data.num_classes, float(config.label_smoothing), skip_nonfinite=True,
        grad_norms=bool(config.get("log_grad_norms", False))))
    self.eval_step = self.dp.jit_eval_step(make_eval_step(self.data.num_classes,
                                                          bool(config.get("eval_flip", False))))

  def init_state(self, log: Callable[[str], None] = print) -> TrainState:
    """The state of step 0: a fresh initialisation, or the weights of ``config.finetune.weights``."""
    state = create_train_state(self.model, self.tx, self.data.image_shape,
                               jax.random.PRNGKey(self.config.seed), self.apply_fn)
    state = finetune.initial_state(self.config, self.model, state, log)
    return self.dp.replicate(state)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without computing it (a restore target)."""
    shapes = jax.eval_shape(
        lambda k: create_train_state(self.model, self.tx, self.data.image_shape, k, self.apply_fn),
        jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.dp.replicated),
                        shapes)

  def train_iterator(self):
    c = self.config
    return iter(data_lib.train_pipeline(
        self.data, c.batch_size, c.seed, jax.process_index(), jax.process_count(),
        num_threads=c.dataset.num_threads, num_workers=c.dataset.num_workers))

  def evaluate(self, state: TrainState) -> dict[str, float]:
    return evaluate_state(self.eval_step, state, self.data, self.config.eval_batch_size, self.dp,
                          self.config.dataset.num_threads)


def _check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir that holds a run of another model or dataset is not resumed (nothing is overwritten)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  old = read_json_object(path, "the config of the run in this workdir, written by train.py; the "
                               "checkpoints hold it too: remove the file to resume from them")
  for key in ("model", "dataset"):
    new_name = config[key]["name"]
    group = old.get(key)
    old_name = group.get("name") if isinstance(group, dict) else None
    if old_name is not None and old_name != new_name:
      raise CheckpointError(f"workdir {workdir} holds a run of {key} {old_name!r}, this config trains "
                            f"{new_name!r}: use another --workdir")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list | None = None, log: Callable[[str], None] = print,
                       stop_at_step: int | None = None, setup: Setup | None = None) -> dict | None:
  """Train ``config`` writing into ``workdir`` (resuming from its newest checkpoint) and evaluate.

  The workdir is locked for the run (:class:`resnet_jax.workdir.RunDir`: a second run on it is
  refused), and SIGTERM or SIGINT stop the run after the current step with a checkpoint
  (:class:`resnet_jax.interrupt.StopOnSignal`, then :class:`~resnet_jax.errors.Interrupted`).
  A resume checks the changed settings (:func:`resnet_jax.workdir.check_resume`).

  Args:
    config: the training config (validated here before any work).
    workdir: output folder (created).
    devices: the devices of the data-parallel mesh (default: all).
    log: where the one-line messages go (progress bars go to stderr).
    stop_at_step: end this process after that step (checkpointed), as an interruption would; a
      later call with the same ``workdir`` resumes.
    setup: a :class:`Setup` of this same config to reuse (its compiled steps), e.g. across resumes.

  Returns:
    The summary (also written to ``WORKDIR/summary.json``), or ``None`` when stopped early.
  """
  from resnet_jax.interrupt import StopOnSignal
  from resnet_jax.workdir import RunDir

  started = time.perf_counter()
  validate_config(config)
  if setup is None:
    maybe_initialize_distributed(config)
  with _end_process_on_error():
    if setup is None:
      setup = Setup(config, devices)
    elif setup.config.to_dict() != config.to_dict():
      raise ConfigError("train_and_evaluate: the given setup was built for another config")
    with StopOnSignal() as signals, RunDir(os.path.abspath(workdir), lock=jax.process_index() == 0):
      return _train_and_evaluate(config, os.path.abspath(workdir), log, stop_at_step, setup, signals,
                                 started)


@contextlib.contextmanager
def _end_process_on_error():
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
      line = (f"{where}: a computation across the processes failed: another process stopped or cannot be "
              f"reached ({_first_line(e)}); start every process again with the same command to resume "
              f"from the newest complete checkpoint")
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


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None],
                        stop_at_step: int | None, setup: Setup, signals: Any, started: float
                        ) -> dict | None:
  """The body of :func:`train_and_evaluate`, in the locked ``workdir``.

  ``started``: ``time.perf_counter()`` when the job began (before the data was loaded); the records'
  ``wall_time_s`` counts from there, plus the wall time of the earlier runs up to their last checkpoint.
  """
  from tqdm import tqdm
  from resnet_jax import workdir as workdir_lib

  _check_same_run(workdir, config)
  if setup.data.skipped_files:
    log(f"warning: {len(setup.data.skipped_files)} unreadable image(s) left out "
        f"(config.dataset.on_corrupt_image='skip'): {', '.join(setup.data.skipped_files[:5])}")
  is_main = jax.process_index() == 0

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  _check_shared_checkpoints(ckpt)
  meta = {"best_test_accuracy": None, "train_time_s": 0.0, "train_images": 0, "step_time_s": 0.0,
          "wall_time_s": 0.0}
  data_state = None
  restore_step = config.restore_step if config.restore_step >= 0 else None
  counts = {"num_train": setup.data.num_train, "num_test": setup.data.num_test,
            "num_classes": setup.data.num_classes}
  changes: list[dict] = []
  saved_config = None
  if ckpt.latest_step() is None and restore_step is None:
    state = setup.init_state(log)
  else:
    state, data_state, saved_meta = ckpt.restore(setup.abstract_state(), restore_step)
    meta.update({k: v for k, v in saved_meta.items() if k in meta})
    restored = int(jax.device_get(state.step))
    changes = workdir_lib.check_resume(
        saved_meta, config, counts, lambda c: total_train_steps(c, setup.steps_per_epoch),
        lambda c: make_schedule(c, setup.steps_per_epoch, total_train_steps(c, setup.steps_per_epoch)),
        restored)
    saved_config = saved_meta.get("config") if isinstance(saved_meta.get("config"), dict) else None
    log(f"resuming {workdir} from step {restored}")
    if restore_step is not None and is_main:  # Later checkpoints are kept aside, not overwritten.
      superseded = os.path.join(workdir, workdir_lib.SUPERSEDED)
      moved = ckpt.set_aside_after(restore_step, superseded)
      kept = workdir_lib.set_aside_run_files(workdir, restore_step, moved)
      if moved:
        log(f"checkpoints of steps {moved} moved to {superseded}")
      if kept:
        log(f"the superseded run's metrics, summary, config and settings history kept in {kept}")
    if restore_step is not None and jax.process_count() > 1:  # Every process sees what was moved.
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("resnet_jax: checkpoints set aside")
      ckpt.reload()
    if changes:
      log(f"settings changed at step {restored}: {workdir_lib.describe_changes(changes)} (recorded in "
          f"{os.path.join(workdir, workdir_lib.HISTORY_NAME)})")
  start_step = int(jax.device_get(state.step))
  wall_base = float(meta["wall_time_s"])

  def wall_time() -> float:  # Seconds of this job so far, everything included, over all resumes.
    return wall_base + time.perf_counter() - started

  if is_main:  # Only once the checkpoint is restored: a failed resume leaves the workdir as it was.
    workdir_lib.record_settings(workdir, config, start_step, changes, _write_json, saved_config)
    _write_json(os.path.join(workdir, "data.json"), setup.data.info)  # Its normalisation, for evaluations.
  if is_main and start_step == 0:
    log(f"training {config.model.name} on {config.dataset.name} ({setup.data.num_train} images, "
        f"{setup.total_steps} steps of {config.batch_size} on {len(setup.dp.devices)} "
        f"{setup.dp.devices[0].platform} device(s)), writing to {workdir}")
  records, rejected = _rewrite_metrics(workdir, start_step) if is_main else ([], 0)
  if rejected:
    log(f"warning: {rejected} line(s) of {os.path.join(workdir, 'metrics.jsonl')} are not metrics "
        f"records (not UTF-8, not a JSON object, or no numeric step): moved to "
        f"{os.path.join(workdir, REJECTED_METRICS)}")

  train_iter = setup.train_iterator()
  if data_state:
    train_iter.set_state(data_state)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  # Unbuffered: each record is written at once, and a failed write leaves nothing for close() to retry.
  metrics_file = open(metrics_path, "ab", buffering=0) if is_main else None
  events = EventWriter(workdir, start_step) if is_main else None  # TensorBoard, the same records.

  def record(rec: dict) -> None:
    records.append(rec)
    if metrics_file is not None:
      line = json.dumps(_strict_json(rec), allow_nan=False) + "\n"  # NaN is not JSON: null.
      try:
        metrics_file.write(line.encode())
      except OSError as e:  # A full disk: name the file.
        raise OSError(e.errno, e.strerror, metrics_path) from None
      events.write(rec)

  def save(step: int) -> None:
    meta["wall_time_s"] = wall_time()
    ckpt.save(step, state, train_iter.get_state(), {**meta, **counts, "config": config.to_dict()})

  batch = config.batch_size
  bar = tqdm(total=setup.total_steps, initial=start_step, disable=not (config.progress_bar and is_main),
             desc=f"{config.model.name} on {config.dataset.name}", unit="step", dynamic_ncols=True)
  pending: list[tuple[int, dict]] = []
  last_test: dict | None = None
  t_window, n_window = time.perf_counter(), 0
  stopped_nonfinite = None
  try:
    for step in range(start_step + 1, setup.total_steps + 1):
      t0 = time.perf_counter()
      state, m = setup.train_step(state, setup.dp.put_batch(next(train_iter)))
      stopping = signals.received
      if jax.process_count() > 1:  # A signal to one process stops all of them after the same step.
        stopping = _any_process(stopping)  # (one arriving meanwhile counts at the next step)
        if stopping is not None and signals.received is None:
          signals.received = stopping
      halt = step == stop_at_step or stopping is not None  # This step is the last one.
      pending.append((step, m))
      if len(pending) >= 2:  # At most one step in flight, so that the progress bar tells the truth.
        jax.block_until_ready(pending[-2][1]["loss"])
      n_window += 1
      bar.update(1)
      # Log at every evaluation and checkpoint too, so that a resumed run logs the same windows.
      if (step % config.log_every_steps == 0 or step % setup.eval_every == 0
          or step % setup.checkpoint_every == 0 or step == setup.total_steps or halt):
        fetched = jax.device_get([mm for _, mm in pending])
        bad = [s for (s, _), mm in zip(pending, fetched) if not mm["finite"]]
        bad_grads = [s for (s, _), mm in zip(pending, fetched) if not mm.get("grads_finite", True)]
        now = time.perf_counter()
        rate = n_window * batch / max(now - t_window, 1e-9)
        loss = float(np.mean([mm["loss"] for mm in fetched if mm["finite"]] or [np.nan]))
        acc = float(np.mean([mm["accuracy"] for mm in fetched if mm["finite"]] or [np.nan]))
        if step > start_step + n_window:  # Not the first window: that one holds the compilation.
          meta["step_time_s"] += now - t_window
          meta["train_images"] += n_window * batch
        rec = {"step": step, "split": "train", "loss": loss, "accuracy": acc,
               "learning_rate": float(setup.schedule(step - 1)), "images_per_sec": rate,
               "nonfinite_steps": len(bad)}
        good = [mm for mm in fetched if mm["finite"] and "grad_norm" in mm]
        for name in (good[0]["grad_norm"] if good else {}):  # The window's mean, per module.
          rec[f"grad_norm/{name}"] = float(np.mean([mm["grad_norm"][name] for mm in good]))
        record(rec)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", img_s=f"{rate:.0f}")
        pending, t_window, n_window = [], time.perf_counter(), 0
        if bad and config.on_nonfinite == "stop":
          stopped_nonfinite = bad[0]
          stopped_in_state = bad[0] not in bad_grads
          break
        if bad:
          log(f"warning: non-finite loss, gradient or updated state at steps {bad[:5]}: those updates "
              f"were skipped")
      if step % setup.eval_every == 0 or step == setup.total_steps:
        last_test = setup.evaluate(state)
        best = meta["best_test_accuracy"]
        meta["best_test_accuracy"] = max(best, last_test["accuracy"]) if best is not None else (
            last_test["accuracy"])
        record({"step": step, "split": "test", "loss": last_test["loss"],
                "accuracy": last_test["accuracy"], "epoch": step / setup.steps_per_epoch,
                "wall_time_s": wall_time()})
        bar.write(f"step {step}/{setup.total_steps} epoch {step / setup.steps_per_epoch:.1f}: "
                  f"train loss {records[-2]['loss'] if len(records) > 1 else float('nan'):.4f}  "
                  f"test loss {last_test['loss']:.4f}  test accuracy {last_test['accuracy']:.4f}")
      meta["train_time_s"] += time.perf_counter() - t0
      if step % setup.checkpoint_every == 0 or step == setup.total_steps or halt:
        save(step)
      if halt:
        break
      if n_window == 0:  # Evaluation and checkpoint time stay out of the images/s windows.
        t_window = time.perf_counter()
  finally:
    bar.close()
    if hasattr(train_iter, "close"):  # Stops grain's threads and worker processes.
      train_iter.close()
    if metrics_file is not None:
      metrics_file.close()
      events.close()
  if stopped_nonfinite is not None:
    ckpt.close()
    last = ckpt.latest_step()
    kept = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
            else "no checkpoint was written yet")
    what = ("non-finite parameters, optimizer state or BatchNorm statistics after the update of step "
            f"{stopped_nonfinite} (the loss and gradients were finite: an optimizer setting or learning "
            f"rate that overflows?)" if stopped_in_state else
            f"non-finite loss or gradient at step {stopped_nonfinite}")
    raise TrainingDivergedError(
        f"{what}: training stopped, that update was not applied; {kept} "
        f"(set config.on_nonfinite='skip' to skip such steps)")
  end_step = int(jax.device_get(state.step))
  if end_step < setup.total_steps and signals.received is not None:
    ckpt.close()
    raise Interrupted(f"stopped by {signals.name} after step {end_step} of {setup.total_steps}: checkpoint "
                      f"written to {os.path.join(ckpt.directory, str(end_step))}; run the same command "
                      f"again to resume", signals.received)
  if end_step < setup.total_steps and stop_at_step is not None:
    ckpt.close()
    return None
  if last_test is None:  # Nothing left to train (resumed a finished run): evaluate once.
    last_test = setup.evaluate(state)
    if meta["best_test_accuracy"] is None:
      meta["best_test_accuracy"] = last_test["accuracy"]
  ckpt.close()
  train_records = [r for r in records if r.get("split") == "train"]
  summary = {
      "config": config.to_dict(),
      "model": config.model.name,
      "dataset": config.dataset.name,
      "parameters": count_parameters(state.params),
      "steps": end_step,
      "epochs": end_step / setup.steps_per_epoch,
      "global_batch": batch,
      "devices": len(setup.dp.devices),
      "platform": setup.dp.devices[0].platform,
      "train_time_s": meta["train_time_s"],
      "wall_time_s": wall_time(),
      "images_per_sec": meta["train_images"] / meta["step_time_s"] if meta["step_time_s"] > 0 else None,
      "final_train_loss": train_records[-1]["loss"] if train_records else None,
      "test_loss": last_test["loss"],
      "test_accuracy": last_test["accuracy"],
      "best_test_accuracy": meta["best_test_accuracy"],
      "workdir": workdir,
      "skipped_images": len(setup.data.skipped_files),
      "skipped_image_files": setup.data.skipped_files[:100],
  }
  if is_main:
    _write_json(os.path.join(workdir, "summary.json"), summary)
    plot_curves(records, os.path.join(workdir, "curves.png"),
                f"{config.model.name} on {config.dataset.name}")
  return summary
