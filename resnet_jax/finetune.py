"""Fine-tuning: start a training run from weights instead of a random initialisation.

``config.finetune`` (see :func:`resnet_jax.config_check.base_config`):

- ``weights``: a torchvision state dict file (``.pth``/``.pt``, ``.safetensors``, ``.npz``; read with
  :func:`resnet_jax.convert.read_state_dict`, the reader of :func:`~resnet_jax.convert.load_checkpoint`) or
  the workdir of another ``train.py`` run (its newest checkpoint). ``""``: random initialisation.
- The classifier head (``fc``, or ``head`` for ``residual_mlp``) keeps its fresh initialisation when the
  number of classes differs from the source's (or always, with ``reset_head``); every other tensor, BatchNorm
  statistics included, is taken from the source. Any other difference in names or shapes is a
  :class:`~resnet_jax.errors.CheckpointError` of one line naming the first bad key.
- ``freeze_backbone``: only the head is trained (the backbone gets ``optax.set_to_zero`` updates);
  ``backbone_lr_scale``: the backbone's learning rate is the schedule's times this factor (both via
  ``optax.multi_transform`` over the labels ``"backbone"`` / ``"head"``).
- ``freeze_batch_stats``: BatchNorm uses and keeps its running statistics during training (the model runs
  in evaluation mode; scales and offsets still train unless the backbone is frozen).

The weights are loaded only when a run starts from step 0: resuming a fine-tuning run restores its own
checkpoint and never reads ``weights`` again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from resnet_jax.errors import CheckpointError

HEAD_NAMES = ("fc", "head")
WEIGHT_FILE_EXTENSIONS = (".pth", ".pt", ".safetensors", ".npz")


def _settings(config) -> dict:
  ft = config.get("finetune", None)
  defaults = dict(weights="", reset_head=False, freeze_backbone=False, freeze_batch_stats=False, backbone_lr_scale=1.0)
  if ft is None:
    return defaults
  return {k: ft.get(k, v) for k, v in defaults.items()}


def head_name(params: Any) -> str | None:
  """The top-level name of the classifier head in ``params`` (``fc`` or ``head``), or ``None``."""
  return next((n for n in HEAD_NAMES if n in params), None)


def param_labels(params: Any) -> Any:
  """``"head"`` for the classifier's parameters, ``"backbone"`` for every other one (same tree as params)."""
  head = head_name(params)
  return {k: jax.tree.map(lambda _: "head" if k == head else "backbone", v) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# The optimizer and the apply function of a fine-tuning run.


def make_optimizer(
  config, schedule: optax.Schedule, base: Callable[[Any, optax.Schedule], optax.GradientTransformation]
) -> optax.GradientTransformation:
  """``base(config, schedule)``, split by ``optax.multi_transform`` when the backbone is frozen or slower.

  Without ``freeze_backbone`` and with ``backbone_lr_scale == 1`` it is ``base(config, schedule)`` itself,
  so ordinary runs (and their checkpoints) are unchanged.
  """
  s = _settings(config)
  scale = float(s["backbone_lr_scale"])
  if not s["freeze_backbone"] and scale == 1.0:
    return base(config, schedule)
  if s["freeze_backbone"]:
    backbone = optax.set_to_zero()
  else:
    backbone = base(config, lambda step: schedule(step) * scale)
  return optax.multi_transform({"head": base(config, schedule), "backbone": backbone}, param_labels)


def make_apply_fn(config, model) -> Callable:
  """``model.apply``, or with ``freeze_batch_stats`` an apply that always runs BatchNorm on its running
  statistics and returns them unchanged (the training step's ``mutable=["batch_stats"]`` still works)."""
  if not _settings(config)["freeze_batch_stats"]:
    return model.apply

  def apply(variables, *args, train: bool = False, mutable: Any = False, **kwargs):
    del train
    out = model.apply(variables, *args, train=False, mutable=mutable, **kwargs)
    if mutable:
      y, state = out
      return y, {**state, "batch_stats": variables.get("batch_stats", {})}
    return out

  return apply


# ----------------------------------------------------------------------------------------------
# Reading the source weights.


def _shape_text(shape) -> str:
  return str(tuple(int(d) for d in shape))


def _is_head_key(flax_path: tuple[str, ...]) -> bool:
  return len(flax_path) > 1 and flax_path[1] in HEAD_NAMES


def _from_state_dict(path: str, target: dict, model_label: str) -> tuple[dict, tuple | None]:
  """Flax variables shaped like ``target`` (abstract, flattened with the collection first) from a
  torchvision state dict file, and the shape of the file's head kernel (in flax layout) or ``None``."""
  from resnet_jax import convert

  state_dict = convert.read_state_dict(path)
  arrays = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  out, used, head_shape, bad = {}, set(), None, []
  for flax_path, leaf in target.items():
    collection, rest = flax_path[0], flax_path[1:]
    key = convert._torch_key(collection, rest, len(leaf.shape))
    expected = convert._torch_shape(tuple(leaf.shape), rest[-1])
    if key not in arrays:
      if not _is_head_key(flax_path):
        bad.append(f"{key!r} is missing from the file (the model has it, shape {_shape_text(expected)})")
      continue
    used.add(key)
    a = convert._as_numpy(arrays[key])
    if _is_head_key(flax_path):
      if rest[-1] == "kernel":
        head_shape = convert._torch_shape(tuple(a.shape), "kernel")  # (out, in) -> (in, out)
      if tuple(a.shape) != expected:
        continue  # Another number of classes: the head is replaced (checked by the caller).
    elif tuple(a.shape) != expected:
      bad.append(f"{key!r} has shape {_shape_text(a.shape)} in the file, the model expects {_shape_text(expected)}")
      continue
    out[flax_path] = convert._to_flax_layout(a, len(leaf.shape), rest[-1])
  target_has_head = any(_is_head_key(p) for p in target)
  unexpected = [k for k in arrays if k not in used and not (k.startswith("fc.") and not target_has_head)]
  bad += [f"{k!r} in the file is not a tensor of the model" for k in unexpected]
  if bad:
    guess = convert.guess_architecture(state_dict)
    hint = f"; the file looks like a {guess} state dict" if guess else ""
    more = f" ({len(bad) - 1} more keys differ)" if len(bad) > 1 else ""
    raise CheckpointError(f"weights {path} do not fit {model_label}: first bad key {bad[0]}{more}{hint}")
  return out, head_shape


def latest_run_checkpoint(workdir: str) -> tuple[str, int]:
  """``(path of the saved state, step)`` of the newest complete checkpoint of the run in ``workdir``."""
  folder = os.path.join(workdir, "checkpoints")
  steps = sorted(
    int(n)
    for n in (os.listdir(folder) if os.path.isdir(folder) else ())
    if n.isdigit() and os.path.isdir(os.path.join(folder, n, "state"))
  )
  if not steps:
    raise CheckpointError(
      f"weights {workdir} is a folder without a complete checkpoint in {folder}: "
      f"expected the workdir of a train.py run, or a weights file "
      f"({', '.join(WEIGHT_FILE_EXTENSIONS)})"
    )
  return os.path.join(folder, str(steps[-1]), "state"), steps[-1]


def read_run_variables(workdir: str) -> tuple[dict, dict]:
  """``({"params", "batch_stats"}, run config as a dict)`` of the newest checkpoint of a ``train.py`` run:
  its weight average when the run kept one (``config.ema_decay > 0``), as the run's evaluations used."""
  import orbax.checkpoint as ocp

  state_path, step = latest_run_checkpoint(workdir)
  run_config = {}
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      run_config = json.load(f)
  except (OSError, json.JSONDecodeError):
    pass
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(state_path))
  except Exception as e:  # orbax raises many types on damaged files
    raise CheckpointError(
      f"cannot read the checkpoint of step {step} in {workdir}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    ) from None
  if not isinstance(restored, dict) or "params" not in restored:
    raise CheckpointError(f"{state_path} does not hold a train state with params")
  variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}
  if isinstance(restored.get("ema"), dict):  # A run with config.ema_decay > 0: its weight average.
    variables = _averaged(restored["ema"], variables, run_config.get("ema_decay"), state_path)
  return jax.tree.map(np.asarray, variables), run_config


def _averaged(ema: dict, own: dict, decay: Any, state_path: str) -> dict:
  """The debiased weight average of a checkpoint (:func:`resnet_jax.train_step.averaged_variables`)."""
  from resnet_jax.train_step import debiased_average

  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
    raise CheckpointError(
      f"{state_path} holds a weight average, but the run's config.json gives no ema_decay in (0, 1) "
      f"(got {decay!r}): restore config.json next to checkpoints/"
    )
  if int(ema["count"]) == 0:  # Saved before the first step: nothing averaged yet.
    return own
  avg = debiased_average(ema["ema"], float(decay), ema["count"])
  return {"params": avg["params"], "batch_stats": avg.get("batch_stats") or {}}


def _from_workdir(workdir: str, target: dict, model_label: str) -> tuple[dict, tuple | None]:
  variables, run_config = read_run_variables(workdir)
  flat = {}
  for collection in ("params", "batch_stats"):
    for p, a in traverse_util.flatten_dict(dict(variables[collection])).items():
      flat[(collection,) + tuple(p)] = a
  run_model = run_config.get("model", {}).get("name", "?")
  head_shape = next((tuple(a.shape) for p, a in flat.items() if _is_head_key(p) and p[-1] == "kernel"), None)
  out, bad = {}, []
  for p, leaf in target.items():
    name = "/".join(p)
    if p not in flat:
      if not _is_head_key(p):
        bad.append(f"{name} is missing from the run (the model has it, shape {_shape_text(leaf.shape)})")
      continue
    if tuple(flat[p].shape) != tuple(leaf.shape):
      if not _is_head_key(p):
        bad.append(
          f"{name} has shape {_shape_text(flat[p].shape)} in the run, the model expects {_shape_text(leaf.shape)}"
        )
      continue
    out[p] = flat[p]
  target_has_head = any(_is_head_key(p) for p in target)
  bad += [
    f"{'/'.join(p)} in the run is not a variable of the model"
    for p in flat
    if p not in target and (target_has_head or not _is_head_key(p))
  ]
  if bad:
    more = f" ({len(bad) - 1} more keys differ)" if len(bad) > 1 else ""
    raise CheckpointError(
      f"weights of the run in {workdir} (model {run_model}) do not fit {model_label}: first bad key {bad[0]}{more}"
    )
  return out, head_shape


def load_initial_variables(
  source: str,
  variables: dict,
  model_label: str = "the model",
  reset_head: bool = False,
  log: Callable[[str], None] = print,
) -> dict:
  """``variables`` (a fresh initialisation) with every tensor replaced by the one of ``source``.

  Args:
    source: a weights file (``.pth``/``.pt``/``.safetensors``/``.npz``, torchvision names and layouts) or
      the workdir of a ``train.py`` run.
    variables: ``{"params", "batch_stats"}`` of the model to fine-tune (their values are kept for the head
      when it is replaced).
    model_label: how the model is named in messages.
    reset_head: keep the fresh head even when the class counts agree.
    log: where the one-line note about the head goes.

  Raises:
    CheckpointError: the source is missing or unreadable, or a name or shape does not fit (one line naming
      the first bad key).
  """
  source = os.fspath(source)
  flat_target = {}
  for collection in ("params", "batch_stats"):
    for p, a in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
      flat_target[(collection,) + tuple(p)] = a
  if os.path.isdir(source):
    loaded, head_shape = _from_workdir(source, flat_target, model_label)
  elif os.path.isfile(source):
    if os.path.splitext(source)[1].lower() not in WEIGHT_FILE_EXTENSIONS:
      raise CheckpointError(
        f"weights {source}: unknown format {os.path.splitext(source)[1]!r}, expected a "
        f"file ending in {', '.join(WEIGHT_FILE_EXTENSIONS)} or a train.py workdir"
      )
    loaded, head_shape = _from_state_dict(source, flat_target, model_label)
  else:
    raise CheckpointError(
      f"weights {source} not found: expected a file ({', '.join(WEIGHT_FILE_EXTENSIONS)}) "
      f"or the workdir of a train.py run"
    )
  head_keys = [p for p in flat_target if _is_head_key(p)]
  target_kernel = next((tuple(flat_target[p].shape) for p in head_keys if p[-1] == "kernel"), None)
  replace_head = bool(head_keys) and (reset_head or head_shape != target_kernel)
  if replace_head:
    for p in head_keys:
      loaded.pop(p, None)
    old = f"{head_shape[-1]} classes" if head_shape else "no head"
    log(f"fine-tuning from {source}: new head for {target_kernel[-1]} classes (the weights have {old})")
  else:
    log(f"fine-tuning from {source}: all {len(loaded)} tensors loaded")
  flat = {p: (jnp.asarray(loaded[p], dtype=a.dtype) if p in loaded else a) for p, a in flat_target.items()}
  out = {}
  for collection in ("params", "batch_stats"):
    part = {p[1:]: a for p, a in flat.items() if p[0] == collection}
    if part or collection in variables:
      out[collection] = traverse_util.unflatten_dict(part) if part else {}
  return out


def initial_state(config, model, state, log: Callable[[str], None] = print):
  """The train state of step 0: ``state`` (fresh) with its params and BatchNorm statistics taken from
  ``config.finetune.weights`` when that is set (and unchanged otherwise)."""
  s = _settings(config)
  if not s["weights"]:
    return state
  variables = {"params": state.params, "batch_stats": state.batch_stats or {}}
  label = f"model {config.model.name}"
  loaded = load_initial_variables(s["weights"], variables, label, reset_head=bool(s["reset_head"]), log=log)
  return state.replace(params=loaded["params"], batch_stats=loaded.get("batch_stats", state.batch_stats))


# ----------------------------------------------------------------------------------------------
# Writing a run's weights as a torchvision state dict.


def torchvision_state_dict(variables: dict) -> dict[str, np.ndarray]:
  """Variables of any conv model of the registry (any options) as torchvision names and layouts.

  For the default architectures this equals :func:`resnet_jax.convert.to_torchvision` (which also checks
  the layout against the registered model); this one follows the variables' own structure, so that
  ``stem="cifar"`` or narrower models round-trip through ``config.finetune.weights`` too.
  """
  from resnet_jax import convert

  out = {}
  for collection in ("params", "batch_stats"):
    for p, a in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
      key = convert._torch_key(collection, tuple(p), np.ndim(a))
      out[key] = np.array(convert._to_torch_layout(np.asarray(a), p[-1]), order="C", copy=True)
      if collection == "batch_stats" and p[-1] == "mean":
        out[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, dtype=np.int64)
  return out


def save_weights(variables: dict, path: str) -> None:
  """Write :func:`torchvision_state_dict` of ``variables`` to a ``.safetensors`` or ``.npz`` file."""
  from resnet_jax.convert import write_state_dict

  write_state_dict(torchvision_state_dict(variables), path)


def main(argv: list[str]) -> int:
  """``python -m resnet_jax.finetune --workdir=RUN --out=FILE.safetensors|.npz``: a run's weights as a file."""
  import argparse

  from resnet_jax.errors import parse_args

  parser = argparse.ArgumentParser(
    prog="python -m resnet_jax.finetune",
    description="write the newest checkpoint's weights of a train.py run as "
    "a torchvision state dict (.safetensors or .npz)",
  )
  parser.add_argument("--workdir", required=True, help="output folder of a train.py run")
  parser.add_argument("--out", required=True, help="file to write (.safetensors or .npz)")
  args = parse_args(parser, argv, "usage: python -m resnet_jax.finetune --workdir=RUN --out=FILE.safetensors")
  variables, _ = read_run_variables(args.workdir)
  save_weights(variables, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  import sys

  from resnet_jax.errors import run_cli

  run_cli(main, sys.argv[1:])
