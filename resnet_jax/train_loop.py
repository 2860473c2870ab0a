"""The training loop: :func:`train_and_evaluate` runs a whole training job from a config.

See :func:`resnet_jax.config_check.base_config` for every key. A run writes into ``workdir``:

- ``config.json``: the config the run started with (written once); ``config_history.jsonl``: the
  settings changed by later resumes, with their steps (:mod:`resnet_jax.workdir`);
- ``metrics.jsonl``: one JSON record per log step (``"split": "train"``) and per evaluation
  (``"split": "test"``), and ``events.out.tfevents.*``: the same records as TensorBoard scalars
  (:mod:`resnet_jax.metrics`);
- ``checkpoints/<step>/``: orbax checkpoints (state, data iterator state, metadata), the last K kept;
- ``summary.json``: config, model, parameters, steps, train_time_s, images_per_sec,
  final_train_loss, test_accuracy, best_test_accuracy (and a few more); with ``config.ema_decay > 0`` the
  evaluations are of the weight average, and ``unaveraged_test_accuracy`` / ``_loss`` are the last
  weights' own;
- ``curves.png``: loss and accuracy against step, train and test.

Running again with the same ``workdir`` resumes from its newest checkpoint. A run holds the lock
``train.lock`` of its workdir while it trains, and stops after a step with a checkpoint on SIGTERM or
SIGINT.

The pieces: :class:`resnet_jax.run_setup.Setup` (data, model, optimizer, the jitted steps),
:func:`resnet_jax.train_step.make_train_step` (the step), :class:`resnet_jax.metrics.MetricsWriter`,
:class:`resnet_jax.checkpoint.Checkpointer` and :mod:`resnet_jax.distributed` (the device mesh and
multi-host runs: process 0 writes the outputs, and an error in one process ends every process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from resnet_jax import host_memory, machine, optim, run_setup
from resnet_jax import workdir as workdir_lib
from resnet_jax.checkpoint import Checkpointer
from resnet_jax.config_check import validate_config
from resnet_jax.distributed import (
  agree_on_signal,
  check_shared_checkpoints,
  end_process_on_error,
  maybe_initialize_distributed,
)
from resnet_jax.errors import CheckpointError, ConfigError, Interrupted, ResNetJaxError
from resnet_jax.metrics import REJECTED_METRICS, MetricsWriter, plot_curves, write_json
from resnet_jax.run_setup import Setup
from resnet_jax.train_step import TrainState, count_parameters


class TrainingDivergedError(ResNetJaxError):
  """A non-finite loss or gradient stopped the run (``config.on_nonfinite = "stop"``)."""


def due(step: int, every: int, also: bool = False) -> bool:
  """Whether a periodic action (log, evaluation, checkpoint) runs after ``step``: every ``every``
  steps, and whenever ``also`` (e.g. the last step)."""
  return also or step % every == 0


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  devices: list | None = None,
  log: Callable[[str], None] = print,
  stop_at_step: int | None = None,
  setup: Setup | None = None,
) -> dict | None:
  """Train ``config`` writing into ``workdir`` (resuming from its newest checkpoint) and evaluate.

  The workdir is locked for the run (:class:`resnet_jax.workdir.RunDir`: a second run on it is
  refused), and SIGTERM or SIGINT stop the run after the current step (call, with ``config.steps_per_call``
  > 1) with a checkpoint (:class:`resnet_jax.interrupt.StopOnSignal`, then
  :class:`~resnet_jax.errors.Interrupted`).
  A resume checks the changed settings (:func:`resnet_jax.workdir.check_resume`).

  Args:
    config: the training config (validated here before any work).
    workdir: output folder (created).
    devices: the devices of the data-parallel mesh (default: all).
    log: where the one-line messages go (progress bars go to stderr).
    stop_at_step: end this process after that step (checkpointed), as an interruption would; a
      later call with the same ``workdir`` resumes.
    setup: a :class:`~resnet_jax.run_setup.Setup` of this same config to reuse (its compiled steps),
      e.g. across resumes.

  Returns:
    The summary (also written to ``WORKDIR/summary.json``), or ``None`` when stopped early.
  """
  from resnet_jax.interrupt import StopOnSignal
  from resnet_jax.workdir import RunDir

  started = time.perf_counter()
  validate_config(config)  # The one check of the config: before any connection, data or compilation.
  if setup is None:
    maybe_initialize_distributed(config)
  with end_process_on_error():
    if setup is None:
      setup = Setup(config, devices)
    elif not _same_run_config(setup.config, config):
      raise ConfigError("train_and_evaluate: the given setup was built for another config")
    workdir = os.path.abspath(workdir)
    with StopOnSignal() as signals, RunDir(workdir, lock=jax.process_index() == 0):
      return _run(config, workdir, log, stop_at_step, setup, signals, started)


@dataclasses.dataclass
class _Run:
  """What a run carries from step to step: the state and the metadata its checkpoints hold."""

  state: TrainState
  meta: dict  # best_test_accuracy, train_time_s, train_images, step_time_s, wall_time_s
  start_step: int
  started: float  # time.perf_counter() when the job began (before the data was loaded)
  last_test: dict | None = None

  def __post_init__(self):
    self.wall_base = float(self.meta["wall_time_s"])

  def wall_time(self) -> float:
    """Seconds of this job so far, everything included, over all resumes (up to their last checkpoint)."""
    return self.wall_base + time.perf_counter() - self.started


def _run(
  config: ml_collections.ConfigDict,
  workdir: str,
  log: Callable[[str], None],
  stop_at_step: int | None,
  setup: Setup,
  signals: Any,
  started: float,
) -> dict | None:
  """The body of :func:`train_and_evaluate`, in the locked ``workdir``: restore, train, summarise."""
  _check_same_run(workdir, config)
  if setup.data.skipped_files:
    log(
      f"warning: {len(setup.data.skipped_files)} unreadable image(s) left out "
      f"(config.dataset.on_corrupt_image='skip'): {', '.join(setup.data.skipped_files[:5])}"
    )
  is_main = jax.process_index() == 0
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  check_shared_checkpoints(ckpt)
  if config.get("time_budget_minutes", 0.0) > 0:
    config, setup = _fit_time_budget(config, workdir, setup, ckpt, started, log)
  state, data_state, meta, changes, saved_config = _restore(config, workdir, setup, ckpt, log)
  run = _Run(state, meta, int(jax.device_get(state.step)), started)
  if is_main:  # Only once the checkpoint is restored: a failed resume leaves the workdir as it was.
    workdir_lib.record_settings(workdir, config, run.start_step, changes, saved_config)
    write_json(os.path.join(workdir, "data.json"), setup.data.info)  # Its normalisation, for evaluations.
  if is_main and run.start_step == 0:
    augment = config.dataset.augment + (f" + cutout {config.dataset.cutout}" if config.dataset.cutout else "")
    log(
      f"training {config.model.name} on {config.dataset.name} ({setup.data.num_train} images, "
      f"{setup.total_steps} steps of {config.batch_size} in {setup.compute_dtype} on {len(setup.dp.devices)} "
      f"{setup.dp.devices[0].platform} device(s), augmentation {augment} on the {setup.augment_on}), "
      f"writing to {workdir}"
    )
  warning = run_setup.steps_per_call_warning(config, setup.dp.devices[0].platform, len(setup.dp.devices))
  if is_main and warning:
    log(warning)
  with contextlib.ExitStack() as stack:
    writer = stack.enter_context(MetricsWriter(workdir, run.start_step, enabled=is_main))
    if writer.rejected:
      log(
        f"warning: {writer.rejected} line(s) of {writer.path} are not metrics records (not UTF-8, not a "
        f"JSON object, or no numeric step): moved to {os.path.join(workdir, REJECTED_METRICS)}"
      )
    if writer.replaced and run.start_step == 0:  # A run stopped before its first checkpoint starts again.
      log(
        f"no checkpoint in {ckpt.directory}: training starts at step 0 and replaces the {len(writer.replaced)} "
        f"records of {writer.path} (steps {min(writer.replaced)} to {max(writer.replaced)})"
      )
    train_iter = setup.train_iterator()
    if hasattr(train_iter, "close"):  # Stops grain's threads and worker processes.
      stack.callback(train_iter.close)
    if data_state:
      train_iter.set_state(data_state)
    stopped = _train(config, setup, run, train_iter, writer, ckpt, signals, stop_at_step, log)
  return _finish(config, workdir, setup, run, ckpt, writer.records, signals, stop_at_step, stopped)


def _same_run_config(built: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> bool:
  """Whether a setup ``built`` for a config serves ``config``: the same, or the same but for the lengths
  that ``config``'s time budget chose (:data:`resnet_jax.time_budget.SCALED_KEYS`)."""
  from resnet_jax import time_budget

  if built.to_dict() == config.to_dict():
    return True
  return config.get("time_budget_minutes", 0.0) > 0 and (
    time_budget.resolve_on_resume(config, built.to_dict()).to_dict() == built.to_dict()
  )


def _fit_time_budget(
  config: ml_collections.ConfigDict,
  workdir: str,
  setup: Setup,
  ckpt: Checkpointer,
  started: float,
  log: Callable[[str], None],
) -> tuple[ml_collections.ConfigDict, Setup]:
  """The config and setup of a run under ``config.time_budget_minutes``: on resume, the lengths that the
  budget chose at step 0 (from the checkpoint); at step 0, what fits on this machine
  (:func:`resnet_jax.time_budget.fit`, recorded in ``WORKDIR/time_budget.json``)."""
  from resnet_jax import time_budget

  def rebuild(c: ml_collections.ConfigDict) -> Setup:
    return setup if c.to_dict() == setup.config.to_dict() else setup.with_config(c)

  restore_step = config.restore_step if config.restore_step >= 0 else None
  if ckpt.latest_step() is not None or restore_step is not None:
    _, saved_meta = ckpt.read_meta(restore_step)
    resolved = time_budget.resolve_on_resume(config, saved_meta.get("config"))
    return resolved, rebuild(resolved)
  if setup.config.to_dict() != config.to_dict():  # A setup made for a budget's choice: start from the config.
    setup = setup.with_config(config)
  config, setup, record = time_budget.fit(config, setup, workdir, lambda: time.perf_counter() - started, log, rebuild)
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, time_budget.BUDGET_FILE), record)
  return config, setup


def _train(
  config: ml_collections.ConfigDict,
  setup: Setup,
  run: _Run,
  train_iter: Any,
  writer: MetricsWriter,
  ckpt: Checkpointer,
  signals: Any,
  stop_at_step: int | None,
  log: Callable[[str], None],
) -> tuple[int, bool] | None:
  """Steps ``run.start_step + 1`` to the last, with their records, evaluations and checkpoints.

  Returns ``(step, in_state)`` when a non-finite update of ``step`` stopped the run (``in_state``: the
  loss and gradients were finite, the updated state was not), else ``None``.
  """
  from tqdm import tqdm

  window = _Window(config.batch_size, stacked=setup.steps_per_call > 1)
  with tqdm(
    total=setup.total_steps,
    initial=run.start_step,
    unit="step",
    dynamic_ncols=True,
    disable=not (config.progress_bar and jax.process_index() == 0),
    desc=f"{config.model.name} on {config.dataset.name}",
  ) as bar:
    step = run.start_step
    while step < setup.total_steps:
      count = _call_length(config, setup, step, stop_at_step)
      t0 = time.perf_counter()
      run.state, metrics = setup.train_call(run.state, [next(train_iter) for _ in range(count)])
      step += count  # Steps before it in this call have no periodic action (_call_length).
      stopping = agree_on_signal(signals)  # In every process at every call: it is a collective.
      halt = step == stop_at_step or stopping is not None  # This step is the last one.
      window.add(step - count + 1, count, metrics)
      bar.update(count)
      last = step == setup.total_steps
      evaluate, save = due(step, setup.eval_every, last), due(step, setup.checkpoint_every, last or halt)
      # Log at every evaluation and checkpoint too, so that a resumed run logs the same windows.
      if due(step, config.log_every_steps, evaluate or save):
        rec, bad, bad_grads = window.record(step, run, float(setup.schedule(step - 1)))
        writer.write(step, rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}", img_s=f"{rec['images_per_sec']:.0f}")
        if bad and config.on_nonfinite == "stop":
          return bad[0], bad[0] not in bad_grads
        if bad:
          log(f"warning: non-finite loss, gradient or updated state at steps {bad[:5]}: those updates were skipped")
      if evaluate:
        _evaluate(setup, run, writer, step, bar.write)
      run.meta["train_time_s"] += time.perf_counter() - t0
      if save:
        run.meta["wall_time_s"] = run.wall_time()
        ckpt.save(step, run.state, train_iter.get_state(), {**run.meta, **_counts(setup), "config": config.to_dict()})
      if halt:
        break
      window.restart_if_empty()  # Evaluation and checkpoint time stay out of the images/s windows.
  return None


def _call_length(config: ml_collections.ConfigDict, setup: Setup, step: int, stop_at_step: int | None) -> int:
  """How many steps the call after ``step`` trains: ``config.steps_per_call``, or fewer so that the call
  ends at the next step with a train record, an evaluation or a checkpoint, at ``stop_at_step`` or at the
  last step. A run's records, evaluations and checkpoints are then those of one step per call."""
  if setup.steps_per_call == 1:
    return 1
  ends = [setup.total_steps] + [
    (step // every + 1) * every for every in (config.log_every_steps, setup.eval_every, setup.checkpoint_every)
  ]
  if stop_at_step is not None and stop_at_step > step:
    ends.append(stop_at_step)
  return min(setup.steps_per_call, min(ends) - step)


class _Window:
  """The steps since the last train record: their metrics (on the devices until the record) and time."""

  def __init__(self, batch_size: int, stacked: bool = False):
    self.batch_size = batch_size
    self.stacked = stacked  # Each call's metrics are its steps' stacked (config.steps_per_call > 1).
    self.pending: list[tuple[int, int, dict]] = []  # (first step, steps, metrics) of each call
    self.started = time.perf_counter()

  def add(self, first: int, count: int, metrics: dict) -> None:
    """The metrics of a call that trained ``count`` steps from step ``first``."""
    self.pending.append((first, count, metrics))
    if len(self.pending) >= 2:  # At most one call in flight, so that the progress bar tells the truth.
      jax.block_until_ready(self.pending[-2][2]["loss"])

  def restart_if_empty(self) -> None:
    if not self.pending:
      self.started = time.perf_counter()

  def record(self, step: int, run: _Run, learning_rate: float) -> tuple[dict, list[int], list[int]]:
    """The train record of the window ending at ``step`` (means over its finite steps), the steps with a
    non-finite update and those with a non-finite loss or gradient; the window starts again."""
    steps, fetched = [], []
    for (first, count, _), m in zip(self.pending, jax.device_get([m for *_, m in self.pending])):
      steps += range(first, first + count)
      fetched += [jax.tree.map(lambda x, i=i: x[i], m) for i in range(count)] if self.stacked else [m]
    bad = [s for s, m in zip(steps, fetched) if not m["finite"]]
    bad_grads = [s for s, m in zip(steps, fetched) if not m.get("grads_finite", True)]
    n, now = len(fetched), time.perf_counter()
    good = [m for m in fetched if m["finite"]]
    if step > run.start_step + n:  # Not the first window: that one holds the compilation.
      run.meta["step_time_s"] += now - self.started
      run.meta["train_images"] += n * self.batch_size
    rec = {
      "split": "train",
      "loss": float(np.mean([m["loss"] for m in good] or [np.nan])),
      "accuracy": float(np.mean([m["accuracy"] for m in good] or [np.nan])),
      "learning_rate": learning_rate,
      "images_per_sec": n * self.batch_size / max(now - self.started, 1e-9),
      "nonfinite_steps": len(bad),
    }
    norms = [m["grad_norm"] for m in good if "grad_norm" in m]
    for name in norms[0] if norms else {}:  # The window's mean, per module.
      rec[f"grad_norm/{name}"] = float(np.mean([g[name] for g in norms]))
    self.pending, self.started = [], time.perf_counter()
    return rec, bad, bad_grads


def _evaluate(setup: Setup, run: _Run, writer: MetricsWriter, step: int, show: Callable[[str], None]) -> None:
  """Test loss and accuracy after ``step``: a test record, the best accuracy so far, a line shown."""
  test = run.last_test = setup.evaluate(run.state)
  best = run.meta["best_test_accuracy"]
  run.meta["best_test_accuracy"] = max(best, test["accuracy"]) if best is not None else test["accuracy"]
  epoch = step / setup.steps_per_epoch
  writer.write(
    step,
    {
      "split": "test",
      "loss": test["loss"],
      "accuracy": test["accuracy"],
      "epoch": epoch,
      "wall_time_s": run.wall_time(),
    },
  )
  records = writer.records
  show(
    f"step {step}/{setup.total_steps} epoch {epoch:.1f}: "
    f"train loss {records[-2]['loss'] if len(records) > 1 else float('nan'):.4f}  "
    f"test loss {test['loss']:.4f}  test accuracy {test['accuracy']:.4f}"
  )


def _counts(setup: Setup) -> dict[str, int]:
  return {"num_train": setup.data.num_train, "num_test": setup.data.num_test, "num_classes": setup.data.num_classes}


def _restore(
  config: ml_collections.ConfigDict, workdir: str, setup: Setup, ckpt: Checkpointer, log: Callable[[str], None]
) -> tuple[TrainState, dict | None, dict, list[dict], dict | None]:
  """``(state, data_state, meta, changes, saved_config)``: step 0, or the checkpoint to resume from
  (the newest, or ``config.restore_step``) with the settings changed since (``changes``)."""
  meta = {"best_test_accuracy": None, "train_time_s": 0.0, "train_images": 0, "step_time_s": 0.0, "wall_time_s": 0.0}
  restore_step = config.restore_step if config.restore_step >= 0 else None
  if ckpt.latest_step() is None and restore_step is None:
    _refuse_finished_without_checkpoint(workdir, ckpt)
    return setup.init_state(log), None, meta, [], None
  # The settings first, before any array is read: a change that also changes the state's structure
  # (config.ema_decay) is then refused with its reason, not as a checkpoint that does not fit.
  step, saved_meta = ckpt.read_meta(restore_step)
  per_epoch = setup.steps_per_epoch
  changes = workdir_lib.check_resume(
    saved_meta,
    config,
    _counts(setup),
    lambda c: optim.total_train_steps(c, per_epoch),
    lambda c: optim.make_schedule(c, per_epoch, optim.total_train_steps(c, per_epoch)),
    step,
  )
  state, data_state, _ = ckpt.restore(setup.abstract_state(), step)
  meta.update({k: v for k, v in saved_meta.items() if k in meta})
  restored = int(jax.device_get(state.step))
  saved_config = saved_meta.get("config") if isinstance(saved_meta.get("config"), dict) else None
  log(f"resuming {workdir} from step {restored}")
  if restore_step is not None:
    _set_aside_later(workdir, ckpt, restore_step, log)
  if changes:
    log(
      f"settings changed at step {restored}: {workdir_lib.describe_changes(changes)} (recorded in "
      f"{os.path.join(workdir, workdir_lib.HISTORY_NAME)})"
    )
  return state, data_state, meta, changes, saved_config


def _refuse_finished_without_checkpoint(workdir: str, ckpt: Checkpointer) -> None:
  """A workdir whose run has finished (``summary.json``) but whose checkpoints are gone is a ConfigError:
  starting at step 0 would replace that run's records with those of a new one."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.isfile(path):
    return
  raise ConfigError(
    f"{workdir} holds a finished run ({path}) but no checkpoint in {ckpt.directory}: training here "
    f"would start again at step 0 and replace that run's records; give another --workdir, or move {path} "
    "away to train from scratch here"
  )


def _set_aside_later(workdir: str, ckpt: Checkpointer, step: int, log: Callable[[str], None]) -> None:
  """Resuming from an earlier ``step``: the later checkpoints and run files are kept aside, not overwritten."""
  if jax.process_index() == 0:
    superseded = os.path.join(workdir, workdir_lib.SUPERSEDED)
    moved = ckpt.set_aside_after(step, superseded)
    kept = workdir_lib.set_aside_run_files(workdir, step, moved)
    if moved:
      log(f"checkpoints of steps {moved} moved to {superseded}")
    if kept:
      log(f"the superseded run's metrics, summary, config and settings history kept in {kept}")
  if jax.process_count() > 1:  # Every process sees what was moved.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("resnet_jax: checkpoints set aside")
    ckpt.reload()


def _finish(
  config: ml_collections.ConfigDict,
  workdir: str,
  setup: Setup,
  run: _Run,
  ckpt: Checkpointer,
  records: list[dict],
  signals: Any,
  stop_at_step: int | None,
  stopped: tuple[int, bool] | None,
) -> dict | None:
  """After the loop: raise for a divergence or an interruption, return ``None`` at ``stop_at_step``,
  else evaluate (when nothing was left to train), write the summary and the curves and return the summary."""
  ckpt.close()
  if stopped is not None:
    raise _diverged(ckpt, *stopped)
  end_step = int(jax.device_get(run.state.step))
  if end_step < setup.total_steps and signals.received is not None:
    raise Interrupted(
      f"stopped by {signals.name} after step {end_step} of {setup.total_steps}: checkpoint "
      f"written to {os.path.join(ckpt.directory, str(end_step))}; run the same command "
      f"again to resume",
      signals.received,
    )
  if end_step < setup.total_steps and stop_at_step is not None:
    return None
  if run.last_test is None:  # Nothing left to train (resumed a finished run): evaluate once.
    run.last_test = setup.evaluate(run.state)
    if run.meta["best_test_accuracy"] is None:
      run.meta["best_test_accuracy"] = run.last_test["accuracy"]
  summary = _summary(config, workdir, setup, run, records, end_step)
  if run.state.ema is not None:  # What the weight average changed: the last weights' own accuracy.
    own = setup.evaluate(run.state.replace(ema=None))
    summary["unaveraged_test_loss"], summary["unaveraged_test_accuracy"] = own["loss"], own["accuracy"]
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "summary.json"), summary)
    plot_curves(records, os.path.join(workdir, "curves.png"), f"{config.model.name} on {config.dataset.name}")
  return summary


def _diverged(ckpt: Checkpointer, step: int, in_state: bool) -> TrainingDivergedError:
  last = ckpt.latest_step()
  kept = (
    f"the last good checkpoint is step {last} in {ckpt.directory}"
    if last is not None
    else "no checkpoint was written yet"
  )
  what = (
    "non-finite parameters, optimizer state or BatchNorm statistics after the update of step "
    f"{step} (the loss and gradients were finite: an optimizer setting or learning "
    f"rate that overflows?)"
    if in_state
    else f"non-finite loss or gradient at step {step}"
  )
  return TrainingDivergedError(
    f"{what}: training stopped, that update was not applied; {kept} (set config.on_nonfinite='skip' to skip such steps)"
  )


def _summary(
  config: ml_collections.ConfigDict, workdir: str, setup: Setup, run: _Run, records: list[dict], end_step: int
) -> dict:
  """The contents of ``summary.json``."""
  meta = run.meta
  train_records = [r for r in records if r.get("split") == "train"]
  return {
    "config": config.to_dict(),
    "model": config.model.name,
    "dataset": config.dataset.name,
    "parameters": count_parameters(run.state.params),
    "steps": end_step,
    "epochs": end_step / setup.steps_per_epoch,
    "global_batch": config.batch_size,
    "devices": len(setup.dp.devices),
    "platform": setup.dp.devices[0].platform,
    "augment_on": setup.augment_on,
    "compute_dtype": setup.compute_dtype,
    "host_memory": "keep" if host_memory.kept() else "default",
    "machine": machine.describe(),
    "train_time_s": meta["train_time_s"],
    "wall_time_s": run.wall_time(),
    "images_per_sec": meta["train_images"] / meta["step_time_s"] if meta["step_time_s"] > 0 else None,
    "final_train_loss": train_records[-1]["loss"] if train_records else None,
    "test_loss": run.last_test["loss"],
    "test_accuracy": run.last_test["accuracy"],
    "best_test_accuracy": meta["best_test_accuracy"],
    "workdir": workdir,
    "skipped_images": len(setup.data.skipped_files),
    "skipped_image_files": setup.data.skipped_files[:100],
  }


def _check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir that holds a run of another model or dataset is not resumed (nothing is overwritten)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  old = workdir_lib.read_json_object(
    path,
    "the config of the run in this workdir, written by train.py; the "
    "checkpoints hold it too: remove the file to resume from them",
  )
  for key in ("model", "dataset"):
    new_name = config[key]["name"]
    group = old.get(key)
    old_name = group.get("name") if isinstance(group, dict) else None
    if old_name is not None and old_name != new_name:
      raise CheckpointError(
        f"workdir {workdir} holds a run of {key} {old_name!r}, this config trains {new_name!r}: use another --workdir"
      )
