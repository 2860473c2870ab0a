"""Re-evaluate a training run's checkpoint on its test set.

  python -m resnet_jax.evaluate --workdir=runs/digits [--step=N] [--eval-flip=true|false] [--eval-translate=N]

Reads ``WORKDIR/config.json`` (written by ``train.py``), rebuilds the model and the data (normalised
with the mean and std recorded in ``WORKDIR/data.json``, the ones the run trained with), restores the
newest (or the given) checkpoint from ``WORKDIR/checkpoints`` and prints the test loss and accuracy,
with the compute dtype and the machine, as one JSON line. ``--eval-flip`` and ``--eval-translate``
score with another test-time augmentation than the run's (``config.eval_flip``,
``config.eval_translate``). Errors (no such workdir, no checkpoint, unreadable checkpoint, a bad
value) are one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections

from resnet_jax.errors import CheckpointError, ConfigError, parse_args, run_cli


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in ``workdir`` as it is now: ``WORKDIR/config.json`` (its start) with the
  setting changes of ``WORKDIR/config_history.jsonl`` applied."""
  from resnet_jax.workdir import current_settings, read_json_object

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} not found: --workdir must be the output folder of a train.py run")
  raw = current_settings(workdir, read_json_object(path, "the config of a train.py run"))
  from resnet_jax.config_check import base_config

  config = base_config()
  try:
    config.update_from_flattened_dict(_flatten(raw))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise ConfigError(f"{path} does not match this version's config keys: {e}") from None
  _use_recorded_normalization(workdir, config)
  return config


def recorded_data(workdir: str) -> dict | None:
  """What the run recorded about its data (``WORKDIR/data.json``: its normalisation, an image folder's class
  names, the held-out images), or ``None`` for a run of an earlier version that wrote none; a file that
  cannot be read as a JSON object is a :class:`CheckpointError` naming it."""
  path = os.path.join(workdir, "data.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
  if not isinstance(info, dict):
    raise CheckpointError(f"cannot read {path}: it holds a JSON {type(info).__name__}, expected an object")
  return info


def _use_recorded_normalization(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Set ``config.dataset.mean / std`` to those of ``WORKDIR/data.json``, where the run recorded them."""
  info = recorded_data(workdir)
  if info is None:
    return  # A run of an earlier version: the config gives the same normalisation.
  path = os.path.join(workdir, "data.json")
  try:
    norm = info["normalization"]
    mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"cannot read the normalisation recorded in {path}: {type(e).__name__}: {e}") from None
  config.dataset.mean, config.dataset.std = mean, std


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k != "options":
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = (
        ml_collections.ConfigDict(v) if isinstance(v, dict) else (tuple(v) if isinstance(v, list) else v)
      )
  return out


def evaluate_workdir(
  workdir: str, step: int | None = None, eval_flip: bool | None = None, eval_translate: int | None = None
) -> dict:
  """Test loss and accuracy of the checkpoint of ``step`` (default: newest) of the run in ``workdir``.

  ``eval_flip`` and ``eval_translate``, where given, replace the run's test-time augmentation.
  """
  import jax

  from resnet_jax import machine, run_setup
  from resnet_jax.checkpoint import Checkpointer
  from resnet_jax.config_check import validate_config

  config = load_run_config(workdir)
  if eval_flip is not None:
    config.eval_flip = bool(eval_flip)
  if eval_translate is not None:
    config.eval_translate = int(eval_translate)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"no checkpoints folder in {workdir}")
  validate_config(config)
  setup = run_setup.Setup(config)
  ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
  try:
    state, _, _ = ckpt.restore(setup.abstract_state(), step)
  finally:
    ckpt.close()
  result = setup.evaluate(state)
  return {
    "workdir": os.path.abspath(workdir),
    "step": int(jax.device_get(state.step)),
    "model": config.model.name,
    "dataset": config.dataset.name,
    "test_loss": result["loss"],
    "test_accuracy": result["accuracy"],
    "examples": result["count"],
    "eval_flip": bool(config.eval_flip),
    "eval_translate": int(config.eval_translate),
    "compute_dtype": setup.compute_dtype,
    "machine": machine.describe(),  # a score may differ in its last digits between CPU kinds
  }


def _bool(text: str) -> bool:
  if text.lower() in ("true", "1", "yes"):
    return True
  if text.lower() in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m resnet_jax.evaluate", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="output folder of a train.py run")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument(
    "--eval-flip", type=_bool, default=None, help="true|false: test-time flip (default: the run's config.eval_flip)"
  )
  parser.add_argument(
    "--eval-translate", type=int, default=None, help="N: test-time translation by N pixels (default: the run's)"
  )
  args = parse_args(
    parser, argv, "usage: python -m resnet_jax.evaluate --workdir=DIR [--step=N] [--eval-flip=B] [--eval-translate=N]"
  )
  print(json.dumps(evaluate_workdir(args.workdir, args.step, args.eval_flip, args.eval_translate)))
  return 0


if __name__ == "__main__":
  run_cli(main, sys.argv[1:])
