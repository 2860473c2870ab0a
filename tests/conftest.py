"""Shared test settings: how many test processes `-n auto` starts; one XLA compilation cache for the
session, shared by those processes and their subprocesses; hypothesis profiles sized for a 2-core CPU;
the finished training run that the reliability tests resume, damage and compare with."""

import os
import shutil
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, settings

# Many tests start train.py and the other CLIs in subprocesses, and each new process compiles the same
# small programs again (model initialisers, training and evaluation steps): most of a short run's time on
# a 2-core CPU. A persistent XLA compilation cache, new for each session (so it never outlives the
# machine or the jax version that wrote it) and inherited by every subprocess through the environment,
# compiles each program once per session. Set JAX_COMPILATION_CACHE_DIR to choose the folder yourself.
_CACHE_ENV = {
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def pytest_configure(config):
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    folder = tempfile.mkdtemp(prefix="resnet_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
  for name, value in _CACHE_ENV.items():
    os.environ.setdefault(name, value)
  # Several test processes may share one GPU: each takes memory as it needs it, not 75% up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if "jax" in sys.modules:  # Imported before this file (by a plugin): its flags were read already.
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
      "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
    )
    jax.config.update(
      "jax_persistent_cache_min_entry_size_bytes", int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"])
    )


# Memory to allow each test process: the torchvision parity tests without the slow ones peak at 1.5 GiB in
# one process (`/usr/bin/time -v`); the slow ones build ResNet-101 and ResNet-152 as well.
_GIB_PER_WORKER = 3


def pytest_xdist_auto_num_workers(config):
  """How many processes `-n auto` (pyproject's default) starts: one per CPU this process may run on,
  no more than the machine's memory holds at `_GIB_PER_WORKER` each, and at least one.

  Most of the suite's time is XLA compiling small programs, which keeps one core busy per process, so a
  process per core is what makes the suite faster. PYTEST_XDIST_AUTO_NUM_WORKERS overrides the count, as
  in pytest-xdist itself; `-n 0` runs the tests in this process.
  """
  del config
  if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
    return None  # pytest-xdist's own hook reads it.
  from resnet_jax import machine

  cpus = machine.available_cpus()
  try:
    memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
  except (ValueError, OSError, AttributeError):  # No sysconf (Windows) or no such name.
    memory_gib = _GIB_PER_WORKER * cpus
  return max(1, min(cpus, int(memory_gib // _GIB_PER_WORKER)))


# JIT compilation makes the first example slow; deadlines would only measure the compiler.
settings.register_profile(
  "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
  "thorough", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 8-step CLI run with checkpoints at steps 4, 6, 8 (every 2, the last 3 kept)."""
  from test_reliability import tiny_args, train_cli

  workdir = tmp_path_factory.mktemp("finished") / "run"
  proc = train_cli(workdir, *tiny_args(8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def finished_setup(finished_run):
  """The run setup (model, optimizer, data) of :func:`finished_run`, as its config.json describes it."""
  from resnet_jax import run_setup
  from resnet_jax.evaluate import load_run_config

  return run_setup.Setup(load_run_config(str(finished_run)))
