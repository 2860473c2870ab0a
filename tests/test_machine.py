"""``resnet_jax.machine``: the machine named next to every figure (summary.json, benchmark and study JSON)."""

from __future__ import annotations

import os
import sys

from resnet_jax import machine


def test_the_machine_is_named_by_cpu_model_and_count():
  d = machine.describe()
  assert d["cpu"] == machine.cpu_name() and d["cpu"].strip() == d["cpu"] and d["cpu"]
  assert d["cpus"] == machine.available_cpus() >= 1
  if hasattr(os, "sched_getaffinity"):
    assert d["cpus"] == len(os.sched_getaffinity(0))
  assert machine.one_line() == f"{d['cpu']}, {d['cpus']} CPUs"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = {line.split(":", 1)[1].strip() for line in f if line.startswith("model name")}
    assert not names or d["cpu"] in names


def test_the_description_names_jax_and_its_backend():
  import jax

  d = machine.describe()
  assert d["jax"] == jax.__version__ and d["backend"] == jax.default_backend()
  assert d["python"] == ".".join(map(str, sys.version_info[:3]))


def test_an_accelerator_is_named_and_a_cpu_run_has_no_device_entry():
  import jax

  d = machine.describe()
  if jax.default_backend() == "cpu":
    assert "device" not in d
  else:
    assert d["device"] == f"{jax.device_count()} x {jax.devices()[0].device_kind}"
