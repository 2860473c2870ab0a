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
:data:`KEEP_FROM_PIXELS` input pixels per training step on, which the config tells before jax starts, and
only where the step runs on the CPU (:func:`expected_platform`). On a GPU or TPU XLA's buffers live in the
device's memory, so there is nothing to gain, and the host only feeds the device: there one arena for every
thread slows the loop down. Where the host limits the loop, as it does on a GPU, ``keep`` made calling the
jitted step of a small model take 1.52-1.65 instead of 0.91-0.93 ms, and the training loop 11-17% longer
(``python benchmarks/train_loop.py --config configs/residual_mlp.py --steps 1000 --host-memory keep`` or
``default``, two runs each, on the CPU of an Intel Xeon, family 6 model 167).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable, Mapping

from resnet_jax.errors import ConfigError

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))

_STATE = {"kept": False}  # mirrors glibc's process-wide malloc settings, which mallopt cannot read back

HOST_MEMORY = ("auto", "keep", "default")
KEEP_FROM_PIXELS = 64 * 32 * 32  # input pixels per training step (batch x height x width) from which auto keeps
_IMAGE_SIDE = {"digits": 8, "cifar10": 32, "cifar100": 32}  # other datasets: config.dataset.image_size


# JAX_PLATFORMS names -> the platform; other names (a plugin's own) count as accelerators.
_PLATFORM_NAMES = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}
# The device nodes of each accelerator's driver, and the jax plugin (a module of the jax_plugins namespace,
# e.g. jax_plugins.xla_cuda13 from jax[cuda13]) or package (libtpu) that drives it.
_GPU_NODES, _GPU_PLUGINS = ("/dev/nvidiactl", "/dev/kfd"), ("xla_cuda", "xla_rocm")
_TPU_NODES = ("/dev/accel0", "/dev/vfio/0")


def _jax_plugins() -> list[str]:
  spec = importlib.util.find_spec("jax_plugins")  # a namespace package: finding it imports no plugin
  return [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)] if spec else []


def expected_platform(
  environ: Mapping[str, str] | None = None,
  exists: Callable[[str], bool] = os.path.exists,
  plugins: list[str] | None = None,
  has_libtpu: bool | None = None,
) -> str:
  """Where jax will run by default, told without starting its backend: ``"cpu"``, ``"gpu"``, ``"tpu"``
  (or the name of another plugin that ``JAX_PLATFORMS`` puts first).

  ``JAX_PLATFORMS`` (or ``jax.config.jax_platforms`` when this process set it) decides where it is set:
  its first platform. Otherwise a GPU where one of jax's CUDA or ROCm plugins is installed and the
  driver's device node exists (``/dev/nvidiactl``, ``/dev/kfd``), a TPU where ``libtpu`` is installed and a
  TPU device node exists (``/dev/accel0``, ``/dev/vfio/0``), else the CPU. ``environ``, ``exists``,
  ``plugins`` (the ``jax_plugins`` module names) and ``has_libtpu`` replace what this process would read.
  A plugin that then fails to start makes jax fall back to the CPU, where ``auto`` has chosen the
  CPU's slower ``default``: a slower step, never a wrong one.
  """
  environ = os.environ if environ is None else environ
  named = environ.get("JAX_PLATFORMS", "")
  if not named and "jax" in sys.modules:
    named = getattr(sys.modules["jax"].config, "jax_platforms", None) or ""
  first = named.split(",")[0].strip().lower()
  if first:
    return _PLATFORM_NAMES.get(first, first)
  plugins = _jax_plugins() if plugins is None else plugins
  if any(p.startswith(_GPU_PLUGINS) for p in plugins) and any(exists(n) for n in _GPU_NODES):
    return "gpu"
  has_libtpu = importlib.util.find_spec("libtpu") is not None if has_libtpu is None else has_libtpu
  if has_libtpu and any(exists(n) for n in _TPU_NODES):
    return "tpu"
  return "cpu"


def choose(setting: str, batch: int, image_side: int, platform: str = "cpu") -> str:
  """``"keep"`` or ``"default"`` for ``setting`` (one of :data:`HOST_MEMORY`) and a training step of
  ``batch`` images of ``image_side`` x ``image_side`` pixels on ``platform`` (:func:`expected_platform`):
  ``auto`` keeps on the CPU from :data:`KEEP_FROM_PIXELS` pixels per step on (CIFAR at batch 64 and up,
  224x224 images at batch 2 and up; never the 8x8 digits at any batch under 1,024), and never on an
  accelerator."""
  if setting not in HOST_MEMORY:
    raise ConfigError(f"host_memory = {setting!r}: expected one of {', '.join(HOST_MEMORY)}")
  if setting != "auto":
    return setting
  if platform != "cpu":
    return "default"
  return "keep" if batch * image_side * image_side >= KEEP_FROM_PIXELS else "default"


def choose_for_config(config, platform: str | None = None) -> str:
  """:func:`choose` for a training config (``config.host_memory``, its global batch and its dataset's
  image side) on ``platform`` (default: :func:`expected_platform`), read from the config and the
  environment alone: ``train.py`` calls it before jax starts."""
  side = _IMAGE_SIDE.get(config.dataset.name, config.dataset.image_size)
  platform = expected_platform() if platform is None else platform
  return choose(config.get("host_memory", "auto"), int(config.batch_size), int(side), platform)


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
