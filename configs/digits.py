"""Default config: CIFAR ResNet-20 on scikit-learn's 8x8 digits (embedded, no download).

``python train.py`` runs this on a 2-core CPU in about a minute and reaches >= 98% test accuracy.
"""

from resnet_jax.config_check import base_config


def get_config():
  c = base_config()
  c.dataset.name = "digits"
  c.dataset.augment = "pad_crop"  # random shifts of up to 1 pixel; no flips (digits are not symmetric)
  c.dataset.crop_padding = 1
  c.model.name = "resnet20"
  c.batch_size = 64
  c.eval_batch_size = 360
  c.num_epochs = 20.0
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "cosine"
  c.schedule.unit = "epochs"
  c.schedule.warmup = 1.0
  c.log_every_steps = 10
  c.checkpoint_every_steps = 110  # every 5 epochs of 22 steps, and at the end
  c.keep_checkpoints = 2
  return c
