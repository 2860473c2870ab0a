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
  y, dx = jax.jit(taps_pool_and_grad, static_argnums=(2, 3, 4))(x, g, k, s, pad)
  y_xla, dx_xla = xla_pool_and_grad(x, g, k, s, pad)
  chex.assert_trees_all_equal(y, y_xla)
  chex.assert_trees_all_equal(dx, dx_xla)


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
