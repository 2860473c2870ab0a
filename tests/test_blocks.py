"""Residual blocks: the input gradient splits into a shortcut part and a branch part (jax.vjp, float64)."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.blocks import BasicBlock, Bottleneck, option_a_shortcut
from resnet_jax.errors import ModelError

# Parameters are initialised with the "rbg" PRNG: compiling threefry for every parameter shape costs
# about 10 s of CPU per model, rbg about 1.5 s.
INIT_KEY = jax.random.key(0, impl="rbg")


def normal(seed: int, shape, dtype=np.float32, scale: float = 1.0) -> jax.Array:
  """Test data from numpy's generator (jax.random would compile a kernel for every new shape)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def make_block(block_cls, order, in_features, filters, stride=1, shortcut="B", residual=True, train=True):
  """A block in float64 with its variables; BN gamma/beta randomised so that no factor is trivially 1 or 0."""
  conv = functools.partial(nn.Conv, use_bias=False, dtype=jnp.float64, param_dtype=jnp.float64)
  norm = functools.partial(
    nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float64, param_dtype=jnp.float64
  )
  out = filters * (4 if block_cls is Bottleneck else 1)
  block = block_cls(
    filters,
    conv=conv,
    norm=norm,
    strides=stride,
    order=order,
    shortcut=shortcut,
    shortcut_changes_shape=stride != 1 or in_features != out,
    residual=residual,
  )
  x = normal(1, (2, 7, 7, in_features), jnp.float64)
  variables = block.init(INIT_KEY, x)
  rng = np.random.default_rng(2)

  def randomise(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    if name in ("bias", "mean"):
      return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
    return leaf

  return block, jax.tree_util.tree_map_with_path(randomise, variables), x


def _apply(block, variables, x, method=None):
  out, _ = block.apply(variables, x, method=method, mutable=["batch_stats"])
  return out


CONFIGS = [  # (block, in_features, filters, stride, shortcut)
  (BasicBlock, 4, 4, 1, "B"),  # identity shortcut
  (Bottleneck, 8, 2, 1, "B"),  # identity shortcut
  (BasicBlock, 4, 8, 2, "B"),  # projection
  (BasicBlock, 4, 8, 2, "A"),  # option A
]


@pytest.mark.parametrize("order", ["v1", "v2", "relu_before_add"])
@pytest.mark.parametrize(
  "config,train",
  [(c, True) for c in CONFIGS] + [(CONFIGS[1], False)],
  ids=lambda c: (
    f"{c[0].__name__}-{c[1]}to{c[2]}-s{c[3]}-{c[4]}" if isinstance(c, tuple) else ("train" if c else "eval")
  ),
)
def test_input_gradient_is_shortcut_part_plus_branch_part(config, order, train):
  block_cls, cin, filters, stride, shortcut = config
  block, variables, x = make_block(block_cls, order, cin, filters, stride, shortcut, train=train)
  y, vjp_block = jax.vjp(lambda x: _apply(block, variables, x), x)
  f, vjp_branch = jax.vjp(lambda x: _apply(block, variables, x, "branch"), x)
  s, vjp_shortcut = jax.vjp(lambda x: _apply(block, variables, x, "shortcut_path"), x)
  # the block is its branch plus its shortcut (ReLU on the sum for v1)
  chex.assert_trees_all_close(y, jax.nn.relu(f + s) if order == "v1" else f + s, atol=1e-12)
  g = normal(3, y.shape, jnp.float64)
  (dx,) = vjp_block(g)
  g_sum = g * (f + s > 0) if order == "v1" else g  # the only thing between the sum and the output
  expected = vjp_shortcut(g_sum)[0] + vjp_branch(g_sum)[0]
  np.testing.assert_allclose(dx, expected, rtol=1e-10, atol=1e-12)
  if cin == filters * (4 if block_cls is Bottleneck else 1) and stride == 1 and order != "v1":
    # identity shortcut and nothing after the addition: dL/dx = g + J_F^T g, the error passed on undamped
    np.testing.assert_allclose(dx, g + vjp_branch(g)[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(vjp_shortcut(g)[0], g, rtol=0, atol=0)


@pytest.mark.parametrize("order", ["v1", "v2", "relu_before_add"])
def test_plain_twin_is_the_branch(order):
  block, variables, x = make_block(BasicBlock, order, 4, 8, stride=2, residual=False)
  assert "downsample_conv" not in variables["params"]
  f = _apply(block, variables, x, "branch")
  chex.assert_trees_all_close(_apply(block, variables, x), jax.nn.relu(f) if order == "v1" else f, atol=0)


def test_zero_init_last_bn_makes_the_block_its_shortcut():
  conv = functools.partial(nn.Conv, use_bias=False)
  norm = functools.partial(nn.BatchNorm, use_running_average=False)
  x = normal(0, (2, 6, 6, 8))
  for order in ("v2", "relu_before_add"):
    for block in (
      BasicBlock(8, conv=conv, norm=norm, order=order, zero_init_last=True),
      Bottleneck(2, conv=conv, norm=norm, order=order, zero_init_last=True),
    ):
      y, _ = block.init_with_output(INIT_KEY, x, mutable=True)
      chex.assert_trees_all_close(y, x, atol=0)


def test_option_a_shortcut():
  x = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float64).reshape(2, 5, 5, 3)
  s = option_a_shortcut(x, 6, 2)
  chex.assert_shape(s, (2, 3, 3, 6))
  np.testing.assert_array_equal(s[..., :3], x[:, ::2, ::2, :])
  assert not np.any(s[..., 3:])
  with pytest.raises(ModelError, match="cannot reduce channels"):
    option_a_shortcut(x, 2, 1)


def test_unknown_order_is_a_model_error():
  block = BasicBlock(4, conv=nn.Conv, norm=nn.BatchNorm, order="post")
  with pytest.raises(ModelError, match="block order 'post'"):
    block.init(INIT_KEY, jnp.zeros((1, 4, 4, 4)))


def test_literal_bottleneck_is_the_formula_and_affine_in_eval_mode():
  # F(x) = Conv1x1(BN(Conv3x3(BN(Conv1x1(x))))), y = F(x) + x: no ReLU, no BN after the last conv
  block, variables, x = make_block(Bottleneck, "literal_bottleneck", 8, 2, train=False)
  assert set(variables["params"]) == {"conv1", "bn1", "conv2", "bn2", "conv3"}
  p, s = variables["params"], variables["batch_stats"]

  def bn(name, h):
    # flax keeps the running statistics in float32 and takes rsqrt(var + eps) there; so does this reference
    return (h - s[name]["mean"]) * (jax.lax.rsqrt(s[name]["var"] + 1e-5) * p[name]["scale"]) + p[name]["bias"]

  def conv(name, h, pad):
    return jax.lax.conv_general_dilated(h, p[name]["kernel"], (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

  f = conv("conv3", bn("bn2", conv("conv2", bn("bn1", conv("conv1", x, "VALID")), ((1, 1), (1, 1)))), "VALID")
  y = _apply(block, variables, x)
  np.testing.assert_allclose(y, f + x, rtol=1e-12, atol=1e-12)
  # affine: y(a x1 + (1 - a) x2) = a y(x1) + (1 - a) y(x2); the v1 and ReLU-before-add blocks are not
  x2 = normal(5, x.shape, jnp.float64)
  mix = lambda b, v: (_apply(b, v, 0.3 * x + 0.7 * x2), 0.3 * _apply(b, v, x) + 0.7 * _apply(b, v, x2))
  np.testing.assert_allclose(*mix(block, variables), rtol=1e-12, atol=1e-12)
  for order in ("v1", "relu_before_add"):
    other, other_vars, _ = make_block(Bottleneck, order, 8, 2, train=False)
    a, b = mix(other, other_vars)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2 * float(jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("stride,cin", [(1, 8), (2, 4)])
def test_literal_bottleneck_has_v1_parameters_less_the_last_bn(stride, cin):
  def count(order, collection):
    _, variables, _ = make_block(Bottleneck, order, cin, 2, stride=stride)
    return sum(int(np.size(v)) for v in jax.tree.leaves(variables[collection])), variables

  n_lit, lit = count("literal_bottleneck", "params")
  n_v1, v1 = count("v1", "params")
  assert n_v1 - n_lit == 2 * 8  # gamma and beta of bn3 (4 * filters channels)
  assert ("downsample_bn" in lit["params"]) == ("downsample_bn" in v1["params"]) == (stride != 1)
  assert count("v1", "batch_stats")[0] - count("literal_bottleneck", "batch_stats")[0] == 2 * 8


def test_literal_bottleneck_zero_init_and_basic_block_error():
  conv = functools.partial(nn.Conv, use_bias=False)
  norm = functools.partial(nn.BatchNorm, use_running_average=False)
  x = normal(0, (2, 6, 6, 8))
  block = Bottleneck(2, conv=conv, norm=norm, order="literal_bottleneck", zero_init_last=True)
  y, variables = block.init_with_output(INIT_KEY, x, mutable=True)
  chex.assert_trees_all_close(y, x, atol=0)  # the last conv's kernel starts at 0: F(x) = 0
  assert not np.any(variables["params"]["conv3"]["kernel"])
  basic = BasicBlock(8, conv=conv, norm=norm, order="literal_bottleneck")
  with pytest.raises(ModelError, match="only for Bottleneck"):
    basic.init(INIT_KEY, x)


def test_literal_bottleneck_through_create_model():
  from resnet_jax import create_model

  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def count(**opts):
    v = jax.eval_shape(create_model("resnet50", num_classes=10, num_filters=4, **opts).init, INIT_KEY, x)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))

  # 16 blocks lose their last BN (gamma, beta) of 4 * filters channels: stages of 3, 4, 6, 3 blocks
  lost = 2 * 4 * 4 * (3 * 1 + 4 * 2 + 6 * 4 + 3 * 8)
  assert count() - count(block_order="literal_bottleneck") == lost
  with pytest.raises(ModelError, match="only for Bottleneck"):
    jax.eval_shape(create_model("resnet20", block_order="literal_bottleneck").init, INIT_KEY, x)


def test_relu_before_add_with_zero_last_gamma_gets_no_gradient_in_its_branch():
  # the branch ends in ReLU(BN(.)) with gamma = beta = 0: its output is 0 and relu'(0) = 0, so every branch
  # parameter, the last BN's gamma and beta included, receives exactly zero gradient
  conv = functools.partial(nn.Conv, use_bias=False)
  norm = functools.partial(nn.BatchNorm, use_running_average=False)
  x = normal(0, (2, 6, 6, 8))
  for block in (
    BasicBlock(8, conv=conv, norm=norm, order="relu_before_add", zero_init_last=True),
    Bottleneck(2, conv=conv, norm=norm, order="relu_before_add", zero_init_last=True),
  ):
    variables = block.init(INIT_KEY, x)
    loss = lambda p: jnp.sum(jnp.sin(block.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0]))
    grads = jax.grad(loss)(variables["params"])
    assert all(not np.any(g) for g in jax.tree.leaves(grads))
