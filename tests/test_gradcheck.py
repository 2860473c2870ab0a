"""``python -m resnet_jax.gradcheck``: its table, its error measure, its exit codes."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import gradcheck, residual_unit
from resnet_jax.errors import run_cli

SMALL = ["--depth", "3", "--width", "3", "--hidden", "4", "--batch", "2"]


def test_rel_error_is_norm_wise():
  b = np.array([1.0, 1e-12, -2.0])
  a = b + np.array([0.0, 1e-12, 0.0])  # the tiny entry is off by 100%, the tensor by 5e-13
  assert gradcheck.abs_error(a, b) == pytest.approx(1e-12)
  assert gradcheck.rel_error(a, b, gradcheck.error_floor("float64")) == pytest.approx(5e-13)
  # all-zero reference: the floor keeps it finite, and equal zeros are no error
  assert gradcheck.rel_error(np.zeros(3), np.zeros(3), gradcheck.error_floor("float32")) == 0.0
  assert gradcheck.rel_error(np.full(2, 1e-40), np.zeros(2), 1e-31) == pytest.approx(1e-9)
  assert gradcheck.error_floor("float32") == pytest.approx(np.finfo(np.float32).tiny / np.finfo(np.float32).eps)


def test_autodiff_stack_grads_has_manual_layout():
  with jax.enable_x64(True):
    params = residual_unit.init_stack(jax.random.PRNGKey(0), 3, 3, 4, jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    y = jnp.zeros((2, 3))
    auto = gradcheck.autodiff_stack_grads(params, x, y, True, "relu")
    manual = residual_unit.manual_stack_grads(params, x, y, True, "relu")
    assert len(auto["inputs"]) == len(manual["inputs"]) == 3
    for l in range(3):
      assert gradcheck.rel_error(manual["inputs"][l], auto["inputs"][l], 1e-292) < 1e-12
    assert gradcheck.rel_error(manual["x"], auto["x"], 1e-292) < 1e-12


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_main_passes_and_prints_table(dtype, capsys):
  assert gradcheck.main(SMALL + ["--dtype", dtype, "--activation", "tanh"]) == 0
  out = capsys.readouterr().out
  for model in ("unit", "residual stack", "plain stack"):
    for name in ("w1", "b1", "w2", "b2", "x"):
      assert any(
        line.startswith(model) and f" {name}" in line and line.endswith("PASS") for line in out.splitlines()
      ), (model, name, out)
  assert "x_l (3 inputs)" in out
  assert f"{gradcheck.DEFAULT_RTOL[dtype]:.0e}" in out
  assert "PASS: all 17 gradients within tolerance" in out


@pytest.fixture
def plain_w1_off_by_1e8(monkeypatch):
  """manual_stack_grads with a relative error of 1e-8 in the first unit's w1 of the plain stack."""
  real = residual_unit.manual_stack_grads

  def off_by_a_little(params, x, y, shortcut=True, activation="sigmoid"):
    g = real(params, x, y, shortcut, activation)
    if not shortcut:
      g["params"][0]["w1"] = g["params"][0]["w1"] * (1 + 1e-8)
    return g

  monkeypatch.setattr(residual_unit, "manual_stack_grads", off_by_a_little)


def test_main_fails_on_a_wrong_gradient(plain_w1_off_by_1e8, capsys):
  """The early unit of the plain stack has the smallest gradients; its error is still caught."""
  assert gradcheck.main(SMALL) == 1
  out = capsys.readouterr().out
  fails = [line for line in out.splitlines() if line.endswith("FAIL")]
  assert len(fails) == 1 and fails[0].startswith("plain stack") and "w1" in fails[0]
  assert "FAIL: 1 of 17 gradients exceed their tolerance" in out


def test_rtol_option_sets_the_tolerance(plain_w1_off_by_1e8, capsys):
  assert gradcheck.main(SMALL + ["--rtol", "1e-6"]) == 0
  out = capsys.readouterr().out
  assert out.count("1e-06  PASS") == 17


@pytest.mark.parametrize(
  "argv,needle",
  [
    (["--depth", "0"], "--depth: expected a positive integer, got '0'"),
    (["--width", "x"], "--width/--dim: expected a positive integer, got 'x'"),
    (["--activation", "selu"], "invalid choice: 'selu'"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--rtol", "-1"], "--rtol: expected a positive number, got '-1'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
  ],
)
def test_bad_option_is_one_error_line(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    run_cli(gradcheck.main, argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_command_line():
  ok = subprocess.run(
    [sys.executable, "-m", "resnet_jax.gradcheck", *SMALL, "--activation", "relu"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert ok.returncode == 0, ok.stderr
  assert "max abs diff" in ok.stdout and "max rel diff" in ok.stdout and "tolerance" in ok.stdout
  assert ok.stdout.count("PASS") == 18  # 17 rows and the summary line
  bad = subprocess.run(
    [sys.executable, "-m", "resnet_jax.gradcheck", "--batch", "-3"], capture_output=True, text=True, timeout=300
  )
  assert bad.returncode == 2
  assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ") and "--batch" in bad.stderr
  assert "Traceback" not in bad.stderr and bad.stdout == ""
