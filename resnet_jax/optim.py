"""The learning-rate schedule, the length of training and the optax optimizer of a training config.

Weight decay applies to kernels only (:func:`decay_mask`): BatchNorm scales/offsets and biases, every
parameter with fewer than 2 dimensions, are not decayed. Fine-tuning splits the parameters into groups
(head and backbone) with ``optax.multi_transform`` around this optimizer (:func:`resnet_jax.finetune.make_optimizer`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_jax.errors import ConfigError


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule: linear warmup from 0, then constant, step decay, cosine or linear to 0.

  ``config.schedule.warmup`` and ``boundaries`` are in ``config.schedule.unit`` (steps or epochs).
  Step decay multiplies the rate by ``decay_factor`` at each boundary.
  """
  sch = config.schedule
  unit = steps_per_epoch if sch.unit == "epochs" else 1
  peak = float(config.optimizer.learning_rate)
  warmup = min(int(round(sch.warmup * unit)), max(total_steps - 1, 0))
  if sch.name == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup, 1))
  elif sch.name == "linear":
    main = optax.linear_schedule(peak, 0.0, transition_steps=max(total_steps - warmup, 1))
  elif sch.name == "step":
    scales: dict[int, float] = {}
    for b in sch.boundaries:
      at = max(int(round(b * unit)) - warmup, 1)
      scales[at] = scales.get(at, 1.0) * float(sch.decay_factor)
    main = optax.piecewise_constant_schedule(peak, scales)
  else:
    main = optax.constant_schedule(peak)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """``config.num_train_steps``, or ``config.num_epochs`` epochs of ``steps_per_epoch`` (at least 1)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def decay_mask(params: Any) -> Any:
  """True for the parameters that get weight decay: kernels (>= 2 dims); False for BN and biases."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """sgd / nesterov (L2 weight decay added to the gradient, torch style), adamw (decoupled), lars."""
  opt = config.optimizer
  wd = float(opt.weight_decay)
  if opt.name in ("sgd", "nesterov"):
    return optax.chain(
      optax.add_decayed_weights(wd, mask=decay_mask),
      optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.name == "nesterov"),
    )
  if opt.name == "adamw":
    return optax.adamw(schedule, b1=opt.momentum, b2=opt.b2, eps=opt.eps, weight_decay=wd, mask=decay_mask)
  if opt.name == "lars":
    return optax.lars(
      schedule,
      weight_decay=wd,
      weight_decay_mask=decay_mask,
      trust_coefficient=opt.lars_trust_coefficient,
      trust_ratio_mask=decay_mask,
      momentum=opt.momentum,
    )
  raise ConfigError(f"config.optimizer.name={opt.name!r}: expected sgd, nesterov, adamw or lars")
