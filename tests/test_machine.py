"""``resnet_jax.machine``: the machine named next to every figure (summary.json, benchmark and study JSON)."""

from __future__ import annotations

import os
import re
import sys

from resnet_jax import machine


def test_the_machine_is_named_by_cpu_model_and_count():
  d = machine.describe()
  assert d["cpu"] == machine.cpu_name() and d["cpu"].strip() == d["cpu"] and d["cpu"]
  assert d["cpus"] == machine.available_cpus() >= 1
  if hasattr(os, "sched_getaffinity"):
    assert d["cpus"] == len(os.sched_getaffinity(0))
  isa = f" ({d['cpu_isa']})" if d["cpu_isa"] else ""
  assert machine.one_line() == f"{d['cpu']}{isa}, {d['cpus']} CPUs"
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


def test_the_vector_instruction_set_is_named():
  assert machine.cpu_isa({"sse2", "avx", "avx2", "fma"}) == "AVX2"
  assert machine.cpu_isa({"avx2", "avx512f", "avx512bw"}) == "AVX-512"
  assert machine.cpu_isa({"avx2", "avx512f", "avx512_bf16"}) == "AVX-512 with bf16"
  assert machine.cpu_isa({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}) == "AVX-512 with bf16 and AMX"
  assert machine.cpu_isa({"sse4_2"}) == "SSE" and machine.cpu_isa(set()) == ""
  d = machine.describe()
  assert d["cpu_isa"] == machine.cpu_isa()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    assert ("AVX-512" in d["cpu_isa"]) == ("avx512f" in flags)


def test_the_cpu_is_told_apart_by_family_model_and_stepping():
  two = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    "stepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 23\nmodel\t\t: 49\nstepping\t: 0\n"
  )
  assert machine.cpu_id(two) == "family 25 model 17 stepping 1"  # the first processor's
  arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
  assert machine.cpu_id(arm) == "" and machine.cpu_id("") == ""
  assert machine.describe()["cpu_id"] == machine.cpu_id()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      text = f.read()
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M)
    assert machine.cpu_id().startswith(f"family {family[1]} model ") if family else machine.cpu_id() == ""
