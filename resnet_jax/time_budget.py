"""Training to a wall-time budget: ``config.time_budget_minutes``.

A recipe such as ``configs/cifar10_fast.py`` is tuned for a number of epochs, and how long those take
depends on the CPU: 50 epochs of ResNet-20 take 37 minutes where oneDNN computes bfloat16 convolutions and
about two hours on an AVX2-only CPU. With a budget, the run measures this machine before its first step
and shortens itself to what fits:

1. :func:`measure` times the training step (after its compilation, with the input pipeline), the
   evaluation (from a few of its batches) and one checkpoint, on a throwaway copy of the initial state.
2. :func:`steps_that_fit` takes the most steps ``N`` (at most the config's) whose cost fits what is left
   of the budget::

       elapsed + compile + N * step + ceil(N / eval_every) * evaluation + ceil(N / ckpt_every) * checkpoint
           <= (1 - margin) * budget

   where ``elapsed`` is the job so far (data loading, the measurement) and ``compile`` the second
   compilation of the steps (the schedule is part of the compiled program).
3. :func:`scale_to_steps` shortens the config to ``N`` steps and the schedule with it: the warmup and
   the step-decay boundaries shrink by ``N / total``, so that the schedule keeps its shape.

The choice is made once, at step 0, and recorded: the run's ``config.json`` and checkpoints hold the
shortened config and ``WORKDIR/time_budget.json`` the measurement. A resume keeps it
(:func:`resolve_on_resume`) and measures nothing. A budget that leaves the config as it is (everything
fits) changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from resnet_jax.errors import ConfigError

BUDGET_FILE = "time_budget.json"
PROBE_DIR = ".time_budget_probe"  # the measured checkpoint's folder in the workdir, removed after
# Keys a budget rewrites: the length of training and the schedule's positions, which scale with it.
SCALED_KEYS = ("num_epochs", "num_train_steps", "schedule.warmup", "schedule.boundaries")


@dataclasses.dataclass(frozen=True)
class Timings:
  """Seconds measured on this machine for one run's pieces (:func:`measure`)."""

  step_s: float  # one training step, input pipeline included, after compilation
  compile_s: float  # compiling the training and evaluation steps (the first calls less the later ones)
  eval_s: float  # one whole evaluation (all its batches)
  checkpoint_s: float  # one checkpoint written


def run_cost(steps: int, t: Timings, eval_every: int, checkpoint_every: int) -> float:
  """Seconds that ``steps`` training steps take with their evaluations and checkpoints (each also after
  the last step, as :mod:`resnet_jax.train_loop` does)."""
  if steps <= 0:
    return 0.0
  evals = math.ceil(steps / eval_every)
  saves = math.ceil(steps / checkpoint_every)
  return steps * t.step_s + evals * t.eval_s + saves * t.checkpoint_s


def steps_that_fit(
  budget_s: float,
  elapsed_s: float,
  t: Timings,
  total_steps: int,
  eval_every: int,
  checkpoint_every: int,
  margin: float,
) -> int:
  """The most steps, from 0 to ``total_steps``, whose :func:`run_cost` and a second compilation fit in
  ``(1 - margin) * budget_s - elapsed_s``."""
  left = (1.0 - margin) * budget_s - elapsed_s - t.compile_s
  lo, hi = 0, total_steps  # run_cost grows with the steps: the largest n with run_cost(n) <= left.
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if run_cost(mid, t, eval_every, checkpoint_every) <= left:
      lo = mid
    else:
      hi = mid - 1
  return lo


def scale_to_steps(config: ml_collections.ConfigDict, steps: int, total_steps: int) -> ml_collections.ConfigDict:
  """A copy of ``config`` that trains ``steps`` instead of ``total_steps``: ``num_train_steps = steps``,
  ``num_epochs`` and the schedule's ``warmup`` and ``boundaries`` times ``steps / total_steps``."""
  f = steps / total_steps
  c = ml_collections.ConfigDict(config.to_dict())
  c.num_train_steps = int(steps)
  c.num_epochs = float(config.num_epochs) * f
  c.schedule.warmup = float(config.schedule.warmup) * f
  c.schedule.boundaries = tuple(float(b) * f for b in config.schedule.boundaries)
  return c


def resolve_on_resume(config: ml_collections.ConfigDict, saved_config: dict | None) -> ml_collections.ConfigDict:
  """``config`` with the lengths a budget chose at step 0 (:data:`SCALED_KEYS`, from ``saved_config``, the
  checkpoint's config), when both have the same budget; else ``config`` unchanged."""
  budget = float(config.get("time_budget_minutes", 0.0))
  if budget <= 0 or not isinstance(saved_config, dict):
    return config
  if float(saved_config.get("time_budget_minutes", 0.0) or 0.0) != budget:
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  for key in SCALED_KEYS:
    group, _, name = key.rpartition(".")
    source = saved_config.get(group, {}) if group else saved_config
    if isinstance(source, dict) and name in source:
      value = source[name]
      (c[group] if group else c)[name] = tuple(value) if isinstance(value, list) else value
  return c


def measure(
  setup: Any, scratch_dir: str, warmup_steps: int = 5, min_seconds: float = 10.0, max_steps: int = 50
) -> Timings:
  """Time ``setup``'s training step, evaluation and checkpoint on a throwaway copy of its initial state.

  The training steps take real batches from a fresh input pipeline: after the first (compiling) one and
  ``warmup_steps`` more, which run slower and are not timed, at least 3 steps, until ``min_seconds`` have
  passed or ``max_steps`` (3 in a multi-host run, where every process must take the same steps). The
  evaluation is timed on up to 3 batches after the first and scaled to the test set's; the checkpoint
  is written into ``scratch_dir/.time_budget_probe`` and removed.
  """
  from resnet_jax import data as data_lib
  from resnet_jax.checkpoint import Checkpointer

  config = setup.config
  state = setup.init_state(log=lambda *_: None)
  train_iter = setup.train_iterator()
  k = setup.steps_per_call  # The steps are timed as the run calls them: k per call.
  try:
    t0 = time.perf_counter()
    state, metrics = setup.train_call(state, [next(train_iter) for _ in range(k)])
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    for _ in range(math.ceil(warmup_steps / k)):  # The first steps after compiling run slower: not timed.
      state, metrics = setup.train_call(state, [next(train_iter) for _ in range(k)])
    jax.block_until_ready(metrics)
    n, t0 = 0, time.perf_counter()
    several = jax.process_count() > 1  # Every process must take as many (collective) steps: a fixed count.
    while n < 3 or (n < max_steps and not several and time.perf_counter() - t0 < min_seconds):
      state, metrics = setup.train_call(state, [next(train_iter) for _ in range(k)])
      n += k
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / n
  finally:
    if hasattr(train_iter, "close"):
      train_iter.close()

  eval_batches = max(1, math.ceil(setup.data.num_test / config.eval_batch_size))  # as data.eval_batches makes them
  batches = data_lib.eval_batches(
    setup.data, config.eval_batch_size, jax.process_index(), jax.process_count(), config.dataset.num_threads
  )
  times = []
  for i, batch in zip(range(4), batches):
    t0 = time.perf_counter()
    jax.block_until_ready(setup.eval_step(state, setup.dp.put_batch(batch)))
    times.append(time.perf_counter() - t0)
    if i + 1 >= eval_batches:
      break
  eval_batch_s = sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0]
  eval_compile_s = max(0.0, times[0] - eval_batch_s)

  # Every process writes its part of one checkpoint, as in the run: one folder, cleared by process 0.
  scratch = os.path.join(scratch_dir, PROBE_DIR)
  _on_process_0_then_sync(lambda: shutil.rmtree(scratch, ignore_errors=True), "time_budget_probe_clear")
  ckpt = Checkpointer(scratch, keep=1)
  t0 = time.perf_counter()
  ckpt.save(1, state, {}, {"probe": True})
  checkpoint_s = time.perf_counter() - t0
  ckpt.close()
  _on_process_0_then_sync(lambda: shutil.rmtree(scratch, ignore_errors=True), "time_budget_probe_removed")
  return Timings(
    step_s=step_s,
    compile_s=max(0.0, first - k * step_s) + eval_compile_s,
    eval_s=eval_batches * eval_batch_s,
    checkpoint_s=checkpoint_s,
  )


def _on_process_0_then_sync(action: Callable[[], Any], name: str) -> None:
  """``action()`` in process 0, then a barrier of all processes (none with one process)."""
  if jax.process_index() == 0:
    action()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def fit(
  config: ml_collections.ConfigDict,
  setup: Any,
  workdir: str,
  elapsed: Callable[[], float],
  log: Callable[[str], None],
  rebuild: Callable[[ml_collections.ConfigDict], Any],
) -> tuple[ml_collections.ConfigDict, Any, dict]:
  """``(config, setup, record)`` for a run of ``config`` at step 0 under its time budget.

  Measures this machine (:func:`measure`), and when the config's steps do not fit, returns the shortened
  config (:func:`scale_to_steps`) and ``rebuild(config)``, its setup; else the config and setup as given.
  ``record`` is what the choice rests on (written to ``WORKDIR/time_budget.json`` by the caller).
  Every process of a multi-host run trains the steps that process 0 chose.

  Raises:
    ConfigError: the budget is spent before the first step (loading and compiling took it).
  """
  budget_s = 60.0 * float(config.time_budget_minutes)
  margin = float(config.time_budget_margin)
  t = measure(setup, workdir)  # The workdir exists: the run holds its lock.
  total = setup.total_steps
  now = elapsed()
  steps = steps_that_fit(budget_s, now, t, total, setup.eval_every, setup.checkpoint_every, margin)
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    steps = int(multihost_utils.broadcast_one_to_all(np.int64(steps)))
  record = {
    "budget_s": budget_s,
    "margin": margin,
    "elapsed_at_fit_s": now,
    **dataclasses.asdict(t),
    "config_steps": total,
    "steps": steps,
    "steps_per_epoch": setup.steps_per_epoch,
    "predicted_wall_time_s": now
    + (t.compile_s if steps < total else 0.0)
    + run_cost(steps, t, setup.eval_every, setup.checkpoint_every),
  }
  if steps < 1:
    raise ConfigError(
      f"config.time_budget_minutes = {config.time_budget_minutes:g} leaves no time to train: {now:.0f} s went "
      f"to loading and measuring, and one step with its evaluation and checkpoint takes "
      f"{t.compile_s + run_cost(1, t, setup.eval_every, setup.checkpoint_every):.0f} s more on this machine; "
      f"give a larger budget, or 0 for none"
    )
  per_epoch = setup.steps_per_epoch
  if steps == total:
    log(
      f"time budget {config.time_budget_minutes:g} min: all {total} steps fit on this machine "
      f"({t.step_s * 1000:.0f} ms per step; about {record['predicted_wall_time_s'] / 60:.1f} min in all)"
    )
    return config, setup, record
  short = scale_to_steps(config, steps, total)
  log(
    f"time budget {config.time_budget_minutes:g} min: {steps} of the config's {total} steps fit on this machine "
    f"({steps / per_epoch:.1f} of {total / per_epoch:.1f} epochs at {t.step_s * 1000:.0f} ms per step; "
    f"warmup {short.schedule.warmup:g} {config.schedule.unit}; about {record['predicted_wall_time_s'] / 60:.1f} "
    f"min in all)"
  )
  return short, rebuild(short), record
