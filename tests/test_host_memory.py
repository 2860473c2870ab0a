"""``resnet_jax.host_memory``: with glibc keeping freed memory, XLA's per-call buffers stop faulting in fresh pages.

Page faults are counted (``getrusage``), not timed, in a subprocess each, since the setting is process-wide
and must precede jax's backend.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from resnet_jax.config_check import base_config
from resnet_jax.errors import ConfigError
from resnet_jax.host_memory import (
  KEEP_FROM_PIXELS,
  choose,
  choose_for_config,
  expected_platform,
  keep_host_memory,
  kept,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import resource, sys
if sys.argv[1] == "keep":
  from resnet_jax.host_memory import keep_host_memory
  assert keep_host_memory()
import jax, jax.numpy as jnp, optax
from resnet_jax import create_model
model = create_model("resnet20", num_classes=10)     # a CIFAR ResNet-20 training step, batch 64
x, y = jnp.ones((64, 32, 32, 3)), jnp.arange(64) % 10
variables = model.init(jax.random.PRNGKey(0), x)

@jax.jit
def step(params, stats):
  def loss_fn(params):
    logits, new = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]
  (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), stats

state = (variables["params"], variables["batch_stats"])
for _ in range(3):
  state = jax.block_until_ready(step(*state))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  state = jax.block_until_ready(step(*state))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_call(mode: str) -> float:
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, mode],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return float(proc.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_kept_host_memory_stops_page_faults_on_every_call():
  default, keep = faults_per_call("default"), faults_per_call("keep")
  assert default > 10_000, default  # XLA's buffers are mapped and unmapped at every step: fresh pages
  assert keep < 0.25 * default, (keep, default)  # the freed buffers are reused


def test_too_late_once_the_backend_has_started():
  jax.devices()
  with pytest.raises(ConfigError, match="before jax starts its backend"):
    keep_host_memory()


@pytest.mark.parametrize(
  "setting, batch, side, expected",
  [
    ("auto", 64, 8, "default"),  # the digits quick start
    ("auto", 1023, 8, "default"),
    ("auto", 1024, 8, "keep"),
    ("auto", 63, 32, "default"),
    ("auto", 64, 32, "keep"),  # CIFAR from batch 64 on
    ("auto", 128, 32, "keep"),
    ("auto", 1, 224, "default"),
    ("auto", 2, 224, "keep"),
    ("keep", 1, 8, "keep"),  # an explicit setting is kept as it is
    ("default", 512, 224, "default"),
  ],
)
def test_auto_keeps_from_a_number_of_input_pixels_per_step(setting, batch, side, expected):
  assert choose(setting, batch, side) == expected
  assert (batch * side * side >= KEEP_FROM_PIXELS) == (choose("auto", batch, side) == "keep")


def test_choose_for_config_reads_the_dataset_image_side_and_names_a_bad_setting(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  c = base_config()  # python train.py: the digits
  assert c.host_memory == "auto" and choose_for_config(c) == "default"
  c.dataset.name = "cifar10"
  assert choose_for_config(c) == "keep"
  c.batch_size = 32
  assert choose_for_config(c) == "default"
  c.dataset.name, c.dataset.image_size = "image_folder", 224
  assert choose_for_config(c) == "keep"
  c.dataset.image_size, c.batch_size = 64, 8  # 32,768 pixels
  assert choose_for_config(c) == "default"
  c.host_memory = "reuse"
  with pytest.raises(ConfigError, match="host_memory = 'reuse': expected one of auto, keep, default"):
    choose_for_config(c)


def test_a_process_that_did_not_keep_its_memory_says_so():
  assert not kept()  # this test process never called keep_host_memory successfully


@pytest.mark.parametrize("platform", ["gpu", "tpu", "metal"])
def test_auto_never_keeps_where_the_step_runs_on_an_accelerator(platform):
  """XLA's buffers are in the device's memory there; one arena would only slow the host's loop down."""
  for batch, side in ((64, 32), (128, 32), (2, 224), (256, 224), (1024, 8)):
    assert choose("auto", batch, side, platform) == "default"
  assert choose("keep", 128, 32, platform) == "keep"  # an explicit setting still holds
  assert choose("auto", 128, 32, "cpu") == "keep"


@pytest.mark.parametrize(
  ("named", "expected"),
  [("cpu", "cpu"), ("cuda", "gpu"), ("cuda,cpu", "gpu"), ("rocm", "gpu"), ("tpu", "tpu"), ("CPU,cuda", "cpu")],
)
def test_jax_platforms_names_the_platform(named, expected):
  # Whatever is installed: the variable decides.
  assert expected_platform({"JAX_PLATFORMS": named}, lambda _: True, ["xla_cuda13"], True) == expected


def test_a_plugin_counts_only_with_its_driver_device():
  env = {}
  nvidia = {"/dev/nvidiactl"}
  assert expected_platform(env, nvidia.__contains__, ["xla_cuda13"], False) == "gpu"
  assert expected_platform(env, nvidia.__contains__, ["xla_cuda12", "other"], False) == "gpu"
  assert expected_platform(env, {"/dev/kfd"}.__contains__, ["xla_rocm7"], False) == "gpu"
  # jax[cuda13] installed on a machine without a GPU: jax will run on the CPU.
  assert expected_platform(env, lambda _: False, ["xla_cuda13"], False) == "cpu"
  # A driver without jax's plugin: jax cannot use the GPU.
  assert expected_platform(env, nvidia.__contains__, [], False) == "cpu"
  assert expected_platform(env, {"/dev/accel0"}.__contains__, [], True) == "tpu"
  assert expected_platform(env, {"/dev/accel0"}.__contains__, [], False) == "cpu"


def test_choose_for_config_follows_the_platform(monkeypatch):
  c = base_config()
  c.dataset.name = "cifar10"  # batch 128 of 32x32: kept on the CPU
  assert choose_for_config(c, "cpu") == "keep"
  assert choose_for_config(c, "gpu") == choose_for_config(c, "tpu") == "default"
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert choose_for_config(c) == "default"
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert choose_for_config(c) == "keep"


def test_this_machine_is_told_without_starting_jax():
  """In a fresh process: the answer comes before jax's backend starts, and names the backend jax then
  starts (the CPU on a machine without an accelerator)."""
  code = (
    "from resnet_jax.host_memory import expected_platform, _backend_started\n"
    "p = expected_platform()\n"
    "assert not _backend_started()\n"
    "import jax\n"
    "print(p, jax.default_backend())\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  told, started = out.stdout.split()
  assert told == started
