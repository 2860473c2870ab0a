"""``resnet_jax.pooling.max_pool``: XLA's max-pool forward and gradient, the gradient computed from the taps."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from resnet_jax.pooling import max_pool


def xla_pool_and_grad(x, g, window, strides, padding):
  f = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)  # noqa: E731
  y, vjp = jax.vjp(f, x)
  return y, vjp(g)[0]


def taps_pool_and_grad(x, g, window, strides, padding):
  y, vjp = jax.vjp(lambda x: max_pool(x, window, strides, padding), x)
  return y, vjp(g)[0]


def assert_equal_to_xla(x, g, window, strides, padding):
  """max_pool's value and gradient, jitted, bit for bit those of ``nn.max_pool``; returns the gradient."""
  y, dx = jax.jit(taps_pool_and_grad, static_argnums=(2, 3, 4))(x, g, window, strides, padding)
  y_xla, dx_xla = xla_pool_and_grad(x, g, window, strides, padding)
  chex.assert_trees_all_equal(y, y_xla)
  chex.assert_trees_all_equal(dx, dx_xla)
  return dx


@given(
  n=st.integers(1, 2),
  h=st.integers(3, 9),
  w=st.integers(3, 9),
  c=st.integers(1, 3),
  k=st.sampled_from([(3, 3), (2, 2), (3, 2)]),
  s=st.sampled_from([(2, 2), (1, 1), (2, 1)]),
  pad=st.sampled_from([((1, 1), (1, 1)), ((0, 0), (0, 0)), ((1, 0), (0, 1))]),
  ties=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_gradient_equals_xla_select_and_scatter(n, h, w, c, k, s, pad, ties, seed):
  """Integer-valued inputs (many ties) and gradients, so the sums are exact and must agree bit for bit."""
  rng = np.random.default_rng(seed)
  x = rng.integers(-2, 3, (n, h, w, c)) if ties else rng.standard_normal((n, h, w, c))
  x = jnp.asarray(x, jnp.float32)
  y_ref = nn.max_pool(x, k, strides=s, padding=pad)
  g = jnp.asarray(rng.integers(-4, 5, y_ref.shape), jnp.float32)
  assert_equal_to_xla(x, g, k, s, pad)


def test_stem_pool_of_real_valued_activations_matches_xla():
  """The ResNet stem's 3x3/2 pool (pad 1) on float activations: same values, gradients to rounding."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  args = ((3, 3), (2, 2), ((1, 1), (1, 1)))
  y, dx = taps_pool_and_grad(x, g, *args)
  y_xla, dx_xla = xla_pool_and_grad(x, g, *args)
  chex.assert_trees_all_equal(y, y_xla)
  chex.assert_trees_all_close(dx, dx_xla, atol=1e-6)
  assert int((dx != 0).sum()) > 0


@given(
  n=st.integers(1, 2),
  rows=st.integers(1, 4),
  cols=st.integers(1, 4),
  c=st.integers(1, 3),
  k=st.sampled_from([(2, 2), (3, 3), (2, 3), (1, 2)]),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
  seed=st.integers(0, 2**16),
)
def test_gradient_of_windows_that_tile_the_input_equals_xla(n, rows, cols, c, k, dtype, seed):
  """Windows equal to their strides, without padding, on sides they divide: the gradient of the blocked
  view (ResNet9's 2x2 pools). Ties in most windows, in float32 and bfloat16: XLA's first tap, bit for bit."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(-2, 3, (n, rows * k[0], cols * k[1], c)), dtype)
  g = jnp.asarray(rng.integers(-4, 5, (n, rows, cols, c)), dtype)
  assert assert_equal_to_xla(x, g, k, k, ((0, 0), (0, 0))).dtype == dtype


def test_windows_that_do_not_tile_the_input_leave_the_remainder_without_gradient():
  """2x2 windows, stride 2, on 5x7: the last row and column are in no window and get no gradient."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 7, 3)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 2, 3, 3)), jnp.float32)
  dx = assert_equal_to_xla(x, g, (2, 2), (2, 2), ((0, 0), (0, 0)))
  assert not np.any(np.asarray(dx[:, 4, :, :])) and not np.any(np.asarray(dx[:, :, 6, :]))
