"""The residual unit's hand-derived gradients against jax.grad, its decomposition, custom_vjp and modules."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, currently_in_test_context, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from resnet_jax import residual_unit
from resnet_jax.errors import ModelError, ResNetJaxError

ACTS = sorted(residual_unit.ACTIVATIONS)
KEYS = ("w1", "b1", "w2", "b2")


def assert_close(a, b, rtol, what=""):
  """Norm-wise: max|a - b| <= rtol * max(max|b|, floor), floor = finfo.tiny / finfo.eps of a's dtype.

  The floor (1e-292 in float64, 1e-31 in float32) only matters for gradients that have underflowed.
  """
  floor = float(np.finfo(np.asarray(a).dtype).tiny / np.finfo(np.asarray(a).dtype).eps)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  err = float(np.max(np.abs(a - b))) if a.size else 0.0
  scale = max(float(np.max(np.abs(b))) if b.size else 0.0, floor)
  assert err <= rtol * scale, f"{what}: max abs diff {err:.3e}, relative {err / scale:.3e} > {rtol:.0e}"


def tanh_well_conditioned(params, x, res, activation):
  """False where a tanh unit saturates (1 - |a1| < 1e-4 anywhere): outside the 1e-10 claim.

  jax.grad differentiates tanh as (g + g a)(1 - a), whose two terms cancel as a -> -1 and lose about
  log10(1 / (1 - |a|)) digits; the hand-derived (1 - a)(1 + a) does not cancel. Where tanh saturates
  the two therefore differ by more than 1e-10 because of the reference, and such examples are skipped.
  """
  if activation != "tanh":
    return True
  h = np.asarray(x, np.float64)
  for p in params:
    a1 = np.tanh(h @ np.asarray(p["w1"]).T + np.asarray(p["b1"]))
    if np.min(1 - np.abs(a1)) < 1e-4:
      return False
    H = a1 @ np.asarray(p["w2"]).T + np.asarray(p["b2"])
    h = H + h if res else H
  return True


def autodiff_stack(params, x, y, res, activation):
  """jax.grad of stack_loss, plus dL/dx_l for every unit input via zero perturbations e_l added to x_l."""

  def perturbed(params, eps):
    h = x
    for p, e in zip(params, eps):
      h = residual_unit.stack_forward([p], h + e, res, activation)
    return 0.5 * jnp.sum(jnp.square(h - y)) / x.shape[0]

  g_params, g_inputs = jax.grad(perturbed, argnums=(0, 1))(params, [jnp.zeros_like(x)] * len(params))
  g_x = jax.grad(residual_unit.stack_loss, argnums=1)(params, x, y, res, activation)
  return g_params, g_x, g_inputs


# (batch, dim, hidden): the edge sizes (all ones; hidden 1 under a wider dim) and an ordinary one. Hypothesis picks
# among these few shapes because every new shape costs one XLA compile per primitive (seconds on 2
# cores); values, seeds, scales, depths and activations vary freely.
SHAPES = [(1, 1, 1), (2, 3, 4), (4, 2, 1)]


@st.composite
def unit_case(draw):
  batch, dim, hidden = draw(st.sampled_from(SHAPES))
  values = st.floats(-3, 3, allow_nan=False, width=64)
  x = draw(hnp.arrays(np.float64, (batch, dim), elements=values))
  y = draw(hnp.arrays(np.float64, (batch, dim), elements=values))
  seed = draw(st.integers(0, 2**31 - 1))
  scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
  return batch, dim, hidden, x, y, seed, scale


def scaled_params(seed, dim, hidden, scale, dtype=jnp.float64):
  p = residual_unit.init_params(jax.random.PRNGKey(seed), dim, hidden, dtype)
  return {k: jnp.asarray(np.asarray(v) * scale) for k, v in p.items()}  # numpy: no compile per shape


@functools.partial(jax.jit, static_argnames="activation")
def unit_grads_both_ways(p, x, y, activation):
  """manual_grads and jax.grad of loss, compiled once per shape and activation."""
  g_p, g_x = jax.grad(residual_unit.loss, argnums=(0, 1))(p, x, y, activation)
  return residual_unit.manual_grads(p, x, y, activation), g_p, g_x


# ---------------------------------------------------------------------------------------------------
# One unit, float64.
# ---------------------------------------------------------------------------------------------------


@given(case=unit_case(), activation=st.sampled_from(ACTS))
def test_manual_grads_equal_jax_grad(case, activation):
  batch, dim, hidden, x, y, seed, scale = case
  with jax.enable_x64(True):
    p = scaled_params(seed, dim, hidden, scale)
    assume(tanh_well_conditioned([p], x, True, activation))
    x, y = jnp.asarray(x), jnp.asarray(y)
    manual, g_p, g_x = unit_grads_both_ways(p, x, y, activation)
    assert set(manual) == {*KEYS, "x"}
    for k in KEYS:
      chex.assert_shape(manual[k], p[k].shape)
      assert_close(manual[k], g_p[k], 1e-10, k)
    assert_close(manual["x"], g_x, 1e-10, "x")


def test_loss_is_the_batch_mean_of_half_squared_error():
  with jax.enable_x64(True):
    p = residual_unit.init_params(jax.random.PRNGKey(0), 3, 4, jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
    y = jax.random.normal(jax.random.PRNGKey(2), (5, 3), jnp.float64)
    per_example = [float(residual_unit.loss(p, x[n : n + 1], y[n : n + 1])) for n in range(5)]
    np.testing.assert_allclose(float(residual_unit.loss(p, x, y)), np.mean(per_example), rtol=1e-14)
    # the forward pass, written out with numpy from the definition y_hat = w2 sigma(w1 x + b1) + b2 + x
    P = {k: np.asarray(v) for k, v in p.items()}
    X = np.asarray(x)
    y_hat = (1 / (1 + np.exp(-(X @ P["w1"].T + P["b1"])))) @ P["w2"].T + P["b2"] + X
    np.testing.assert_allclose(np.asarray(residual_unit.forward(p, x)), y_hat, rtol=1e-13)


# ---------------------------------------------------------------------------------------------------
# Stacks, float64, depths up to 50.
# ---------------------------------------------------------------------------------------------------


def check_stack(depth, dim, hidden, batch, activation, res, seed, scale=1.0):
  params = [
    {k: jnp.asarray(np.asarray(v) * scale) for k, v in p.items()}
    for p in residual_unit.init_stack(jax.random.PRNGKey(seed), depth, dim, hidden, jnp.float64)
  ]
  kx, ky = jax.random.split(jax.random.PRNGKey(seed + 1))
  x = jax.random.normal(kx, (batch, dim), jnp.float64)
  y = jax.random.normal(ky, (batch, dim), jnp.float64)
  well_conditioned = tanh_well_conditioned(params, x, res, activation)
  if currently_in_test_context():
    assume(well_conditioned)
  else:  # a fixed case must be one where jax.grad's tanh derivative is itself accurate
    assert well_conditioned
  manual = residual_unit.manual_stack_grads(params, x, y, res, activation)
  g_params, g_x, g_inputs = autodiff_stack(params, x, y, res, activation)
  assert len(manual["params"]) == len(manual["inputs"]) == depth
  for l in range(depth):  # per unit, so that a wrong early unit in a vanishing plain stack is seen
    for k in KEYS:
      assert_close(manual["params"][l][k], g_params[l][k], 1e-10, f"unit {l} {k}")
    assert_close(manual["inputs"][l], g_inputs[l], 1e-10, f"dL/dx_{l}")
  assert_close(manual["x"], g_x, 1e-10, "x")
  np.testing.assert_array_equal(manual["x"], manual["inputs"][0])
  return manual


@given(
  depth=st.integers(1, 50),
  shape=st.sampled_from(SHAPES[:2]),
  activation=st.sampled_from(ACTS),
  res=st.booleans(),
  seed=st.integers(0, 2**20),
  scale=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_manual_stack_grads_equal_jax_grad(depth, shape, activation, res, seed, scale):
  batch, dim, hidden = shape
  with jax.enable_x64(True):
    check_stack(depth, dim, hidden, batch, activation, res, seed, scale)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("res", [True, False], ids=["residual", "plain"])
def test_depth_50_stacks(activation, res):
  with jax.enable_x64(True):
    manual = check_stack(50, 3, 4, 2, activation, res, seed=7)
  if activation == "sigmoid":
    # the plain sigmoid stack's first-unit gradient has vanished; the residual one has not
    first = float(np.max(np.abs(np.asarray(manual["inputs"][0]))))  # float64, outside the x64 context
    last = float(np.max(np.abs(np.asarray(manual["inputs"][-1]))))
    assert first > 0 and last > 0
    assert (first < 1e-10 * last) if not res else (first > 0.1 * last)


# ---------------------------------------------------------------------------------------------------
# The decomposition dL/dx = branch term + delta.
# ---------------------------------------------------------------------------------------------------


@given(case=unit_case(), activation=st.sampled_from(ACTS))
def test_input_grad_parts(case, activation):
  batch, dim, hidden, x, y, seed, scale = case
  with jax.enable_x64(True):
    p = scaled_params(seed, dim, hidden, scale)
    assume(tanh_well_conditioned([p], x, True, activation))
    x, y = jnp.asarray(x), jnp.asarray(y)
    branch, shortcut = residual_unit.input_grad_parts(p, x, y, activation)
    # the shortcut part is exactly the original error (y_hat - y), divided by batch for the batch mean
    y_hat = residual_unit.forward(p, x, activation)
    np.testing.assert_array_equal(shortcut, (y_hat - y) / batch)
    np.testing.assert_array_equal(branch + shortcut, residual_unit.manual_grads(p, x, y, activation)["x"])

    H = lambda v: residual_unit.stack_forward([p], v, shortcut=False, activation=activation)  # H(x) alone
    through_branch = lambda v: 0.5 * jnp.sum(jnp.square(H(v) + jax.lax.stop_gradient(v) - y)) / batch
    through_shortcut = lambda v: 0.5 * jnp.sum(jnp.square(H(jax.lax.stop_gradient(v)) + v - y)) / batch
    assert_close(branch, jax.grad(through_branch)(x), 1e-10, "branch")
    assert_close(shortcut, jax.grad(through_shortcut)(x), 1e-12, "shortcut")


def test_shortcut_part_is_y_hat_minus_y_for_one_example():
  with jax.enable_x64(True):
    p = residual_unit.init_params(jax.random.PRNGKey(3), 1, 1, jnp.float64)
    x = jnp.array([[0.5]])
    y = jnp.array([[-1.0]])
    _, shortcut = residual_unit.input_grad_parts(p, x, y, "tanh")
    np.testing.assert_array_equal(shortcut, residual_unit.forward(p, x, "tanh") - y)


@pytest.mark.parametrize("res", [True, False], ids=["residual", "plain"])
def test_stack_input_grad_parts(res):
  with jax.enable_x64(True):
    depth, activation = 6, "sigmoid"
    params = residual_unit.init_stack(jax.random.PRNGKey(0), depth, 3, 4, jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    y = jax.random.normal(jax.random.PRNGKey(2), (2, 3), jnp.float64)
    parts = residual_unit.stack_input_grad_parts(params, x, y, res, activation)
    _, _, g_inputs = autodiff_stack(params, x, y, res, activation)
    x_L = residual_unit.stack_forward(params, x, res, activation)
    above = list(g_inputs[1:]) + [(x_L - y) / 2]
    for l, (branch, shortcut) in enumerate(parts):
      x_l = residual_unit.stack_forward(params[:l], x, res, activation) if l else x
      # branch_l = J_{H_l}(x_l)^T dL/dx_{l+1}, computed here with jax.vjp of the branch alone
      _, vjp = jax.vjp(lambda v: residual_unit.stack_forward([params[l]], v, False, activation), x_l)
      assert_close(branch, vjp(above[l])[0], 1e-10, f"branch {l}")
      if res:
        assert_close(shortcut, above[l], 1e-10, f"shortcut {l}")
      else:
        np.testing.assert_array_equal(shortcut, np.zeros_like(shortcut))
      assert_close(branch + shortcut, g_inputs[l], 1e-10, f"dL/dx_{l}")


# ---------------------------------------------------------------------------------------------------
# float32 at the documented tolerance.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTS)
def test_float32_agreement(activation):
  from resnet_jax.gradcheck import DEFAULT_RTOL

  rtol = DEFAULT_RTOL["float32"]
  params = residual_unit.init_stack(jax.random.PRNGKey(0), 50, 3, 4)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3))
  y = jax.random.normal(jax.random.PRNGKey(2), (2, 3))
  manual = residual_unit.manual_grads(params[0], x, y, activation)
  g_p, g_x = jax.grad(residual_unit.loss, argnums=(0, 1))(params[0], x, y, activation)
  for k in KEYS:
    assert manual[k].dtype == jnp.float32
    assert_close(manual[k], g_p[k], rtol, k)
  assert_close(manual["x"], g_x, rtol, "x")
  for res in (True, False):
    m = residual_unit.manual_stack_grads(params, x, y, res, activation)
    g_params, g_x, g_inputs = autodiff_stack(params, x, y, res, activation)
    for l in range(50):
      for k in KEYS:
        assert_close(m["params"][l][k], g_params[l][k], rtol, f"unit {l} {k}")
      assert_close(m["inputs"][l], g_inputs[l], rtol, f"dL/dx_{l}")


# ---------------------------------------------------------------------------------------------------
# custom_vjp: training with the hand-derived backward pass.
# ---------------------------------------------------------------------------------------------------


def _data(dim=3, batch=2, dtype=jnp.float64):
  x = jax.random.normal(jax.random.PRNGKey(11), (batch, dim), dtype)
  y = jax.random.normal(jax.random.PRNGKey(12), (batch, dim), dtype)
  return x, y


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("res", [True, False], ids=["residual", "plain"])
def test_residual_unit_custom_vjp_equals_autodiff(activation, res):
  with jax.enable_x64(True):
    p = residual_unit.init_params(jax.random.PRNGKey(0), 3, 4, jnp.float64)
    x, y = _data()
    custom = lambda p, x: jnp.sum(jnp.sin(residual_unit.hand_derived_unit(p, x, activation, res)) * y)
    plain = lambda p, x: jnp.sum(jnp.sin(residual_unit.stack_forward([p], x, res, activation)) * y)
    np.testing.assert_array_equal(
      residual_unit.hand_derived_unit(p, x, activation, res), residual_unit.stack_forward([p], x, res, activation)
    )
    got = jax.grad(custom, argnums=(0, 1))(p, x)
    want = jax.grad(plain, argnums=(0, 1))(p, x)
    for k in KEYS:
      assert_close(got[0][k], want[0][k], 1e-10, k)
    assert_close(got[1], want[1], 1e-10, "x")


def test_residual_unit_uses_the_custom_backward():
  p = residual_unit.init_params(jax.random.PRNGKey(0), 3, 2)
  x, _ = _data(3, 2, jnp.float32)
  assert "custom_vjp" in str(jax.make_jaxpr(residual_unit.hand_derived_unit)(p, x))
  assert "custom_vjp" not in str(jax.make_jaxpr(residual_unit.forward)(p, x))


@pytest.mark.parametrize(
  "make_opt", [lambda: optax.sgd(0.1, momentum=0.9), lambda: optax.adam(0.05)], ids=["sgd", "adam"]
)
def test_training_with_custom_vjp_follows_autodiff(make_opt):
  with jax.enable_x64(True):
    depth = 3
    params = residual_unit.init_stack(jax.random.PRNGKey(0), depth, 3, 4, jnp.float64)
    x, y = _data()

    def loss_custom(params):
      h = x
      for p in params:
        h = residual_unit.hand_derived_unit(p, h, "tanh")
      return 0.5 * jnp.sum(jnp.square(h - y)) / x.shape[0]

    loss_auto = lambda params: residual_unit.stack_loss(params, x, y, True, "tanh")
    trajectories = []
    for loss_fn in (loss_custom, loss_auto):
      opt = make_opt()
      p, state = params, opt.init(params)
      step = jax.jit(lambda p, s: _step(loss_fn, opt, p, s))
      losses = []
      for _ in range(5):
        p, state, l = step(p, state)
        losses.append(float(l))
      trajectories.append((p, losses))
    (p1, l1), (p2, l2) = trajectories
    assert l1[-1] < l1[0]
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    chex.assert_trees_all_close(p1, p2, rtol=1e-10, atol=1e-12)


def _step(loss_fn, opt, p, state):
  l, g = jax.value_and_grad(loss_fn)(p)
  updates, state = opt.update(g, state, p)
  return optax.apply_updates(p, updates), state, l


# ---------------------------------------------------------------------------------------------------
# Flax modules.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", [True, False], ids=["residual", "plain"])
def test_residual_unit_module_matches_functions(res):
  unit = residual_unit.ResidualUnit(dim=4, hidden=6, activation="tanh", residual=res)
  x, _ = _data(4, 3, jnp.float32)
  variables = unit.init(jax.random.PRNGKey(0), x)
  p = variables["params"]
  ref = residual_unit.init_params(jax.random.PRNGKey(0), 4, 6)
  assert set(p) == set(KEYS)
  chex.assert_trees_all_equal_shapes(dict(p), ref)
  chex.assert_trees_all_close(
    unit.apply(variables, x), residual_unit.stack_forward([p], x, res, "tanh"), rtol=1e-6, atol=1e-6
  )
  # the mapping is the identity: a dict from init_params is the module's params collection
  chex.assert_trees_all_close(
    unit.apply({"params": ref}, x), residual_unit.stack_forward([ref], x, res, "tanh"), rtol=1e-6, atol=1e-6
  )
  if res:
    chex.assert_trees_all_close(unit.apply({"params": ref}, x), residual_unit.forward(ref, x, "tanh"), rtol=1e-6)


def test_residual_mlp_is_embed_stack_head():
  model = residual_unit.ResidualMLP(depth=3, dim=5, hidden=7, num_classes=4, activation="relu")
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 1))
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.PRNGKey(0), images)
  params = variables["params"]
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x, train=True))(params, images)
  chex.assert_shape(logits, (2, 4))
  flat = images.reshape(2, -1)
  h = flat @ params["embed"]["kernel"] + params["embed"]["bias"]
  h = residual_unit.stack_forward([params[f"unit{l:03d}"] for l in range(3)], h, True, "relu")
  chex.assert_trees_all_close(logits, h @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-5, atol=1e-5)
  assert sorted(variables["perturbations"]) == ["block00", "block01", "block02"]


@pytest.mark.parametrize("res", [True, False], ids=["residual", "plain"])
def test_residual_mlp_hand_derived_grad_equals_autodiff(res):
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 4, 4, 1))
  labels = jnp.array([0, 2, 1])
  kw = dict(depth=4, dim=5, hidden=6, num_classes=3, activation="sigmoid", residual=res)
  auto, hand = residual_unit.ResidualMLP(**kw), residual_unit.ResidualMLP(**kw, hand_derived_grad=True)
  variables = jax.jit(auto.init)(jax.random.PRNGKey(0), images)

  def loss(model, variables):
    logits = model.apply(variables, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  g_auto = jax.jit(jax.grad(lambda v: loss(auto, v)))(variables)
  g_hand = jax.jit(jax.grad(lambda v: loss(hand, v)))(variables)
  chex.assert_trees_all_close(g_hand, g_auto, rtol=1e-5, atol=1e-7)
  # The unit-input gradients (perturbations) equal the hand-derived stack backward pass started from
  # dL/dx_L = dL/dlogits head_kernel^T: with y = x_L - batch * dL/dx_L, stack_loss has that dL/dx_L.
  p = variables["params"]
  units = [p[f"unit{l:03d}"] for l in range(4)]
  x0 = images.reshape(3, -1) @ p["embed"]["kernel"] + p["embed"]["bias"]
  x_L = residual_unit.stack_forward(units, x0, res, "sigmoid")
  logits = x_L @ p["head"]["kernel"] + p["head"]["bias"]
  g_logits = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean())(logits)
  y = x_L - 3 * (g_logits @ p["head"]["kernel"].T)
  manual = jax.jit(residual_unit.manual_stack_grads, static_argnums=(3, 4))(units, x0, y, res, "sigmoid")
  for l in range(4):
    chex.assert_trees_all_close(manual["inputs"][l], g_auto["perturbations"][f"block{l:02d}"], rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(manual["params"][l], dict(g_auto["params"][f"unit{l:03d}"]), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------------


def _good():
  p = residual_unit.init_params(jax.random.PRNGKey(0), 4, 3)
  return p, jnp.zeros((2, 4)), jnp.zeros((2, 4))


BAD_UNIT = [
  ("w1 not a matrix", lambda p, x, y: ({**p, "w1": p["w1"][0]}, x, y), ["params['w1']", "(4,)", "(hidden, dim)"]),
  ("b1 wrong length", lambda p, x, y: ({**p, "b1": jnp.zeros(5)}, x, y), ["params['b1']", "(5,)", "(3,)"]),
  ("w2 transposed", lambda p, x, y: ({**p, "w2": p["w2"].T}, x, y), ["params['w2']", "(3, 4)", "(4, 3)"]),
  ("b2 wrong length", lambda p, x, y: ({**p, "b2": jnp.zeros(3)}, x, y), ["params['b2']", "(3,)", "(4,)"]),
  ("missing key", lambda p, x, y: ({k: v for k, v in p.items() if k != "b2"}, x, y), ["missing b2"]),
  ("not a dict", lambda p, x, y: ([p["w1"]], x, y), ["params must be a dict"]),
  ("x wrong width", lambda p, x, y: (p, jnp.zeros((2, 5)), y), ["x has shape (2, 5)", "(batch, 4)"]),
  ("x a vector", lambda p, x, y: (p, jnp.zeros(4), y), ["x has shape (4,)", "x[None, :]"]),
  ("y mismatched", lambda p, x, y: (p, x, jnp.zeros((3, 4))), ["y has shape (3, 4)", "expected (2, 4)"]),
]


@pytest.mark.parametrize("fn_name", ["loss", "manual_grads", "input_grad_parts"])
@pytest.mark.parametrize("label,corrupt,needles", BAD_UNIT, ids=[b[0] for b in BAD_UNIT])
def test_bad_unit_input(fn_name, label, corrupt, needles):
  p, x, y = corrupt(*_good())
  with pytest.raises(ModelError) as e:
    getattr(residual_unit, fn_name)(p, x, y)
  assert isinstance(e.value, ValueError)
  for n in needles:
    assert n in str(e.value), (n, str(e.value))
  assert fn_name in str(e.value)


@pytest.mark.parametrize("fn", [residual_unit.forward, residual_unit.hand_derived_unit])
def test_bad_input_under_jit(fn):
  p, _, _ = _good()
  with pytest.raises(ResNetJaxError, match=r"x has shape \(2, 3\), expected \(batch, dim\) = \(batch, 4\)"):
    jax.jit(fn)(p, jnp.zeros((2, 3)))


@pytest.mark.parametrize(
  "fn_name",
  [
    "forward",
    "loss",
    "manual_grads",
    "input_grad_parts",
    "hand_derived_unit",
    "stack_forward",
    "stack_loss",
    "manual_stack_grads",
  ],
)
def test_unknown_activation(fn_name):
  p, x, y = _good()
  p = [p] if fn_name.startswith(("stack", "manual_stack")) else p
  args = (p, x) if fn_name in ("forward", "hand_derived_unit", "stack_forward") else (p, x, y)
  kwargs = {"activation": "selu"}
  with pytest.raises(ModelError, match=r"unknown activation 'selu'; expected one of 'sigmoid', 'tanh', 'relu'"):
    getattr(residual_unit, fn_name)(*args, **kwargs)


def test_bad_stack_input():
  params = residual_unit.init_stack(jax.random.PRNGKey(0), 3, 4, 2)
  x = jnp.zeros((2, 4))
  with pytest.raises(ModelError, match=r"params\[2\]\['w1'\] has shape \(2, 5\), expected \(hidden, dim\) = \(2, 4\)"):
    residual_unit.manual_stack_grads(params[:2] + [residual_unit.init_params(jax.random.PRNGKey(1), 5, 2)], x, x)
  with pytest.raises(ModelError, match="empty list"):
    residual_unit.stack_forward([], x)
  with pytest.raises(ModelError, match=r"stack_loss: y has shape \(2, 3\), expected \(2, 4\)"):
    residual_unit.stack_loss(params, x, jnp.zeros((2, 3)))
  with pytest.raises(ModelError, match="list of unit dicts"):
    residual_unit.stack_forward(params[0], x)
  with pytest.raises(ModelError, match="depth must be >= 1"):
    residual_unit.init_stack(jax.random.PRNGKey(0), 0, 4, 2)


def test_bad_module_input():
  unit = residual_unit.ResidualUnit(dim=4, hidden=3)
  with pytest.raises(ModelError, match=r"ResidualUnit: x has shape \(2, 5\)"):
    unit.init(jax.random.PRNGKey(0), jnp.zeros((2, 5)))
  with pytest.raises(ModelError, match="unknown activation 'gelu'"):
    residual_unit.ResidualMLP(2, 4, 3, 10, activation="gelu").init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)))


# ----------------------------------------------------------------------------------------------------
# The derivation's expressions as written, for one example (batch 1), against manual_grads
# ----------------------------------------------------------------------------------------------------


def _np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def test_scalar_expressions_of_the_derivation_at_batch_1():
  # dim = hidden = 1: every quantity is a number; the expressions are evaluated exactly as written.
  w1, b1, w2, b2, x, y = 0.7, -0.2, -1.3, 0.4, 0.9, 0.25
  a1 = _np_sigmoid(w1 * x + b1)
  y_hat = w2 * a1 + b2 + x
  dL_dw1 = (y_hat - y) * w2 * a1 * (1 - a1) * x
  dL_dx = (y_hat - y) * w2 * a1 * (1 - a1) * w1 + (y_hat - y)
  with jax.enable_x64(True):
    p = {"w1": jnp.array([[w1]]), "b1": jnp.array([b1]), "w2": jnp.array([[w2]]), "b2": jnp.array([b2])}
    g = residual_unit.manual_grads(p, jnp.array([[x]]), jnp.array([[y]]), "sigmoid")
    branch, shortcut = residual_unit.input_grad_parts(p, jnp.array([[x]]), jnp.array([[y]]), "sigmoid")
  np.testing.assert_allclose(float(g["w1"][0, 0]), dL_dw1, rtol=1e-14)
  np.testing.assert_allclose(float(g["x"][0, 0]), dL_dx, rtol=1e-14)
  np.testing.assert_allclose(float(g["w2"][0, 0]), (y_hat - y) * a1, rtol=1e-14)
  np.testing.assert_allclose(float(shortcut[0, 0]), y_hat - y, rtol=1e-14)  # the "+ (y_hat - y)" term
  np.testing.assert_allclose(float(branch[0, 0]), dL_dx - (y_hat - y), rtol=1e-13)


def test_vector_expressions_of_the_derivation_at_batch_1():
  # Column vectors x (d, 1), W1 (h, d), W2 (d, h); e = y_hat - y. The scalar expressions become
  #   dL/dW1 = ((W2^T e) * a1 * (1 - a1)) x^T        dL/dx = W1^T ((W2^T e) * a1 * (1 - a1)) + I e
  # ("+1" of the scalar case is the identity Jacobian I of the shortcut). Row-vector results of
  # manual_grads (batch 1) are their transposes.
  rng = np.random.default_rng(0)
  d, h = 5, 7
  W1, W2 = rng.standard_normal((h, d)), rng.standard_normal((d, h))
  b1, b2 = rng.standard_normal((h, 1)), rng.standard_normal((d, 1))
  x, y = rng.standard_normal((d, 1)), rng.standard_normal((d, 1))
  a1 = _np_sigmoid(W1 @ x + b1)
  y_hat = W2 @ a1 + b2 + x
  e = y_hat - y
  delta1 = (W2.T @ e) * a1 * (1 - a1)
  dL_dW1 = delta1 @ x.T
  dL_dx = W1.T @ delta1 + np.eye(d) @ e
  with jax.enable_x64(True):
    p = {"w1": jnp.asarray(W1), "b1": jnp.asarray(b1[:, 0]), "w2": jnp.asarray(W2), "b2": jnp.asarray(b2[:, 0])}
    g = residual_unit.manual_grads(p, jnp.asarray(x.T), jnp.asarray(y.T), "sigmoid")
  np.testing.assert_allclose(np.asarray(g["w1"]), dL_dW1, rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(np.asarray(g["x"]), dL_dx.T, rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(np.asarray(g["w2"]), e @ a1.T, rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(np.asarray(g["b1"]), delta1[:, 0], rtol=1e-13, atol=1e-15)


def test_relu_derivative_is_zero_at_exactly_zero():
  assert float(residual_unit.ACTIVATIONS["relu"].sigma_prime(jnp.zeros(3), jnp.zeros(3)).sum()) == 0.0
  with jax.enable_x64(True):
    # w1 x + b1 = 0.5 * 1.0 - 0.5 = 0 exactly (and 0 * x + 0 for the second hidden unit)
    p = {
      "w1": jnp.array([[0.5], [0.0]]),
      "b1": jnp.array([-0.5, 0.0]),
      "w2": jnp.array([[2.0, -3.0]]),
      "b2": jnp.array([0.1]),
    }
    x, y = jnp.array([[1.0]]), jnp.array([[0.0]])
    z1 = x @ p["w1"].T + p["b1"]
    assert np.all(np.asarray(z1) == 0.0)
    g = residual_unit.manual_grads(p, x, y, "relu")
    np.testing.assert_array_equal(g["w1"], 0.0)  # relu'(0) = 0: nothing reaches the first layer
    np.testing.assert_array_equal(g["b1"], 0.0)
    np.testing.assert_array_equal(g["x"], residual_unit.forward(p, x, "relu") - y)  # only the shortcut's e
    auto = jax.grad(lambda p, x: residual_unit.loss(p, x, y, "relu"), argnums=(0, 1))(p, x)
    np.testing.assert_array_equal(auto[0]["w1"], 0.0)  # jax.nn.relu's derivative at 0 is 0 as well
    np.testing.assert_array_equal(auto[1], g["x"])


def test_uniform_fan_in_is_init_params_distribution():
  init = residual_unit.uniform_fan_in(16)
  w = init(jax.random.PRNGKey(0), (1000,), jnp.float32)
  assert float(jnp.max(jnp.abs(w))) <= 0.25 and float(jnp.max(jnp.abs(w))) > 0.24
  p = residual_unit.init_params(jax.random.PRNGKey(1), dim=16, hidden=4)
  k1 = jax.random.split(jax.random.PRNGKey(1), 4)[0]
  np.testing.assert_array_equal(p["w1"], init(k1, (4, 16), jnp.float32))


def test_sigma_prime_is_the_hand_written_derivative():
  z = jnp.linspace(-5.0, 5.0, 11)
  for name in ACTS:
    auto = jax.vmap(jax.grad(residual_unit.ACTIVATIONS[name].sigma))(z)
    np.testing.assert_allclose(residual_unit.sigma_prime(z, name), auto, rtol=1e-6, atol=1e-7)
