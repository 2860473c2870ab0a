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
  norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=jnp.float64, param_dtype=jnp.float64)
  out = filters * (4 if block_cls is Bottleneck else 1)
  block = block_cls(filters, conv=conv, norm=norm, strides=stride, order=order, shortcut=shortcut,
                    projection=stride != 1 or in_features != out, residual=residual)
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
    (BasicBlock, 4, 4, 1, "B"),        # identity shortcut
    (Bottleneck, 8, 2, 1, "B"),        # identity shortcut
    (BasicBlock, 4, 8, 2, "B"),        # projection
    (BasicBlock, 4, 8, 2, "A"),        # option A
]


@pytest.mark.parametrize("order", ["v1", "v2", "relu_before_add"])
@pytest.mark.parametrize("config,train", [(c, True) for c in CONFIGS] + [(CONFIGS[1], False)],
                         ids=lambda c: f"{c[0].__name__}-{c[1]}to{c[2]}-s{c[3]}-{c[4]}" if isinstance(c, tuple)
                         else ("train" if c else "eval"))
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
    for block in (BasicBlock(8, conv=conv, norm=norm, order=order, zero_init_last=True),
                  Bottleneck(2, conv=conv, norm=norm, order=order, zero_init_last=True)):
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
