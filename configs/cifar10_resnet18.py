"""CIFAR-10, ResNet-18 with the CIFAR stem (3x3/1 conv, no max-pool; 11,173,962 parameters) and a cosine schedule.

Batch 128, SGD momentum 0.9 (Nesterov), learning rate 0.1 with 1 warmup epoch and cosine decay over
200 epochs, weight decay 5e-4, pad-4 random crop + flip. Data from a local folder holding
cifar-10-batches-py/:

  python train.py --config=configs/cifar10_resnet18.py --config.dataset.data_dir=/data/cifar10
"""

from resnet_jax.config_check import base_config


def get_config():
  c = base_config()
  c.dataset.name = "cifar10"
  c.dataset.augment = "pad_crop_flip"
  c.dataset.crop_padding = 4
  c.model.name = "resnet18"
  c.model.options.stem = "cifar"  # 32x32 images: keep the resolution of the first stage
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 200.0
  c.optimizer.name = "nesterov"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "cosine"
  c.schedule.unit = "epochs"
  c.schedule.warmup = 1.0
  c.log_every_steps = 100
  # host_memory stays "auto": at this batch and image size glibc keeps and reuses the host memory XLA
  # frees after each step, for faster CPU steps (resnet_jax.host_memory).
  return c
