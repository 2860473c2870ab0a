"""The machine a measurement ran on, named next to every figure: CPU model, CPUs this process may use,
operating system, jax's version and backend.

Results files (``summary.json`` of a run, the JSON of ``benchmarks/`` and ``experiments/``) take
:func:`describe`; plot titles and tables take :func:`one_line`.
"""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
  """The CPU's model name (``/proc/cpuinfo``, e.g. ``"AMD EPYC"``), else what :mod:`platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def available_cpus() -> int:
  """The CPUs this process may run on (its affinity mask where the OS has one, else all)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows
    return os.cpu_count() or 1


def one_line() -> str:
  """``"<CPU model>, <n> CPUs"``: the machine in a plot title or a table caption."""
  return f"{cpu_name()}, {available_cpus()} CPUs"


def describe() -> dict:
  """CPU model and count, OS, Python, jax's version and default backend, and on a GPU or TPU the device
  (``device``: ``"<count> x <kind>"``). Asking for the backend starts it: a script that sets
  ``XLA_FLAGS`` calls this afterwards."""
  import jax

  out = {
    "cpu": cpu_name(),
    "cpus": available_cpus(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
  }
  if out["backend"] != "cpu":
    out["device"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  return out
