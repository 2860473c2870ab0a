"""End to end on tiny image folders: pretrain, write the weights, fine-tune, classify files, export.

Also: ONNX Runtime and StableHLO round-trip parity for resnet18 / resnet20 (resnet50: slow), and the bad
input of ``python -m resnet_jax.predict`` / ``resnet_jax.export`` (one ``error:`` line, exit status 2).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import data as data_lib
from resnet_jax import export, finetune, predict, train_loop
from resnet_jax.errors import run_cli
from resnet_jax.evaluate import load_run_config
from resnet_jax.models import create_model

sys.path.insert(0, os.path.dirname(__file__))
from test_data import write_image_folder  # noqa: E402
from test_train import tiny_config  # noqa: E402


def _folder_config(data_dir: str, **overrides):
  c = tiny_config(
    "resnet20",
    **{
      "dataset.name": "image_folder",
      "dataset.data_dir": data_dir,
      "dataset.image_size": 16,
      "dataset.augment": "none",
      "num_train_steps": 4,
      "dataset.max_train_examples": -1,
      "dataset.max_test_examples": -1,
      "batch_size": 4,
      "eval_batch_size": 4,
      **overrides,
    },
  )
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A run fine-tuned (3 classes) from the weights file written from a pretraining run (2 classes)."""
  tmp = tmp_path_factory.mktemp("e2e")
  pre_data = write_image_folder(str(tmp / "pre"), classes=("a", "b"), per_class=4, test_per_class=2, seed=1)
  pre = str(tmp / "pretrain")
  train_loop.train_and_evaluate(_folder_config(pre_data), pre, log=lambda *_: None)
  weights = str(tmp / "pre.safetensors")
  assert finetune.main(["--workdir", pre, "--out", weights]) == 0
  data = write_image_folder(
    str(tmp / "own"), classes=("ant", "bee", "cat"), per_class=4, test_per_class=2, size=(23, 17), seed=2
  )
  workdir = str(tmp / "finetuned")
  notes = []
  summary = train_loop.train_and_evaluate(
    _folder_config(data, **{"finetune.weights": weights, "finetune.backbone_lr_scale": 0.1}), workdir, log=notes.append
  )
  assert any("new head for 3 classes (the weights have 2 classes)" in n for n in notes)
  assert np.isfinite(summary["final_train_loss"])
  return workdir, data


def _cli(main, argv, capsys):
  """Run a command-line main as ``python -m`` would: ``(exit status, stdout, stderr)``."""
  with pytest.raises(SystemExit) as e:
    run_cli(main, argv)
  out, err = capsys.readouterr()
  return e.value.code, out, err


def test_predict_equals_the_evaluation_path(run):
  workdir, data = run
  config = load_run_config(workdir)
  config.dataset.in_memory = "never"  # streamed: the same batches as in memory, and the file of each image
  ds = data_lib.load_dataset(config.dataset)
  batch = ds.test_batch(np.arange(ds.num_test))
  test_files = list(ds.test_x.paths)
  predictor = predict.load_predictor(workdir=workdir)
  images = np.stack([predictor.preprocessing.load(p) for p in test_files])
  np.testing.assert_array_equal(images, batch["image"])  # same resize, crop and normalisation
  logits = predictor.model.apply(predictor.variables, batch["image"], train=False)
  np.testing.assert_allclose(predictor.predict(test_files), jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)
  assert predictor.class_names == ["ant", "bee", "cat"]
  top = predictor.classify(test_files[:2], top_k=2)
  assert [len(r["top"]) for r in top] == [2, 2] and top[0]["top"][0][1] >= top[0]["top"][1][1]


def test_predict_cli_files_and_folders(run, capsys):
  workdir, data = run
  folder = os.path.join(data, "test", "bee")
  one = os.path.join(data, "test", "ant", "img0.png")
  code, out, err = _cli(predict.main, [f"--workdir={workdir}", one, folder, "--top-k=3", "--json"], capsys)
  assert code == 0, err
  rows = [json.loads(line) for line in out.strip().splitlines()]
  assert [r["path"] for r in rows] == [one] + sorted(os.path.join(folder, f) for f in os.listdir(folder))
  for r in rows:
    probs = [t["probability"] for t in r["top"]]
    assert sorted(t["class"] for t in r["top"]) == ["ant", "bee", "cat"]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5


def test_predict_bad_input_is_one_line(run, tmp_path, capsys):
  workdir, _ = run
  junk = tmp_path / "junk.png"
  junk.write_bytes(b"this is not an image")
  empty = tmp_path / "empty"
  empty.mkdir()
  bad_weights = tmp_path / "w.npz"
  np.savez(bad_weights, x=np.zeros(3))
  cases = [
    ([f"--workdir={workdir}", str(tmp_path / "missing.jpg")], "image not found"),
    ([f"--workdir={workdir}", str(junk)], "cannot read image"),
    ([f"--workdir={workdir}", str(empty)], "holds no image files"),
    ([f"--weights={tmp_path / 'nope.pth'}", "--model=resnet18", str(empty / ".." / "junk.png")], "not found"),
    ([f"--workdir={tmp_path}", str(junk)], "config.json not found"),
  ]
  for argv, needle in cases:
    code, out, err = _cli(predict.main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (argv, err)
  # A weights file that is no state dict of the model: one line naming it.
  img = tmp_path / "ok.png"
  from PIL import Image

  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
  code, _, err = _cli(predict.main, [f"--weights={bad_weights}", "--model=resnet18", str(img)], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad_weights) in err and "fc.weight" in err


@pytest.mark.parametrize("fmt", ["onnx", "stablehlo"])
def test_export_cli_round_trip(run, fmt, tmp_path, capsys):
  if fmt == "onnx":
    import jax2onnx  # noqa: F401, E401  (the test extra installs them: a failure, never a skip)
  workdir, _ = run
  out_file = str(tmp_path / f"model.{fmt}")
  code, out, err = _cli(export.main, [f"--workdir={workdir}", f"--format={fmt}", f"--out={out_file}"], capsys)
  assert code == 0, err
  assert "dynamic batch" in out and "max |logit difference|" in out
  predictor = predict.load_predictor(workdir=workdir)
  x = np.random.default_rng(3).normal(size=(5, 16, 16, 3)).astype(np.float32)  # another batch size
  want = np.asarray(predictor.model.apply(predictor.variables, x, train=False))
  if fmt == "onnx":
    session = export.onnx_session(out_file)
    got = session.run(None, {"image": x})[0]
  else:
    with open(out_file, "rb") as f:
      got = export.run_stablehlo(f.read(), x)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_export_bad_input_is_one_line(run, tmp_path, capsys):
  workdir, _ = run
  for argv, needle in (
    ([f"--workdir={workdir}", "--format=tflite", f"--out={tmp_path / 'm'}"], "unknown export format 'tflite'"),
    ([f"--workdir={tmp_path / 'none'}", "--format=onnx", f"--out={tmp_path / 'm'}"], "not found"),
    ([f"--workdir={workdir}", "--format=stablehlo", f"--out={tmp_path / 'no' / 'm'}"], "does not exist"),
  ):
    code, _, err = _cli(export.main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, err)


def _random_variables(model, size):
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(1)
  stats = jax.tree_util.tree_map_with_path(
    lambda p, a: (rng.uniform(0.5, 1.5, a.shape) if p[-1].key == "var" else rng.normal(0, 0.1, a.shape)).astype(
      np.float32
    ),
    variables["batch_stats"],
  )
  return {"params": variables["params"], "batch_stats": stats}


@pytest.mark.parametrize(
  "name",
  [
    "resnet20",
    pytest.param("resnet18", marks=pytest.mark.slow),
    pytest.param("resnet50", marks=pytest.mark.slow),
  ],
)
def test_onnx_and_stablehlo_parity(name):
  import jax2onnx  # noqa: F401, E401  (the test extra installs them: a failure, never a skip)

  size = 32
  model = create_model(name, num_classes=10)
  variables = _random_variables(model, size)
  x = np.random.default_rng(2).normal(size=(3, size, size, 3)).astype(np.float32)
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  proto = export.to_onnx(model, variables, (size, size, 3))
  session = export.onnx_session(proto.SerializeToString())
  assert session.get_inputs()[0].shape[0] == "B"  # dynamic batch
  got = session.run(None, {"image": x})[0]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  blob = export.to_stablehlo(model, variables, (size, size, 3))
  np.testing.assert_allclose(export.run_stablehlo(blob, x), want, atol=1e-4, rtol=0)
