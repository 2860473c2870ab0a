"""Smoke tests of ``benchmarks/bench.py`` on a tiny CIFAR ResNet: it runs, prints its table, writes JSON,
with and without ``--compare-torch``, and reports user errors as one line with exit status 2.

No timing assertions: the machine running the tests is shared, so only the structure of the output is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench.py")
COMMON = ["--batch", "2", "--size", "8", "--repeats", "2", "--warmup", "1", "--min-repeat-seconds", "0"]
TINY = ["--model", "resnet20", *COMMON]
MLP = ["--model", "residual_mlp", *COMMON]  # compiles in a few seconds


def run_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, BENCH, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
  )


def test_bench_jax_only_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  p = run_bench(*MLP, "--mode", "both", "--cpu-conv", "eigen", "--json", str(out))
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert res["config"]["model"] == "residual_mlp" and res["config"]["batch"] == 2
  assert "xla_cpu_experimental_ynn_fusion_type" in res["machine"]["xla_flags"]
  jax_res = res["jax"]
  assert jax_res["params"] > 0
  for mode in ("train", "infer"):
    assert jax_res[mode]["images_per_s"] > 0
    assert len(jax_res[mode]["all_seconds_per_step"]) == 2
    assert jax_res[mode]["compile_s"] > 0 and jax_res[mode]["peak_rss_mb"] > 0
  assert jax_res["train"]["first_step_s"] >= jax_res["train"]["compile_s"]
  assert jax_res["forward_flops_per_image"] > 0
  assert res["utilisation"]["train_flops_per_image"] == pytest.approx(3 * jax_res["forward_flops_per_image"])
  assert "torch" not in res
  assert "jax (float32)" in p.stdout and "compile" in p.stdout
  # --host-memory auto (the default): 2 images of 8x8 are far below a step worth keeping host memory for.
  assert res["config"]["host_memory"] == "auto" and res["config"]["host_memory_kept"] is False
  assert "host memory default" in p.stdout.splitlines()[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_bench_keeps_host_memory_for_a_step_of_cifar_size(tmp_path):
  out = tmp_path / "bench.json"
  args = ["--model", "residual_mlp", "--batch", "64", "--size", "32", "--repeats", "1", "--warmup", "1"]
  p = run_bench(*args, "--mode", "train", "--min-repeat-seconds", "0", "--json", str(out))
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert res["config"]["host_memory_kept"] is True and "host memory kept" in p.stdout.splitlines()[0]


@pytest.mark.slow
def test_bench_compare_torch_reports_ratios(tmp_path):
  """A BatchNorm model (its statistics are updated by the step), with PyTorch measured in the same run."""
  out = tmp_path / "bench.json"
  p = run_bench(*TINY, "--mode", "train", "--compare-torch", "--json", str(out))
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert "ynn" not in res["machine"]["xla_flags"]
  assert "infer" not in res["jax"] and res["jax"]["train"]["images_per_s"] > 0
  assert res["jax"]["train"]["cpu_seconds_per_step"] > 0
  for fmt in ("channels_last", "contiguous"):
    torch_ips = res["torch"][fmt]["train"]["images_per_s"]
    assert torch_ips > 0
    assert res["ratios"][fmt]["train"] == pytest.approx(res["jax"]["train"]["images_per_s"] / torch_ips)
  assert "ratio jax/torch channels_last" in p.stdout


def jax_parameter_count(name: str, num_classes: int, size: int, **options) -> int:
  """How many parameters ``create_model(name, num_classes, **options)`` has (shapes only, nothing computed)."""
  import jax

  from resnet_jax import create_model
  from resnet_jax.train_step import count_parameters

  model = create_model(name, num_classes=num_classes, **options)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32)))
  return count_parameters(shapes["params"])


def test_torch_counterparts_match_parameter_counts():
  """The PyTorch models compared against have the same number of parameters as the JAX ones."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import torch_models
  finally:
    sys.path.pop(0)

  for name, classes, size in (("resnet20", 10, 8), ("plain20", 10, 8), ("resnet18", 7, 32), ("resnet9", 10, 32)):
    assert torch_models.has_counterpart(name)
    n_jax = jax_parameter_count(name, classes, size)
    n_torch = sum(p.numel() for p in torch_models.create_torch_model(name, classes).parameters())
    assert n_jax == n_torch, name
  assert not torch_models.has_counterpart("residual_mlp")
  # Widths: ResNet-9 at half width (configs/cifar10_resnet9.py); the other PyTorch nets have theirs fixed.
  n_jax = jax_parameter_count("resnet9", 10, 32, num_filters=32)
  n_torch = sum(p.numel() for p in torch_models.create_torch_model("resnet9", 10, num_filters=32).parameters())
  assert n_jax == n_torch == 1_646_112
  assert torch_models.has_counterpart("resnet9", num_filters=True)
  assert not torch_models.has_counterpart("resnet20", num_filters=True)
  with pytest.raises(ValueError, match="resnet20 has a fixed width"):
    torch_models.create_torch_model("resnet20", 10, num_filters=8)


def test_bench_unknown_model_is_one_line_error():
  p = run_bench("--model", "resnet21", "--mode", "infer")
  assert p.returncode == 2
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: unknown model 'resnet21'")
  assert "resnet20" in lines[0]


def test_bench_compare_torch_without_torch_is_one_line_error(tmp_path):
  # A module directory that shadows torch with one that fails to import, as on a machine without torch.
  (tmp_path / "torch").mkdir()
  (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
  p = run_bench(*MLP, "--compare-torch", env={"PYTHONPATH": str(tmp_path)})
  assert p.returncode == 2
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and "--compare-torch needs torch" in lines[0] and "pip install" in lines[0]


def test_bench_bad_value_is_one_line_error():
  p = run_bench(*MLP, "--batch", "0")
  assert p.returncode == 2 and p.stderr.strip().startswith("error: --batch must be at least 1")
  p = run_bench(*MLP, "--num-filters", "0")
  assert p.returncode == 2 and p.stderr.strip().startswith("error: --num-filters must be at least 1")
  p = run_bench(*MLP, "--num-filters", "8")
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1 and "residual_mlp has no num_filters option" in lines[0]
  p = run_bench(*MLP, "--profile", "-1")
  assert p.returncode == 2 and p.stderr.strip().startswith("error: --profile must be >= 0")
  p = run_bench(*MLP, "--profile", "2", "--mode", "infer")
  assert p.returncode == 2 and p.stderr.strip().startswith("error: --profile traces training steps")
  p = run_bench(*TINY, "--compare-batch-norm", "--mode", "infer")
  assert p.returncode == 2 and p.stderr.strip().startswith("error: --compare-batch-norm times training steps")
  p = run_bench(*MLP, "--compare-batch-norm", "--mode", "train")
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1 and "residual_mlp has no BatchNorm to compare" in lines[0]


def test_bench_num_filters_sets_the_models_width(tmp_path):
  """``--num-filters``: the model's width option, named on the first line and kept in the JSON."""
  out = tmp_path / "bench.json"
  p = run_bench("--model", "resnet9", *COMMON, "--num-filters", "4", "--mode", "infer", "--json", str(out))
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert res["config"]["num_filters"] == 4 and "resnet9 (num_filters=4): batch 2" in p.stdout.splitlines()[0]
  narrow, full = jax_parameter_count("resnet9", 10, 8, num_filters=4), jax_parameter_count("resnet9", 10, 8)
  assert res["jax"]["params"] == narrow < full


def _import_bench():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import bench
  finally:
    sys.path.pop(0)
  return bench


HLO = """HloModule jit_train_step

%fused_conv (p0: f32[2,4,4,3], p1: f32[3,3,3,8]) -> f32[2,4,4,8] {
  %p0 = f32[2,4,4,3]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,3,8]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[2,4,4,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}
}

%fused_add (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %add.2 = f32[8]{0} add(%p0, %p0)
}

ENTRY %main.9 (x: f32[2,4,4,3], w: f32[3,3,3,8]) -> (f32[2,4,4,8], f32[8]) {
  %x = f32[2,4,4,3]{3,2,1,0} parameter(0)
  %w = f32[3,3,3,8]{3,2,1,0} parameter(1)
  %ffi_call.3 = f32[2,4,4,8]{3,2,1,0} custom-call(%x, %w), custom_call_target="resnet_jax_onednn_conv2d", \
metadata={op_name="jit(train_step)/jvp(ResNet)/conv1/ffi_call"}
  %ynn_fusion.4 = f32[2,4,4,8]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_conv
  %add_fusion.5 = f32[8]{0} fusion(%w), kind=kLoop, calls=%fused_add, \
metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/bn1/add"}
  %multiply.6 = f32[8]{0} multiply(%add_fusion.5, %add_fusion.5), metadata={op_name="jit(train_step)/mul"}
  ROOT %tuple.7 = (f32[2,4,4,8]{3,2,1,0}, f32[8]{0}) tuple(%ffi_call.3, %multiply.6)
}
"""


def test_hlo_operations_sorts_a_programs_operations_by_kind_and_pass():
  ops = _import_bench().hlo_operations(HLO)
  assert ops["ffi_call.3"] == {"kind": "convolution", "pass": "forward", "group": "ffi_call"}
  # A fusion is a convolution when the computation it calls holds one; no source location: unattributed.
  assert ops["ynn_fusion.4"] == {"kind": "convolution", "pass": "unattributed", "group": "ynn_fusion"}
  assert ops["add_fusion.5"] == {"kind": "other", "pass": "backward", "group": "add_fusion"}
  assert ops["multiply.6"] == {"kind": "other", "pass": "update", "group": "multiply"}
  assert ops["convolution.1"]["kind"] == "convolution" and ops["add.2"]["kind"] == "other"


def test_bench_profile_splits_the_training_steps_time_by_operation(tmp_path):
  out = tmp_path / "bench.json"
  p = run_bench(*TINY, "--mode", "train", "--profile", "2", "--json", str(out))
  assert p.returncode == 0, p.stderr
  prof = json.loads(out.read_text())["jax"]["train"]["profile"]
  assert prof["steps"] == 2 and prof["wall_ms_per_step"] > 0 and prof["busy_ms_per_step"] > 0
  # Each table splits the same operations' time: every one adds up to the total.
  for table in ("kind", "pass", "pass_kind", "group"):
    assert sum(prof[table].values()) == pytest.approx(prof["busy_ms_per_step"], rel=1e-6)
  assert set(prof["kind"]) == {"convolution", "other"} and prof["kind"]["convolution"] > 0
  assert {"forward", "backward"} <= set(prof["pass"]) <= {"forward", "backward", "update", "unattributed"}
  assert list(prof["group"].values()) == sorted(prof["group"].values(), reverse=True)
  assert "profile of 2 training steps" in p.stdout and "longest operations" in p.stdout


def test_bench_compare_batch_norm_times_both_steps_and_reports_their_ratio(tmp_path):
  out = tmp_path / "bench.json"
  p = run_bench(*TINY, "--mode", "train", "--compare-batch-norm", "--json", str(out))
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  flax_bn, rule = res["jax"]["train"], res["jax"]["batch_norm_rule"]
  for step in (flax_bn, rule):
    assert step["images_per_s"] > 0 and len(step["all_seconds_per_step"]) == 2 and step["compile_s"] > 0
  assert res["batch_norm_rule_ratio"] == pytest.approx(rule["images_per_s"] / flax_bn["images_per_s"])
  assert "jax, BatchNorm with its own rule" in p.stdout and "ratio rule/flax BatchNorm" in p.stdout


def test_cifar_models_are_read_from_the_model_registry():
  from resnet_jax import list_models

  bench = _import_bench()
  cifar = {name for name in list_models() if bench.is_cifar_model(name)}
  expected = {f"{kind}{depth}" for kind in ("resnet", "preact_resnet", "plain") for depth in (20, 32, 44, 56, 110)}
  assert cifar == expected | {"resnet9"}


@pytest.mark.parametrize("name", ["sgd", "nesterov"])
def test_torch_optimizer_makes_the_updates_of_the_training_optimizer(name):
  """``--compare-torch`` (sgd) and ``experiments/torch_reference.py`` (sgd, nesterov) run PyTorch with the
  optimizer train.py builds: three steps of both from the same parameters and gradients (a kernel, which
  gets weight decay, and a bias, which does not) agree. (The decay moves the kernel by about 1e-4 of its
  size over three steps, 100 times the relative tolerance; jax computes in float32.)"""
  import argparse

  import numpy as np
  import optax
  import torch

  from resnet_jax import optim

  bench = _import_bench()
  config = bench.bench_config(
    argparse.Namespace(model="resnet20", dtype="float32", conv_backend="xla", num_filters=None)
  )
  config.optimizer.name = name
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))}
  grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
  tx = optim.make_optimizer(config, optax.constant_schedule(float(config.optimizer.learning_rate)))
  state, jax_params = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)
  module = torch.nn.Module()
  for k, v in params.items():
    module.register_parameter(k, torch.nn.Parameter(torch.tensor(v)))
  if name == "sgd":
    opt = bench.torch_optimizer(module, config)
  else:
    opt = bench.torch_models.torch_sgd(module, config.optimizer)
  for g in grads:
    for k, v in g.items():
      getattr(module, k).grad = torch.tensor(v)
    opt.step()
  for k in params:
    np.testing.assert_allclose(getattr(module, k).detach().numpy(), np.asarray(jax_params[k]), rtol=1e-6, atol=1e-7)


def test_matmul_flops_counts_convolutions_and_dense_layers_by_hand():
  import jax
  import jax.numpy as jnp

  bench = _import_bench()

  def f(x, k, w):  # 3x3 conv, stride 2, 3 -> 5 channels on 2x9x9; a dense layer 5 -> 4 under a nested jit
    y = jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.jit(lambda a: a.mean(axis=(1, 2)) @ w)(y)

  args = (jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 5)), jnp.ones((5, 4)))
  conv = 2 * (2 * 5 * 5 * 5) * (3 * 3 * 3)  # 2 x output elements x MACs per output
  dense = 2 * (2 * 4) * 5
  assert bench.matmul_flops(jax.make_jaxpr(f)(*args)) == conv + dense


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_matmul_flops_of_imagenet_models_equal_the_published_counts(name):
  """Forward multiply-adds at 224x224 equal torchvision's published GFLOPS (which count MACs)."""
  import jax
  import jax.numpy as jnp

  from resnet_jax import create_model

  bench = _import_bench()
  model = create_model(name)
  x = jnp.zeros((1, 224, 224, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  flops = bench.matmul_flops(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x))
  assert flops / 2e9 == pytest.approx(bench.REFERENCE_GMACS_224[name], rel=1e-3)


def test_conv_ops_times_every_backend_and_writes_json(tmp_path):
  out = tmp_path / "ops.json"
  p = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "benchmarks", "conv_ops.py"),
      "--shapes",
      "2,6,4",
      "--repeats",
      "1",
      "--min-seconds",
      "0",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert res["backends"] == ["xla", "onednn", "torch"]
  gflops = res["gflops"]["2,6,4"]
  assert set(gflops) == {f"{b}.{p}" for b in ("xla", "onednn", "torch") for p in ("fwd", "dx", "dW")}
  assert all(v > 0 for v in gflops.values())
  assert "| 2, 6, 4 |" in p.stdout


@pytest.mark.parametrize("args,needle", [(["--shapes", "1,2"], "B,H,C"), (["--backends", "mkl"], "mkl")])
def test_conv_ops_bad_arguments_are_one_line(args, needle):
  p = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", "conv_ops.py"), *args],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.startswith("error: ") and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_onednn_backend_counts_the_same_flops(tmp_path):
  """--conv-backend onednn runs, labels its row, and counts the model's FLOPs (its convolutions are custom calls)."""
  import jax
  import jax.numpy as jnp

  from resnet_jax import create_model

  out = tmp_path / "bench.json"
  p = run_bench(*TINY, "--mode", "train", "--conv-backend", "onednn", "--json", str(out))
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert res["jax"]["train"]["images_per_s"] > 0 and "onednn convolutions" in p.stdout
  model, x = create_model("resnet20", num_classes=10), jnp.zeros((1, 8, 8, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  expected = _import_bench().matmul_flops(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x))
  assert res["jax"]["forward_flops_per_image"] == pytest.approx(expected)


def _data_pipeline(*args: str) -> subprocess.CompletedProcess:
  """``benchmarks/data_pipeline.py`` with short timing windows and the given arguments."""
  script = os.path.join(ROOT, "benchmarks", "data_pipeline.py")
  quick = ["--batch", "8", "--seconds", "0.2", "--warmup", "1", "--repeats", "1"]
  return subprocess.run([sys.executable, script, *quick, *args], capture_output=True, text=True, timeout=300)


def test_data_pipeline_reports_every_storage_and_both_halves_of_device_augmentation(tmp_path):
  out = tmp_path / "pipeline.json"
  p = _data_pipeline("--images", "60", "--dir", str(tmp_path / "jpegs"), "--json", str(out))
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert set(res["pipeline_images_per_s"]) == {"memory", "per-step decode", "device draws", "device batch"}
  assert all(v > 0 for v in res["pipeline_images_per_s"].values())
  assert len(list((tmp_path / "jpegs" / "train").glob("*/*.jpg"))) == 60
  assert (res["source"], res["images"], res["jpeg_quality"]) == ("random", 60, 75)
  m = res["machine"]  # the figures name the CPU they were measured on
  assert m["cpu"] == res["cpu"] and m["cpu_isa"] and m["cpu_id"] is not None and m["pillow"] and m["jax"]


def test_data_pipeline_times_an_existing_folder_without_writing_into_it(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  for i in range(24):  # a tiny image folder of another size and layout than the script's own
    folder = tmp_path / "photos" / "train" / ("cat", "dog", "owl")[i % 3]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  out = tmp_path.parent / f"{tmp_path.name}_pipeline.json"
  p = _data_pipeline("--batch", "4", "--folder", str(tmp_path / "photos"), "--json", str(out))
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert (res["source"], res["images"], res["jpeg_quality"]) == ("folder", 24, None)
  assert all(v > 0 for v in res["pipeline_images_per_s"].values())
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written there

  for args in (["--folder", str(tmp_path / "missing")], ["--folder", str(tmp_path), "--dir", str(tmp_path)]):
    p = _data_pipeline(*args)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and ("missing" in p.stderr or "--dir" in p.stderr), p.stderr


ONEDNN_CHECK = os.path.join(ROOT, "benchmarks", "onednn_check.py")


def test_onednn_check_counts_shapes_and_writes_json(tmp_path):
  out = tmp_path / "check.json"
  grid = ["--kernels", "3", "--strides", "1,2", "--in-channels", "4", "--out-channels", "8", "--sizes", "5,8"]
  p = subprocess.run(
    [sys.executable, ONEDNN_CHECK, *grid, "--batches", "2", "--runs", "2", "--json", str(out)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr
  res = json.loads(out.read_text())
  assert [(r["kernel"], r["stride"], r["shapes"], r["wrong"]) for r in res["summary"]] == [(3, 1, 2, 0), (3, 2, 2, 0)]
  assert res["wrong"] == [] and res["machine"]["cpu_isa"] == machine.cpu_isa()
  assert "3x3 stride 1: 0 of 2 shapes wrong" in p.stdout and "3x3 stride 2: 0 of 2 shapes wrong" in p.stdout


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--kernels", "0"], "--kernels='0'"),
    (["--sizes", "a"], "--sizes='a'"),
    (["--runs", "0"], "--runs=0"),
    (["--hang-seconds", "0"], "--hang-seconds=0.0"),
  ],
)
def test_onednn_check_bad_arguments_are_one_line(args, needle):
  p = subprocess.run([sys.executable, ONEDNN_CHECK, *args], capture_output=True, text=True, timeout=120)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
