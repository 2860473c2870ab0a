"""The training configuration: every key with its default, and the check run before any work starts.

Config files in ``configs/`` start from :func:`base_config` (so every key always exists) and change
values. :func:`validate_config` checks the whole ConfigDict: unknown keys (with a "did you mean"),
types, ranges and combinations, and raises :class:`~resnet_jax.errors.ConfigError` naming the key,
the value and what was expected.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable

import ml_collections

from resnet_jax.data import AUGMENTATIONS, DATASETS
from resnet_jax.errors import ConfigError
from resnet_jax.models import CONV_BACKENDS

OPTIMIZERS = ("sgd", "nesterov", "adamw", "lars")
SCHEDULES = ("constant", "step", "cosine")
UNITS = ("steps", "epochs")
DTYPES = ("float32", "bfloat16")
NONFINITE = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
  """Every training key with its default value (the digits run of ``python train.py``)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"          # digits | cifar10 | cifar100 | image_folder
  c.dataset.data_dir = ""            # cifar*/image_folder: the local folder (no download)
  c.dataset.image_size = 224         # image_folder: crop size fed to the model
  c.dataset.num_classes = -1         # -1: from the dataset
  c.dataset.test_fraction = 0.2      # digits: fraction held out (stratified, fixed)
  c.dataset.augment = "none"         # none | pad_crop | pad_crop_flip | random_resized_crop_flip
  c.dataset.crop_padding = 4         # pad_crop*: zero padding per side before the random crop
  c.dataset.mean = ()                # per-channel normalisation; () = the dataset's default
  c.dataset.std = ()
  c.dataset.num_threads = 2          # grain read threads
  c.dataset.num_workers = 0          # grain worker processes (0: none)
  c.dataset.max_train_examples = -1  # >0: train on a fixed subset (quick runs, tests)
  c.dataset.max_test_examples = -1
  c.dataset.on_corrupt_image = "stop"  # image_folder, an unreadable file: stop | skip (each file is
                                       # checked once at load time, the bad ones left out and counted)

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet20"          # any name of resnet_jax.list_models()
  c.model.dtype = "float32"          # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.model.conv_backend = "xla"       # conv models: xla | onednn (CPU, x86-64; pip install -e ".[onednn]")
  c.model.options = ml_collections.ConfigDict()  # extra keyword options of create_model

  c.finetune = ml_collections.ConfigDict()  # start from weights (resnet_jax.finetune, docs/finetune.md)
  c.finetune.weights = ""            # a torchvision .pth/.pt/.safetensors/.npz file or a train.py workdir;
                                     # "" = random init. Read at step 0 only (a resume never reloads it)
  c.finetune.reset_head = False      # new head even when the class counts agree (always when they differ)
  c.finetune.freeze_backbone = False  # train the head only
  c.finetune.freeze_batch_stats = False  # BatchNorm on its running statistics, which stay as loaded
  c.finetune.backbone_lr_scale = 1.0  # the backbone's learning rate = the schedule's x this

  c.batch_size = 128                 # global batch, over all devices and hosts
  c.eval_batch_size = 256
  c.num_epochs = 30.0
  c.num_train_steps = -1             # >0 overrides num_epochs

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"           # sgd | nesterov | adamw | lars
  c.optimizer.learning_rate = 0.1    # peak learning rate
  c.optimizer.momentum = 0.9         # sgd/nesterov/lars momentum; adamw: b1
  c.optimizer.b2 = 0.999             # adamw
  c.optimizer.eps = 1e-8             # adamw
  c.optimizer.weight_decay = 5e-4    # on conv/dense kernels only (not BN, not biases)
  c.optimizer.lars_trust_coefficient = 0.001

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"         # constant | step | cosine
  c.schedule.unit = "epochs"         # unit of warmup and boundaries: steps | epochs
  c.schedule.warmup = 1.0            # linear warmup from 0 to the peak
  c.schedule.boundaries = ()         # step: multiply the rate by decay_factor at each boundary
  c.schedule.decay_factor = 0.1

  c.label_smoothing = 0.0
  c.log_every_steps = 20
  c.eval_every_steps = -1            # -1: once per epoch (and always at the end)
  c.checkpoint_every_steps = -1      # -1: at each evaluation (and always at the end)
  c.keep_checkpoints = 3
  c.progress_bar = True
  c.on_nonfinite = "stop"            # a non-finite loss: stop | skip (the step is not applied)
  c.host_memory = "default"          # keep: glibc keeps and reuses freed host memory (one malloc arena),
                                     # no page faults every step: CPU steps of CIFAR size and up ~20%
                                     # faster, tiny ones (digits) slower (resnet_jax.host_memory) | default
  c.restore_step = -1                # resume from: -1 = the newest checkpoint; N = checkpoint N (later
                                     # ones are moved to WORKDIR/checkpoints_superseded/)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False   # call jax.distributed.initialize (multi-host)
  c.distributed.coordinator_address = ""  # "" = auto-detect (cluster environments)
  c.distributed.num_processes = -1
  c.distributed.process_id = -1
  return c


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         integer: bool = False) -> Callable[[Any], str | None]:
  """A check that a value is a number (an int where ``integer``) in the given range."""
  def check(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
      return "an integer" if integer else "a number"
    if isinstance(v, float) and not math.isfinite(v):
      return "a finite number"
    if lo is not None and (v <= lo if lo_open else v < lo):
      return f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
    if hi is not None and v > hi:
      return f"<= {hi}"
    return None
  return check


def _pos_int(v: Any) -> str | None:
  return _num(0, lo_open=True, integer=True)(v)


def _pos_int_or_auto(v: Any) -> str | None:
  if v == -1 and isinstance(v, int) and not isinstance(v, bool):
    return None
  return None if _pos_int(v) is None else "a positive integer or -1"


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
  def check(v: Any) -> str | None:
    return None if isinstance(v, str) and v in options else f"one of {', '.join(options)}"
  return check


def _type(t: type, what: str) -> Callable[[Any], str | None]:
  def check(v: Any) -> str | None:
    return None if isinstance(v, t) and not (t is int and isinstance(v, bool)) else what
  return check


def _floats(v: Any) -> str | None:
  if not isinstance(v, (tuple, list)) or any(
      isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
    return "a tuple of numbers"
  return None


SCHEMA: dict[str, Any] = {
    "seed": _num(0, 2**31 - 1, integer=True),
    "dataset": {
        "name": _choice(DATASETS),
        "data_dir": _type(str, "a string (a folder path)"),
        "image_size": _pos_int,
        "num_classes": _pos_int_or_auto,
        "test_fraction": lambda v: _num(0.0, 1.0, lo_open=True)(v) or (
            "< 1" if v >= 1.0 else None),
        "augment": _choice(AUGMENTATIONS),
        "crop_padding": _num(0, integer=True),
        "mean": _floats,
        "std": _floats,
        "num_threads": _pos_int,
        "num_workers": _num(0, integer=True),
        "max_train_examples": _pos_int_or_auto,
        "max_test_examples": _pos_int_or_auto,
        "on_corrupt_image": _choice(("stop", "skip")),
    },
    "model": {
        "name": _type(str, "a model name (see resnet_jax.list_models())"),
        "dtype": _choice(DTYPES),
        "conv_backend": _choice(CONV_BACKENDS),
        "options": None,  # Free-form: checked by create_model (ModelError).
    },
    "finetune": {
        "weights": _type(str, "a string (a weights file or a train.py workdir)"),
        "reset_head": _type(bool, "True or False"),
        "freeze_backbone": _type(bool, "True or False"),
        "freeze_batch_stats": _type(bool, "True or False"),
        "backbone_lr_scale": _num(0.0, lo_open=True),
    },
    "batch_size": _pos_int,
    "eval_batch_size": _pos_int,
    "num_epochs": _num(0.0, lo_open=True),
    "num_train_steps": _pos_int_or_auto,
    "optimizer": {
        "name": _choice(OPTIMIZERS),
        "learning_rate": _num(0.0, lo_open=True),
        "momentum": _num(0.0, 1.0),
        "b2": _num(0.0, 1.0),
        "eps": _num(0.0, lo_open=True),
        "weight_decay": _num(0.0),
        "lars_trust_coefficient": _num(0.0, lo_open=True),
    },
    "schedule": {
        "name": _choice(SCHEDULES),
        "unit": _choice(UNITS),
        "warmup": _num(0.0),
        "boundaries": _floats,
        "decay_factor": _num(0.0, lo_open=True),
    },
    "label_smoothing": _num(0.0, 1.0),
    "log_every_steps": _pos_int,
    "eval_every_steps": _pos_int_or_auto,
    "checkpoint_every_steps": _pos_int_or_auto,
    "keep_checkpoints": _pos_int,
    "progress_bar": _type(bool, "True or False"),
    "on_nonfinite": _choice(NONFINITE),
    "host_memory": _choice(("keep", "default")),
    "restore_step": _num(-1, integer=True),
    "distributed": {
        "initialize": _type(bool, "True or False"),
        "coordinator_address": _type(str, "a string host:port"),
        "num_processes": _pos_int_or_auto,
        "process_id": _num(-1, integer=True),
    },
}


def _walk(cfg: Any, schema: dict[str, Any], prefix: str) -> None:
  if not isinstance(cfg, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"config.{prefix.rstrip('.')} must be a group of keys, got {cfg!r}")
  keys = list(cfg.keys())
  for key in keys:
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema), n=3)
      hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
      raise ConfigError(f"unknown config key config.{prefix}{key}{hint} "
                        f"(known keys here: {', '.join(sorted(schema))})")
  for key, rule in schema.items():
    if key not in keys:
      raise ConfigError(f"config.{prefix}{key} is missing; start config files from "
                        f"resnet_jax.config_check.base_config()")
    value = cfg[key]
    if isinstance(rule, dict):
      _walk(value, rule, f"{prefix}{key}.")
    elif rule is None:
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"config.{prefix}{key} must be a group of keyword options, got {value!r}")
    else:
      expected = rule(value)
      if expected is not None:
        raise ConfigError(f"config.{prefix}{key} = {value!r} ({type(value).__name__}) is invalid: "
                          f"expected {expected}")


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Check every key, type, range and combination of a training config; raise ConfigError.

  Args:
    config: the full training config.
    device_count: the number of devices the batch is split over (``jax.device_count()``); the
      global batch sizes must be divisible by it. ``None`` skips that check.
  """
  _walk(config, SCHEMA, "")
  ds = config.dataset
  if ds.name in ("cifar10", "cifar100", "image_folder") and not ds.data_dir:
    raise ConfigError(f"config.dataset.data_dir is empty: dataset {ds.name!r} is read from a local "
                      f"folder (set --config.dataset.data_dir=DIR)")
  if len(ds.mean) != len(ds.std):
    raise ConfigError(f"config.dataset.mean {tuple(ds.mean)} and config.dataset.std {tuple(ds.std)} "
                      f"must have the same length")
  if any(s <= 0 for s in ds.std):
    raise ConfigError(f"config.dataset.std must be positive, got {tuple(ds.std)}")
  if ds.augment == "random_resized_crop_flip" and ds.name != "image_folder":
    raise ConfigError(f"config.dataset.augment='random_resized_crop_flip' works on image folders "
                      f"only, not on {ds.name!r} (use pad_crop_flip)")
  sch = config.schedule
  if sch.name == "step" and not len(sch.boundaries):
    raise ConfigError("config.schedule.name='step' needs config.schedule.boundaries (in "
                      f"{sch.unit}), e.g. (32000, 48000)")
  if list(sch.boundaries) != sorted(sch.boundaries) or any(b <= 0 for b in sch.boundaries):
    raise ConfigError(f"config.schedule.boundaries {tuple(sch.boundaries)} must be positive and increasing")
  if config.distributed.initialize and config.distributed.coordinator_address and (
      config.distributed.num_processes < 1 or config.distributed.process_id < 0):
    raise ConfigError("config.distributed: with a coordinator_address, set num_processes >= 1 and "
                      "process_id >= 0")
  if device_count is not None:
    for key in ("batch_size", "eval_batch_size"):
      if config[key] % device_count:
        raise ConfigError(f"config.{key} = {config[key]} is not divisible by the {device_count} devices "
                          f"the batch is split over; use a multiple of {device_count}")
