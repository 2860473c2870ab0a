"""Everything a training run needs, built from its config: :class:`Setup` (device mesh, data, model,
learning-rate schedule, optimizer, the jitted training and evaluation steps, the initial state) and
:func:`build_model`. :mod:`resnet_jax.train_loop` trains with it; :mod:`resnet_jax.evaluate` evaluates
checkpoints with it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resnet_jax import data as data_lib
from resnet_jax import device_augment, finetune, optim
from resnet_jax.config_check import check_device_count
from resnet_jax.distributed import DataParallel
from resnet_jax.errors import ConfigError, ModelError
from resnet_jax.train_step import TrainState, create_train_state, make_eval_step, make_train_step


def conv_backend(config: ml_collections.ConfigDict, device_count: int = 1) -> str | None:
  """The ``conv_backend`` option the model gets: None for a model without one (no convolutions), else
  ``config.model.conv_backend``, except that ``auto`` means XLA's convolutions when the step runs on several
  devices: a oneDNN custom call is not partitioned by XLA, so each device would gather the whole batch and
  convolve all of it."""
  from resnet_jax import models

  if "conv_backend" not in models.model_options(config.model.name):
    return None
  backend = config.model.conv_backend
  return "xla" if backend == "auto" and device_count > 1 else backend


def steps_per_call_warning(config: ml_collections.ConfigDict, platform: str, device_count: int = 1) -> str | None:
  """A one-line warning where ``config.steps_per_call`` > 1 costs more than it saves, else None: on the CPU
  with XLA's convolutions (``conv_backend="xla"``, or ``auto`` on several devices), which XLA compiles
  inside the loop of steps to code several times slower than the same convolutions in a single step."""
  k = int(config.get("steps_per_call", 1))
  if k == 1 or platform != "cpu" or conv_backend(config, device_count) != "xla":
    return None
  return (
    f"warning: config.steps_per_call = {k} with XLA's convolutions on the CPU: inside the loop of steps they "
    f"run several times slower than in single steps, and the loop compiles longer (docs/training.md, "
    f"'Several steps per call'); steps_per_call = 1 avoids it, and so do oneDNN's convolutions (conv_backend "
    f"'auto' on one device)"
  )


def compute_dtype(config: ml_collections.ConfigDict, device_count: int = 1, device: jax.Device | None = None) -> str:
  """The compute dtype of a run, ``"float32"`` or ``"bfloat16"``: ``config.model.dtype`` unless it is ``auto``.

  ``auto`` is bfloat16 where ``device`` (default: this process's first) computes it natively, float32
  elsewhere:

  - TPU: bfloat16.
  - GPU: bfloat16 on NVIDIA GPUs of compute capability 8.0 and up (bfloat16 tensor cores), float32 on
    older or other GPUs.
  - CPU: bfloat16 when the model's convolutions run in oneDNN (:func:`conv_backend` ``auto`` or
    ``onednn``) and this CPU's oneDNN computes bfloat16 convolutions (AVX-512 bf16 or AMX,
    :func:`resnet_jax.onednn_conv.implements_bfloat16`); float32 otherwise. Without them the bfloat16
    convolutions run in float32 between conversions, and a bfloat16 ResNet-20 training step is slower than
    the float32 one (docs/cifar.md, section 1).
  """
  setting = config.model.dtype
  if setting != "auto":
    return setting
  device = device or jax.local_devices()[0]
  if device.platform == "tpu":
    return "bfloat16"
  if device.platform == "gpu":
    try:
      capability = float(getattr(device, "compute_capability", 0) or 0)
    except (TypeError, ValueError):  # a GPU that reports no NVIDIA compute capability
      capability = 0.0
    return "bfloat16" if capability >= 8.0 else "float32"
  if device.platform == "cpu" and conv_backend(config, device_count) in ("auto", "onednn"):
    from resnet_jax import onednn_conv

    return "bfloat16" if onednn_conv.implements_bfloat16() else "float32"
  return "float32"


def build_model(
  config: ml_collections.ConfigDict, num_classes: int, device_count: int = 1, device: jax.Device | None = None
):
  """``create_model(config.model.name, num_classes, **config.model.options)`` with the compute dtype
  (:func:`compute_dtype`) and the convolution backend (:func:`conv_backend`)."""
  from resnet_jax import models

  options = config.model.options.to_dict() if hasattr(config.model.options, "to_dict") else dict(config.model.options)
  if compute_dtype(config, device_count, device) == "bfloat16":
    options["dtype"] = jnp.bfloat16
    options.setdefault("param_dtype", jnp.float32)
  backend = conv_backend(config, device_count)
  if backend is not None:
    options["conv_backend"] = backend
  return models.create_model(config.model.name, num_classes=num_classes, **options)


def build_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer of a run: :func:`resnet_jax.optim.make_optimizer`, split into parameter groups by
  :func:`resnet_jax.finetune.make_optimizer` when fine-tuning freezes or slows the backbone."""
  return finetune.make_optimizer(config, schedule, optim.make_optimizer)


def build_train_step(
  config: ml_collections.ConfigDict,
  num_classes: int,
  dp: DataParallel,
  on_device: tuple[jax.Array, Callable] | None = None,
  steps_per_call: int = 1,
) -> Callable:
  """The jitted training step ``(state, batch) -> (state, metrics)`` of a run of ``config`` on the mesh
  ``dp``: what :class:`Setup` trains with and ``benchmarks/bench.py`` times
  (:func:`resnet_jax.train_step.make_train_step`, the state donated).

  ``on_device``: ``(images, make_batch)`` for augmentation on the device: the step then takes the
  draws of :meth:`resnet_jax.data.Dataset.train_draws` instead of a batch, and makes the batch with
  ``make_batch(images, draws)`` (:func:`resnet_jax.device_augment.make_batch`) inside the same program.

  ``steps_per_call`` > 1: ``(state, batches, count) -> (state, metrics)`` instead, the step run ``count``
  times in one program (:func:`repeat_step`; ``batches`` from :meth:`DataParallel.put_batches`).
  """
  step = make_train_step(
    num_classes,
    float(config.label_smoothing),
    skip_nonfinite=True,
    grad_norms=bool(config.get("log_grad_norms", False)),
  )
  more = ()
  if on_device is not None:
    images, make_batch = on_device
    train_step = step

    def step_from_draws(state: TrainState, draws: dict, images: jax.Array):
      return train_step(state, make_batch(images, draws))

    step, more = step_from_draws, (images,)
  if steps_per_call > 1:
    jitted = dp.jit_train_step(repeat_step(step, steps_per_call), replicated_args=1 + len(more), stacked=True)
    return lambda state, batches, count: jitted(state, batches, np.int32(count), *more)
  jitted = dp.jit_train_step(step, replicated_args=len(more))
  return (lambda state, draws: jitted(state, draws, *more)) if more else jitted


def repeat_step(step: Callable, length: int) -> Callable:
  """``steps(state, batches, count, *more) -> (state, metrics)``: ``step(state, batch, *more)`` applied to
  ``batches[0]``, ..., ``batches[count - 1]`` in turn, in one program (one call from the host for ``count``
  steps). ``batches``: ``length`` batches stacked on a new leading axis, ``count`` at most ``length`` (the
  rest are not used). ``metrics``: each metric of ``step`` with a leading axis of ``length``, the first
  ``count`` entries those of the steps, the rest zero."""

  def steps(state: TrainState, batches: dict, count: jax.Array, *more):
    def one(i, carry):
      state, out = carry
      batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), batches)
      state, metrics = step(state, batch, *more)
      return state, jax.tree.map(lambda o, m: o.at[i].set(m), out, metrics)

    first = jax.tree.map(lambda x: x[0], batches)
    shapes = jax.eval_shape(lambda s, b: step(s, b, *more)[1], state, first)
    out = jax.tree.map(lambda s: jnp.zeros((length, *s.shape), s.dtype), shapes)
    return jax.lax.fori_loop(0, count, one, (state, out))

  return steps


def augment_on(setting: str, ds: data_lib.Dataset, platform: str) -> str:
  """Where the training batches are augmented: ``host`` (the input pipeline) or ``device`` (the step).

  ``auto``: the device on an accelerator when the images are in memory with an augmentation it can
  make, else the host. ``device`` for a streamed folder or ``random_resized_crop_flip`` is a ConfigError.
  """
  if setting == "device":
    ds.check_augmentable_on_device()
  if setting == "auto":
    return "device" if ds.augmentable_on_device and platform != "cpu" else "host"
  return setting


def evaluate_state(
  eval_step: Callable, state: TrainState, ds: data_lib.Dataset, batch_size: int, dp: DataParallel, num_threads: int = 2
) -> dict[str, float]:
  """Loss and accuracy of ``state`` on the whole test set."""
  totals = None
  for batch in data_lib.eval_batches(ds, batch_size, jax.process_index(), jax.process_count(), num_threads):
    out = eval_step(state, dp.put_batch(batch))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {
    "loss": float(totals["loss"]) / count,
    "accuracy": float(totals["correct"]) / count,
    "count": int(totals["count"]),
  }


class Setup:
  """Everything a run needs, built from a config (checked by :func:`resnet_jax.config_check.validate_config`):
  the mesh, data, model, schedule, optimizer and the jitted steps."""

  def __init__(
    self, config: ml_collections.ConfigDict, devices: list | None = None, data: data_lib.Dataset | None = None
  ):
    """``data``: the dataset of ``config.dataset``, already loaded (e.g. by another setup of the same
    dataset: :meth:`with_config`); default: loaded here."""
    self.config = config
    self.dp = DataParallel(devices)
    check_device_count(config, len(self.dp.devices))
    self.data = data if data is not None else data_lib.load_dataset(config.dataset, progress=config.progress_bar)
    self.compute_dtype = compute_dtype(config, len(self.dp.devices), self.dp.devices[0])
    self.model = build_model(config, self.data.num_classes, len(self.dp.devices), self.dp.devices[0])
    min_size = getattr(self.model, "min_input_size", None)
    if min_size and min(self.data.image_shape[:2]) < min_size:
      raise ModelError(
        f"model {config.model.name} needs images of at least {min_size}x{min_size}, "
        f"the dataset gives {self.data.image_shape[0]}x{self.data.image_shape[1]}"
      )
    self.steps_per_epoch = self.data.num_train // config.batch_size
    if self.steps_per_epoch < 1:
      raise ConfigError(
        f"config.batch_size = {config.batch_size} exceeds the {self.data.num_train} "
        f"training examples of {config.dataset.name}"
      )
    self.total_steps = optim.total_train_steps(config, self.steps_per_epoch)
    self.eval_every = config.eval_every_steps if config.eval_every_steps > 0 else self.steps_per_epoch
    self.checkpoint_every = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else self.eval_every
    self.schedule = optim.make_schedule(config, self.steps_per_epoch, self.total_steps)
    self.tx = build_optimizer(config, self.schedule)
    self.apply_fn = finetune.make_apply_fn(config, self.model)
    self.ema_decay = float(config.get("ema_decay", 0.0))
    self.augment_on = augment_on(config.dataset.augment_on, self.data, self.dp.devices[0].platform)
    on_device = None
    if self.augment_on == "device":
      images = self.dp.replicate_host_array(self.data.train_x)
      ds = self.data
      on_device = (images, device_augment.make_batch(ds.crop_padding_used, ds.mean, ds.std, ds.cutout))
    self.train_step = build_train_step(config, self.data.num_classes, self.dp, on_device)
    self.steps_per_call = int(config.get("steps_per_call", 1))
    self.train_steps = (
      build_train_step(config, self.data.num_classes, self.dp, on_device, self.steps_per_call)
      if self.steps_per_call > 1
      else None
    )
    translate = int(config.get("eval_translate", 0))
    if translate >= min(self.data.image_shape[:2]):
      raise ConfigError(
        f"config.eval_translate = {translate} must be smaller than the images' sides, "
        f"{self.data.image_shape[0]}x{self.data.image_shape[1]} in {config.dataset.name}"
      )
    self.eval_step = self.dp.jit_eval_step(
      make_eval_step(self.data.num_classes, bool(config.get("eval_flip", False)), translate)
    )

  def with_config(self, config: ml_collections.ConfigDict) -> Setup:
    """A setup of ``config`` on the same devices and data (its ``dataset`` settings must be this one's):
    e.g. the same run with another length or schedule. Its steps compile again on first use."""
    if config.dataset.to_dict() != self.config.dataset.to_dict():
      raise ConfigError("Setup.with_config: the new config reads another dataset; build a new Setup for it")
    return Setup(config, self.dp.devices, self.data)

  def init_state(self, log: Callable[[str], None] = print) -> TrainState:
    """The state of step 0: a fresh initialisation, or the weights of ``config.finetune.weights``."""
    state = create_train_state(
      self.model, self.tx, self.data.image_shape, jax.random.PRNGKey(self.config.seed), self.apply_fn, self.ema_decay
    )
    state = finetune.initial_state(self.config, self.model, state, log)
    return self.dp.replicate(state)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without computing it (a restore target)."""
    shapes = jax.eval_shape(
      lambda k: create_train_state(self.model, self.tx, self.data.image_shape, k, self.apply_fn, self.ema_decay),
      jax.random.PRNGKey(0),
    )
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.dp.replicated), shapes)

  def train_iterator(self):
    c = self.config
    return iter(
      data_lib.train_pipeline(
        self.data,
        c.batch_size,
        c.seed,
        jax.process_index(),
        jax.process_count(),
        num_threads=c.dataset.num_threads,
        num_workers=c.dataset.num_workers,
        on_device=self.augment_on == "device",
      )
    )

  def train_call(self, state: TrainState, host_batches: list[dict]) -> tuple[TrainState, dict]:
    """Train on ``host_batches`` (from :meth:`train_iterator`; one, or up to ``config.steps_per_call``)
    in one program call: ``(state, metrics)``. With ``config.steps_per_call`` = 1, one batch and the
    step's metrics; above, the steps' metrics stacked on a leading axis of ``config.steps_per_call``,
    the first ``len(host_batches)`` entries filled (:func:`repeat_step`)."""
    if self.train_steps is None:
      if len(host_batches) != 1:
        raise ValueError(f"train_call: {len(host_batches)} batches with config.steps_per_call = 1; expected 1")
      return self.train_step(state, self.dp.put_batch(host_batches[0]))
    if not 1 <= len(host_batches) <= self.steps_per_call:
      raise ValueError(f"train_call: {len(host_batches)} batches; expected 1 to {self.steps_per_call}")
    return self.train_steps(state, self.dp.put_batches(host_batches, self.steps_per_call), len(host_batches))

  def evaluate(self, state: TrainState) -> dict[str, float]:
    return evaluate_state(
      self.eval_step, state, self.data, self.config.eval_batch_size, self.dp, self.config.dataset.num_threads
    )
