"""Shared test settings: hypothesis profiles sized for a 2-core CPU; the finished training run that the
reliability tests resume, damage and compare with."""

import os

import pytest
from hypothesis import HealthCheck, settings

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
