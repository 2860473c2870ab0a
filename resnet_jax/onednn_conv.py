"""2-D convolutions computed by oneDNN on the CPU, callable from jitted JAX code (the default on x86-64 CPUs).

XLA:CPU (jaxlib 0.10.2) computes convolutions with Eigen or YNNPACK, which on AVX-512 CPUs run well behind
oneDNN, the library PyTorch uses, above all for the weight gradient. This module is the JAX layer: it calls
oneDNN's primitives (:mod:`resnet_jax.onednn_lib`, the C API through ``ctypes``) inside a ``jax.custom_vjp``::

  y  = conv(x, w)            oneDNN convolution forward
  dx = conv_transpose(dy, w) oneDNN convolution backward-data
  dW = corr(x, dy)           oneDNN convolution backward-weights

with the semantics of ``lax.conv_general_dilated(x, w, strides, padding,
dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)``: NHWC activations, HWIO kernels
(flax's layout), explicit (possibly asymmetric) padding ``((top, bottom), (left, right))``, any strides, no
dilation, float32 or bfloat16.

Two ways into oneDNN from a compiled XLA program (``transport``):

- ``"custom_call"`` (default): an XLA custom call through XLA's typed FFI (``jax.ffi.ffi_call``) whose
  handler is a ``ctypes`` callback (:func:`custom_call_target`). oneDNN reads XLA's input buffers and writes its
  output buffer in place: no copies.
- ``"pure_callback"``: ``jax.pure_callback``, which copies every input into a new array and the result back
  into XLA's buffer (about 1 ms per 8 MB on a 2-core Xeon: as long as a small convolution itself).

Activations stay NHWC in memory, so no transposes are needed (see :mod:`resnet_jax.onednn_lib` for the
layouts, the library's requirements and ``$RESNET_JAX_ONEDNN_LIBRARY``). oneDNN's OpenMP threads
(``OMP_NUM_THREADS``) are independent of XLA's own thread pool. The arrays are computed on the host, so use
this with the CPU backend (``JAX_PLATFORMS=cpu``).

Public API: :func:`conv2d`, :func:`conv_general_dilated` (``lax``'s signature, what
``flax.linen.Conv`` calls) and :class:`Conv`, a drop-in for ``flax.linen.Conv`` with the same parameter
(``kernel``, HWIO) and initialisation.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import platform
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.errors import ModelError
from resnet_jax.onednn_lib import ConvPrimitives, ConvSpec, library, make_spec, primitives

Array = Any

TRANSPORTS = ("custom_call", "pure_callback")
CUSTOM_CALL_TARGET = "resnet_jax_onednn_conv2d"


# XLA's typed FFI (xla/ffi/api/c_api.h, the layout shared by jaxlib 0.10 to 0.12): the handler receives an
# XLA_FFI_CallFrame* and returns NULL or an XLA_FFI_Error*. Only the fields read here are declared in full.
class _FfiInternalExtension(ctypes.Structure):
  _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.c_void_p)]


class _FfiApiVersion(ctypes.Structure):
  _fields_ = [
    ("struct_size", ctypes.c_size_t),
    ("extension_start", ctypes.c_void_p),
    ("major_version", ctypes.c_int),
    ("minor_version", ctypes.c_int),
  ]


class _FfiMetadata(ctypes.Structure):
  _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _FfiApiVersion), ("traits", ctypes.c_uint32)]


class _FfiMetadataExtension(ctypes.Structure):
  _fields_ = [("extension_base", _FfiInternalExtension), ("metadata", ctypes.POINTER(_FfiMetadata))]


class _FfiErrorCreateArgs(ctypes.Structure):
  _fields_ = [
    ("struct_size", ctypes.c_size_t),
    ("extension_start", ctypes.c_void_p),
    ("message", ctypes.c_char_p),
    ("errc", ctypes.c_int),
  ]


_FFI_ERROR_CREATE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_FfiErrorCreateArgs))


class _FfiApi(ctypes.Structure):
  _fields_ = [
    ("struct_size", ctypes.c_size_t),
    ("extension_start", ctypes.c_void_p),
    ("api_version", _FfiApiVersion),
    ("internal_api", ctypes.c_void_p),
    ("error_create", _FFI_ERROR_CREATE),
  ]


class _FfiBuffer(ctypes.Structure):
  _fields_ = [
    ("struct_size", ctypes.c_size_t),
    ("extension_start", ctypes.c_void_p),
    ("dtype", ctypes.c_int),
    ("data", ctypes.c_void_p),
    ("rank", ctypes.c_int64),
    ("dims", ctypes.POINTER(ctypes.c_int64)),
  ]


class _FfiByteSpan(ctypes.Structure):
  _fields_ = [("ptr", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _FfiList(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
  _fields_ = [
    ("struct_size", ctypes.c_size_t),
    ("extension_start", ctypes.c_void_p),
    ("size", ctypes.c_int64),
    ("types", ctypes.POINTER(ctypes.c_int)),
    ("ptrs", ctypes.POINTER(ctypes.c_void_p)),
  ]


class _FfiAttrs(ctypes.Structure):
  _fields_ = [
    ("struct_size", ctypes.c_size_t),
    ("extension_start", ctypes.c_void_p),
    ("size", ctypes.c_int64),
    ("types", ctypes.POINTER(ctypes.c_int)),
    ("names", ctypes.POINTER(ctypes.POINTER(_FfiByteSpan))),
    ("attrs", ctypes.POINTER(ctypes.c_void_p)),
  ]


class _FfiCallFrame(ctypes.Structure):
  _fields_ = [
    ("struct_size", ctypes.c_size_t),
    ("extension_start", ctypes.POINTER(_FfiInternalExtension)),
    ("api", ctypes.POINTER(_FfiApi)),
    ("ctx", ctypes.c_void_p),
    ("stage", ctypes.c_int),
    ("args", _FfiList),
    ("rets", _FfiList),
    ("attrs", _FfiAttrs),
    ("future", ctypes.c_void_p),
  ]


_FFI_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_FfiCallFrame))
_FFI_BUFFER_P = ctypes.POINTER(_FfiBuffer)
_FFI_EXTENSION_METADATA = 1
_FFI_ATTR_STRING = 4
_FFI_ERROR_INTERNAL = 13
_FFI_OPS = {"forward": "forward_ptr", "backward_data": "backward_data_ptr", "backward_weights": "backward_weights_ptr"}


def _ffi_metadata(frame: _FfiCallFrame) -> None:
  """Answer XLA's metadata query (made when the handler is registered): the FFI version and no traits.

  The version reported is the runtime's own, read from the call frame: this handler uses only fields that
  every version since 0.1 lays out alike.
  """
  metadata = ctypes.cast(frame.extension_start, ctypes.POINTER(_FfiMetadataExtension)).contents.metadata.contents
  version = frame.api.contents.api_version if frame.api else None
  metadata.api_version = _FfiApiVersion(
    ctypes.sizeof(_FfiApiVersion),
    None,
    version.major_version if version else 0,
    version.minor_version if version else 1,
  )
  metadata.traits = 0
  return None


def _ffi_string_attr(frame: _FfiCallFrame, name: bytes) -> bytes:
  """The value of the string attribute ``name`` of an FFI call."""
  attrs = frame.attrs
  for i in range(attrs.size):
    span = attrs.names[i].contents
    if ctypes.string_at(span.ptr, span.len) == name and attrs.types[i] == _FFI_ATTR_STRING:
      value = ctypes.cast(attrs.attrs[i], ctypes.POINTER(_FfiByteSpan)).contents
      return ctypes.string_at(value.ptr, value.len)
  raise KeyError(f"the FFI call has no string attribute {name.decode()!r}")


def _ffi_error(frame: _FfiCallFrame, message: str) -> int:
  """An ``XLA_FFI_Error*`` (code INTERNAL) carrying ``message``; XLA raises it in the calling Python code."""
  args = _FfiErrorCreateArgs(ctypes.sizeof(_FfiErrorCreateArgs), None, message.encode(), _FFI_ERROR_INTERNAL)
  return frame.api.contents.error_create(ctypes.byref(args))


_TARGET_LOCK = threading.Lock()
_TARGET: list[Any] = []  # the registered handler, which must outlive every compiled program that calls it
_BY_CONFIG: dict[bytes, tuple[str, ConvPrimitives]] = {}


def custom_call_target() -> str:
  """Register (once) the XLA FFI handler that runs the primitives; returns its target name."""
  with _TARGET_LOCK:
    if not _TARGET:
      handler = _FFI_HANDLER(_run_ffi_call)
      jax.ffi.register_ffi_target(CUSTOM_CALL_TARGET, jax.ffi.pycapsule(handler), platform="cpu")
      _TARGET.append(handler)
  return CUSTOM_CALL_TARGET


def _run_ffi_call(frame_ptr: Any) -> int | None:
  """XLA's typed FFI calls this with an ``XLA_FFI_CallFrame*``; returns NULL or an ``XLA_FFI_Error*``.

  The call frame carries two buffers in, one buffer out and the string attribute ``config``,
  ``"<op> <ConvSpec.encode()>"``. The spec travels in full (not as a number valid in this process only), so
  a compiled program is self-contained, e.g. when it comes from jax's persistent compilation cache.
  """
  frame = frame_ptr.contents
  if frame.extension_start and frame.extension_start.contents.type == _FFI_EXTENSION_METADATA:
    return _ffi_metadata(frame)
  try:
    key = _ffi_string_attr(frame, b"config")
    entry = _BY_CONFIG.get(key)
    if entry is None:
      op, text = key.decode().split(" ", 1)
      entry = _BY_CONFIG[key] = (op, primitives(ConvSpec.decode(text)))
    op, p = entry
    a, b = (ctypes.cast(frame.args.ptrs[i], _FFI_BUFFER_P).contents.data for i in (0, 1))
    out = ctypes.cast(frame.rets.ptrs[0], _FFI_BUFFER_P).contents.data
    getattr(p, _FFI_OPS[op])(a, b, out)
  except BaseException as e:  # noqa: BLE001  (no exception can cross XLA: hand it back as an FFI error)
    return _ffi_error(frame, f"oneDNN convolution failed: {type(e).__name__}: {e}")
  return None


# ---------------------------------------------------------------------------------------------------------
# JAX functions


def _call(spec: ConvSpec, transport: str, op: str, shape: Sequence[int], a: Array, b: Array) -> Array:
  """Run primitive ``op`` ("forward", "backward_data", "backward_weights") of ``spec`` on (a, b)."""
  p = primitives(spec)
  result = jax.ShapeDtypeStruct(tuple(shape), a.dtype)
  if transport == "custom_call":
    call = jax.ffi.ffi_call(custom_call_target(), result, vmap_method="sequential")
    return call(a, b, config=f"{op} {spec.encode()}")
  return jax.pure_callback(getattr(p, op), result, a, b, vmap_method="sequential")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv(spec: ConvSpec, transport: str, x: Array, kernel: Array) -> Array:
  return _call(spec, transport, "forward", spec.out_shape, x, kernel)


def _conv_fwd(spec: ConvSpec, transport: str, x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
  return _conv(spec, transport, x, kernel), (x, kernel)


def _conv_bwd(spec: ConvSpec, transport: str, residuals: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  dx = _call(spec, transport, "backward_data", spec.x_shape, dy, kernel)
  dw = _call(spec, transport, "backward_weights", spec.kernel_shape, x, dy)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(
  x: Array,
  kernel: Array,
  strides: int | Sequence[int] = (1, 1),
  padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
  feature_group_count: int = 1,
  transport: str = "custom_call",
) -> Array:
  """2-D convolution by oneDNN, differentiable (custom VJP), usable under ``jit``, ``grad`` and ``vmap``.

  Equals ``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
  feature_group_count=feature_group_count)``, i.e. with G = groups and I = C / G::

    y[n, p, q, o] = sum_{i, j, c < I} x_pad[n, p*sh + i, q*sw + j, (o // (O/G))*I + c] * kernel[i, j, c, o]

  dx and dW come from oneDNN's backward-data and backward-weights primitives.

  Args:
    x: NHWC input, float32 or bfloat16.
    kernel: HWIO kernel (KH, KW, C / groups, O) of the same dtype.
    strides: (sh, sw) or one int.
    padding: ((top, bottom), (left, right)), non-negative, asymmetric allowed.
    feature_group_count: groups; C and O must be divisible by it.
    transport: ``"custom_call"`` (zero-copy XLA custom call) or ``"pure_callback"`` (see the module docstring).

  Raises:
    ModelError: oneDNN is not installed, or the dtype, shapes, padding or transport are not supported.
  """
  if transport not in TRANSPORTS:
    raise ModelError(f"unknown transport {transport!r}: expected one of {', '.join(TRANSPORTS)}")
  if transport == "custom_call" and jax.default_backend() != "cpu":
    raise ModelError(
      f"the oneDNN custom call runs on the CPU backend only, the default backend is "
      f"{jax.default_backend()!r}: set JAX_PLATFORMS=cpu, or use conv_backend='xla'"
    )
  x, kernel = jnp.asarray(x), jnp.asarray(kernel)
  spec = make_spec(x.shape, kernel.shape, x.dtype, strides, padding, feature_group_count, kernel.dtype)
  if _is_strided_1x1(spec):
    x = _strided_1x1_input(x, spec)
    spec = unit_stride_spec(spec)
  primitives(spec)  # built (or refused) now, at trace time, never inside the compiled program
  return _conv(spec, transport, x, kernel)


def _is_strided_1x1(spec: ConvSpec) -> bool:
  return spec.kernel_shape[:2] == (1, 1) and spec.strides != (1, 1)


def unit_stride_spec(spec: ConvSpec) -> ConvSpec:
  """The convolution oneDNN runs for ``spec``: a 1x1 convolution with strides ``s`` becomes the unit-stride
  1x1 convolution of every ``s``-th pixel of the padded input, the same sum:

    y[n, p, q, o] = sum_c x_pad[n, p*sh, q*sw, c] * kernel[0, 0, c, o] = conv1x1(x_pad[:, ::sh, ::sw])[n, p, q, o]

  oneDNN 3.2's strided 1x1 kernel (``jit_1x1`` with its strided-input copy) computes wrong weight gradients
  on AVX2-only CPUs for inputs of fewer than 8 channels, at random from run to run, and now and then never
  returns (a race between its threads); the unit-stride kernel is exact, and XLA's strided slice (whose
  gradient scatters ``dx`` back) costs what that copy cost. Any other convolution is returned unchanged.
  """
  if not _is_strided_1x1(spec):
    return spec
  n, ho, wo, _ = spec.out_shape
  return dataclasses.replace(spec, x_shape=(n, ho, wo, spec.x_shape[3]), strides=(1, 1), padding=((0, 0), (0, 0)))


def _strided_1x1_input(x: Array, spec: ConvSpec) -> Array:
  """Every ``strides``-th pixel of the padded ``x``: the input of :func:`unit_stride_spec`'s convolution."""
  (pt, pb), (pl, pr) = spec.padding
  if pt or pb or pl or pr:
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  n, ho, wo, _ = spec.out_shape
  (sh, sw), c = spec.strides, x.shape[3]
  return lax.slice(x, (0, 0, 0, 0), (n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, c), (1, sh, sw, 1))


_NHWC_DIMENSION_NUMBERS = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def conv_general_dilated(
  lhs: Array,
  rhs: Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> Array:
  """``lax.conv_general_dilated``'s signature, computed by :func:`conv2d` (what ``flax.linen.Conv`` calls).

  Only the NHWC/HWIO/NHWC case without dilation, batch groups or a preferred element type is supported;
  ``padding`` may be explicit pairs, ``"SAME"`` or ``"VALID"``. ``precision`` is ignored (oneDNN computes in
  the input dtype with float32 accumulation). Anything else raises :class:`ModelError`.
  """
  del precision
  padding = _explicit_padding(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    batch_group_count,
    preferred_element_type,
  )
  return conv2d(lhs, rhs, window_strides, padding, feature_group_count)


def _explicit_padding(
  lhs: Array,
  rhs: Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation: Sequence[int] | None,
  rhs_dilation: Sequence[int] | None,
  dimension_numbers: Any,
  batch_group_count: int,
  preferred_element_type: Any,
) -> Any:
  """The padding pairs of a ``lax.conv_general_dilated`` call that :func:`conv2d` can compute (NHWC/HWIO,
  no dilation, batch groups or preferred element type); :class:`ModelError` for any other call."""
  if jnp.ndim(lhs) != 4 or jnp.ndim(rhs) != 4:
    raise ModelError(
      f"the oneDNN convolution is 2-D: expected rank-4 NHWC input and HWIO kernel, got shapes "
      f"{jnp.shape(lhs)} and {jnp.shape(rhs)}"
    )
  dn = lax.conv_dimension_numbers(jnp.shape(lhs), jnp.shape(rhs), dimension_numbers)
  if dn != _NHWC_DIMENSION_NUMBERS:
    raise ModelError(f"the oneDNN convolution supports NHWC inputs with HWIO kernels only, got {dimension_numbers!r}")
  for name, dilation in (("lhs_dilation", lhs_dilation), ("rhs_dilation", rhs_dilation)):
    if dilation is not None and any(int(d) != 1 for d in dilation):
      raise ModelError(f"the oneDNN convolution does not support {name}={tuple(dilation)}: use conv_backend='xla'")
  if batch_group_count != 1 or preferred_element_type is not None:
    raise ModelError("the oneDNN convolution supports neither batch_group_count nor preferred_element_type")
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(jnp.shape(lhs)[1:3], jnp.shape(rhs)[:2], tuple(window_strides), padding)
  return padding


_NOTICED: set[str] = set()


def notice(message: str, key: str | None = None) -> None:
  """Print ``note: message`` on stderr once per process for each ``key`` (default: the message itself)."""
  key = message if key is None else key
  if key not in _NOTICED:
    _NOTICED.add(key)
    print(f"note: {message}", file=sys.stderr)


def unsupported_reason(
  lhs: Array,
  rhs: Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  preferred_element_type: Any = None,
) -> str | None:
  """Why oneDNN cannot compute this ``lax.conv_general_dilated`` call here, or None when it can.

  The empty string means "not applicable, nothing to say": a non-CPU default backend (GPU, TPU) or a
  non-x86-64 machine (ARM, Apple silicon), where XLA's convolutions are the right choice anyway. Otherwise the
  reason names what is missing: the library, a dtype, a layout, or a primitive this CPU's oneDNN does not
  implement (e.g. bfloat16 convolutions on a CPU without AVX-512), found by building the primitives.
  """
  if jax.default_backend() != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
    return ""
  try:
    library()
  except ModelError as e:
    return f"oneDNN is not available ({e})"
  try:  # the checks of conv_general_dilated and conv2d themselves
    padding = _explicit_padding(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      batch_group_count,
      preferred_element_type,
    )
    spec = make_spec(
      jnp.shape(lhs),
      jnp.shape(rhs),
      jnp.result_type(lhs),
      window_strides,
      padding,
      feature_group_count,
      jnp.result_type(rhs),
    )
  except ModelError as e:
    return str(e).split(": use ")[0]
  try:
    primitives(unit_stride_spec(spec))
  except ModelError as e:
    return f"this CPU's oneDNN lacks some {spec.dtype} convolutions ({str(e).split(': use ')[0]})"
  return None


@functools.cache
def implements_bfloat16() -> bool:
  """Whether this machine's oneDNN computes bfloat16 convolutions itself (an x86-64 CPU with AVX-512 bf16
  or AMX), found by building the primitives of a 3x3 one; False on a CPU without them (AVX2 only), without
  oneDNN, or off the CPU backend. Where it is False, ``conv_backend="auto"`` runs bfloat16 convolutions in
  float32 (:func:`auto_conv_general_dilated`) and a bfloat16 model is slower than a float32 one."""
  x = jax.ShapeDtypeStruct((8, 8, 8, 16), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.bfloat16)
  return unsupported_reason(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")) is None


def _bfloat16_runs_in_float32(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any, **kwargs) -> bool:
  """Whether a bfloat16 convolution that oneDNN cannot compute here has a float32 twin that it can."""
  if jnp.result_type(lhs) != jnp.bfloat16 or jnp.result_type(rhs) != jnp.bfloat16:
    return False
  lhs32 = jax.ShapeDtypeStruct(jnp.shape(lhs), jnp.float32)
  rhs32 = jax.ShapeDtypeStruct(jnp.shape(rhs), jnp.float32)
  return unsupported_reason(lhs32, rhs32, window_strides, padding, **kwargs) is None


def auto_conv_general_dilated(
  lhs: Array,
  rhs: Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> Array:
  """``lax.conv_general_dilated`` by oneDNN where :func:`unsupported_reason` allows it, else by XLA.

  The choice is made per convolution at trace time; a fallback for a reason worth knowing (oneDNN missing, a
  dtype or primitive this CPU's oneDNN lacks) prints one ``note:`` line on stderr, once per reason.

  A bfloat16 convolution that this CPU's oneDNN does not implement (an AVX2-only CPU has no bfloat16
  primitives) while it implements the float32 one runs as that float32 convolution of the bfloat16 inputs,
  rounded to bfloat16: ``y = bf16(conv(f32(x), f32(w)))``. That is what a bfloat16 convolution computes
  (products of bfloat16 numbers are exact in float32, and oneDNN and XLA accumulate bfloat16 in float32
  too), at the float32 speed, which on such a CPU is well above XLA's bfloat16 convolutions.
  """
  kwargs = dict(
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    preferred_element_type=preferred_element_type,
  )
  reason = unsupported_reason(lhs, rhs, window_strides, padding, **kwargs)
  if reason is None:
    return conv_general_dilated(lhs, rhs, window_strides, padding, precision=precision, **kwargs)
  if reason and _bfloat16_runs_in_float32(lhs, rhs, window_strides, padding, **kwargs):
    notice(
      f"{reason}; they run in oneDNN in float32 on the bfloat16 inputs, with bfloat16 results (conv_backend='auto')",
      key=reason.split(" (")[0],
    )
    lhs32, rhs32 = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    y = conv_general_dilated(lhs32, rhs32, window_strides, padding, precision=precision, **kwargs)
    return y.astype(jnp.bfloat16)
  if reason:  # one note per kind of reason, not per convolution shape
    notice(f"{reason}; XLA's convolutions are used there instead (conv_backend='auto')", key=reason.split(" (")[0])
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, precision=precision, **kwargs)


class Conv(nn.Conv):
  """``flax.linen.Conv`` computed by oneDNN: same attributes, parameter ``kernel`` (HWIO), initialisation.

  A drop-in for ``functools.partial(nn.Conv, use_bias=False, dtype=..., param_dtype=..., kernel_init=...)``
  as used by :class:`resnet_jax.models.ResNet`, so checkpoints and :mod:`resnet_jax.convert` work unchanged.
  Supports 2-D NHWC inputs, float32/bfloat16 compute dtypes, strides, explicit or SAME/VALID padding and
  feature groups; dilations raise :class:`ModelError`.
  """

  conv_general_dilated: Callable[..., Array] | None = conv_general_dilated


class AutoConv(nn.Conv):
  """``flax.linen.Conv`` computed by oneDNN where it can be, by XLA elsewhere (``conv_backend="auto"``).

  Same parameters as ``nn.Conv`` and :class:`Conv`; see :func:`auto_conv_general_dilated` for the choice.
  """

  conv_general_dilated: Callable[..., Array] | None = auto_conv_general_dilated
