"""CIFAR-10, ResNet-20: the recipe of He et al. (2015), section 4.2.

Batch 128, SGD momentum 0.9, learning rate 0.1 divided by 10 at 32k and 48k iterations, weight decay
1e-4, 64k iterations, 4-pixel zero padding + random 32x32 crop + horizontal flip, per-channel
normalisation. The data is read from a local folder:

  python train.py --config=configs/cifar10_resnet20.py --config.dataset.data_dir=/data/cifar10 \
      --workdir=runs/cifar10_resnet20

where /data/cifar10/cifar-10-batches-py/ is the unpacked python-pickle release, or a folder of images
train/<class>/*.png|jpg (add --config.dataset.holdout=-1 to hold out 5,000 of them when it has no
test/). Measured on CIFAR-10's training images as JPEGs (quality 75), 5,000 held out: ResNet-20 reaches
86.10% on the held-out JPEGs after 64,000 iterations (the paper: 91.25% on the test images), in
11.5 hours of wall time on 2 vCPUs of an AMD EPYC (AVX2 only) shared with other jobs; at the run's
median 267 images/s the 64k iterations take about 8.5 hours there, and about 4.2 hours on an
AVX-512 EPYC (546 images/s). On one NVIDIA H200 the 64k iterations took 9.0 min, everything included
(84.84%; docs/cifar.md, section 5: RUNS=paper benchmarks/gpu_cifar.sh DATA). docs/cifar.md, section 2:
python experiments/he_table.py --data_dir DIR --depths 20. Other depths:
--config.model.name=resnet32|resnet44|resnet56|resnet110 (the paper warms ResNet-110 up at 0.01 for
400 iterations: --config.schedule.warmup=400).
"""

from resnet_jax.config_check import base_config


def get_config():
  c = base_config()
  c.dataset.name = "cifar10"
  c.dataset.data_dir = ""  # set on the command line
  c.dataset.augment = "pad_crop_flip"
  c.dataset.crop_padding = 4
  c.model.name = "resnet20"
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_train_steps = 64000
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "step"
  c.schedule.unit = "steps"
  c.schedule.warmup = 0.0
  c.schedule.boundaries = (32000.0, 48000.0)
  c.schedule.decay_factor = 0.1
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000
  # host_memory stays "auto": at this batch and image size glibc keeps and reuses the host memory XLA
  # frees after each step, for faster CPU steps (resnet_jax.host_memory).
  return c
