"""The training configuration: every key with its default, and the check run before any work starts.

Config files in ``configs/`` start from :func:`base_config` (so every key always exists) and change
values. :func:`validate_config` checks the whole ConfigDict: unknown keys (with a "did you mean"),
types, ranges and combinations, and raises :class:`~resnet_jax.errors.ConfigError` naming the key,
the value and what was expected.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import math
import os
import re
import textwrap
import tokenize
from collections.abc import Callable
from typing import Any

import ml_collections

from resnet_jax.augment import AUGMENTATIONS, NORMALIZATIONS
from resnet_jax.data import AUGMENT_ON, IN_MEMORY
from resnet_jax.datasets import DATASETS
from resnet_jax.errors import ConfigError
from resnet_jax.host_memory import HOST_MEMORY
from resnet_jax.models import CONV_BACKENDS

OPTIMIZERS = ("sgd", "nesterov", "adamw", "lars")
SCHEDULES = ("constant", "step", "cosine", "linear")
UNITS = ("steps", "epochs")
DTYPES = ("float32", "bfloat16", "auto")  # resolved by resnet_jax.run_setup.compute_dtype
NONFINITE = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
  """Every training key with its default value (the digits run of ``python train.py``)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # initial parameters and the order of the training data

  c.dataset = ml_collections.ConfigDict()  # the data and its input pipeline
  c.dataset.name = "digits"  # digits | cifar10 | cifar100 | image_folder
  c.dataset.data_dir = ""  # cifar*/image_folder: the local folder (no download), or a tar archive of it
  c.dataset.unpack_dir = ""  # where a tar archive data_dir is unpacked once ("": ~/.cache/resnet_jax/unpacked)
  c.dataset.image_size = 224  # image_folder: crop size fed to the model
  c.dataset.num_classes = -1  # -1: from the dataset
  c.dataset.test_fraction = 0.2  # digits: fraction held out (stratified, fixed)
  c.dataset.augment = "none"  # none | pad_crop | pad_crop_flip | random_resized_crop_flip
  c.dataset.crop_padding = 4  # pad_crop*: zero padding per side before the random crop
  c.dataset.cutout = 0  # side in pixels of one square per training image set to 0 after normalisation
  # (the channel mean; DeVries & Taylor 2017), centred anywhere, clipped at the border; 0 = off
  c.dataset.normalize = "default"  # default: the dataset's usual statistics (docs/training.md) |
  # dataset: mean / std of the training images (not the held-out ones)
  c.dataset.mean = ()  # per-channel normalisation; () = as `normalize` says
  c.dataset.std = ()  # per-channel divisor after the mean; () = as `normalize` says
  c.dataset.holdout = 0.0  # >0: hold out of the training images, as the evaluation split, a
  # fraction in (0, 1) or a count >= 1 (stratified, fixed per seed);
  # -1: 10% when the data has no test split, else none
  c.dataset.holdout_seed = 0  # which images holdout takes (resnet_jax.datasets.holdout_mask)
  c.dataset.in_memory = "auto"  # image_folder: auto (decode once into memory when the images are
  # image_size square and fit in in_memory_max_mb) | always | never
  c.dataset.augment_on = "auto"  # where training batches are augmented: host (the input pipeline) |
  # device (the step, images kept in device memory) | auto (device on GPU/TPU for in-memory images)
  c.dataset.in_memory_max_mb = 4096  # image_folder, in_memory=auto: most decoded MB held in memory
  c.dataset.num_threads = 2  # grain read threads
  c.dataset.num_workers = 0  # grain worker processes (0: none)
  c.dataset.max_train_examples = -1  # >0: train on a fixed subset (quick runs, tests)
  c.dataset.max_test_examples = -1  # >0: evaluate on a fixed subset
  c.dataset.on_corrupt_image = "stop"  # image_folder, an unreadable file: stop | skip (each file is
  # checked once at load time, the bad ones left out and counted)

  c.model = ml_collections.ConfigDict()  # the network (resnet_jax.create_model)
  c.model.name = "resnet20"  # any name of resnet_jax.list_models()
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | auto (bfloat16 where the device computes it
  # natively, else float32: resnet_jax.run_setup.compute_dtype); parameters stay float32
  c.model.conv_backend = "auto"  # conv models: auto (oneDNN where it runs, else XLA) | xla | onednn
  c.model.options = ml_collections.ConfigDict()  # extra keyword options of create_model

  c.finetune = ml_collections.ConfigDict()  # start from weights (resnet_jax.finetune, docs/finetune.md)
  c.finetune.weights = ""  # a torchvision .pth/.pt/.safetensors/.npz file or a train.py workdir;
  # "" = random init. Read at step 0 only (a resume never reloads it)
  c.finetune.reset_head = False  # new head even when the class counts agree (always when they differ)
  c.finetune.freeze_backbone = False  # train the head only
  c.finetune.freeze_batch_stats = False  # BatchNorm on its running statistics, which stay as loaded
  c.finetune.backbone_lr_scale = 1.0  # the backbone's learning rate = the schedule's x this

  c.batch_size = 128  # global batch, over all devices and hosts
  c.eval_batch_size = 256  # global batch of the evaluation
  c.num_epochs = 30.0  # length of training in passes over the training set
  c.num_train_steps = -1  # >0 overrides num_epochs

  c.optimizer = ml_collections.ConfigDict()  # optax optimizer
  c.optimizer.name = "sgd"  # sgd | nesterov | adamw | lars
  c.optimizer.learning_rate = 0.1  # peak learning rate
  c.optimizer.momentum = 0.9  # sgd/nesterov/lars momentum; adamw: b1
  c.optimizer.b2 = 0.999  # adamw
  c.optimizer.eps = 1e-8  # adamw
  c.optimizer.weight_decay = 5e-4  # on conv/dense kernels only (not BN, not biases)
  c.optimizer.lars_trust_coefficient = 0.001  # lars: the trust ratio's coefficient

  c.schedule = ml_collections.ConfigDict()  # learning-rate schedule
  c.schedule.name = "cosine"  # constant | step | cosine | linear (to 0 at the last step)
  c.schedule.unit = "epochs"  # unit of warmup and boundaries: steps | epochs
  c.schedule.warmup = 1.0  # linear warmup from 0 to the peak
  c.schedule.boundaries = ()  # step: multiply the rate by decay_factor at each boundary
  c.schedule.decay_factor = 0.1  # step: the factor applied at each boundary

  c.label_smoothing = 0.0  # e: the targets are (1 - e) one-hot + e / classes
  c.eval_flip = False  # evaluate on the mean logits of each image and its mirror image
  c.eval_translate = 0  # n > 0: test-time translation too: half the logits of the image, half the mean of
  # the image shifted n pixels down-right and up-left, borders reflected (resnet_jax.train_step.eval_logits)
  c.ema_decay = 0.0  # d > 0: keep an exponential moving average of the weights and BatchNorm
  # statistics, m = d m + (1 - d) theta after every step, debiased; evaluations, checkpoints'
  # exports, predict and fine-tuning from the workdir use it (resnet_jax.train_step.averaged_variables)
  c.time_budget_minutes = 0.0  # m > 0: train at most what fits in m minutes of this machine, everything
  # included: measured before step 0, the steps that fit (at most the config's), the schedule shortened
  # in proportion, the choice recorded in WORKDIR/time_budget.json and kept on resume (resnet_jax.time_budget)
  c.time_budget_margin = 0.03  # the fraction of the budget left unplanned (0 to 0.5), for the machine's speed to vary
  c.steps_per_call = 1  # k > 1: up to k training steps in one compiled call (a loop on the device),
  # for steps so short that the host's work per call limits them; calls end at every record, evaluation
  # and checkpoint: the same batches, records and checkpoints as one step per call, the same numbers to
  # float rounding (resnet_jax.run_setup.repeat_step)
  c.log_every_steps = 20  # a train record (metrics.jsonl, TensorBoard) every N steps
  c.log_grad_norms = False  # train records: "grad_norm/<module>", the window's mean L2 norm of
  # the gradient of each top-level module (stem, each block, head)
  c.eval_every_steps = -1  # -1: once per epoch (and always at the end)
  c.checkpoint_every_steps = -1  # -1: at each evaluation (and always at the end)
  c.keep_checkpoints = 3  # the newest K checkpoints are kept
  c.progress_bar = True  # tqdm progress bar on stderr
  c.on_nonfinite = "stop"  # a non-finite loss: stop | skip (the step is not applied)
  c.host_memory = "auto"  # keep: glibc keeps and reuses freed host memory (one malloc arena),
  # no page faults every step: CPU steps of CIFAR size and up ~20% faster, tiny ones (digits)
  # slower | default | auto: keep from 65,536 input pixels per step (resnet_jax.host_memory)
  c.restore_step = -1  # resume from: -1 = the newest checkpoint; N = checkpoint N (later
  # ones are moved to WORKDIR/checkpoints_superseded/)

  c.distributed = ml_collections.ConfigDict()  # multi-host runs
  c.distributed.initialize = False  # call jax.distributed.initialize (multi-host)
  c.distributed.coordinator_address = ""  # "" = auto-detect (cluster environments)
  c.distributed.num_processes = -1  # with coordinator_address: the number of processes
  c.distributed.process_id = -1  # with coordinator_address: the index of this process
  c.distributed.init_timeout_s = 300  # seconds to wait for every process to connect
  c.distributed.heartbeat_timeout_s = 100  # seconds without a heartbeat after which a process counts as
  # dead and the others stop (where the installed jax takes the setting)
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file such as ``configs/cifar10_fast.py`` (what ``train.py --config`` reads).

  Raises :class:`~resnet_jax.errors.ConfigError` when the file does not exist or defines no ``get_config``
  returning a ConfigDict. The config is returned as written; :func:`validate_config` checks it.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path}: no such file (expected a config such as configs/cifar10_fast.py)")
  name = "config_" + "".join(ch if ch.isalnum() else "_" for ch in os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_config = getattr(module, "get_config", None)
  config = get_config() if callable(get_config) else None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: expected a get_config() that returns an ml_collections.ConfigDict")
  return config


def describe_config() -> list[tuple[str, Any, str]]:
  """``(key, default, description)`` for every key and group of :func:`base_config`, in its order.

  The descriptions are the comments of ``base_config``'s source (a key's comment continued on the
  comment-only lines right below it joined into one line), so that they are written in one place only.
  Keys are dotted (``"optimizer.learning_rate"``); a group's default is its ConfigDict.
  """
  lines = textwrap.dedent(inspect.getsource(base_config)).splitlines()
  comments = {
    tok.start[0] - 1: tok.string.lstrip("#").strip()
    for tok in tokenize.generate_tokens(iter(line + "\n" for line in lines).__next__)
    if tok.type == tokenize.COMMENT
  }
  described: dict[str, list[str]] = {}
  key = None
  for row, line in enumerate(lines):
    assigned = re.match(r"\s*c\.([\w.]+)\s*=", line)
    if assigned:
      key = assigned.group(1)
      described[key] = [comments[row]] if row in comments else []
    elif key and described[key] and row in comments and line.lstrip().startswith("#"):
      described[key].append(comments[row])  # The comment goes on below its key.
    else:
      key = None
  defaults = base_config()
  out = []
  for key, text in described.items():
    value = defaults
    for part in key.split("."):
      value = value[part]
    out.append((key, value, " ".join(text)))
  return out


def _num(
  lo: float | None = None, hi: float | None = None, lo_open: bool = False, integer: bool = False
) -> Callable[[Any], str | None]:
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


def _holdout(v: Any) -> str | None:
  """dataset.holdout: a fraction in (0, 1), a whole count >= 1, 0 (none) or -1 (auto)."""
  if v == -1 and not isinstance(v, bool):
    return None
  if _num(0.0)(v) or (v >= 1 and v != int(v)):
    return "a fraction in (0, 1), a whole count >= 1 or -1 (auto)"
  return None


def _floats(v: Any) -> str | None:
  if not isinstance(v, (tuple, list)) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
    return "a tuple of numbers"
  return None


SCHEMA: dict[str, Any] = {
  "seed": _num(0, 2**31 - 1, integer=True),
  "dataset": {
    "name": _choice(DATASETS),
    "data_dir": _type(str, "a string (a folder path)"),
    "unpack_dir": _type(str, "a string (a folder path)"),
    "image_size": _pos_int,
    "num_classes": _pos_int_or_auto,
    "test_fraction": lambda v: _num(0.0, 1.0, lo_open=True)(v) or ("< 1" if v >= 1.0 else None),
    "augment": _choice(AUGMENTATIONS),
    "crop_padding": _num(0, integer=True),
    "cutout": _num(0, integer=True),
    "normalize": _choice(NORMALIZATIONS),
    "mean": _floats,
    "std": _floats,
    "holdout": _holdout,
    "holdout_seed": _num(0, 2**31 - 1, integer=True),
    "in_memory": _choice(IN_MEMORY),
    "augment_on": _choice(AUGMENT_ON),
    "in_memory_max_mb": _num(0, integer=True),
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
  "eval_flip": _type(bool, "True or False"),
  "eval_translate": _num(0, integer=True),
  "ema_decay": lambda v: _num(0.0)(v) or ("< 1" if v >= 1.0 else None),
  "log_grad_norms": _type(bool, "True or False"),
  "time_budget_minutes": _num(0.0),
  "time_budget_margin": _num(0.0, 0.5),
  "log_every_steps": _pos_int,
  "steps_per_call": _pos_int,
  "eval_every_steps": _pos_int_or_auto,
  "checkpoint_every_steps": _pos_int_or_auto,
  "keep_checkpoints": _pos_int,
  "progress_bar": _type(bool, "True or False"),
  "on_nonfinite": _choice(NONFINITE),
  "host_memory": _choice(HOST_MEMORY),
  "restore_step": _num(-1, integer=True),
  "distributed": {
    "initialize": _type(bool, "True or False"),
    "coordinator_address": _type(str, "a string host:port"),
    "num_processes": _pos_int_or_auto,
    "process_id": _num(-1, integer=True),
    "init_timeout_s": _pos_int,
    "heartbeat_timeout_s": _pos_int,
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
      raise ConfigError(f"unknown config key config.{prefix}{key}{hint} (known keys here: {', '.join(sorted(schema))})")
  for key, rule in schema.items():
    if key not in keys:
      raise ConfigError(
        f"config.{prefix}{key} is missing; start config files from resnet_jax.config_check.base_config()"
      )
    value = cfg[key]
    if isinstance(rule, dict):
      _walk(value, rule, f"{prefix}{key}.")
    elif rule is None:
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"config.{prefix}{key} must be a group of keyword options, got {value!r}")
    else:
      expected = rule(value)
      if expected is not None:
        raise ConfigError(f"config.{prefix}{key} = {value!r} ({type(value).__name__}) is invalid: expected {expected}")


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
    raise ConfigError(
      f"config.dataset.data_dir is empty: dataset {ds.name!r} is read from a local "
      f"folder (set --config.dataset.data_dir=DIR)"
    )
  if len(ds.mean) != len(ds.std):
    raise ConfigError(
      f"config.dataset.mean {tuple(ds.mean)} and config.dataset.std {tuple(ds.std)} must have the same length"
    )
  if any(s <= 0 for s in ds.std):
    raise ConfigError(f"config.dataset.std must be positive, got {tuple(ds.std)}")
  if ds.augment == "random_resized_crop_flip" and ds.name != "image_folder":
    raise ConfigError(
      f"config.dataset.augment='random_resized_crop_flip' works on image folders "
      f"only, not on {ds.name!r} (use pad_crop_flip)"
    )
  if ds.augment == "random_resized_crop_flip" and ds.in_memory == "always":
    raise ConfigError(
      "config.dataset.augment='random_resized_crop_flip' crops full-size images, read "
      "at each step; it does not apply to config.dataset.in_memory='always' (images held "
      "at the model size): use pad_crop_flip, or in_memory='auto' or 'never'"
    )
  if ds.in_memory == "never" and ds.name != "image_folder":
    raise ConfigError(
      f"config.dataset.in_memory='never' applies to image folders only; {ds.name!r} is always held in memory"
    )
  _check_optimizer(config)
  sch = config.schedule
  if sch.name == "step" and not len(sch.boundaries):
    raise ConfigError(
      f"config.schedule.name='step' needs config.schedule.boundaries (in {sch.unit}), e.g. (32000, 48000)"
    )
  if list(sch.boundaries) != sorted(sch.boundaries) or any(b <= 0 for b in sch.boundaries):
    raise ConfigError(f"config.schedule.boundaries {tuple(sch.boundaries)} must be positive and increasing")
  _check_distributed(config.distributed)
  if device_count is not None:
    check_device_count(config, device_count)


def check_device_count(config: ml_collections.ConfigDict, device_count: int) -> None:
  """The global batch sizes must be divisible by ``device_count``, the devices the batch is split over."""
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % device_count:
      raise ConfigError(
        f"config.{key} = {config[key]} is not divisible by the {device_count} devices "
        f"the batch is split over; use a multiple of {device_count}"
      )


def _check_distributed(d: ml_collections.ConfigDict) -> None:
  """What can be checked of ``config.distributed`` before connecting to the coordinator."""
  if not d.initialize:
    return
  if not d.coordinator_address:
    if d.num_processes != -1 or d.process_id != -1:
      raise ConfigError(
        f"config.distributed.num_processes = {d.num_processes} and process_id = "
        f"{d.process_id} are given without a coordinator_address: set all three "
        f"(--config.distributed.coordinator_address=HOST:PORT), or none of them on a "
        f"cluster that jax.distributed.initialize detects (SLURM, Cloud TPU, Kubernetes)"
      )
    return
  host, sep, port = d.coordinator_address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(
      f"config.distributed.coordinator_address = {d.coordinator_address!r} is invalid: "
      f"expected HOST:PORT with a port in 1..65535, e.g. 10.0.0.1:1234 (process 0's host)"
    )
  if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
    raise ConfigError(
      f"config.distributed.process_id = {d.process_id} with num_processes = "
      f"{d.num_processes}: with a coordinator_address, set num_processes >= 1 (the same on "
      f"every process) and a process_id in [0, num_processes), a different one on each "
      f"process"
    )


FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max: parameters and updates are float32.


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
  """Settings that pass the per-key ranges but cannot train: a division by zero or a float32 overflow."""
  opt = config.optimizer
  if opt.name == "adamw":
    for key, value in (("momentum", opt.momentum), ("b2", opt.b2)):
      if value >= 1.0:
        what = "b1 (config.optimizer.momentum)" if key == "momentum" else "b2"
        raise ConfigError(
          f"config.optimizer.{key} = {value!r} is invalid for adamw: its {what} must be < 1 "
          f"(adam's bias correction divides by 1 - {what.split()[0]}**step, which is 0 "
          f"at 1); typical values are 0.9 and 0.999"
        )
  for key in ("learning_rate", "weight_decay", "eps", "lars_trust_coefficient"):
    if abs(opt[key]) > FLOAT32_MAX:
      raise ConfigError(
        f"config.optimizer.{key} = {opt[key]!r} is not finite in float32 (largest "
        f"{FLOAT32_MAX:.4g}), the dtype of the parameters and updates"
      )
  sch = config.schedule
  peak = rate = float(opt.learning_rate)
  if sch.name == "step":
    for b in sch.boundaries:
      rate *= float(sch.decay_factor)
      if rate > FLOAT32_MAX:
        raise ConfigError(
          f"config.schedule.decay_factor = {sch.decay_factor!r}: the learning rate "
          f"{peak!r} times the decay factor at boundary {b} is {rate:.4g}, not finite "
          f"in float32 (largest {FLOAT32_MAX:.4g})"
        )
