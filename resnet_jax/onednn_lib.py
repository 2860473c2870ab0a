"""oneDNN's convolution primitives through its C API (``ctypes``, no compiled extension): the library layer.

This module loads the oneDNN shared library ``libdnnl.so.3``, describes a convolution (:class:`ConvSpec`),
builds its forward, backward-data and backward-weights primitives once per process (:func:`primitives`)
and runs them on raw buffers or numpy arrays (:class:`ConvPrimitives`). It knows nothing of JAX:
:mod:`resnet_jax.onednn_conv` calls it from compiled programs.

Activations are NHWC in memory (oneDNN's ``nhwc`` layout); the kernel is handed over in HWIO and reordered by
oneDNN into the blocked layout its kernels prefer (``format_tag any``), one small copy of the weights per call.

Requirements: an x86-64 CPU and ``libdnnl.so.3`` (``pip install onednn-cpu-gomp==2023.2.0``, which puts it in
``<sys.prefix>/lib``; it links against the system's ``libgomp.so.1``, GCC's OpenMP runtime). oneDNN's threads
are OpenMP threads: ``OMP_NUM_THREADS`` (default: the CPUs the process may run on) sets their number.
``$RESNET_JAX_ONEDNN_LIBRARY``, when set, names the library file to load instead.

Errors: a missing or unloadable library, and a convolution that oneDNN does not implement on this CPU
(e.g. bfloat16 without AVX-512), are :class:`~resnet_jax.errors.ModelError` (the user can act on them); any
other failing oneDNN call is :class:`OneDNNError`, an internal error that keeps its traceback.

A known defect of this oneDNN (3.2) on AVX2-only CPUs: the backward-weights primitive of a 1x1 convolution
with strides, for inputs of fewer than 8 channels, returns wrong weight gradients at random and now and
then never returns (a race between its threads; ``benchmarks/onednn_check.py`` finds it). This layer runs
what it is given; :mod:`resnet_jax.onednn_conv` never gives it such a convolution (it computes every
strided 1x1 convolution as a unit-stride one, ``unit_stride_spec``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import platform
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from resnet_jax.errors import ModelError

INSTALL_HINT = (
  "install oneDNN with `pip install onednn-cpu-gomp==2023.2.0` (x86-64 Linux), or use "
  "conv_backend='xla' (flax's nn.Conv)"
)
LIBRARY_NAME = "libdnnl.so.3"
LIBRARY_ENV = "RESNET_JAX_ONEDNN_LIBRARY"  # path of the library file, when it is not where pip puts it

# Constants of the oneDNN 3.x C API (include/oneapi/dnnl/dnnl_types.h, stable across 3.x).
_SUCCESS = 0
_F32, _BF16 = 3, 2
_FORMAT_ANY = 1
_ENGINE_CPU = 1
_STREAM_DEFAULT = 1
_FORWARD_TRAINING = 64
_CONVOLUTION_DIRECT = 1
_SCRATCHPAD_USER = 1
_QUERY_IMPL_INFO_STR = 8
_QUERY_WEIGHTS_MD, _QUERY_DIFF_WEIGHTS_MD, _QUERY_SCRATCHPAD_MD = 131, 132, 136
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_SCRATCHPAD = 1, 17, 33, 80
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 129, 145, 161
_ARG_FROM, _ARG_TO = 1, 17
_MAX_NDIMS = 12

_DIMS = ctypes.c_int64 * _MAX_NDIMS
_DTYPES = {np.dtype(np.float32): _F32, np.dtype(ml_dtypes.bfloat16): _BF16}
_DTYPE_NAMES = {d.name: d for d in _DTYPES}


class OneDNNError(RuntimeError):
  """A oneDNN call failed where it should not have: an internal error (a bug), not a user error."""


class _ExecArg(ctypes.Structure):
  _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


def _dims(values: Sequence[int]) -> Any:
  return _DIMS(*[int(v) for v in values])


def _library_paths() -> list[str]:
  """Where ``libdnnl.so.3`` may be: ``$RESNET_JAX_ONEDNN_LIBRARY`` alone when set, otherwise the loader's
  search path, then the pip wheel's ``<prefix>/lib``."""
  if os.environ.get(LIBRARY_ENV):
    return [os.environ[LIBRARY_ENV]]
  paths = [LIBRARY_NAME]
  for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, sys.exec_prefix)):
    paths.append(os.path.join(prefix, "lib", LIBRARY_NAME))
  return paths


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """Everything that fixes one convolution: shapes (NHWC input, HWIO kernel), strides, padding, groups, dtype."""

  x_shape: tuple[int, int, int, int]
  kernel_shape: tuple[int, int, int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  groups: int
  dtype: str

  @property
  def out_shape(self) -> tuple[int, int, int, int]:
    n, h, w, _ = self.x_shape
    kh, kw, _, o = self.kernel_shape
    (pt, pb), (pl, pr) = self.padding
    sh, sw = self.strides
    return (n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, o)

  @property
  def flops(self) -> int:
    """2 x multiply-adds of the forward pass (each backward pass costs the same)."""
    n, oh, ow, o = self.out_shape
    kh, kw, i, _ = self.kernel_shape
    return 2 * n * oh * ow * o * kh * kw * i

  def encode(self) -> str:
    """Self-contained text form (the custom call's opaque string): ``"float32 2,9,9,4 3,3,4,6 1,1 1,1,1,1 1"``."""
    pad = (*self.padding[0], *self.padding[1])
    return " ".join(
      [self.dtype]
      + [",".join(map(str, v)) for v in (self.x_shape, self.kernel_shape, self.strides, pad)]
      + [str(self.groups)]
    )

  @classmethod
  def decode(cls, text: str) -> ConvSpec:
    """Inverse of :meth:`encode`."""
    dtype, x, k, s, pad, g = text.split()
    x, k, s, pad = (tuple(int(v) for v in part.split(",")) for part in (x, k, s, pad))
    return cls(x, k, s, (pad[:2], pad[2:]), int(g), dtype)  # type: ignore[arg-type]


_vp, _ci, _pvp = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)
# The C functions that return a dnnl_status_t, with their argument types.
_STATUS_FUNCTIONS = [
  ("dnnl_engine_create", [_pvp, _ci, ctypes.c_size_t]),
  ("dnnl_stream_create", [_pvp, _vp, ctypes.c_uint]),
  ("dnnl_stream_wait", [_vp]),
  ("dnnl_memory_desc_create_with_strides", [_pvp, _ci, _DIMS, _ci, _DIMS]),
  ("dnnl_memory_desc_create_with_tag", [_pvp, _ci, _DIMS, _ci, _ci]),
  ("dnnl_memory_desc_destroy", [_vp]),
  ("dnnl_primitive_attr_create", [_pvp]),
  ("dnnl_primitive_attr_set_scratchpad_mode", [_vp, _ci]),
  (
    "dnnl_convolution_forward_primitive_desc_create",
    [_pvp, _vp, _ci, _ci, _vp, _vp, _vp, _vp, _DIMS, _DIMS, _DIMS, _DIMS, _vp],
  ),
  (
    "dnnl_convolution_backward_data_primitive_desc_create",
    [_pvp, _vp, _ci, _vp, _vp, _vp, _DIMS, _DIMS, _DIMS, _DIMS, _vp, _vp],
  ),
  (
    "dnnl_convolution_backward_weights_primitive_desc_create",
    [_pvp, _vp, _ci, _vp, _vp, _vp, _vp, _DIMS, _DIMS, _DIMS, _DIMS, _vp, _vp],
  ),
  ("dnnl_reorder_primitive_desc_create", [_pvp, _vp, _vp, _vp, _vp, _vp]),
  ("dnnl_primitive_desc_query", [_vp, _ci, _ci, _vp]),
  ("dnnl_primitive_create", [_pvp, _vp]),
  ("dnnl_primitive_execute", [_vp, _vp, _ci, ctypes.POINTER(_ExecArg)]),
  ("dnnl_memory_create", [_pvp, _vp, _vp, _vp]),
  ("dnnl_memory_destroy", [_vp]),
]
# The other C functions used: name, argument types, result type.
_OTHER_FUNCTIONS = [
  ("dnnl_primitive_desc_query_md", [_vp, _ci, _ci], _vp),
  ("dnnl_memory_desc_equal", [_vp, _vp], _ci),
  ("dnnl_memory_desc_get_size", [_vp], ctypes.c_size_t),
]


class _Library:
  """The loaded oneDNN library: C signatures, one CPU engine, a stream per thread, the primitives built."""

  def __init__(self, cdll: ctypes.CDLL):
    self.cdll = cdll
    for name, argtypes, restype in [(n, a, _ci) for n, a in _STATUS_FUNCTIONS] + _OTHER_FUNCTIONS:
      fn = getattr(cdll, name)
      fn.argtypes, fn.restype = argtypes, restype
    self.engine = ctypes.c_void_p()
    self.check(cdll.dnnl_engine_create(ctypes.byref(self.engine), _ENGINE_CPU, 0), "creating the CPU engine")
    self._local = threading.local()
    self._lock = threading.Lock()
    self._primitives: dict[ConvSpec, ConvPrimitives] = {}

  def check(self, status: int, what: str) -> None:
    if status != _SUCCESS:
      raise OneDNNError(f"oneDNN failed ({what}): status {status}")

  def stream(self) -> ctypes.c_void_p:
    """This thread's stream (cheap on the CPU; one per thread keeps concurrent executions apart)."""
    s = getattr(self._local, "stream", None)
    if s is None:
      s = ctypes.c_void_p()
      self.check(self.cdll.dnnl_stream_create(ctypes.byref(s), self.engine, _STREAM_DEFAULT), "creating a stream")
      self._local.stream = s
    return s

  def buffer(self, purpose: str, nbytes: int) -> np.ndarray:
    """This thread's reusable byte buffer for ``purpose`` ("scratchpad" or "weights"), grown as needed.

    Reused from call to call, so its pages are touched once, not faulted in afresh by every convolution.
    A thread runs one primitive at a time, and the two purposes never share memory.
    """
    buffers = getattr(self._local, "buffers", None)
    if buffers is None:
      buffers = self._local.buffers = {}
    buf = buffers.get(purpose)
    if buf is None or buf.nbytes < nbytes:
      buf = buffers[purpose] = np.empty(max(nbytes, 64), np.uint8)
    return buf

  def primitives(self, spec: ConvSpec) -> ConvPrimitives:
    """The primitives for ``spec``, built once per process and kept."""
    with self._lock:
      p = self._primitives.get(spec)
      if p is None:
        p = self._primitives[spec] = ConvPrimitives(self, spec)
      return p


@functools.cache
def _load() -> _Library:
  if platform.machine().lower() not in ("x86_64", "amd64"):
    raise ModelError(
      f"the oneDNN convolutions need an x86-64 CPU, this is {platform.machine()!r}: "
      "use conv_backend='xla' (flax's nn.Conv)"
    )
  problems = []
  for path in _library_paths():
    try:
      cdll = ctypes.CDLL(path)
    except OSError as e:
      if os.path.exists(path):  # there but unloadable, e.g. libgomp.so.1 missing: apt-get install libgomp1
        problems.append(str(e))
      continue
    try:
      return _Library(cdll)
    except AttributeError as e:  # a symbol of the 3.x C API is missing
      raise ModelError(f"{path} is not oneDNN 3.x ({e}): {INSTALL_HINT}") from None
  if problems:
    raise ModelError(
      f"oneDNN library found but not loadable ({'; '.join(problems)}); the usual cause is a "
      "missing GCC OpenMP runtime libgomp.so.1 (Debian/Ubuntu: apt-get install libgomp1), or use "
      "conv_backend='xla'"
    )
  raise ModelError(f"oneDNN library {LIBRARY_NAME} not found (tried {', '.join(_library_paths())}): {INSTALL_HINT}")


def library() -> _Library:
  """The loaded oneDNN library; raises :class:`ModelError` saying how to install it when it is missing."""
  return _load()


def available() -> bool:
  """True when this is an x86-64 CPU and ``libdnnl.so.3`` loads."""
  try:
    _load()
  except ModelError:
    return False
  return True


# ---------------------------------------------------------------------------------------------------------
# Primitives


def _nhwc_md(lib: _Library, shape: Sequence[int], dt: int) -> ctypes.c_void_p:
  """Memory descriptor of an NHWC array; oneDNN's logical order is (N, C, H, W)."""
  n, h, w, c = shape
  md = ctypes.c_void_p()
  lib.check(
    lib.cdll.dnnl_memory_desc_create_with_strides(
      ctypes.byref(md), 4, _dims((n, c, h, w)), dt, _dims((h * w * c, 1, w * c, c))
    ),
    "NHWC descriptor",
  )
  return md


def _hwio_md(lib: _Library, shape: Sequence[int], groups: int, dt: int) -> ctypes.c_void_p:
  """Memory descriptor of an HWIO kernel; oneDNN's logical order is (O, I, H, W) or (G, O/G, I/G, H, W)."""
  kh, kw, i, o = shape
  md = ctypes.c_void_p()
  if groups == 1:
    dims, strides = (o, i, kh, kw), (1, o, kw * i * o, i * o)
  else:
    og = o // groups  # output channel g * og + k of the HWIO kernel
    dims, strides = (groups, og, i, kh, kw), (og, 1, o, kw * i * o, i * o)
  lib.check(
    lib.cdll.dnnl_memory_desc_create_with_strides(ctypes.byref(md), len(dims), _dims(dims), dt, _dims(strides)),
    "HWIO descriptor",
  )
  return md


class _Primitive:
  """One oneDNN primitive with its user-managed scratchpad size and implementation name."""

  def __init__(self, lib: _Library, pd: ctypes.c_void_p, what: str):
    self.lib = lib
    self.pd = pd
    self.handle = ctypes.c_void_p()
    lib.check(lib.cdll.dnnl_primitive_create(ctypes.byref(self.handle), pd), f"creating the {what} primitive")
    self.scratch_md = lib.cdll.dnnl_primitive_desc_query_md(pd, _QUERY_SCRATCHPAD_MD, 0)
    self.scratch_bytes = int(lib.cdll.dnnl_memory_desc_get_size(self.scratch_md)) if self.scratch_md else 0
    name = ctypes.c_char_p()
    lib.cdll.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(name))
    self.impl = (name.value or b"?").decode()

  def md(self, query: int) -> ctypes.c_void_p:
    return self.lib.cdll.dnnl_primitive_desc_query_md(self.pd, query, 0)

  def execute(self, args: Sequence[tuple[int, Any, int]]) -> None:
    """Run on this thread's stream; ``args`` are (argument id, memory descriptor, data pointer)."""
    lib, cdll = self.lib, self.lib.cdll
    if self.scratch_bytes:
      scratch = lib.buffer("scratchpad", self.scratch_bytes)
      args = list(args) + [(_ARG_SCRATCHPAD, self.scratch_md, scratch.ctypes.data)]
    mems = []
    try:
      for _, md, ptr in args:
        m = ctypes.c_void_p()
        lib.check(cdll.dnnl_memory_create(ctypes.byref(m), md, lib.engine, ctypes.c_void_p(ptr)), "memory")
        mems.append(m)
      exec_args = (_ExecArg * len(args))(*[_ExecArg(a[0], m) for a, m in zip(args, mems)])
      stream = lib.stream()
      lib.check(cdll.dnnl_primitive_execute(self.handle, stream, len(args), exec_args), "execute")
      lib.check(cdll.dnnl_stream_wait(stream), "stream wait")
    finally:
      for m in mems:
        cdll.dnnl_memory_destroy(m)


class ConvPrimitives:
  """oneDNN forward, backward-data and backward-weights primitives for one :class:`ConvSpec`.

  The activations are NHWC; each primitive picks its own kernel layout (``format_tag any``) and the HWIO
  kernel is reordered into it (forward, backward-data) or out of it (backward-weights) when it differs.
  The ``*_ptr`` methods take raw addresses of C-contiguous buffers; the others take and return numpy arrays.
  """

  def __init__(self, lib: _Library, spec: ConvSpec):
    self.lib, self.spec = lib, spec
    dt = _DTYPES[_DTYPE_NAMES[spec.dtype]]
    self.x_md = _nhwc_md(lib, spec.x_shape, dt)
    self.y_md = _nhwc_md(lib, spec.out_shape, dt)
    self.w_md = _hwio_md(lib, spec.kernel_shape, spec.groups, dt)
    self._attr = ctypes.c_void_p()
    lib.check(lib.cdll.dnnl_primitive_attr_create(ctypes.byref(self._attr)), "attributes")
    lib.check(lib.cdll.dnnl_primitive_attr_set_scratchpad_mode(self._attr, _SCRATCHPAD_USER), "scratchpad mode")
    fwd_pd, bwd_data_pd, bwd_weights_pd = self._descriptors(dt)
    self.forward_p = _Primitive(lib, fwd_pd, "forward")
    self.backward_data_p = _Primitive(lib, bwd_data_pd, "backward-data")
    self.backward_weights_p = _Primitive(lib, bwd_weights_pd, "backward-weights")
    self._fwd_w = self._layout(self.forward_p.md(_QUERY_WEIGHTS_MD), into=True)
    self._bwd_data_w = self._layout(self.backward_data_p.md(_QUERY_WEIGHTS_MD), into=True)
    self._bwd_weights_w = self._layout(self.backward_weights_p.md(_QUERY_DIFF_WEIGHTS_MD), into=False)

  def _descriptors(self, dt: int) -> tuple[ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]:
    """The forward, backward-data and backward-weights primitive descriptors, weights in the layout oneDNN
    prefers (``format_any``); :class:`ModelError` where oneDNN does not implement the convolution."""
    lib, spec = self.lib, self.spec
    kh, kw, i, o = spec.kernel_shape
    g = spec.groups
    w_dims = (o, i, kh, kw) if g == 1 else (g, o // g, i, kh, kw)
    strides, dilates = _dims(spec.strides), _dims((0, 0))
    (pt, pb), (pl, pr) = spec.padding
    pad_l, pad_r = _dims((pt, pl)), _dims((pb, pr))
    what = (
      f"convolution of {spec.x_shape} by {spec.kernel_shape} ({spec.dtype}, strides {spec.strides}, "
      f"padding {spec.padding}, groups {g})"
    )

    def create(fn: Callable, *args: Any) -> ctypes.c_void_p:
      pd = ctypes.c_void_p()
      status = fn(ctypes.byref(pd), lib.engine, *args)
      if status != _SUCCESS:
        raise ModelError(f"oneDNN does not implement the {what} (status {status}): use conv_backend='xla'")
      return pd

    w_any = ctypes.c_void_p()
    lib.check(
      lib.cdll.dnnl_memory_desc_create_with_tag(ctypes.byref(w_any), len(w_dims), _dims(w_dims), dt, _FORMAT_ANY),
      "weights descriptor",
    )
    conv = (strides, dilates, pad_l, pad_r)
    fwd_pd = create(
      lib.cdll.dnnl_convolution_forward_primitive_desc_create,
      _FORWARD_TRAINING,
      _CONVOLUTION_DIRECT,
      self.x_md,
      w_any,
      None,
      self.y_md,
      *conv,
      self._attr,
    )
    bwd_data_pd = create(
      lib.cdll.dnnl_convolution_backward_data_primitive_desc_create,
      _CONVOLUTION_DIRECT,
      self.x_md,
      w_any,
      self.y_md,
      *conv,
      fwd_pd,
      self._attr,
    )
    bwd_weights_pd = create(
      lib.cdll.dnnl_convolution_backward_weights_primitive_desc_create,
      _CONVOLUTION_DIRECT,
      self.x_md,
      w_any,
      None,
      self.y_md,
      *conv,
      fwd_pd,
      self._attr,
    )
    lib.cdll.dnnl_memory_desc_destroy(w_any)
    return fwd_pd, bwd_data_pd, bwd_weights_pd

  def _layout(self, md: Any, into: bool) -> tuple[Any, _Primitive | None, int]:
    """(descriptor, reorder HWIO -> md (``into``) or md -> HWIO, or None when md is HWIO, bytes of md)."""
    lib = self.lib
    if lib.cdll.dnnl_memory_desc_equal(md, self.w_md):
      return md, None, 0
    src, dst = (self.w_md, md) if into else (md, self.w_md)
    pd = ctypes.c_void_p()
    lib.check(
      lib.cdll.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), src, lib.engine, dst, lib.engine, self._attr),
      "weights reorder",
    )
    return md, _Primitive(lib, pd, "reorder"), int(lib.cdll.dnnl_memory_desc_get_size(md))

  def _run_with_weights(self, p: _Primitive, layout: tuple, w_ptr: int, args: list) -> None:
    md, reorder, nbytes = layout
    if reorder is not None:
      buf = self.lib.buffer("weights", nbytes)
      reorder.execute([(_ARG_FROM, self.w_md, w_ptr), (_ARG_TO, md, buf.ctypes.data)])
      w_ptr = buf.ctypes.data
    p.execute(args + [(_ARG_WEIGHTS, md, w_ptr)])

  def forward_ptr(self, x: int, w: int, y: int) -> None:
    """y = conv(x, w) on raw buffers (NHWC x and y, HWIO w)."""
    self._run_with_weights(self.forward_p, self._fwd_w, w, [(_ARG_SRC, self.x_md, x), (_ARG_DST, self.y_md, y)])

  def backward_data_ptr(self, dy: int, w: int, dx: int) -> None:
    """dx = conv_transpose(dy, w): the gradient with respect to the input, on raw buffers."""
    self._run_with_weights(
      self.backward_data_p, self._bwd_data_w, w, [(_ARG_DIFF_DST, self.y_md, dy), (_ARG_DIFF_SRC, self.x_md, dx)]
    )

  def backward_weights_ptr(self, x: int, dy: int, dw: int) -> None:
    """dW = corr(x, dy): the gradient with respect to the HWIO kernel, on raw buffers."""
    md, reorder, nbytes = self._bwd_weights_w
    buf = None if reorder is None else self.lib.buffer("weights", nbytes)
    self.backward_weights_p.execute(
      [
        (_ARG_SRC, self.x_md, x),
        (_ARG_DIFF_DST, self.y_md, dy),
        (_ARG_DIFF_WEIGHTS, md, dw if buf is None else buf.ctypes.data),
      ]
    )
    if buf is not None:
      reorder.execute([(_ARG_FROM, md, buf.ctypes.data), (_ARG_TO, self.w_md, dw)])

  def _host(self, a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype=_DTYPE_NAMES[self.spec.dtype])

  def forward(self, x: Any, w: Any) -> np.ndarray:
    """y = conv(x, w) for host arrays."""
    x, w = self._host(x), self._host(w)
    y = np.empty(self.spec.out_shape, x.dtype)
    self.forward_ptr(x.ctypes.data, w.ctypes.data, y.ctypes.data)
    return y

  def backward_data(self, dy: Any, w: Any) -> np.ndarray:
    """dx for host arrays."""
    dy, w = self._host(dy), self._host(w)
    dx = np.empty(self.spec.x_shape, dy.dtype)
    self.backward_data_ptr(dy.ctypes.data, w.ctypes.data, dx.ctypes.data)
    return dx

  def backward_weights(self, x: Any, dy: Any) -> np.ndarray:
    """dW for host arrays."""
    x, dy = self._host(x), self._host(dy)
    dw = np.empty(self.spec.kernel_shape, x.dtype)
    self.backward_weights_ptr(x.ctypes.data, dy.ctypes.data, dw.ctypes.data)
    return dw


def primitives(spec: ConvSpec) -> ConvPrimitives:
  """The oneDNN primitives for ``spec`` (built once per process); :class:`ModelError` when unsupported."""
  return library().primitives(spec)


# ---------------------------------------------------------------------------------------------------------
def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
  if isinstance(value, (int, np.integer)):
    return int(value), int(value)
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ModelError(f"{what} must be an int or a pair (height, width), got {value!r}")
  return value  # type: ignore[return-value]


def make_spec(
  x_shape: Sequence[int],
  kernel_shape: Sequence[int],
  dtype: Any,
  strides: int | Sequence[int],
  padding: Sequence[Sequence[int]],
  feature_group_count: int = 1,
  kernel_dtype: Any = None,
) -> ConvSpec:
  """Check the arguments of :func:`conv2d` and describe the convolution; :class:`ModelError` if unsupported.

  ``dtype`` is the input's; ``kernel_dtype`` (default: the same) must equal it.
  """
  x_shape, kernel_shape = tuple(int(d) for d in x_shape), tuple(int(d) for d in kernel_shape)
  if len(x_shape) != 4 or len(kernel_shape) != 4:
    raise ModelError(
      f"the oneDNN convolution takes an NHWC input and an HWIO kernel (rank 4), got shapes {x_shape} and {kernel_shape}"
    )
  dtype = np.dtype(dtype)
  if kernel_dtype is not None and np.dtype(kernel_dtype) != dtype:
    raise ModelError(f"input and kernel must have the same dtype, got {dtype.name} and {np.dtype(kernel_dtype).name}")
  if dtype not in _DTYPES:
    raise ModelError(
      f"the oneDNN convolution supports float32 and bfloat16, got {dtype.name}: use dtype=float32 or conv_backend='xla'"
    )
  strides = _pair(strides, "strides")
  try:
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    raise ModelError(f"padding must be explicit ((top, bottom), (left, right)), got {padding!r}") from None
  if len(padding) != 2 or min(padding[0] + padding[1]) < 0:
    raise ModelError(f"padding must be two non-negative (low, high) pairs, got {padding!r}")
  if min(strides) < 1:
    raise ModelError(f"strides must be positive, got {strides}")
  g = int(feature_group_count)
  kh, kw, i, o = kernel_shape
  if g < 1 or x_shape[3] != i * g or o % g:
    raise ModelError(
      f"input channels {x_shape[3]} must equal kernel input channels {i} x feature_group_count {g}, "
      f"and kernel output channels {o} must be divisible by {g}"
    )
  spec = ConvSpec(x_shape, kernel_shape, strides, padding, g, dtype.name)  # type: ignore[arg-type]
  if min(spec.out_shape) < 1:
    raise ModelError(f"a {kh}x{kw} kernel with padding {padding} does not fit the {x_shape[1]}x{x_shape[2]} input")
  return spec
