"""CIFAR-100 (fine labels), CIFAR ResNet-56.

Batch 128, SGD momentum 0.9, learning rate 0.1 multiplied by 0.2 at epochs 60, 120 and 160 of 200,
weight decay 5e-4, pad-4 random crop + flip. Data from a local folder holding cifar-100-python/:

  python train.py --config=configs/cifar100.py --config.dataset.data_dir=/data/cifar100
"""

from resnet_jax.config_check import base_config


def get_config():
  c = base_config()
  c.dataset.name = "cifar100"
  c.dataset.augment = "pad_crop_flip"
  c.dataset.crop_padding = 4
  c.model.name = "resnet56"
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 200.0
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "step"
  c.schedule.unit = "epochs"
  c.schedule.warmup = 0.0
  c.schedule.boundaries = (60.0, 120.0, 160.0)
  c.schedule.decay_factor = 0.2
  c.log_every_steps = 100
  # host_memory stays "auto": at this batch and image size glibc keeps and reuses the host memory XLA
  # frees after each step, for faster CPU steps (resnet_jax.host_memory).
  return c
