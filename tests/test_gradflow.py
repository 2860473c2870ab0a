"""Claims of ``resnet_jax.gradient_flow`` and ``python experiments/gradient_flow.py``, checked on small cases.

- Through 50 sigmoid units the plain stack's input gradient is many orders of magnitude below the
  residual twin's, while the residual gradient stays within a small factor of the output's.
- The chunked, rescaled backward pass gives the same per-unit norms as one unchunked pass, and the
  hand-derived gradients equal ``jax.grad`` (float64).
- The per-unit Jacobians and their product equal ``jax.jacfwd`` of the stack; the measured per-unit
  decay matches the random-matrix prediction and never beats the spectral bound with sup sigmoid' = 1/4.
- CIFAR plain-56 vs ResNet-56 (BatchNorm, training mode): the plain net's block-input gradient grows
  far more from the last block to the first.
- The command writes results.json and both plots; bad flags give one error line and exit 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import gradient_flow, residual_unit
from resnet_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "gradient_flow.py")
_spec = importlib.util.spec_from_file_location("gradient_flow_script", SCRIPT)
script = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(script)


def _stack(depth: int, width: int = 8, hidden: int = 16, batch: int = 4, seed: int = 0):
  """float64 stack of the library's residual unit with N(0, 1) inputs and targets (call under x64)."""
  kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
  params = residual_unit.init_stack(kp, depth, width, hidden, dtype=jnp.float64)
  x = jax.random.normal(kx, (batch, width), jnp.float64)
  y = jax.random.normal(ky, (batch, width), jnp.float64)
  return params, x, y


@pytest.fixture(scope="module")
def depth50():
  """measure_mlp at depth 50, sigmoid, tiny width: records for the plain and the residual stack."""
  plain, res = gradient_flow.measure_mlp(50, width=8, hidden=16, activation="sigmoid", batch=4, seed=0)
  assert not jax.config.jax_enable_x64  # measured in float64, without leaving x64 on
  return {"plain": plain, "residual": res}


def test_plain_first_layer_gradient_orders_of_magnitude_below_residual(depth50):
  plain = depth50["plain"]["log10_input_grad"]
  res = depth50["residual"]["log10_input_grad"]
  assert len(plain) == len(res) == 51
  # Same weights and targets; 50 sigmoid units cost the plain stack dozens of orders of magnitude.
  assert res[0] - plain[0] > 20, (plain[0], res[0])
  assert plain[0] - plain[-1] < -20
  # The plain gradient shrinks at every unit going down; the per-unit factor is far below 1.
  assert np.all(np.diff(plain) > 0)
  assert depth50["plain"]["measured_factor"] < 0.25


def test_residual_gradients_stay_bounded(depth50):
  res = np.array(depth50["residual"]["log10_input_grad"])
  # Every unit's input gradient within a factor 10 of the output error dL/dy_hat.
  assert np.max(np.abs(res - res[-1])) < 1.0, res
  # The residual Jacobians I + J_l never drop below the identity's scale on average.
  assert 0.9 < depth50["residual"]["measured_factor"] < 1.1


def test_hand_derived_equals_jax_grad(depth50):
  for net in ("plain", "residual"):
    assert depth50[net]["max_rel_diff_vs_jax"] < 1e-10, depth50[net]["max_rel_diff_vs_jax"]


def test_measured_decay_matches_prediction_and_respects_bound(depth50):
  plain = depth50["plain"]
  # The random-matrix estimate q = ||W1||_F ||W2||_F rms(sigma') / sqrt(dim hidden) per unit...
  assert plain["measured_factor"] == pytest.approx(plain["predicted_typical_factor"], rel=0.35)
  # ...and no example can lose less than the spectral bound with sup sigmoid' = 1/4 allows.
  assert plain["measured_factor"] <= plain["predicted_bound_factor"]
  assert plain["jacobian_norm_factor"] <= plain["predicted_bound_factor"] * (1 + 1e-12)
  # The per-example product of Jacobians decays as the measured batch gradient does.
  assert plain["log10_jacobian_product_norm"] == pytest.approx(plain["log10_first_over_last"], abs=3.0)
  res = depth50["residual"]
  assert res["measured_factor"] == pytest.approx(res["predicted_typical_factor"], rel=0.1)


@pytest.mark.parametrize("residual_flag", [False, True])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_chunked_backward_equals_one_pass(residual_flag, activation):
  with jax.enable_x64(True):
    params, x, y = _stack(13)
    one = gradient_flow.stack_gradient_norms(params, x, y, residual_flag, activation, chunk=100, check=False)
    chunked = gradient_flow.stack_gradient_norms(params, x, y, residual_flag, activation, chunk=4, check=True)
    direct = residual_unit.manual_stack_grads(params, x, y, shortcut=residual_flag, activation=activation)
  np.testing.assert_allclose(chunked["log10_input_grad"], one["log10_input_grad"], atol=1e-9)
  np.testing.assert_allclose(chunked["log10_param_grad"], one["log10_param_grad"], atol=1e-9)
  expected = [math.log10(float(np.linalg.norm(np.asarray(g)))) for g in direct["inputs"]]
  np.testing.assert_allclose(one["log10_input_grad"][:-1], expected, atol=1e-12)
  assert chunked["max_rel_diff_vs_jax"] < 1e-10


def test_deep_plain_gradient_does_not_underflow():
  # 10^-100 and below would be 0 in float32 and, far enough down, in float64: the chunks carry the scale.
  with jax.enable_x64(True):
    params, x, y = _stack(120)
    g = gradient_flow.stack_gradient_norms(params, x, y, False, "sigmoid", check=False)
  v = np.array(g["log10_input_grad"])
  assert np.all(np.isfinite(v))
  assert v[0] < -100
  slope = np.diff(v)
  assert np.all(slope > 0)


@pytest.mark.parametrize("residual_flag", [False, True])
def test_jacobians_equal_jacfwd(residual_flag):
  with jax.enable_x64(True):
    params, x, _ = _stack(5, width=6, hidden=7, batch=3, seed=3)
    xs = gradient_flow.layer_inputs(params, x, residual_flag, "sigmoid")
    # One unit: J = W2 diag(sigma'(z)) W1 is d x_{l+1} / d x_l (minus I for the residual unit).
    f = lambda v: residual_unit.stack_forward(params[:1], v[None], shortcut=residual_flag, activation="sigmoid")[0]
    for b in range(3):
      full = jax.jacfwd(f)(x[b])
      j = gradient_flow.unit_jacobians(params[0], x[b : b + 1], "sigmoid")[0]
      chex.assert_trees_all_close(j + (jnp.eye(6) if residual_flag else 0), full, atol=1e-12)
    # The product over the stack, for example 0: the spectral norm of d x_L / d x_0.
    g = lambda v: residual_unit.stack_forward(params, v[None], shortcut=residual_flag, activation="sigmoid")[0]
    whole = jax.jacfwd(g)(x[0])
    expected = math.log10(float(jnp.linalg.norm(whole, 2)))
    assert gradient_flow.log10_product_norm(params, xs, residual_flag, "sigmoid") == pytest.approx(expected, abs=1e-9)


def test_sigma_prime_is_below_its_supremum():
  z = jnp.linspace(-8.0, 8.0, 401)
  for name, sup in gradient_flow.SIGMA_PRIME_SUP.items():
    d = residual_unit.sigma_prime(z, name)
    assert float(jnp.max(d)) <= sup + 1e-7
  assert float(residual_unit.sigma_prime(jnp.zeros(1), "sigmoid")[0]) == pytest.approx(0.25)


@pytest.mark.slow
def test_conv_plain56_gradient_grows_far_more_than_resnet56(depth50, tmp_path):
  records = gradient_flow.measure_conv(56, batch=2, size=8, seed=0)
  plain, res = records
  assert plain["model"] == "plain56" and res["model"] == "resnet56"
  assert len(plain["log10_block_input_grad"]) == len(res["log10_block_input_grad"]) == 27
  assert plain["blocks"][0].endswith("block00") and plain["blocks"][-1].endswith("block26")
  assert all(math.isfinite(v) for v in plain["log10_block_input_grad"] + res["log10_block_input_grad"])
  # BatchNorm keeps the plain net from vanishing, but its gradient explodes towards the input.
  assert plain["log10_first_over_last"] - res["log10_first_over_last"] > 2.0
  # The gradient plot gains a third panel for the conv nets.
  results = {
    "config": {"activation": "sigmoid", "width": 8, "hidden": 16, "batch": 4, "seed": 0},
    "mlp": [depth50["plain"], depth50["residual"]],
    "conv": records,
  }
  script.plot_grad_norms(results, str(tmp_path / "g.png"))
  assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_writes_results_and_plots(tmp_path, capsys):
  out = tmp_path / "gf"
  argv = [
    "--depths",
    "3,30",
    "--width",
    "4",
    "--hidden",
    "8",
    "--batch",
    "4",
    "--skip-conv",
    "--train-depths",
    "2",
    "--train-steps",
    "2",
    "--train-width",
    "8",
    "--train-hidden",
    "8",
    "--out",
    str(out),
  ]
  assert script.main(argv) == 0
  printed = capsys.readouterr().out
  results = json.loads((out / "results.json").read_text())
  assert [(r["depth"], r["net"]) for r in results["mlp"]] == [
    (3, "plain"),
    (3, "residual"),
    (30, "plain"),
    (30, "residual"),
  ]
  assert results["conv"] == []
  assert sorted((r["depth"], r["net"]) for r in results["train"]) == [(2, "plain"), (2, "residual")]
  for r in results["train"]:
    assert 0.0 <= r["train_error"] <= 1.0 and 0.0 <= r["test_error"] <= 1.0
  for name in ("grad_norms.png", "degradation.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  # The table shows what the json holds.
  r30 = results["mlp"][2]
  assert f"{r30['log10_input_grad'][0]:.2f}" in printed
  assert "Degradation" in printed and "CIFAR" not in printed


@pytest.mark.parametrize(
  "argv, fragment",
  [
    (["--depths", "0"], "--depths"),
    (["--depths", "a,b"], "--depths"),
    (["--activation", "gelu"], "--activation"),
    (["--width", "0"], "--width"),
    (["--conv-depths", "21"], "6n+2"),
    (["--train-steps", "-1"], "--train-steps"),
    (["--train-lr", "nan"], "--train-lr"),
    (["--no-such-flag"], "unrecognized"),
  ],
)
def test_bad_flags_raise_config_error(argv, fragment):
  with pytest.raises(ConfigError, match=fragment.replace("+", r"\+")):
    script.parse_args(argv)


def test_bad_flag_exits_2_with_one_line(tmp_path):
  proc = subprocess.run(
    [sys.executable, SCRIPT, "--activation", "gelu", "--out", str(tmp_path / "x")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "gelu" in lines[0]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "x").exists()


def test_explosion_and_block_orders_are_exclusive():
  with pytest.raises(ConfigError, match="at most one"):
    script.parse_args(["--explosion", "--block-orders"])


@pytest.mark.slow
def test_literal_bottleneck_network_is_affine_in_eval_mode():
  # resnet50 (num_filters 8) on the digits, 3 steps: from the first block's input to the logits, the
  # literal bottleneck stack is affine in evaluation mode (up to float32 rounding), the v1 stack is not.
  from resnet_jax.datasets import digits_split

  data = digits_split(seed=0)
  lit = script.train_block_order("literal_bottleneck", steps=3, data=data)
  v1 = script.train_block_order("v1", steps=3, data=data)
  assert lit["eval_nonlinearity"] < 1e-5 < 1e-2 < v1["eval_nonlinearity"]
  assert v1["parameters"] - lit["parameters"] == 2 * 4 * 8 * (3 * 1 + 4 * 2 + 6 * 4 + 3 * 8)


def test_xor_halves():
  x_tr, y_tr, x_te, y_te = script.xor_halves(n_train=400, n_test=100, seed=1)
  assert x_tr.shape == (400, 8, 8, 1) and x_te.shape == (100, 8, 8, 1) and x_tr.dtype == np.float32
  assert set(np.unique(y_tr)) == {0, 1} and 0.4 < y_tr.mean() < 0.6
  # rows 3-4 carry only noise, so no 3x3 patch sees both halves; the label is the sign of the product
  assert abs(float(x_tr[:, 3:5].std()) - 0.3) < 0.02
  top, bottom = x_tr[:, :3].mean(axis=(1, 2, 3)), x_tr[:, 5:].mean(axis=(1, 2, 3))
  assert np.mean((top * bottom > 0) == (y_tr == 1)) > 0.9


def test_batch_indices_reshuffle_when_a_permutation_runs_out():
  batches = script.batch_indices(np.random.default_rng(0), 10, 4, 5)
  assert [len(b) for b in batches] == [4] * 5
  # two batches per permutation of 10 (the last 2 examples dropped), then a fresh permutation
  for first, second in (batches[0:2], batches[2:4]):
    assert len(set(first) | set(second)) == 8
  assert np.array_equal(batches[0], np.random.default_rng(0).permutation(10)[:4])


def test_max_rel_error_is_the_worst_leaf_of_gradcheck_rel_error():
  a = {"w": np.array([1.0, 2.0]), "b": np.array([0.5])}
  b = {"w": np.array([1.0, 2.5]), "b": np.array([0.25])}
  assert gradient_flow.max_rel_error(a, b) == pytest.approx(max(0.5 / 2.5, 0.25 / 0.25))
  assert gradient_flow.max_rel_error(a, a) == 0.0


def test_digits_optimizer_is_the_library_sgd_after_clipping():
  params = {"w": jnp.array([3.0, 4.0])}
  grads = {"w": jnp.array([30.0, 40.0])}  # norm 50: clipped to norm 1
  tx = script.sgd_with_clipping(0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["w"]), [-0.06, -0.08], rtol=1e-6)
