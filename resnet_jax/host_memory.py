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
library never calls it on its own: ``train.py`` does, as does ``benchmarks/bench.py``.

Which runs gain (:func:`choose`, ``config.host_memory = "auto"``, the default): steps that process
many input pixels. A CIFAR ResNet-20 step at batch 128 (131,072 pixels) runs 16-20% faster with it; a
digits step (8x8 images) gains nothing, and its input pipeline's threads, sharing one arena, wait on
each other (the quick start's training took 19.5 s instead of 15.5 s). ``auto`` keeps the memory from
:data:`KEEP_FROM_PIXELS` input pixels per training step on, which the config tells before jax starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from resnet_jax.errors import ConfigError

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))

_STATE = {"kept": False}  # mirrors glibc's process-wide malloc settings, which mallopt cannot read back

HOST_MEMORY = ("auto", "keep", "default")
KEEP_FROM_PIXELS = 64 * 32 * 32  # input pixels per training step (batch x height x width) from which auto keeps
_IMAGE_SIDE = {"digits": 8, "cifar10": 32, "cifar100": 32}  # other datasets: config.dataset.image_size


def choose(setting: str, batch: int, image_side: int) -> str:
  """``"keep"`` or ``"default"`` for ``setting`` (one of :data:`HOST_MEMORY`) and a training step of
  ``batch`` images of ``image_side`` x ``image_side`` pixels: ``auto`` keeps from :data:`KEEP_FROM_PIXELS`
  pixels per step on (CIFAR at batch 64 and up, 224x224 images at batch 2 and up; never the 8x8 digits
  at any batch under 1,024)."""
  if setting not in HOST_MEMORY:
    raise ConfigError(f"host_memory = {setting!r}: expected one of {', '.join(HOST_MEMORY)}")
  if setting != "auto":
    return setting
  return "keep" if batch * image_side * image_side >= KEEP_FROM_PIXELS else "default"


def choose_for_config(config) -> str:
  """:func:`choose` for a training config (``config.host_memory``, its global batch and its dataset's
  image side), read from the config alone: ``train.py`` calls it before jax starts."""
  side = _IMAGE_SIDE.get(config.dataset.name, config.dataset.image_size)
  return choose(config.get("host_memory", "auto"), int(config.batch_size), int(side))


def apply(choice: str) -> bool:
  """:func:`keep_host_memory` when ``choice`` is ``"keep"`` (what :func:`choose` returned); True where
  the memory is kept from now on."""
  return keep_host_memory() if choice == "keep" else False


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
  applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
  _STATE["kept"] = _STATE["kept"] or applied
  return applied


def kept() -> bool:
  """Whether :func:`keep_host_memory` took effect in this process (glibc's settings are process-wide and
  cannot be read back, so this module records them; ``summary.json`` reports it as ``host_memory``)."""
  return _STATE["kept"]
