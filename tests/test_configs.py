"""Every config in configs/ validates and trains a few steps on tiny data; bad configs fail early.

The command-line tests run ``train.py`` in a subprocess: a bad flag or value must give exit status 2,
exactly one ``error: ...`` line on stderr, no traceback, and nothing written.
"""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resnet_jax import optim, train_loop
from resnet_jax.config_check import base_config, load_config_file, validate_config
from resnet_jax.errors import ConfigError

sys.path.insert(0, os.path.dirname(__file__))
from test_data import write_cifar, write_image_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
# Configs whose models take over ~20 s to compile on a 2-core CPU; and cifar10_fast, which the normal suite
# trains on an image folder (tests/test_cifar.py) while this test gives it the pickle release.
SLOW = {"cifar100", "cifar10_resnet18", "imagenet_resnet50", "finetune", "cifar10_fast"}


def load_config(name: str) -> ml_collections.ConfigDict:
  return load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))


def test_the_required_configs_exist():
  assert {"digits", "cifar10_resnet20", "cifar10_resnet18", "cifar100", "imagenet_resnet50", "residual_mlp"} <= set(
    CONFIGS
  )


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid(name, tmp_path):
  config = load_config(name)
  if config.dataset.name != "digits":
    with pytest.raises(ConfigError, match="data_dir"):
      validate_config(config)
    config.dataset.data_dir = str(tmp_path)
  validate_config(config, device_count=1)


def test_load_config_file_reads_get_config_and_names_a_bad_file(tmp_path):
  good = tmp_path / "my-run.py"
  good.write_text(
    "from resnet_jax.config_check import base_config\n\n"
    "def get_config():\n  c = base_config()\n  c.batch_size = 7\n  return c\n"
  )
  assert load_config_file(str(good)).batch_size == 7
  with pytest.raises(ConfigError, match=r"nope\.py: no such file"):
    load_config_file(str(tmp_path / "nope.py"))
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return {'batch_size': 7}\n")
  with pytest.raises(ConfigError, match=r"bad\.py: expected a get_config\(\) that returns"):
    load_config_file(str(bad))
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ConfigError, match=r"empty\.py: expected a get_config\(\)"):
    load_config_file(str(tmp_path / "empty.py"))


def test_cifar10_resnet20_is_the_paper_recipe():
  c = load_config("cifar10_resnet20")
  assert (c.batch_size, c.num_train_steps, c.optimizer.name, c.optimizer.momentum) == (128, 64000, "sgd", 0.9)
  assert (c.optimizer.learning_rate, c.optimizer.weight_decay) == (0.1, 1e-4)
  assert (c.schedule.name, c.schedule.unit, tuple(c.schedule.boundaries)) == ("step", "steps", (32000, 48000))
  assert (c.dataset.augment, c.dataset.crop_padding, c.model.name) == ("pad_crop_flip", 4, "resnet20")
  sched = optim.make_schedule(c, 390, 64000)
  np.testing.assert_allclose([sched(31999), sched(32000), sched(48000)], [0.1, 0.01, 0.001], rtol=1e-6)


def _tiny(name: str, tmp_path) -> ml_collections.ConfigDict:
  c = load_config(name)
  if c.dataset.name in ("cifar10", "cifar100"):
    c.dataset.data_dir = write_cifar(str(tmp_path / "data"), c.dataset.name, per_batch=2, num_test=4)
  elif c.dataset.name == "image_folder":
    c.dataset.data_dir = write_image_folder(str(tmp_path / "data"), per_class=4, test_per_class=2, size=(40, 36))
    c.dataset.image_size = 32
  c.dataset.max_train_examples = 8
  c.dataset.max_test_examples = 4
  c.dataset.num_threads = 1
  c.batch_size = 4
  c.eval_batch_size = 4
  c.num_train_steps = 2
  c.eval_every_steps = 2
  c.log_every_steps = 1
  c.progress_bar = False
  return c


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CONFIGS])
def test_config_trains_a_few_steps_on_tiny_data(name, tmp_path):
  config = _tiny(name, tmp_path)
  summary = train_loop.train_and_evaluate(config, str(tmp_path / "run"), log=lambda *_: None)
  assert summary["steps"] == 2 and summary["model"] == load_config(name).model.name
  assert math.isfinite(summary["final_train_loss"]) and 0.0 <= summary["test_accuracy"] <= 1.0
  assert os.path.exists(tmp_path / "run" / "summary.json")


# ----------------------------------------------------------------------------------------------
# validate_config in process.


def test_unknown_key_in_a_config_file_suggests_the_close_name():
  c = base_config()
  c.optimizer.learnig_rate = 0.1
  with pytest.raises(ConfigError, match="learnig_rate.*did you mean optimizer.learning_rate"):
    validate_config(c)


@pytest.mark.parametrize(
  "key,value,expected",
  [
    ("batch_size", 0, "batch_size"),
    ("batch_size", -4, "batch_size"),
    ("batch_size", 2.5, "integer"),
    ("eval_batch_size", 0, "eval_batch_size"),
    ("optimizer.learning_rate", -0.1, "learning_rate"),
    ("optimizer.name", "adam", "sgd, nesterov, adamw, lars"),
    ("dataset.name", "mnist", "digits"),
    ("label_smoothing", 1.5, "label_smoothing"),
    ("model.dtype", "float16", "bfloat16"),
    ("schedule.boundaries", (5.0, 2.0), "increasing"),
    ("progress_bar", 1, "True or False"),
    ("num_epochs", float("nan"), "finite"),
    ("dataset.test_fraction", 1.0, "test_fraction"),
    ("dataset.cutout", -1, r"config\.dataset\.cutout = -1 .*expected >= 0"),
    ("dataset.cutout", 2.5, r"config\.dataset\.cutout = 2\.5 .*integer"),
  ],
)
def test_bad_values_are_config_errors(key, value, expected):
  c = base_config()
  section, _, leaf = key.rpartition(".")
  node = c[section] if section else c
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ConfigError, match=expected):
    validate_config(c)


@given(st.integers(1, 64), st.integers(1, 8))
def test_batch_must_divide_over_the_devices(batch, devices):
  c = base_config()
  c.batch_size = batch
  c.eval_batch_size = devices * 4
  if batch % devices:
    with pytest.raises(ConfigError, match=f"not divisible by the {devices} devices"):
      validate_config(c, device_count=devices)
  else:
    validate_config(c, device_count=devices)


# ----------------------------------------------------------------------------------------------
# The command line.


def run_train(args, tmp_path, env=None):
  workdir = tmp_path / "out"
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *args],
    capture_output=True,
    text=True,
    cwd=str(tmp_path),
    timeout=300,
    env={**os.environ, **(env or {})},
  )
  return proc, workdir


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """Exit status 2, exactly one ``error: ...`` line on stderr, no traceback; returns the line."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.mark.parametrize(
  "args,needles",
  [
    (["--config.optimizer.lrr=0.1"], ["lrr"]),
    (["--config.batch_size=abc"], ["batch_size", "'abc'"]),
    (["--config.batch_size=0"], ["batch_size", "0"]),
    (["--config.batch_size=-8"], ["batch_size"]),
    (["--config=configs/nope.py"], ["configs/nope.py", "not found"]),
    (["--bogus=1"], ["bogus"]),
    (["--config.model.conv_backend=mkl"], ["conv_backend", "xla, onednn"]),
    (["--config.host_memory=reuse"], ["host_memory", "keep, default"]),
  ],
)
def test_cli_bad_config_is_one_line_and_exit_2(args, needles, tmp_path):
  args = [a.replace("configs/", os.path.join(ROOT, "configs") + "/") for a in args]
  proc, workdir = run_train(args, tmp_path)
  assert_one_line_error(proc, *needles)
  assert not workdir.exists()


def test_cli_missing_data_folder_names_place_and_layout(tmp_path):
  missing = tmp_path / "cifar_here"
  proc, workdir = run_train(
    [f"--config={ROOT}/configs/cifar10_resnet20.py", f"--config.dataset.data_dir={missing}"], tmp_path
  )
  assert_one_line_error(proc, str(missing), "cifar-10-batches-py")
  assert not workdir.exists()


def test_cli_batch_not_divisible_by_device_count(tmp_path):
  # Four CPU devices, also on a machine with a GPU (where jax would otherwise pick the one GPU).
  proc, workdir = run_train(
    ["--config.batch_size=6"],
    tmp_path,
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
  )
  assert_one_line_error(proc, "batch_size = 6", "4 devices")
  assert not workdir.exists()


def test_cli_unknown_model_lists_close_names(tmp_path):
  proc, workdir = run_train(["--config.model.name=resnet21"], tmp_path)
  assert_one_line_error(proc, "resnet21", "resnet20")
  assert not workdir.exists()


def test_cli_trains_prints_outputs_and_evaluates(tmp_path):
  args = [
    f"--config={ROOT}/configs/residual_mlp.py",
    "--config.num_train_steps=3",
    "--config.model.options.depth=1",
    "--config.dataset.max_train_examples=32",
    "--config.batch_size=8",
    "--config.progress_bar=False",
    "--config.eval_every_steps=3",
    "--config.host_memory=keep",
  ]
  proc, workdir = run_train(args, tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert f"outputs in {workdir}" in proc.stdout
  for name in ("summary.json", "metrics.jsonl", "curves.png", "config.json"):
    assert (workdir / name).exists()
  proc = subprocess.run(
    [sys.executable, "-m", "resnet_jax.evaluate", f"--workdir={workdir}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  with open(workdir / "summary.json") as f:
    import json

    summary = json.load(f)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 3 and result["test_accuracy"] == summary["test_accuracy"]
  assert (result["eval_flip"], result["eval_translate"]) == (False, 0)  # the run's own test-time augmentation
  assert result["compute_dtype"] == summary["compute_dtype"] and result["machine"] == summary["machine"]
  from resnet_jax.evaluate import evaluate_workdir

  augmented = evaluate_workdir(str(workdir), eval_flip=True, eval_translate=1)
  assert (augmented["eval_flip"], augmented["eval_translate"]) == (True, 1)
  assert augmented["step"] == 3 and augmented["test_loss"] != result["test_loss"]
  proc = subprocess.run(
    [sys.executable, "-m", "resnet_jax.evaluate", f"--workdir={workdir}", "--eval-translate=8"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.eval_translate = 8 must be smaller than")
  assert summary["host_memory"] == ("keep" if sys.platform.startswith("linux") else "default")
