"""The machine a measurement ran on, named next to every figure: CPU model and vector instruction set,
CPUs this process may use, operating system, jax's version and backend.

Results files (``summary.json`` of a run, the JSON of ``benchmarks/`` and ``experiments/``) take
:func:`describe`; plot titles and tables take :func:`one_line`.
"""

from __future__ import annotations

import functools
import os
import platform


@functools.cache
def _proc_cpuinfo() -> str:
  """``/proc/cpuinfo``, read once per process; ``""`` where there is none (macOS, Windows)."""
  try:
    with open("/proc/cpuinfo") as f:
      return f.read()
  except OSError:
    return ""


def _first_processor(cpuinfo: str) -> dict[str, str]:
  """The fields of the first processor's block of a ``/proc/cpuinfo`` text (``"model name"``, ``"flags"``, ...)."""
  fields = {}
  for line in cpuinfo.splitlines():
    if not line.strip():
      break  # the first processor's block is enough
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
  return fields


def cpu_name() -> str:
  """The CPU's model name (``/proc/cpuinfo``, e.g. ``"AMD EPYC"``), else what :mod:`platform` knows."""
  return _first_processor(_proc_cpuinfo()).get("model name") or platform.processor() or platform.machine()


def cpu_id(cpuinfo: str | None = None) -> str:
  """The x86 CPU's family, model and stepping (``"family 25 model 17 stepping 1"``), from the first
  processor of ``/proc/cpuinfo`` (or of the text ``cpuinfo``); ``""`` where it has no ``cpu family`` (ARM,
  macOS). Virtual machines often name the CPU only ``"AMD EPYC"``: these numbers tell one generation from
  another (AMD's family 23 is Zen 1 and 2, 25 is Zen 3 and 4, 26 is Zen 5)."""
  fields = _first_processor(_proc_cpuinfo() if cpuinfo is None else cpuinfo)
  if "cpu family" not in fields:
    return ""
  return " ".join(
    f"{name.split()[-1]} {fields[name]}" for name in ("cpu family", "model", "stepping") if name in fields
  )


def _cpu_flags() -> set[str]:
  return set(_first_processor(_proc_cpuinfo()).get("flags", "").split())


def cpu_isa(flags: set[str] | None = None) -> str:
  """The x86 vector instruction set that decides which kernels run (``"AVX-512 with bf16 and AMX"``,
  ``"AVX-512 with bf16"``, ``"AVX-512"``, ``"AVX2"``, ``"SSE"``), from ``/proc/cpuinfo``'s flags (or
  ``flags``); ``""`` where they are not known (macOS, ARM). The same CPU model name comes with AVX2 only or
  with AVX-512, and oneDNN's bfloat16 convolutions need AVX-512 bf16 or AMX."""
  flags = _cpu_flags() if flags is None else flags
  if "avx512f" in flags:
    extras = [name for flag, name in (("avx512_bf16", "bf16"), ("amx_bf16", "AMX")) if flag in flags]
    return "AVX-512" + (" with " + " and ".join(extras) if extras else "")
  if "avx2" in flags:
    return "AVX2"
  return "SSE" if any(f.startswith("sse") for f in flags) else ""


def available_cpus() -> int:
  """The CPUs this process may run on (its affinity mask where the OS has one, else all)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows
    return os.cpu_count() or 1


def one_line() -> str:
  """``"<CPU model> (<instruction set>), <n> CPUs"``: the machine in a plot title or a table caption."""
  isa = cpu_isa()
  return f"{cpu_name()}{f' ({isa})' if isa else ''}, {available_cpus()} CPUs"


def describe() -> dict:
  """CPU model, family/model/stepping (:func:`cpu_id`), vector instruction set (:func:`cpu_isa`) and count,
  OS, Python, jax's version and default backend, and on a GPU or TPU the device (``device``: ``"<count> x
  <kind>"``). Asking for the backend starts it: a script that sets ``XLA_FLAGS`` calls this afterwards."""
  import jax

  out = {
    "cpu": cpu_name(),
    "cpu_id": cpu_id(),
    "cpu_isa": cpu_isa(),
    "cpus": available_cpus(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
  }
  if out["backend"] != "cpu":
    out["device"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  return out
