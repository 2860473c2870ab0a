"""The host's share of a training step: what each step of ``train.py``'s loop costs the host, against the
loop as a whole, to tell whether the device or the host limits a run.

  python benchmarks/train_loop.py --config configs/cifar10_fast.py --data_dir DIR
  python benchmarks/train_loop.py --config configs/digits.py --steps 200 --json loop.json   # the digits

The config is built as ``train.py`` builds it (:class:`resnet_jax.run_setup.Setup`, with
``--augment_on``, ``dataset.holdout=-1`` for a folder without ``test/``, and ``--host-memory`` applied
before jax starts, as ``train.py`` does), compiled, then timed over ``--steps`` steps each (milliseconds
per step):

- ``draws``: ``next()`` of the training iterator alone (grain's threads fill it: their throughput);
- ``transfer``: ``DataParallel.put_batch`` of one batch, alone;
- ``dispatch``: the jitted step called on one batch already on the device, without waiting for it (the
  host's time per call), and ``same_batch``: the same loop waited for at its end (the device's time per
  step, where the device is the slower of the two);
- ``loop_in_flight_K``: next batch, transfer and step, as ``train.py`` runs them, waiting for the step
  ``K`` steps back before the next (``train.py`` keeps one in flight: K=1);
- ``train_py``: ``train.py``'s own loop (:func:`resnet_jax.train_loop.train_and_evaluate` on the same
  setup, in a temporary workdir, over about ``--steps`` steps in log windows of up to 100), its train
  records' time per step after the first window: the loop above plus what the run adds (its metrics
  records, the signal check, the bookkeeping), without the evaluation and checkpoint at its end. With
  ``--steps_per_call K`` that run calls up to K steps at a time (``config.steps_per_call``); the loop above
  always calls one. ``train_py_first_window_s``: that run's first log window, its compilation included.

Where ``loop_in_flight_1`` is about ``draws + transfer + dispatch``, the host limits the run and the device
waits; where it is about ``same_batch`` and well above ``dispatch``, the device limits it. Where
``train_py`` is well above ``loop_in_flight_1``, the run's own bookkeeping costs the difference.

The config's length and periodic actions are set for the ``train_py`` run (``num_train_steps``, one log
window per ``--steps``/10 steps, one evaluation and checkpoint at the end, no time budget); the other
measurements do not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_jax import host_memory  # noqa: E402
from resnet_jax.config_check import load_config_file  # noqa: E402
from resnet_jax.errors import ConfigError, run_cli  # noqa: E402

IN_FLIGHT = (1, 2, 4)


def ms_per_step(seconds: float, steps: int) -> float:
  return round(seconds / steps * 1e3, 3)


def train_py_window(steps: int) -> int:
  """The log window of the ``train_py`` run: about a tenth of the steps timed, at most 100."""
  return max(1, min(100, steps // 10))


def train_py_timings(config, setup) -> tuple[float, float]:
  """``train.py``'s loop on ``setup`` (built for ``config``), in a temporary workdir: its time per step (ms)
  from the train records after the first window, and the first window's seconds (compilation included)."""
  from resnet_jax.metrics import read_metrics
  from resnet_jax.train_loop import train_and_evaluate

  with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()):  # its evaluation line
    train_and_evaluate(config, workdir, log=lambda _: None, setup=setup)
    first, *train = [r for r in read_metrics(workdir) if r.get("split") == "train"]
  window_s = [config.log_every_steps * config.batch_size / r["images_per_sec"] for r in (first, *train)]
  return ms_per_step(sum(window_s[1:]), config.log_every_steps * len(train)), round(window_s[0], 2)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="a config file, e.g. configs/cifar10_fast.py")
  p.add_argument("--data_dir", default=None, help="config.dataset.data_dir (the config's own by default)")
  p.add_argument("--augment_on", default=None, choices=("auto", "host", "device"), help="config.dataset.augment_on")
  p.add_argument("--host-memory", default=None, choices=host_memory.HOST_MEMORY, help="config.host_memory")
  p.add_argument("--batch_size", type=int, default=None, help="config.batch_size")
  p.add_argument("--steps_per_call", type=int, default=None, help="config.steps_per_call (of the train_py run)")
  p.add_argument("--conv_backend", default=None, choices=("auto", "onednn", "xla"), help="config.model.conv_backend")
  p.add_argument("--steps", type=int, default=1000, help="steps timed per measurement")
  p.add_argument("--json", dest="json_out", default=None)
  args = p.parse_args(argv)
  if args.steps < 1:
    raise ConfigError(f"--steps {args.steps}: expected at least 1 step per measurement")

  config = load_config_file(args.config)
  config.progress_bar = False
  if args.data_dir is not None:
    config.dataset.data_dir = args.data_dir
  if args.augment_on is not None:
    config.dataset.augment_on = args.augment_on
  if args.batch_size is not None:
    config.batch_size = args.batch_size
  if args.host_memory is not None:
    config.host_memory = args.host_memory
  if args.steps_per_call is not None:
    config.steps_per_call = args.steps_per_call
  if args.conv_backend is not None:
    config.model.conv_backend = args.conv_backend
  if config.dataset.name != "digits" and not config.dataset.get("holdout", 0):
    config.dataset.holdout = -1  # A folder with no test/ split: hold out part of train/ as train.py's users do.
  window = train_py_window(args.steps)  # The train_py run: its first window, then about --steps steps.
  config.time_budget_minutes = 0.0
  config.num_train_steps = window * (1 + math.ceil(args.steps / window))
  config.log_every_steps = window
  config.eval_every_steps = config.checkpoint_every_steps = config.num_train_steps
  kept = host_memory.apply(host_memory.choose_for_config(config))  # Before jax starts, as train.py.

  import jax

  from resnet_jax import machine
  from resnet_jax.config_check import validate_config
  from resnet_jax.run_setup import Setup

  validate_config(config)
  t0 = time.perf_counter()
  setup = Setup(config)
  setup_s = time.perf_counter() - t0
  it = setup.train_iterator()
  try:
    state = setup.init_state(log=lambda _: None)
    batch = setup.dp.put_batch(next(it))
    t0 = time.perf_counter()
    state, metrics = setup.train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(20):
      state, metrics = setup.train_step(state, batch)
    jax.block_until_ready(metrics)

    n, ms = args.steps, {}
    t0 = time.perf_counter()
    for _ in range(n):
      host = next(it)
    ms["draws"] = ms_per_step(time.perf_counter() - t0, n)
    t0 = time.perf_counter()
    for _ in range(n):
      moved = setup.dp.put_batch(host)
    jax.block_until_ready(moved)
    ms["transfer"] = ms_per_step(time.perf_counter() - t0, n)
    t0 = time.perf_counter()
    for _ in range(n):
      state, metrics = setup.train_step(state, batch)
    t1 = time.perf_counter()
    jax.block_until_ready(metrics)
    ms["dispatch"], ms["same_batch"] = ms_per_step(t1 - t0, n), ms_per_step(time.perf_counter() - t0, n)
    for depth in IN_FLIGHT:
      pending = []
      t0 = time.perf_counter()
      for _ in range(n):
        state, metrics = setup.train_step(state, setup.dp.put_batch(next(it)))
        pending.append(metrics)
        if len(pending) > depth:
          jax.block_until_ready(pending[-depth - 1]["loss"])
          pending = pending[-depth:]
      jax.block_until_ready(metrics)
      ms[f"loop_in_flight_{depth}"] = ms_per_step(time.perf_counter() - t0, n)
  finally:
    if hasattr(it, "close"):
      it.close()
  ms["train_py"], first_window_s = train_py_timings(config, setup)

  result = {
    "machine": machine.describe(),
    "config": os.path.relpath(args.config),
    "model": config.model.name,
    "dataset": config.dataset.name,
    "batch": int(config.batch_size),
    "compute_dtype": setup.compute_dtype,
    "augment_on": setup.augment_on,
    "host_memory": "keep" if kept else "default",
    "steps_per_call": int(config.steps_per_call),
    "conv_backend": config.model.get("conv_backend"),
    "steps_timed": n,
    "setup_s": round(setup_s, 2),
    "compile_and_first_step_s": round(compile_s, 2),
    "train_py_first_window_s": first_window_s,
    "ms_per_step": ms,
  }
  print(json.dumps(result, indent=2))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  run_cli(main, sys.argv[1:])
