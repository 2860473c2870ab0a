"""CIFAR from image folders, the automatic holdout, and the training options of the fast recipe: the
linear schedule, test-time flip, gradient norms per block, and the run's wall time in its records."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import augment, data, datasets, machine, metrics, onednn_conv, optim, run_setup, train_loop, train_step
from resnet_jax.config_check import base_config, validate_config
from resnet_jax.errors import ConfigError, DataError
from resnet_jax.models import create_model

sys.path.insert(0, os.path.dirname(__file__))
from test_data import dataset_config, folder_arrays, write_cifar, write_image_folder  # noqa: E402
from test_train import tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_cifar_folder(root: str, per_class: int = 4, test_per_class: int = 0) -> str:
  """CIFAR-10 as files: ``root/train/<class>/*.png|jpg`` (and ``test/``), 32x32 random images."""
  write_image_folder(root, classes=CIFAR10_CLASSES, per_class=per_class, test_per_class=test_per_class, size=(32, 32))
  if not test_per_class:
    shutil.rmtree(os.path.join(root, "test"))
  return root


# ----------------------------------------------------------------------------------------------
# CIFAR as an image folder.


def test_cifar10_reads_an_image_folder_and_holds_out_10_percent_when_it_has_no_test_split(tmp_path):
  root = write_cifar_folder(str(tmp_path), per_class=10)
  ds = data.load_dataset(dataset_config(name="cifar10", data_dir=root, holdout=-1), progress=False)
  assert (ds.num_train, ds.num_test, ds.num_classes) == (90, 10, 10)
  assert ds.info["eval_split"] == "holdout" and ds.info["storage"] == "memory"
  assert np.bincount(ds.test_y).tolist() == [1] * 10  # stratified
  x, y = folder_arrays(root)
  mask = datasets.holdout_mask(
    y, [os.path.relpath(p, os.path.join(root, "train")) for p in datasets.scan_image_folder(root, "train")[0]], 0.1
  )
  np.testing.assert_array_equal(ds.test_x, x[mask])
  np.testing.assert_array_equal(ds.train_x, x[~mask])
  # The classes in sorted order are CIFAR-10's labels; the normalisation is CIFAR-10's.
  np.testing.assert_array_equal(np.sort(np.unique(ds.train_y)), np.arange(10))
  np.testing.assert_allclose(ds.mean, augment.CIFAR10_MEAN)


def test_cifar10_folder_with_a_test_split_evaluates_on_it_and_auto_holds_out_nothing(tmp_path):
  root = write_cifar_folder(str(tmp_path), per_class=3, test_per_class=2)
  ds = data.load_dataset(dataset_config(name="cifar10", data_dir=root, holdout=-1), progress=False)
  assert (ds.num_train, ds.num_test) == (30, 20) and ds.info["eval_split"] == "test"
  np.testing.assert_array_equal(ds.test_x, folder_arrays(root, "test")[0])


def test_cifar10_folder_without_test_split_and_no_holdout_says_what_to_set(tmp_path):
  root = write_cifar_folder(str(tmp_path), per_class=2)
  with pytest.raises(DataError, match="no test/ split.*holdout"):
    data.load_dataset(dataset_config(name="cifar10", data_dir=root), progress=False)


def test_cifar10_folder_with_the_wrong_class_count_is_an_error(tmp_path):
  root = write_image_folder(str(tmp_path), classes=("cat", "dog"), per_class=2, size=(32, 32))
  with pytest.raises(DataError, match="2 class folders, expected 10"):
    data.load_dataset(dataset_config(name="cifar10", data_dir=root), progress=False)


def test_auto_holdout_takes_nothing_from_the_pickles_that_have_a_test_split(tmp_path):
  root = write_cifar(str(tmp_path), "cifar10", per_batch=4, num_test=6)
  ds = data.load_dataset(dataset_config(name="cifar10", data_dir=root, holdout=-1), progress=False)
  assert (ds.num_train, ds.num_test) == (20, 6) and ds.info["eval_split"] == "test"


@pytest.mark.parametrize("value", [-2, -0.5, -1.5])
def test_holdout_accepts_minus_one_and_no_other_negative(value):
  config = base_config()
  config.dataset.holdout = -1
  validate_config(config)
  config.dataset.holdout = value
  with pytest.raises(ConfigError, match="holdout"):
    validate_config(config)


# ----------------------------------------------------------------------------------------------
# Training options.


def test_linear_schedule_warms_up_then_decays_to_zero_at_the_last_step():
  c = base_config()
  c.optimizer.learning_rate = 0.2
  c.schedule.name, c.schedule.unit, c.schedule.warmup = "linear", "epochs", 2.0
  sched = optim.make_schedule(c, steps_per_epoch=10, total_steps=120)
  np.testing.assert_allclose(
    [sched(0), sched(10), sched(20), sched(70), sched(120)], [0.0, 0.1, 0.2, 0.1, 0.0], rtol=1e-6, atol=1e-8
  )
  values = np.array([sched(i) for i in range(20, 121)])
  assert np.all(np.diff(values) < 0)


def _eval_state(model, image_shape, seed=0):
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape)), train=False)
  return train_step.TrainState.create(
    apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=optax.sgd(0.1)
  )


def _tiny_resnet_and_images(seed):
  """A 3-class ResNet-20 of 4 filters, its state and variables, and six random 8x8 images."""
  model = create_model("resnet20", num_classes=3, num_filters=4, conv_backend="xla")
  state = _eval_state(model, (8, 8, 3))
  images = jnp.asarray(np.random.default_rng(seed).normal(size=(6, 8, 8, 3)), jnp.float32)
  return model, state, {"params": state.params, "batch_stats": state.batch_stats}, images


def test_eval_flip_scores_the_mean_logits_of_the_image_and_its_mirror_image():
  model, state, variables, images = _tiny_resnet_and_images(0)
  plain = model.apply(variables, images, train=False)
  mirrored = model.apply(variables, images[:, :, ::-1], train=False)
  mean = (plain + mirrored) / 2
  labels = jnp.argmax(mean, -1)
  batch = {"image": images, "label": labels, "mask": jnp.ones(6)}
  flipped = train_step.make_eval_step(3, flip=True)(state, batch)
  assert float(flipped["correct"]) == 6.0  # the labels are the flip-mean's predictions
  loss = -jax.nn.log_softmax(mean)[jnp.arange(6), labels]
  np.testing.assert_allclose(flipped["loss"], jnp.sum(loss), rtol=1e-5)
  unflipped = train_step.make_eval_step(3, flip=False)(state, batch)
  assert not np.isclose(float(unflipped["loss"]), float(flipped["loss"]), rtol=1e-4)
  # An image equal to its mirror image scores the same with and without the flip.
  symmetric = dict(batch, image=(images + images[:, :, ::-1]) / 2)
  a = train_step.make_eval_step(3, flip=True)(state, symmetric)
  b = train_step.make_eval_step(3, flip=False)(state, symmetric)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def _pixel_logits(i: int, j: int):
  """A stand-in network whose logits are the channels of pixel (i, j): each view is readable by hand."""
  return lambda x: x[:, i, j, :]


def test_test_time_translation_averages_the_image_and_its_two_shifts_with_reflected_borders():
  with jax.enable_x64(True):  # float64: the views are compared exactly
    x = np.arange(2 * 5 * 6 * 3, dtype=np.float64).reshape(2, 5, 6, 3) ** 1.5  # no two pixels alike
    # An inner pixel: the down-right shift shows x[i-1, j-1], the up-left one x[i+1, j+1].
    got = train_step.eval_logits(_pixel_logits(2, 3), jnp.asarray(x), flip=False, translate=1)
    np.testing.assert_allclose(got, x[:, 2, 3] / 2 + x[:, 1, 2] / 4 + x[:, 3, 4] / 4, rtol=1e-12)
    # The corner: both shifts reflect into the image, onto x[1, 1] (the edge row and column are not repeated).
    got = train_step.eval_logits(_pixel_logits(0, 0), jnp.asarray(x), flip=False, translate=1)
    np.testing.assert_allclose(got, x[:, 0, 0] / 2 + x[:, 1, 1] / 2, rtol=1e-12)
    # Two pixels of shift, and the mirror image of each view: pixel (2, 2) of a width-6 mirror image is pixel
    # (2, 3) of the view, which is x[0, 1] in the view shifted down-right and x[4, 5] in the one shifted up-left.
    got = train_step.eval_logits(_pixel_logits(2, 2), jnp.asarray(x), flip=True, translate=2)
    want = (x[:, 2, 2] + x[:, 2, 3]) / 4 + (x[:, 0, 0] + x[:, 0, 1]) / 8 + (x[:, 4, 4] + x[:, 4, 5]) / 8
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # translate=0 is the flip alone, and without the flip the image alone.
    np.testing.assert_allclose(
      train_step.eval_logits(_pixel_logits(1, 4), jnp.asarray(x), flip=True, translate=0),
      (x[:, 1, 4] + x[:, 1, 1]) / 2,
      rtol=1e-12,
    )
    np.testing.assert_array_equal(
      train_step.eval_logits(_pixel_logits(1, 4), jnp.asarray(x), flip=False, translate=0), x[:, 1, 4]
    )


def test_eval_translate_scores_the_eval_logits_and_a_too_large_shift_is_a_config_error():
  model, state, variables, images = _tiny_resnet_and_images(2)
  logits = train_step.eval_logits(lambda x: model.apply(variables, x, train=False), images, flip=True, translate=1)
  labels = jnp.argmax(logits, -1)
  batch = {"image": images, "label": labels, "mask": jnp.ones(6)}
  scored = train_step.make_eval_step(3, flip=True, translate=1)(state, batch)
  assert float(scored["correct"]) == 6.0  # the labels are the six views' predictions
  np.testing.assert_allclose(scored["loss"], jnp.sum(-jax.nn.log_softmax(logits)[jnp.arange(6), labels]), rtol=1e-5)
  flip_only = train_step.make_eval_step(3, flip=True)(state, batch)
  assert not np.isclose(float(flip_only["loss"]), float(scored["loss"]), rtol=1e-4)
  with pytest.raises(ConfigError, match=r"eval_translate = 8 must be smaller than the images' sides, 8x8"):
    run_setup.Setup(tiny_config("resnet20", eval_translate=8))
  with pytest.raises(ConfigError, match=r"config.eval_translate = -1"):
    validate_config(tiny_config("resnet20", eval_translate=-1))


def test_grad_norms_are_the_norms_of_each_blocks_gradient():
  model = create_model("resnet20", num_classes=3, num_filters=4, conv_backend="xla")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
  state = train_step.TrainState.create(
    apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=optax.sgd(0.1)
  )
  rng = np.random.default_rng(1)
  batch = {"image": jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32), "label": jnp.asarray([0, 1, 2, 1])}
  _, metrics = train_step.make_train_step(3, grad_norms=True)(state, batch)

  def loss_fn(params):
    logits, _ = model.apply(
      {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
    )
    return train_step.cross_entropy(logits, batch["label"], 3).mean()

  grads = jax.grad(loss_fn)(state.params)
  assert set(metrics["grad_norm"]) == set(grads) >= {"conv1", "layer1_0", "layer3_2", "fc"}
  for name, g in grads.items():
    np.testing.assert_allclose(metrics["grad_norm"][name], optax.tree.norm(g), rtol=1e-5)
  _, without = train_step.make_train_step(3)(state, batch)
  assert "grad_norm" not in without


@pytest.mark.slow
def test_run_records_grad_norms_per_block_and_its_wall_time_across_a_resume(tmp_path):
  config = tiny_config("resnet20", log_grad_norms=True, eval_flip=True)
  workdir = str(tmp_path / "run")
  setup = run_setup.Setup(config)
  assert train_loop.train_and_evaluate(config, workdir, log=lambda *_: None, stop_at_step=4, setup=setup) is None
  first = [r["wall_time_s"] for r in metrics.read_metrics(workdir) if r["split"] == "test"]
  summary = train_loop.train_and_evaluate(config, workdir, log=lambda *_: None, setup=setup)
  records = metrics.read_metrics(workdir)
  train = [r for r in records if r["split"] == "train"]
  assert all(r["grad_norm/layer1_0"] > 0 and r["grad_norm/fc"] > 0 for r in train)
  assert {k for k in train[0] if k.startswith("grad_norm/")} == {
    f"grad_norm/{n}" for n in ("conv1", "bn1", "fc", *(f"layer{s}_{b}" for s in (1, 2, 3) for b in (0, 1, 2)))
  }
  times = [r["wall_time_s"] for r in records if r["split"] == "test"]
  assert len(first) == 1 and len(times) == 2 and 0 < times[0] == first[0] < times[1]
  assert summary["wall_time_s"] >= times[1]


# ----------------------------------------------------------------------------------------------
# configs/cifar10_fast.py and experiments/cifar_effects.py.


def test_cifar10_fast_keeps_the_paper_network_and_trains_on_a_folder_without_flags(tmp_path):
  from test_configs import load_config

  c = load_config("cifar10_fast")
  assert (c.model.name, c.model.options.to_dict(), c.dataset.holdout) == ("resnet20", {}, -1)
  model = run_setup.build_model(c, num_classes=10)
  params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False), jax.random.PRNGKey(0))[
    "params"
  ]
  assert train_step.count_parameters(params) == 269_722  # He et al.'s ResNet-20, option A
  c.dataset.data_dir = write_cifar_folder(str(tmp_path / "data"), per_class=4)
  c.num_epochs, c.batch_size, c.eval_batch_size, c.progress_bar = 2.0, 16, 4, False
  lines = []
  summary = train_loop.train_and_evaluate(c, str(tmp_path / "run"), log=lines.append)
  assert summary["steps"] == 4 and np.isfinite(summary["final_train_loss"])
  with open(tmp_path / "run" / "data.json") as f:
    assert json.load(f)["eval_split"] == "holdout"
  # model.dtype="auto": bfloat16 where this CPU's oneDNN computes it, float32 elsewhere; said and recorded
  dtype = "bfloat16" if onednn_conv.implements_bfloat16() else "float32"
  assert c.model.dtype == "auto" and summary["compute_dtype"] == dtype
  assert any(line.startswith("training resnet20") and f" in {dtype} on " in line for line in lines), lines


def _effects(args, tmp_path):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", "cifar_effects.py"), *args],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    timeout=900,
  )


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--data_dir", "x", "--runs", "nope"], "--runs='nope'"),
    (["--data_dir", "x", "--epochs", "0"], "--epochs=0.0"),
    (["--epochs", "2"], "usage: python experiments/cifar_effects.py"),
  ],
)
def test_effects_cli_bad_input_is_one_line(args, needle, tmp_path):
  proc = _effects(args, tmp_path)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.slow
def test_effects_runs_the_orderings_and_writes_curves_and_figures(tmp_path):
  data_dir = write_cifar_folder(str(tmp_path / "data"), per_class=15)  # 135 training images: 1 step
  out = tmp_path / "out"
  args = ["--data_dir", data_dir, "--epochs", "2", "--runs", "orderings", "--workdir", str(tmp_path / "runs")]
  proc = _effects([*args, "--out", str(out)], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "effects.json") as f:
    results = json.load(f)
  assert set(results["runs"]) == {"resnet20", "resnet20_v2", "resnet20_relu_before_add"}
  for r in results["runs"].values():
    assert r["steps"] == [2] and r["eval_steps"] == [2] and 0 <= r["final_val_error"] <= 1
    assert {"layer1_0", "layer3_2"} <= set(r["grad_norm"])
  assert (out / "orderings.png").exists() and not (out / "degradation.png").exists()
  # A second call resumes the finished runs: nothing is trained again.
  again = _effects([*args, "--out", str(out), "--plot_only"], tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# experiments/he_table.py (He et al.'s Table 6) and experiments/torch_reference.py.


def _experiment(script, args, tmp_path):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", script), *args],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    timeout=900,
  )


def _import_experiment(name):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # As an import would: dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


def test_he_table_runs_the_paper_recipe_with_its_drops_at_the_same_fractions():
  he_table = _import_experiment("he_table")
  full = he_table.run_config(110, "DIR", 64000)
  assert (full.model.name, full.num_train_steps, full.batch_size) == ("resnet110", 64000, 128)
  assert tuple(full.schedule.boundaries) == (32000.0, 48000.0) and full.schedule.warmup == 400
  assert (full.optimizer.name, full.optimizer.learning_rate, full.optimizer.weight_decay) == ("sgd", 0.1, 1e-4)
  short = he_table.run_config(20, "DIR", 1000)
  assert tuple(short.schedule.boundaries) == (500.0, 750.0) and short.schedule.warmup == 0
  assert short.eval_every_steps == 1000 and short.dataset.augment_on == "auto" and short.steps_per_call == 1
  validate_config(short)
  assert he_table.run_config(56, "DIR", 1000, steps_per_call=10).steps_per_call == 10


@pytest.mark.parametrize(
  "script, args, needle",
  [
    ("he_table.py", ["--data_dir", "x", "--depths", "20,21"], "--depths='20,21'"),
    ("he_table.py", ["--data_dir", "x", "--steps", "2"], "--steps=2"),
    ("he_table.py", ["--data_dir", "x", "--steps_per_call", "0"], "--steps_per_call=0"),
    ("torch_reference.py", ["--config", "nope.py", "--data_dir", "x"], "config file nope.py: no such file"),
    ("torch_reference.py", ["--config", "configs/cifar10_resnet18.py", "--data_dir", "x"], "model.name = 'resnet18'"),
    ("torch_reference.py", ["--config", "configs/cifar10_fast.py", "--data_dir", "x", "--pipeline", "tf"], "'tf'"),
    ("jpeg_quality.py", ["--data_dir", "x", "--qualities", "source,100"], "--qualities='source,100'"),
    ("jpeg_quality.py", ["--data_dir", "x", "--qualities", "50,50"], "expected distinct entries"),
    ("jpeg_quality.py", ["--data_dir", "x", "--epochs", "0"], "--epochs=0.0"),
    ("time_to_accuracy.py", ["--workdir", "nope"], "nope/summary.json not found"),
  ],
)
def test_experiment_cli_bad_input_is_one_line(script, args, needle, tmp_path):
  args = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in args]
  proc = _experiment(script, args, tmp_path)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr


def test_eval_split_name_says_how_many_images_were_held_out():
  assert data.eval_split_name({"eval_split": "holdout", "holdout": {"images": 5000}}) == "5,000 held-out images"
  assert data.eval_split_name({"eval_split": "test"}) == "test split"


@pytest.mark.slow
def test_time_to_accuracy_writes_the_runs_curve_and_names_its_evaluation_split(tmp_path):
  from test_configs import load_config

  c = load_config("cifar10_fast")
  c.dataset.data_dir = write_cifar_folder(str(tmp_path / "data"), per_class=15)  # 15 of 150 held out
  c.num_epochs, c.batch_size, c.eval_batch_size, c.eval_every_steps, c.progress_bar = 2.0, 32, 8, 3, False
  c.ema_decay, c.dataset.cutout, c.eval_translate, c.seed = 0.5, 4, 1, 3
  workdir = tmp_path / "cifar10_tiny"
  summary = train_loop.train_and_evaluate(c, str(workdir), log=lambda *_: None)
  out = tmp_path / "out"
  proc = _experiment(
    "time_to_accuracy.py", ["--workdir", str(workdir), "--target", "1e-9", "--out", str(out)], tmp_path
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "cifar10_tiny.json") as f:
    result = json.load(f)
  assert result["eval_split"] == "15 held-out images" and result["steps"] == summary["steps"]
  assert result["seed"] == 3
  assert (
    result["step"] == [3, 6, summary["steps"]] == [3, 6, 8] and result["final_accuracy"] == summary["test_accuracy"]
  )
  # The weight average's curve, the last weights' own final accuracy, and the recipe that says so.
  assert result["final_unaveraged_accuracy"] == summary["unaveraged_test_accuracy"]
  recipe = result["recipe"]
  assert (recipe["ema_decay"], recipe["cutout"], recipe["augment"], recipe["eval_translate"]) == (
    0.5,
    4,
    "pad_crop_flip",
    1,
  )
  last_train = [r for r in metrics.read_metrics(str(workdir)) if r["split"] == "train"][-1]
  assert result["final_train_accuracy"] == last_train["accuracy"]
  times = result["wall_time_s"]
  assert 0 < times[0] < times[1] < times[2] and result["target_reached_s"] == times[0]
  assert (out / "cifar10_tiny.png").stat().st_size > 0 and "first reached at" in proc.stdout
  # The run's machine, by name, instruction set and family/model where the CPU has them.
  assert result["machine_details"] == summary["machine"]
  assert result["machine"].startswith(machine.cpu_name()) and machine.cpu_isa() in result["machine"]
  assert machine.cpu_id() in result["machine"] and result["machine"].endswith(f"{machine.available_cpus()} CPUs")
  # The split comes from the run's data.json, not from its config: without it, no guess.
  os.remove(workdir / "data.json")
  missing = _experiment("time_to_accuracy.py", ["--workdir", str(workdir), "--out", str(out)], tmp_path)
  assert missing.returncode == 2 and "data.json not found" in missing.stderr, missing.stderr


@pytest.mark.slow
def test_he_table_trains_each_depth_writes_the_table_and_resumes(tmp_path):
  data_dir = write_cifar_folder(str(tmp_path / "data"), per_class=15)  # 135 training images: 1 step of 128
  out, runs = tmp_path / "out", str(tmp_path / "runs")
  args = ["--data_dir", data_dir, "--depths", "20", "--steps", "8", "--workdir", runs, "--out", str(out)]
  proc = _experiment("he_table.py", args, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "he_table.json") as f:
    table = json.load(f)
  (r,) = table["rows"]
  assert (r["model"], r["parameters"], r["steps"], r["paper_error"]) == ("resnet20", 269_722, 8, 8.75)
  assert 0 <= r["error"] <= 100 and table["eval_split"] == "15 held-out images"
  # The curves of the paper's Fig. 6: the run's own log and evaluation records, the last one the table's.
  c = r["curve"]
  assert c["eval_steps"][-1] == 8 and c["error"][-1] == pytest.approx(r["error"])
  assert len(c["steps"]) == len(c["train_error"]) >= 1 and all(0 <= e <= 100 for e in c["train_error"])
  assert r["final_train_error"] == pytest.approx(sum(c["train_error"][-5:]) / len(c["train_error"][-5:]))
  speeds = sorted(v for v in c["images_per_sec"] if v)
  assert len(c["images_per_sec"]) == len(c["steps"]) and speeds
  assert r["median_images_per_sec"] == pytest.approx(statistics.median(speeds))
  line = f"| ResNet-20 | 269,722 | 8 | {r['error']:.2f}% | 8.75% | {r['final_train_error']:.2f}% |"
  assert line in (out / "he_table.md").read_text()
  assert f"| {r['median_images_per_sec']:,.0f} |\n" in (out / "he_table.md").read_text()
  assert (out / "he_table.png").stat().st_size > 0
  again = _experiment("he_table.py", [*args, "--table_only"], tmp_path)
  assert again.returncode == 0 and "ResNet-20" in again.stdout
  # A finished run is not trained again, also where it came without its checkpoints (runs_archive.py).
  shutil.rmtree(os.path.join(runs, "resnet20", "checkpoints"))
  table = (out / "he_table.md").read_text()
  again = _experiment("he_table.py", args, tmp_path)
  assert again.returncode == 0 and f"ResNet-20: finished already, error {r['error']:.2f}%" in again.stdout
  assert (
    not os.path.exists(os.path.join(runs, "resnet20", "checkpoints")) and (out / "he_table.md").read_text() == table
  )


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["resnet_jax", "torchvision"])
def test_torch_reference_trains_the_config_on_the_same_data_and_writes_its_curve(pipeline, tmp_path):
  pytest.importorskip("torchvision")
  data_dir = write_cifar_folder(str(tmp_path / "data"), per_class=15)
  args = ["--config", os.path.join(ROOT, "configs", "cifar10_fast.py"), "--data_dir", data_dir, "--epochs", "2"]
  args += ["--dtype", "float32", "--seed", "3", "--pipeline", pipeline, "--out", str(tmp_path)]
  proc = _experiment("torch_reference.py", args, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "cifar10_fast_torch.json") as f:
    result = json.load(f)
  assert (result["model"], result["parameters"], result["steps"], result["dtype"]) == (
    "resnet20",
    269_722,
    2,
    "float32",
  )
  assert result["step"] == [2] and 0 <= result["final_accuracy"] <= 1 and result["train_images_per_sec"] > 0
  assert result["eval_split"] == "15 held-out images"  # 10% of the 150 images
  assert result["pipeline"].startswith(pipeline + " (") and result["seed"] == 3
  assert result["machine_details"] == machine.describe() and result["machine"].startswith(machine.cpu_name())


def _torchvision_setup(tmp_path, per_class=10, test_per_class=0, **dataset):
  """A tiny CIFAR-10 folder, ``configs/cifar10_fast.py`` pointed at it, and the reference's two pipelines."""
  pytest.importorskip("torchvision")
  from test_configs import load_config

  torch_reference = _import_experiment("torch_reference")
  c = load_config("cifar10_fast")
  c.dataset.data_dir = write_cifar_folder(str(tmp_path / "data"), per_class=per_class, test_per_class=test_per_class)
  c.batch_size, c.eval_batch_size = 30, 4
  for key, value in dataset.items():
    c.dataset[key] = value
  return torch_reference, c


def _pixels(x, normalization) -> np.ndarray:
  """Normalised NCHW float images back to NHWC uint8 pixels."""
  mean = np.asarray(normalization["mean"])[:, None, None]
  std = np.asarray(normalization["std"])[:, None, None]
  return np.rint((np.asarray(x) * std + mean) * 255).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def test_torchvision_pipeline_evaluates_on_the_images_train_py_holds_out(tmp_path):
  torch_reference, c = _torchvision_setup(tmp_path)
  tv = torch_reference.torchvision_data(c)
  ds = data.load_dataset(c.dataset, progress=False)
  assert (tv.num_train, tv.num_eval, tv.num_classes, tv.eval_split) == (90, 10, 10, "10 held-out images")
  assert (ds.num_train, ds.num_test, data.eval_split_name(ds.info)) == (90, 10, tv.eval_split)
  # Its own statistics: those of the 90 training images train.py trains on.
  pixels = ds.train_x.reshape(-1, 3).astype(np.float64) / 255
  norm = tv.details["normalization"]
  np.testing.assert_allclose(norm["mean"], pixels.mean(0), atol=2e-6)
  np.testing.assert_allclose(norm["std"], pixels.std(0), atol=2e-6)
  batches = list(tv.eval_batches())
  assert [len(y) for _, y, _ in batches] == [4, 4, 2] and all(w.tolist() == [1.0] * len(w) for _, _, w in batches)
  images = np.concatenate([_pixels(x, norm) for x, _, _ in batches])
  np.testing.assert_array_equal(images, ds.test_x)
  np.testing.assert_array_equal(np.concatenate([y for _, y, _ in batches]), ds.test_y)


def test_torchvision_pipeline_evaluates_on_a_test_folder_when_there_is_one(tmp_path):
  torch_reference, c = _torchvision_setup(tmp_path, per_class=3, test_per_class=2)
  tv = torch_reference.torchvision_data(c)
  ds = data.load_dataset(c.dataset, progress=False)
  assert (tv.num_train, tv.num_eval, tv.eval_split) == (30, 20, "test split") and ds.num_test == 20
  images = np.concatenate([_pixels(x, tv.details["normalization"]) for x, _, _ in tv.eval_batches()])
  np.testing.assert_array_equal(images, ds.test_x)


def test_torchvision_pipeline_batches_are_crops_and_flips_of_each_training_image_once_per_epoch(tmp_path):
  import torch

  torch_reference, c = _torchvision_setup(tmp_path)
  tv = torch_reference.torchvision_data(c)
  train_x = data.load_dataset(c.dataset, progress=False).train_x
  padded = np.pad(train_x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  windows = np.stack([padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)], axis=1)
  windows = np.concatenate([windows, windows[:, :, :, ::-1]], axis=1)  # (image, offset and flip, H, W, C)
  epochs, draws = [], set()
  for _ in range(2):
    sources = []
    for _ in range(3):  # 90 images in batches of 30: three steps per epoch, the last batch full.
      x, y = next(tv.train)
      assert (
        x.shape == (30, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
      )
      for image in _pixels(x, tv.details["normalization"]):
        match = np.argwhere((windows == image).all(axis=(2, 3, 4)))
        assert len(match), "a training image that is no crop or flip of any training image"
        sources.append(int(match[0, 0]))
        draws.add(int(match[0, 1]))
    epochs.append(sources)
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(90)) and epochs[0] != epochs[1]
  assert any(d >= 81 for d in draws) and any(d < 81 for d in draws) and len(draws) > 20


def test_torch_reference_evaluates_when_train_py_does_and_refuses_what_it_does_not_implement():
  pytest.importorskip("torch")
  from test_configs import load_config

  torch_reference = _import_experiment("torch_reference")
  c = load_config("cifar10_fast")
  torch_reference.check_supported(c)
  assert torch_reference.evaluation_steps(c, 351, 1404) == [702, 1404]
  c.eval_every_steps = -1  # Once per epoch, and always at the end.
  assert torch_reference.evaluation_steps(c, 3, 7) == [3, 6, 7]
  c.eval_every_steps = 2
  assert torch_reference.evaluation_steps(c, 3, 6) == [2, 4, 6]
  bad = load_config("cifar10_fast")
  bad.ema_decay = 0.99
  with pytest.raises(ConfigError, match="config.ema_decay = 0.99: the PyTorch reference keeps no weight average"):
    torch_reference.check_supported(bad)
  bad = load_config("cifar10_fast")
  bad.finetune.weights = "w.pth"
  with pytest.raises(ConfigError, match="finetune.weights = 'w.pth': the PyTorch reference trains from scratch"):
    torch_reference.check_supported(bad)


@pytest.mark.parametrize("flip, translate", [(False, 0), (True, 0), (False, 2), (True, 1)])
def test_torch_reference_scores_the_views_train_py_scores(flip, translate):
  """The PyTorch reference's test-time augmentation is ``train_step.eval_logits``'s: the same views with the
  same weights, for a function of every pixel's position (a linear map of the flattened image)."""
  torch = pytest.importorskip("torch")
  torch_reference = _import_experiment("torch_reference")
  rng = np.random.default_rng(7)
  images = rng.normal(size=(3, 6, 5, 2))  # NHWC, not square: the height and width are not swapped
  w = rng.normal(size=(6 * 5 * 2, 4))

  def f_torch(x):  # NCHW, as the reference's models take them
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) @ torch.from_numpy(w)

  with jax.enable_x64(True):  # float64 on both sides: the views are compared exactly
    ours = train_step.eval_logits(lambda x: x.reshape(x.shape[0], -1) @ w, jnp.asarray(images), flip, translate)
    ours = np.asarray(ours)
  theirs = torch_reference.eval_logits(f_torch, torch.from_numpy(images).permute(0, 3, 1, 2), flip, translate)
  assert ours.dtype == theirs.numpy().dtype == np.float64
  np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-12, atol=1e-12)
  # Each view changes the logits, so the comparison above sees a view missing, shifted or mirrored wrongly.
  assert np.allclose(ours, images.reshape(3, -1) @ w) == (not flip and not translate)


def test_torchvision_pipeline_refuses_what_it_does_not_implement(tmp_path):
  torch_reference, c = _torchvision_setup(tmp_path, per_class=2, cutout=8)
  with pytest.raises(ConfigError, match="cutout = 8: --pipeline torchvision implements none, pad_crop"):
    torch_reference.torchvision_data(c)
  c.dataset.cutout, c.dataset.max_train_examples = 0, 50
  with pytest.raises(ConfigError, match="max_train_examples = 50: --pipeline torchvision reads every image"):
    torch_reference.torchvision_data(c)
  c.dataset.max_train_examples, c.dataset.data_dir = -1, str(tmp_path / "pickles")
  with pytest.raises(ConfigError, match="pickles/train is not a directory"):
    torch_reference.torchvision_data(c)


# ----------------------------------------------------------------------------------------------
# experiments/jpeg_quality.py (what JPEG compression costs).


def test_jpeg_quality_copies_keep_the_names_and_lose_more_at_lower_quality(tmp_path):
  from PIL import Image

  jpeg_quality = _import_experiment("jpeg_quality")
  data_dir = write_cifar_folder(str(tmp_path / "data"), per_class=2, test_per_class=1)
  items = jpeg_quality.source_images(data_dir)
  assert len(items) == 30 and all(isinstance(src, str) for _, src in items)
  infos = {q: jpeg_quality.write_copy(items, q, str(tmp_path / f"q{q}")) for q in (90, 20)}
  for q in (90, 20):
    copied = sorted(
      os.path.relpath(os.path.join(d, f), tmp_path / f"q{q}") for d, _, fs in os.walk(tmp_path / f"q{q}") for f in fs
    )
    assert copied == sorted([jpeg_quality.DONE] + [rel for rel, _ in items])  # Same names: same held-out split.
    with Image.open(tmp_path / f"q{q}" / items[0][0]) as im:
      assert im.format == "JPEG" and im.size == (32, 32)
  assert infos[90]["psnr_db"] > infos[20]["psnr_db"] > 0 and infos[90]["mean_bytes"] > infos[20]["mean_bytes"]
  marker = tmp_path / "q20" / jpeg_quality.DONE
  before = marker.stat().st_mtime_ns
  assert jpeg_quality.write_copy(items, 20, str(tmp_path / "q20")) == infos[20]  # Finished: not written again.
  assert marker.stat().st_mtime_ns == before
  # The pickle release: its images, by split and class, under new names.
  pickles = write_cifar(str(tmp_path / "pickles"), per_batch=2, num_test=3)
  items = jpeg_quality.source_images(pickles)
  assert len(items) == 13 and sum(rel.startswith("test" + os.sep) for rel, _ in items) == 3
  assert all(isinstance(src, np.ndarray) and src.shape == (32, 32, 3) for _, src in items)
  info = jpeg_quality.write_copy(items, 75, str(tmp_path / "from_pickles"))
  assert info["images"] == 13 and np.isfinite(info["psnr_db"])


@pytest.mark.slow
def test_jpeg_quality_trains_the_fast_config_per_quality_and_writes_the_table(tmp_path):
  data_dir = write_cifar_folder(str(tmp_path / "data"), per_class=15)  # 135 training images: 2 steps of 128
  out, runs = tmp_path / "out", str(tmp_path / "runs")
  args = ["--data_dir", data_dir, "--qualities", "source,30", "--epochs", "2", "--workdir", runs, "--out", str(out)]
  proc = _experiment("jpeg_quality.py", args, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "jpeg_quality.json") as f:
    result = json.load(f)
  assert [r["quality"] for r in result["rows"]] == ["source", "30"] and result["dtype"] == "float32"
  for r in result["rows"]:
    assert r["steps"] == 2 and 0 <= r["accuracy"] <= 1
  assert result["rows"][0]["psnr_db"] is None and result["rows"][1]["psnr_db"] > 0
  assert result["eval_split"] == "15 held-out images"
  again = _experiment("jpeg_quality.py", [*args, "--table_only"], tmp_path)
  assert again.returncode == 0 and "| 30 |" in again.stdout, again.stderr[-3000:]
