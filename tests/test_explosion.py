"""Vanishing and explosion over the weight gain (resnet_jax.explosion, ``experiments/gradient_flow.py --explosion``).

- The measured gradient equals the library's hand-derived, jax.grad-checked stack gradients.
- The three predictions bound the measurement in order: measured <= ||prod M_l||_2 <= sum log10 ||M_l||_2,
  and the product norm equals the spectral norm of jax.jacfwd of the whole stack (also with BatchNorm).
- What the shortcut guarantees: the error from above passes each unit undamped (g M = g + g J); what it
  does not: at gain 3 the ReLU residual stack explodes like the plain one. The remedies: a zero last BN
  gamma makes every factor I, a 1/L branch keeps the product bounded, BN tames the residual stack.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gradflow import script  # experiments/gradient_flow.py

from resnet_jax import explosion, gradient_flow
from resnet_jax.errors import ConfigError


def _data(batch=8, width=8, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed + 1))
  with jax.enable_x64(True):
    return (jax.random.normal(kx, (batch, width), jnp.float64), jax.random.normal(ky, (batch, width), jnp.float64))


def _params(depth, gain, width=8, hidden=16, branch_scale=1.0):
  with jax.enable_x64(True):
    return explosion.stack_params(jax.random.key(0), depth, width, hidden, gain, branch_scale)


@pytest.mark.parametrize("activation,gain", [("relu", 3.0), ("sigmoid", 1.0), ("tanh", 2.0)])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_measured_equals_hand_derived_stack_gradients(activation, gain, residual):
  params = _params(30, gain)
  x, y = _data()
  m = explosion.measure(params, x, y, activation, residual, jacobians=False)
  with jax.enable_x64(True):
    ref = gradient_flow.stack_gradient_norms(params, x, y, residual, activation, chunk=10)
  ref_log = np.array(ref["log10_input_grad"])
  np.testing.assert_allclose(m["log10_grad"], ref_log - ref_log[-1], atol=1e-9)
  assert ref["max_rel_diff_vs_jax"] < 1e-10
  assert m["log10_bound"] is None


@pytest.mark.parametrize(
  "residual,norm,gamma", [(False, False, 1.0), (True, False, 1.0), (False, True, 1.0), (True, True, 1.0)]
)
def test_product_norm_is_the_stack_jacobian_and_predictions_are_ordered(residual, norm, gamma):
  depth, batch, width = 6, 3, 4
  params = _params(depth, 2.0, width=width, hidden=5)
  x, y = _data(batch, width)
  m = explosion.measure(params, x, y, "tanh", residual, norm, gamma)
  with jax.enable_x64(True):

    def stack(v):
      v = v.reshape(batch, width)
      for p in params:
        v = explosion.unit(p, v, "tanh", residual, norm, gamma)
      return v.reshape(-1)

    full = np.asarray(jax.jacfwd(stack)(x.reshape(-1)))
  np.testing.assert_allclose(m["log10_product"][0], np.log10(np.linalg.norm(full, 2)), atol=1e-9)
  grad, prod, bound = (np.array(m[k]) for k in ("log10_grad", "log10_product", "log10_bound"))
  assert np.all(grad <= prod + 1e-9) and np.all(prod <= bound + 1e-9), (grad, prod, bound)
  assert grad[-1] == prod[-1] == bound[-1] == 0.0


def test_the_shortcut_passes_the_error_undamped():
  # dL/dx_l = g + g J_l: the identity term is there whatever the branch does (any gain, BN or not)
  p = _params(1, 4.0)[0]
  x, _ = _data()
  g = _data(seed=5)[0]
  with jax.enable_x64(True):
    for norm in (False, True):
      _, vjp_res = jax.vjp(lambda v: explosion.unit(p, v, "relu", True, norm), x)
      _, vjp_branch = jax.vjp(lambda v: explosion.unit(p, v, "relu", False, norm), x)
      np.testing.assert_allclose(vjp_res(g)[0], g + vjp_branch(g)[0], rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def relu_gain3():
  x, y = _data()
  out = {}
  for name, residual, norm, gamma, scale in explosion.REMEDIES:
    params = _params(40, 3.0, branch_scale=1 / 40 if scale is None else scale)
    out[name] = explosion.measure(params, x, y, "relu", residual, norm, gamma)
  out["plain gain 1"] = explosion.measure(_params(40, 1.0), x, y, "relu", False)
  return out


def test_vanishing_and_explosion(relu_gain3):
  assert relu_gain3["plain gain 1"]["log10_grad"][0] < -15  # default init: vanishes
  assert relu_gain3["plain"]["log10_grad"][0] > 8  # x3 weights: explodes
  assert relu_gain3["residual"]["log10_grad"][0] > 8  # and the shortcut does not stop it
  assert relu_gain3["residual"]["log10_forward"] > 8  # the signal itself explodes too


def test_remedies(relu_gain3):
  zero = relu_gain3["residual + BN, last gamma 0"]
  assert all(abs(v) < 1e-12 for k in ("log10_grad", "log10_product", "log10_bound") for v in zero[k])  # M_l = I
  small = relu_gain3["residual, branch x 1/L"]
  assert abs(small["log10_grad"][0]) < 1 and small["log10_product"][0] < 1.5
  bn = relu_gain3["residual + BN"]["log10_grad"][0]
  assert bn < relu_gain3["residual"]["log10_grad"][0] - 5 and bn < relu_gain3["plain + BN"]["log10_grad"][0]
  assert relu_gain3["plain + BN"]["log10_grad"][0] > 1  # BN alone: the plain net still explodes


def test_cli_explosion_mode(tmp_path, capsys):
  out = tmp_path / "ex"
  argv = [
    "--explosion",
    "--gains",
    "3",
    "--explosion-depths",
    "2,3",
    "--width",
    "4",
    "--hidden",
    "5",
    "--explosion-batch",
    "3",
    "--out",
    str(out),
  ]
  assert script.main(argv) == 0
  printed = capsys.readouterr().out
  results = json.loads((out / "explosion.json").read_text())
  nets = {(r["activation"], r["gain"], r["net"]) for r in results["explosion"]}
  assert len(nets) == 3 * 2 + len(explosion.REMEDIES) - 2
  assert {r["depth"] for r in results["explosion"]} == {2, 3}
  assert all(("profile" in r) == (r["depth"] == 3) for r in results["explosion"])
  assert (out / "explosion.png").read_bytes()[:4] == b"\x89PNG"
  assert not (out / "results.json").exists()  # the main study is not re-run
  r = results["explosion"][0]
  assert f"{r['log10_first_over_last']:.2f}" in printed


@pytest.mark.parametrize(
  "argv, fragment",
  [
    (["--gains", "0"], "--gains"),
    (["--gains", "x"], "--gains"),
    (["--explosion-depths", "0"], "--explosion-depths"),
    (["--explosion-batch", "1"], "--explosion-batch"),
    (["--remedy-gain", "-1"], "--remedy-gain"),
  ],
)
def test_bad_explosion_flags(argv, fragment):
  with pytest.raises(ConfigError, match=fragment):
    script.parse_args(argv)
