"""The derivation's residual units as a classifier: flatten -> Dense(dim) -> depth x (H(x) + x) -> Dense.

Trains ``residual_mlp`` (resnet_jax.residual_unit.ResidualMLP, ReLU units) on the 8x8 digits with AdamW.
Set ``--config.model.options.residual=False`` for the plain twin (x_{l+1} = H_l(x_l)).
"""

import ml_collections

from resnet_jax.config_check import base_config


def get_config():
  c = base_config()
  c.dataset.name = "digits"
  c.dataset.augment = "none"
  c.model.name = "residual_mlp"
  c.model.options = ml_collections.ConfigDict(
    {"depth": 8, "dim": 64, "hidden": 64, "activation": "relu", "residual": True}
  )
  c.batch_size = 64
  c.eval_batch_size = 360
  c.num_epochs = 30.0
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "cosine"
  c.schedule.unit = "epochs"
  c.schedule.warmup = 1.0
  c.log_every_steps = 10
  return c
