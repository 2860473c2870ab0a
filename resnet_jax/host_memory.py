"""Host memory reuse for XLA on the CPU: glibc ``malloc`` settings that stop page faults on every step.

XLA's CPU runtime allocates the buffers of a compiled program (a single temporary buffer of tens to
hundreds of MB, plus the outputs) at every execution and frees them afterwards. With glibc's defaults,
allocations that large are ``mmap``-ed and unmapped again, and the worker threads' allocations land in
per-thread arenas that are trimmed back to the system, so every step touches fresh pages: a CIFAR ResNet-20
training step at batch 128 takes about 73,000 minor page faults, about 20% of its CPU time on a 2-core VM.

:func:`keep_host_memory` tells glibc (``mallopt``) to serve every allocation from one heap (``M_ARENA_MAX=1``),
never from ``mmap`` (``M_MMAP_MAX=0``), and never to give freed memory back (``M_TRIM_THRESHOLD`` at its
maximum): the second step reuses the first step's pages, with a few dozen faults per step. The price is
that the process keeps its peak host memory until it exits, which a training process reaches anyway.

The arena setting only applies to threads that have not allocated yet, so this must run before jax starts
its backend (before the first array or computation); it is a process-wide setting, which is why the
library never calls it on its own: ``train.py`` does (``config.host_memory = "keep"``), as does
``benchmarks/bench.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from resnet_jax.errors import ConfigError

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a jax without this private function: assume not started
    return False


def keep_host_memory() -> bool:
  """Make glibc keep and reuse freed host memory (see the module docstring); True where it was applied.

  Returns False, changing nothing, where the C library is not glibc (macOS, musl). Raises
  :class:`~resnet_jax.errors.ConfigError` once jax's backend has started: then it would come too late
  for XLA's threads.
  """
  if _backend_started():
    raise ConfigError(
      "host memory reuse must be set before jax starts its backend (before the first jax "
      "array or computation): call resnet_jax.host_memory.keep_host_memory() first"
    )
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # glibc only  # noqa: B018
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
