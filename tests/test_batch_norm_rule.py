"""benchmarks/batch_norm_rule.py against flax.linen.BatchNorm: the same variables, outputs and running
statistics, and the same derivatives in reverse and forward mode (float64), from its own derivative rule;
and the models' ``norm_layer`` option, which ``bench.py --compare-batch-norm`` sets to it."""

from __future__ import annotations

import functools
import os
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resnet_jax import create_model
from resnet_jax.errors import ModelError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from batch_norm_rule import BatchNorm, batch_norm_train  # noqa: E402


def normal(seed: int, shape, dtype=np.float64, scale: float = 1.0, shift: float = 0.0) -> jax.Array:
  return jnp.asarray(shift + scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def randomised(variables: dict, seed: int) -> dict:
  """Variables with scale, bias and the running statistics moved off 1 and 0."""
  rng = np.random.default_rng(seed)

  def move(path, leaf):
    if path[-1].key in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(move, variables)


def both(**kwargs) -> tuple[nn.Module, nn.Module]:
  kwargs.setdefault("use_running_average", False)
  return BatchNorm(**kwargs), nn.BatchNorm(**kwargs)


def train_apply(module: nn.Module, variables: dict):
  """``(params, x) -> (y, new batch_stats)`` in batch-statistics mode."""

  def f(params, x):
    y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  return f


@pytest.fixture
def float64():
  with jax.enable_x64(True):
    yield


@given(
  shape=st.sampled_from([(4, 3, 3, 2), (2, 5, 1, 3), (7, 4), (3, 2, 2, 2, 5)]),
  momentum=st.sampled_from([0.0, 0.9, 0.99]),
  epsilon=st.sampled_from([1e-5, 1e-3]),
  seed=st.integers(0, 2**16),
)
def test_values_statistics_and_gradients_equal_flax(shape, momentum, epsilon, seed):
  with jax.enable_x64(True):
    _values_statistics_and_gradients_equal_flax(shape, momentum, epsilon, seed)


def _values_statistics_and_gradients_equal_flax(shape, momentum, epsilon, seed):
  ours, flax_bn = both(momentum=momentum, epsilon=epsilon, dtype=jnp.float64, param_dtype=jnp.float64)
  x = normal(seed, shape, scale=2.0, shift=0.5)
  variables = ours.init(jax.random.key(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, flax_bn.init(jax.random.key(0), x))
  variables = randomised(variables, seed + 1)
  w = normal(seed + 2, shape)  # a loss that weights every output differently

  def loss(module):
    def f(params, x):
      y, stats = train_apply(module, variables)(params, x)
      return jnp.sum(jnp.sin(y) * w), (y, stats)

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(variables["params"], x)

  (l_ours, (y_ours, stats_ours)), g_ours = loss(ours)
  (l_flax, (y_flax, stats_flax)), g_flax = loss(flax_bn)
  chex.assert_trees_all_close(y_ours, y_flax, rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(stats_ours, stats_flax, rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(l_ours, l_flax, rtol=1e-12)
  chex.assert_trees_all_close(g_ours, g_flax, rtol=1e-9, atol=1e-11)


@pytest.mark.usefixtures("float64")
def test_forward_mode_jacobians_equal_flax_and_reverse_mode():
  """jax.jacfwd works through the batch-statistics mode (the rule is a JVP) and equals flax's Jacobian
  and our own jax.jacrev, for the input, the scale and the bias, and for the running statistics too."""
  ours, flax_bn = both(momentum=0.8, dtype=jnp.float64, param_dtype=jnp.float64)
  x = normal(3, (3, 2, 2, 3), scale=1.5)
  variables = randomised(ours.init(jax.random.key(0), x), 4)
  for argnums in (0, 1):
    fwd = jax.jacfwd(train_apply(ours, variables), argnums=argnums)(variables["params"], x)
    ref = jax.jacfwd(train_apply(flax_bn, variables), argnums=argnums)(variables["params"], x)
    rev = jax.jacrev(train_apply(ours, variables), argnums=argnums)(variables["params"], x)
    chex.assert_trees_all_close(fwd, ref, rtol=1e-9, atol=1e-11)
    chex.assert_trees_all_close(rev, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.usefixtures("float64")
def test_the_gradient_is_the_textbook_formula():
  """dL/dx = gamma*inv * (delta - mean(delta) - x_hat * mean(delta * x_hat)), dL/dgamma = sum(delta * x_hat),
  dL/dbeta = sum(delta), with delta = dL/dy, written out here with numpy."""
  x = normal(5, (6, 3, 4), scale=3.0, shift=-1.0)
  gamma, beta, delta = normal(6, (4,)), normal(7, (4,)), normal(8, (6, 3, 4))
  eps = 1e-5
  _, vjp = jax.vjp(lambda x, g, b: batch_norm_train(x, g, b, eps, jnp.float64, jnp.float64)[0], x, gamma, beta)
  dx, dgamma, dbeta = vjp(delta)
  xn, dn, gn = np.asarray(x).reshape(-1, 4), np.asarray(delta).reshape(-1, 4), np.asarray(gamma)
  mu, var = xn.mean(0), xn.var(0)
  inv = 1 / np.sqrt(var + eps)
  x_hat = (xn - mu) * inv
  np.testing.assert_allclose(dgamma, (dn * x_hat).sum(0), rtol=1e-12)
  np.testing.assert_allclose(dbeta, dn.sum(0), rtol=1e-12)
  expected = gn * inv * (dn - dn.mean(0) - x_hat * (dn * x_hat).mean(0))
  np.testing.assert_allclose(np.asarray(dx).reshape(-1, 4), expected, rtol=1e-9, atol=1e-12)


def test_bfloat16_compute_matches_flax():
  """Mixed precision (bfloat16 compute, float32 parameters, statistics in float32): the same output dtype,
  values, running statistics and gradients as flax's, up to bfloat16's rounding of the output and of the
  input gradient."""
  ours, flax_bn = both(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  x = normal(9, (8, 4, 4, 6), np.float32, scale=2.0, shift=1.0).astype(jnp.bfloat16)
  variables = randomised(ours.init(jax.random.key(0), x), 10)
  w = normal(11, x.shape, np.float32)

  def run(module):
    def f(params, x):
      y, stats = train_apply(module, variables)(params, x)
      return jnp.sum(y.astype(jnp.float32) * w), (y, stats)

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(variables["params"], x)

  (_, (y_ours, stats_ours)), (gp_ours, gx_ours) = run(ours)
  (_, (y_flax, stats_flax)), (gp_flax, gx_flax) = run(flax_bn)
  assert y_ours.dtype == y_flax.dtype == jnp.bfloat16
  assert gx_ours.dtype == gx_flax.dtype == jnp.bfloat16
  chex.assert_trees_all_equal(y_ours, y_flax)  # the same forward arithmetic, to the bit
  chex.assert_trees_all_close(stats_ours, stats_flax, rtol=1e-6)
  chex.assert_trees_all_close(gp_ours, gp_flax, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(gx_ours.astype(jnp.float32), gx_flax.astype(jnp.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
  "kwargs, call",
  [
    ({"use_running_average": True}, {}),
    ({"use_running_average": None}, {"use_running_average": True}),
    ({"axis": 1}, {}),
    ({"use_scale": False}, {}),
    ({"use_bias": False}, {}),
    ({"use_fast_variance": False}, {}),
    ({}, {"mask": "half"}),
  ],
  ids=["running", "running-at-call", "axis1", "no-scale", "no-bias", "two-pass-variance", "mask"],
)
def test_settings_outside_the_rule_give_flax_results(kwargs, call):
  ours, flax_bn = both(momentum=0.9, dtype=jnp.float64, param_dtype=jnp.float64, **kwargs)
  x = normal(12, (4, 3, 3, 5), scale=2.0)
  if call.get("mask") == "half":
    call = {"mask": jnp.arange(x.size).reshape(x.shape) % 2 == 0}
  variables = ours.init(jax.random.key(0), x, **call)
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, flax_bn.init(jax.random.key(0), x, **call))
  variables = randomised(variables, 13)

  def f(module):
    def loss(params, x):
      y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"], **call)
      return jnp.sum(jnp.cos(y)), updates

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

  chex.assert_trees_all_equal(f(ours), f(flax_bn))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", ["resnet20", "resnet9"])
def test_a_model_trains_with_it_as_with_flax_batchnorm(name):
  """ResNet-20 and ResNet-9 in training mode (float64): ``norm_layer=BatchNorm`` (this rule) and the default
  ``flax.linen.BatchNorm`` give the same variables, logits, running statistics and gradients of a loss."""
  kw = {"num_classes": 10, "dtype": jnp.float64, "param_dtype": jnp.float64, "conv_backend": "xla"}
  if name == "resnet9":
    kw["num_filters"] = 4
  flax_model, rule_model = create_model(name, **kw), create_model(name, norm_layer=BatchNorm, **kw)
  assert flax_model.norm_layer is nn.BatchNorm
  x = normal(14, (4, 8, 8, 3))
  labels = jnp.arange(4) % 10
  variables = flax_model.init(jax.random.key(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, rule_model.init(jax.random.key(0), x))
  variables = randomised(variables, 15)

  def run(model):
    def loss(params):
      logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), (logits, updates)

    return jax.value_and_grad(loss, has_aux=True)(variables["params"])

  (l_rule, aux_rule), g_rule = run(rule_model)
  (l_flax, aux_flax), g_flax = run(flax_model)
  chex.assert_trees_all_close(aux_rule, aux_flax, rtol=1e-10, atol=1e-12)
  chex.assert_trees_all_close(l_rule, l_flax, rtol=1e-12)
  chex.assert_trees_all_close(g_rule, g_flax, rtol=1e-8, atol=1e-11)


@pytest.mark.usefixtures("float64")
def test_norm_layer_takes_a_partial_of_flax_batchnorm():
  """``norm_layer=functools.partial(nn.BatchNorm, use_fast_variance=False)``: two-pass batch variances, the
  same variables, and in float64 the same outputs as the default to rounding."""
  kw = {"num_classes": 10, "dtype": jnp.float64, "param_dtype": jnp.float64, "conv_backend": "xla"}
  default = create_model("resnet20", **kw)
  two_pass = create_model("resnet20", norm_layer=functools.partial(nn.BatchNorm, use_fast_variance=False), **kw)
  x = normal(16, (4, 8, 8, 3), shift=3.0)  # a large mean: where the two variance formulas round differently
  variables = randomised(default.init(jax.random.key(0), x), 17)
  out_default = default.apply(variables, x, train=True, mutable=["batch_stats"])
  out_two_pass = two_pass.apply(variables, x, train=True, mutable=["batch_stats"])
  chex.assert_trees_all_close(out_two_pass, out_default, rtol=1e-9, atol=1e-11)


def test_norm_layer_must_be_a_module_class():
  with pytest.raises(ModelError, match="norm_layer='BatchNorm' is invalid: expected a module class"):
    create_model("resnet20", norm_layer="BatchNorm")
  with pytest.raises(ModelError, match="norm_layer=1 is invalid"):
    create_model("resnet9", norm_layer=1)
