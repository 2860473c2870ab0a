"""The hand-written BasicBlock backward pass (training mode) against jax.grad, in float64."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_jax.block_backward import basic_block_backward, basic_block_forward, conv, conv_backward
from resnet_jax.blocks import BasicBlock
from tests.test_blocks import make_block, normal


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def flax_grads(block, variables, x, delta):
  """jax.grad of sum(delta * block(x)) in training mode, w.r.t. params and x."""

  def loss(params, x):
    y, _ = block.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(delta * y)

  gp, gx = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
  return {"params": gp, "x": gx}


@pytest.mark.parametrize("order", ["v1", "v2", "relu_before_add"])
@pytest.mark.parametrize(
  "cin,filters,stride,shortcut,residual",
  [
    (4, 4, 1, "B", True),  # identity shortcut
    (4, 6, 2, "B", True),  # projection (1x1 conv + BN; from the pre-activation in v2)
    (4, 6, 2, "A", True),  # option A: strided identity, zero-padded channels
    (4, 6, 2, "B", False),  # plain twin
  ],
)
def test_hand_written_backward_matches_jax_grad(order, cin, filters, stride, shortcut, residual):
  block, variables, x = make_block(BasicBlock, order, cin, filters, stride, shortcut, residual)
  y_flax, _ = block.apply(variables, x, mutable=["batch_stats"])
  y, _ = basic_block_forward(variables["params"], x, stride, order, residual=residual)
  np.testing.assert_allclose(y, y_flax, rtol=1e-12, atol=1e-12)
  delta = normal(7, y.shape, jnp.float64)
  ours = basic_block_backward(variables["params"], x, delta, stride, order, residual=residual)
  chex.assert_trees_all_equal_structs(ours["params"], variables["params"])
  chex.assert_trees_all_close(ours, flax_grads(block, variables, x, delta), rtol=1e-10, atol=1e-10)


@settings(max_examples=4)
@given(
  seed=st.integers(0, 2**31 - 1),
  size=st.integers(3, 9),
  stride=st.sampled_from([1, 2]),
  pad=st.sampled_from([0, 1]),
  k=st.sampled_from([1, 3]),
)
def test_conv_backward_matches_vjp(seed, size, stride, pad, k):
  with jax.enable_x64(True):
    x = normal(seed, (2, size, size + 1, 3), jnp.float64)
    w = normal(seed + 1, (k, k, 3, 5), jnp.float64)
    y, vjp = jax.vjp(lambda x, w: conv(x, w, stride, pad), x, w)
    delta = normal(seed + 2, y.shape, jnp.float64)
    chex.assert_trees_all_close(conv_backward(x, w, delta, stride, pad), vjp(delta), rtol=1e-10, atol=1e-10)


@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 10.0))
def test_hand_written_backward_on_random_values(seed, scale):
  with jax.enable_x64(True):
    block, variables, _ = make_block(BasicBlock, "v1", 4, 4)
    x = normal(seed, (2, 7, 7, 4), jnp.float64, scale)
    delta = normal(seed + 1, (2, 7, 7, 4), jnp.float64)
    ours = basic_block_backward(variables["params"], x, delta)
    chex.assert_trees_all_close(ours, flax_grads(block, variables, x, delta), rtol=1e-9, atol=1e-9)
