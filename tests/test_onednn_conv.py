"""oneDNN convolutions (resnet_jax.onednn_conv) against lax.conv_general_dilated: forward, dx, dW, flax Conv.

Tolerances: each float32 result is compared with a float64 reference, elementwise within 1e-5 of the same
operation applied to the absolute values (|x| * |w|, the scale of the rounding error of the sums).
"""

import functools
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

from resnet_jax import onednn_conv, onednn_lib
from resnet_jax.blocks import BasicBlock
from resnet_jax.errors import ModelError, ResNetJaxError, run_cli
from resnet_jax.models import conv_kernel_init

DN = ("NHWC", "HWIO", "NHWC")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_library_is_available():
  """The suite needs the library (pyproject's onednn-cpu-gomp); say how to get it rather than skip."""
  assert onednn_lib.available(), f"libdnnl.so.3 not loadable: {onednn_lib.INSTALL_HINT}"


def _lax_conv(x, w, strides, padding, groups):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups)


@functools.cache
def _onednn_fns(strides, padding, groups, transport):
  """jit-compiled forward, dx and dW of the oneDNN convolution (cached per configuration)."""
  f = functools.partial(
    onednn_conv.conv2d, strides=strides, padding=padding, feature_group_count=groups, transport=transport
  )
  fwd = jax.jit(f)
  dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)[0])
  return fwd, dx, dw


def _reference64(x, w, dy, strides, padding, groups):
  """float64 forward, dx, dW and their error scales (the same maps applied to |x|, |w|, |dy|)."""
  with jax.enable_x64(True):
    x, w, dy = (jnp.asarray(np.asarray(a, np.float64)) for a in (x, w, dy))
    f = functools.partial(_lax_conv, strides=strides, padding=padding, groups=groups)
    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(dy)
    ay, avjp = jax.vjp(f, jnp.abs(x), jnp.abs(w))
    adx, adw = avjp(jnp.abs(dy))
    return [np.asarray(a) for a in (y, dx, dw, ay, adx, adw)]


def _assert_close64(got, want, scale, what):
  got = np.asarray(got, np.float64)
  assert got.shape == want.shape, what
  err = np.abs(got - want)
  bound = 1e-5 * scale + 1e-7
  worst = np.unravel_index(np.argmax(err - bound), err.shape)
  assert np.all(err <= bound), f"{what}: error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


@st.composite
def conv_cases(draw):
  k = draw(st.sampled_from([1, 3, 7]))
  s = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
  pad = tuple((draw(st.integers(0, k // 2 + 1)), draw(st.integers(0, k // 2 + 1))) for _ in range(2))
  groups = draw(st.sampled_from([1, 1, 2]))
  h = draw(st.integers(max(1, k - pad[0][0] - pad[0][1]), 10))
  w = draw(st.integers(max(1, k - pad[1][0] - pad[1][1]), 10))
  return dict(
    batch=draw(st.integers(1, 3)),
    h=h,
    w=w,
    c=groups * draw(st.integers(1, 5)),
    o=groups * draw(st.integers(1, 5)),
    k=k,
    strides=s,
    padding=pad,
    groups=groups,
    seed=draw(st.integers(0, 2**16)),
  )


@given(conv_cases())
def test_forward_dx_dw_match_lax(case):
  """Forward, dx and dW (jit, custom VJP) equal lax.conv_general_dilated and jax.vjp of it in float64."""
  rng = np.random.default_rng(case["seed"])
  x = rng.standard_normal((case["batch"], case["h"], case["w"], case["c"])).astype(np.float32)
  w = rng.standard_normal((case["k"], case["k"], case["c"] // case["groups"], case["o"])).astype(np.float32)
  args = (case["strides"], case["padding"], case["groups"])
  y_shape = jax.eval_shape(functools.partial(_lax_conv, strides=args[0], padding=args[1], groups=args[2]), x, w).shape
  dy = rng.standard_normal(y_shape).astype(np.float32)
  y64, dx64, dw64, ay, adx, adw = _reference64(x, w, dy, *args)
  fwd, dx, dw = _onednn_fns(*args, "custom_call")
  _assert_close64(fwd(x, w), y64, ay, f"forward {case}")
  _assert_close64(dx(x, w, dy), dx64, adx, f"dx {case}")
  _assert_close64(dw(x, w, dy), dw64, adw, f"dW {case}")


def test_pure_callback_transport_equals_custom_call():
  """Both ways into oneDNN run the same primitives: same forward, dx and dW."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 7, 6)).astype(np.float32)
  w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  args = ((2, 1), ((1, 0), (2, 1)), 2)
  dy = rng.standard_normal((2, 4, 8, 4)).astype(np.float32)  # (9 + 1 - 3) // 2 + 1, 7 + 3 - 3 + 1
  got = [f(x, w, dy) if i else f(x, w) for i, f in enumerate(_onednn_fns(*args, "pure_callback"))]
  want = [f(x, w, dy) if i else f(x, w) for i, f in enumerate(_onednn_fns(*args, "custom_call"))]
  y64, dx64, dw64, ay, adx, adw = _reference64(x, w, dy, *args)
  for g, c, ref, scale in zip(got, want, (y64, dx64, dw64), (ay, adx, adw)):
    _assert_close64(g, ref, scale, "pure_callback")
    np.testing.assert_allclose(g, c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transport", onednn_conv.TRANSPORTS)
def test_grad_of_a_loss_matches_lax(transport):
  """jax.grad of a two-layer loss (stride 2 then stride 1) through oneDNN equals the lax version."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
  w1 = jnp.asarray(rng.standard_normal((3, 3, 3, 4)) * 0.3, jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((1, 1, 4, 5)) * 0.3, jnp.float32)

  def loss(conv, x, w1, w2):
    h = jax.nn.relu(conv(x, w1, (2, 2), ((1, 1), (1, 1)), 1))
    return jnp.sum(jnp.tanh(conv(h, w2, (1, 1), ((0, 0), (0, 0)), 1)) ** 2)

  mine = functools.partial(onednn_conv.conv2d, transport=transport)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, mine), argnums=(0, 1, 2)))(x, w1, w2)
  want = jax.value_and_grad(functools.partial(loss, _lax_conv), argnums=(0, 1, 2))(x, w1, w2)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


def test_vmap_over_a_leading_axis():
  """vmap runs the convolution once per element (sequentially) and equals lax's batched result."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 2)), jnp.float32)
  pad = ((1, 1), (1, 1))
  got = jax.vmap(lambda x, w: onednn_conv.conv2d(x, w, 1, pad))(x, w)
  want = jax.vmap(lambda x, w: _lax_conv(x, w, (1, 1), pad, 1))(x, w)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(features=6, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
    dict(features=6, kernel_size=(1, 1), padding=((0, 0), (0, 0))),
    dict(features=6, kernel_size=(3, 3), padding="SAME", feature_group_count=2),
    dict(features=6, kernel_size=(7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=True),
  ],
)
def test_flax_conv_is_a_drop_in(kwargs):
  """onednn_conv.Conv: same parameters (name, shape, init) as nn.Conv, same output and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4))
  base = dict(kernel_init=conv_kernel_init, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32)
  ref, mine = nn.Conv(**{**base, **kwargs}), onednn_conv.Conv(**{**base, **kwargs})
  params = ref.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(mine.init(jax.random.key(1), x), params)

  def loss(module, params, x):
    return jnp.sum(jnp.sin(module.apply(params, x)))

  got = jax.jit(jax.value_and_grad(functools.partial(loss, mine), argnums=(0, 1)))(params, x)
  want = jax.value_and_grad(functools.partial(loss, ref), argnums=(0, 1))(params, x)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


def test_basic_block_with_onednn_conv_equals_flax():
  """A residual block built with the oneDNN Conv partial trains exactly like the nn.Conv one."""

  def block(conv_cls):
    conv = functools.partial(
      conv_cls, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=conv_kernel_init
    )
    norm = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5)
    return BasicBlock(8, conv=conv, norm=norm, strides=2, shortcut_changes_shape=True, shortcut="B")

  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  variables = block(nn.Conv).init(jax.random.key(1), x)

  def loss(conv_cls, params, x):
    y, _ = block(conv_cls).apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.mean(y**2)

  got = jax.jit(jax.value_and_grad(functools.partial(loss, onednn_conv.Conv)))(variables["params"], x)
  want = jax.value_and_grad(functools.partial(loss, nn.Conv))(variables["params"], x)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


def _supports(dtype) -> bool:
  """Whether this CPU's oneDNN builds convolution primitives for ``dtype`` (bfloat16 needs AVX-512 or newer)."""
  try:
    onednn_lib.primitives(onednn_lib.make_spec((1, 4, 4, 8), (3, 3, 8, 8), dtype, 1, ((1, 1), (1, 1))))
  except ModelError:
    return False
  return True


def test_bfloat16_matches_float32_of_the_rounded_inputs():
  """bfloat16 in, bfloat16 out (oneDNN accumulates in float32): within bfloat16 rounding of the float32 result.

  On a CPU whose oneDNN has no bfloat16 convolutions (AVX2-only), the same call is a ModelError that says so.
  """
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 8)) * 0.2, jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  if not _supports(jnp.bfloat16):
    with pytest.raises(ModelError, match=r"does not implement .*bfloat16"):
      onednn_conv.conv2d(x, w, 1, pad)
    return
  y, vjp = jax.vjp(jax.jit(lambda x, w: onednn_conv.conv2d(x, w, 1, pad)), x, w)
  dy = jnp.ones(y.shape, jnp.bfloat16)
  y32, vjp32 = jax.vjp(lambda x, w: _lax_conv(x, w, (1, 1), pad, 1), x.astype(jnp.float32), w.astype(jnp.float32))
  assert y.dtype == jnp.bfloat16
  for got, want in zip((y, *vjp(dy)), (y32, *vjp32(dy.astype(jnp.float32)))):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-7, atol=1e-2 * float(jnp.abs(want).max()))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), **env
  )
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


# A bfloat16 CIFAR net under each backend; prints the largest logit and gradient differences to XLA's.
_AUTO_VS_XLA = """
import jax, jax.numpy as jnp, numpy as np
from resnet_jax import create_model, onednn_conv, onednn_lib
from resnet_jax.errors import ModelError
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
def run(backend):
  m = create_model("resnet20", num_classes=4, dtype=jnp.bfloat16, conv_backend=backend)
  v = m.init(jax.random.key(0), x)
  loss = lambda p: jnp.sum(m.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])[0] ** 2)
  return jax.jit(jax.value_and_grad(loss))(v["params"])
(l_auto, g_auto), (l_xla, g_xla) = run("auto"), run("xla")
print("loss", abs(float(l_auto) - float(l_xla)) / abs(float(l_xla)))
try:
  l_onednn, g_onednn = run("onednn")
  jax.block_until_ready(g_onednn)
  print("onednn: ran")
except ModelError as e:
  print("onednn: ModelError", e)
"""


def test_avx2_only_cpu_runs_bfloat16_convolutions_in_float32():
  """On an AVX2-only CPU (emulated: oneDNN's ISA capped at AVX2) oneDNN has no bfloat16 convolutions.

  conv_backend="auto" then computes each one as oneDNN's float32 convolution of the bfloat16 inputs, rounded
  to bfloat16, after one note on stderr: bitwise that computation, forward and backward, and within
  bfloat16 rounding of XLA's bfloat16 network. conv_backend="onednn" is a ModelError saying what is missing;
  float32 convolutions run in oneDNN as everywhere.
  """
  p = _run(
    _AUTO_VS_XLA
    + """
spec = onednn_lib.make_spec((1, 4, 4, 8), (3, 3, 8, 8), jnp.float32, 1, ((1, 1), (1, 1)))
print("float32", onednn_lib.primitives(spec).forward_p.impl)
rng = np.random.default_rng(1)
x16 = jnp.asarray(rng.standard_normal((2, 7, 7, 16)), jnp.bfloat16)
w16 = jnp.asarray(rng.standard_normal((3, 3, 16, 8)) * 0.2, jnp.bfloat16)
args = dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
auto = lambda x, w: onednn_conv.auto_conv_general_dilated(x, w, **args)
want = lambda x, w: onednn_conv.conv_general_dilated(
  x.astype(jnp.float32), w.astype(jnp.float32), **args).astype(jnp.bfloat16)
(y, vjp), (y_want, vjp_want) = (jax.vjp(jax.jit(f), x16, w16) for f in (auto, want))
dy = jnp.asarray(rng.standard_normal(y.shape), jnp.bfloat16)
got, expected = (y, *vjp(dy)), (y_want, *vjp_want(dy))
print("dtypes", ",".join(str(a.dtype) for a in got))
print("bitwise", all(bool(jnp.array_equal(a, b)) for a, b in zip(got, expected)))
print("calls", jax.jit(auto).lower(x16, w16).as_text().count(onednn_conv.CUSTOM_CALL_TARGET))
print("implements_bfloat16", onednn_conv.implements_bfloat16())
""",
    ONEDNN_MAX_CPU_ISA="AVX2",
  )
  assert p.returncode == 0, p.stderr
  out = dict(line.split(" ", 1) for line in p.stdout.splitlines())
  assert 0.0 < float(out["loss"]) < 5e-2, p.stdout  # oneDNN's float32 sums, rounded, not XLA's own
  assert out["onednn:"].startswith("ModelError") and "bfloat16" in out["onednn:"], p.stdout
  assert "avx2" in out["float32"], p.stdout
  assert out["dtypes"] == "bfloat16,bfloat16,bfloat16" and out["bitwise"] == "True", p.stdout
  assert int(out["calls"]) == 1, p.stdout  # oneDNN, not XLA
  assert out["implements_bfloat16"] == "False", p.stdout  # so model.dtype="auto" computes in float32
  notes = [line for line in p.stderr.splitlines() if line.startswith("note:")]
  assert len(notes) == 1, p.stderr
  assert "bfloat16" in notes[0] and "in float32" in notes[0] and "conv_backend='auto'" in notes[0], p.stderr


_STRIDED_1X1 = """
import jax, jax.numpy as jnp, numpy as np
from resnet_jax import onednn_conv, onednn_lib
rng = np.random.default_rng(0)
worst = 0.0
for n, h, c, o, pad in [(1, 8, 4, 8, 0), (2, 8, 1, 4, 0), (2, 8, 4, 8, 0), (1, 8, 2, 8, 0), (2, 7, 3, 16, 1)]:
  x = rng.standard_normal((n, h, h, c)).astype(np.float32)
  w = rng.standard_normal((1, 1, c, o)).astype(np.float32)
  padding = ((pad, pad), (pad, pad))
  f = jax.jit(lambda x, w: onednn_conv.conv2d(x, w, 2, padding))
  y, vjp = jax.vjp(f, x, w)
  dy = rng.standard_normal(y.shape).astype(np.float32)
  xs = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))[:, ::2, ::2].astype(np.float64)
  y64, dw64 = np.einsum("nhwc,co->nhwo", xs, w[0, 0]), np.einsum("nhwc,nhwo->co", xs, dy)
  for _ in range(10):  # the defect this guards against struck at random, in most runs of these shapes
    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(dy)
    for got, want in ((y, y64), (dw[0, 0], dw64)):
      worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
print("worst", worst)
unit = onednn_lib.make_spec((1, 8, 8, 4), (1, 1, 4, 8), np.float32, 1, ((0, 0), (0, 0)))
print("impl", onednn_lib.primitives(unit).backward_weights_p.impl)
"""


@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_strided_1x1_convolutions_are_exact_on_avx2_and_avx512(isa):
  """1x1 convolutions with stride 2 and few channels (a ResNet's projection shortcut, scaled down), 10 runs
  each: the output and the weight gradient equal the float64 sums every time. oneDNN 3.2's strided 1x1
  kernel for AVX2 gets the weight gradient wrong in most runs of these shapes; conv2d runs them as unit-stride
  convolutions of the strided input (onednn_conv.unit_stride_spec), on AVX-512 CPUs and AVX2-only ones alike
  (an AVX2-only CPU is emulated by capping oneDNN's ISA)."""
  p = _run(_STRIDED_1X1, **({} if isa == "native" else {"ONEDNN_MAX_CPU_ISA": "AVX2"}))
  assert p.returncode == 0, p.stderr
  out = dict(line.split(" ", 1) for line in p.stdout.splitlines())
  assert float(out["worst"]) < 1e-5, p.stdout
  if isa == "AVX2":
    assert "avx2" in out["impl"], p.stdout


def test_unit_stride_spec_keeps_the_output_and_changes_only_strided_1x1():
  spec = onednn_lib.make_spec((2, 9, 7, 4), (1, 1, 4, 8), np.float32, (2, 3), ((1, 0), (0, 2)))
  unit = onednn_conv.unit_stride_spec(spec)
  assert unit.out_shape == spec.out_shape == (2, 5, 3, 8)
  assert (unit.x_shape, unit.strides, unit.padding) == ((2, 5, 3, 4), (1, 1), ((0, 0), (0, 0)))
  for same in (
    onednn_lib.make_spec((2, 9, 7, 4), (3, 3, 4, 8), np.float32, 2, ((1, 1), (1, 1))),
    onednn_lib.make_spec((2, 9, 7, 4), (1, 1, 4, 8), np.float32, 1, ((0, 0), (0, 0))),
  ):
    assert onednn_conv.unit_stride_spec(same) == same


def test_auto_uses_onednn_where_it_can():
  """Where oneDNN has the primitives (float32 always; bfloat16 with AVX-512), auto runs them: no note, and
  the result differs from XLA's only by float rounding."""
  p = _run(_AUTO_VS_XLA)
  assert p.returncode == 0, p.stderr
  out = dict(line.split(" ", 1) for line in p.stdout.splitlines())
  if _supports(jnp.bfloat16):
    assert out["onednn:"] == "ran" and "note:" not in p.stderr, (p.stdout, p.stderr)
    assert 0.0 < float(out["loss"]) < 5e-2, p.stdout  # oneDNN's bfloat16 sums, not XLA's
  else:
    assert out["onednn:"].startswith("ModelError") and "note:" in p.stderr


@pytest.mark.parametrize(
  "env, note",
  [
    ({"RESNET_JAX_ONEDNN_LIBRARY": "/nonexistent/libdnnl.so.3"}, "oneDNN is not available"),
    ({"RESNET_JAX_FAKE_MACHINE": "aarch64"}, None),
  ],
)
def test_without_onednn_auto_is_xla(env, note):
  """Without a loadable oneDNN (missing library; or an ARM or Apple machine, where it is never used) the
  package imports, conv_backend="auto" trains with XLA's convolutions, and only a missing library on x86-64
  is worth a note."""
  code = (
    "import platform, os\n"
    "if os.environ.get('RESNET_JAX_FAKE_MACHINE'):\n"
    "  platform.machine = lambda: os.environ['RESNET_JAX_FAKE_MACHINE']\n"
    "import jax, jax.numpy as jnp\n"
    "from resnet_jax import create_model, onednn_conv, onednn_lib\n"
    "assert not onednn_lib.available()\n"
    "m = create_model('resnet20', num_classes=3)\n"
    "x = jnp.ones((2, 8, 8, 3))\n"
    "v = m.init(jax.random.key(0), x)\n"
    "hlo = jax.jit(lambda v, x: m.apply(v, x)).lower(v, x).as_text()\n"
    "print('custom calls', hlo.count(onednn_conv.CUSTOM_CALL_TARGET))\n"
  )
  p = _run(code, **env)
  assert p.returncode == 0, p.stderr
  assert "custom calls 0" in p.stdout
  notes = [line for line in p.stderr.splitlines() if line.startswith("note:")]
  if note is None:
    assert notes == [], p.stderr
  else:
    assert len(notes) == 1 and note in notes[0] and "pip install" in notes[0], p.stderr


def test_an_error_inside_onednn_reaches_the_caller(monkeypatch):
  """A failure inside the FFI handler is raised in the calling Python code, with its message."""

  def broken(self, *args):
    raise RuntimeError("broken on purpose")

  monkeypatch.setattr(onednn_lib.ConvPrimitives, "forward_ptr", broken)
  x, w = jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 2))
  with pytest.raises(Exception, match="oneDNN convolution failed: RuntimeError: broken on purpose"):
    jax.block_until_ready(jax.jit(lambda x, w: onednn_conv.conv2d(x, w, 1, ((1, 1), (1, 1))))(x, w))


@pytest.mark.parametrize("backend", ["onednn", "auto"])
def test_an_internal_onednn_failure_is_not_a_user_error(monkeypatch, capsys, backend):
  """A oneDNN call that fails where it should not (here: creating primitive attributes) is an internal
  OneDNNError: neither a ModelError that run_cli would print as one line, nor a reason for auto to fall back."""
  lib = onednn_lib.library()
  monkeypatch.setattr(lib.cdll, "dnnl_primitive_attr_create", lambda *args: 1)  # dnnl_out_of_memory
  x = jnp.ones((1, 7, 5, 3))  # a shape no other test builds primitives for

  def main():
    conv = onednn_conv.Conv if backend == "onednn" else onednn_conv.AutoConv
    conv(5, (3, 3), use_bias=False).init(jax.random.key(0), x)

  with pytest.raises(onednn_lib.OneDNNError, match="oneDNN failed") as e:
    run_cli(main)
  assert not isinstance(e.value, ResNetJaxError)
  assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize(
  "call, message",
  [
    (
      lambda: onednn_conv.conv2d(jnp.ones((1, 4, 4, 2), jnp.float16), jnp.ones((3, 3, 2, 2), jnp.float16)),
      "supports float32 and bfloat16, got float16",
    ),
    (lambda: onednn_conv.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2), jnp.bfloat16)), "same dtype"),
    (lambda: onednn_conv.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 2))), "input channels 3"),
    (
      lambda: onednn_conv.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), padding=((-1, 0), (0, 0))),
      "non-negative",
    ),
    (lambda: onednn_conv.conv2d(jnp.ones((1, 2, 2, 2)), jnp.ones((5, 5, 2, 2))), "does not fit"),
    (lambda: onednn_conv.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), transport="ffi"), "transport"),
    (
      lambda: onednn_conv.conv_general_dilated(
        jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2)), (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN
      ),
      "rhs_dilation",
    ),
    (
      lambda: onednn_conv.conv_general_dilated(
        jnp.ones((1, 2, 6, 6)), jnp.ones((2, 2, 3, 3)), (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
      ),
      "NHWC",
    ),
    (lambda: onednn_conv.Conv(2, (3,), dtype=jnp.float32).init(jax.random.key(0), jnp.ones((1, 5, 2))), "2-D"),
  ],
)
def test_unsupported_arguments_raise_model_error(call, message):
  with pytest.raises(ModelError, match=message):
    call()


def test_missing_library_says_how_to_install():
  """Without libdnnl: available() is False and the first convolution raises ModelError naming the package."""
  code = (
    "import jax.numpy as jnp\n"
    "from resnet_jax import onednn_conv, onednn_lib\n"
    "from resnet_jax.errors import ModelError\n"
    "assert not onednn_lib.available()\n"
    "try:\n"
    "  onednn_conv.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((1, 1, 1, 1)))\n"
    "except ModelError as e:\n"
    "  print(e)\n"
  )
  env = dict(
    os.environ,
    RESNET_JAX_ONEDNN_LIBRARY="/nonexistent/libdnnl.so.3",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
  )
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "pip install onednn-cpu-gomp==2023.2.0" in out.stdout and "conv_backend='xla'" in out.stdout, out.stdout


def test_concurrent_calls_from_two_threads():
  """Two Python threads running jitted oneDNN gradients at once get the same results as one at a time."""
  import concurrent.futures

  rng = np.random.default_rng(4)
  xs = [jnp.asarray(rng.standard_normal((2, 12, 12, 8)), jnp.float32) for _ in range(2)]
  w = jnp.asarray(rng.standard_normal((3, 3, 8, 8)) * 0.2, jnp.float32)
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(onednn_conv.conv2d(x, w, 1, ((1, 1), (1, 1))) ** 2), argnums=(0, 1)))
  want = [grad(x, w) for x in xs]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    got = list(pool.map(lambda i: [grad(xs[i % 2], w) for _ in range(5)], range(4)))
  for i, results in enumerate(got):
    for r in results:
      chex.assert_trees_all_close(r, want[i % 2], rtol=1e-6, atol=1e-6)
