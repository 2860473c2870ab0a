"""ImageNet (or any image folder), ResNet-50 v1.5: the standard 90-epoch recipe with cosine decay.

Batch 256 (global), SGD momentum 0.9, learning rate 0.1 x batch/256 with 5 warmup epochs then cosine
to 0, weight decay 1e-4 (not on BatchNorm or biases), label smoothing 0.1, random-resized-crop 224 +
flip for training, resize 256 + centre crop 224 for evaluation, ImageNet mean/std normalisation.
The data is an image folder:

  DATA_DIR/train/<class>/*.JPEG   DATA_DIR/test/<class>/*.JPEG   (e.g. ILSVRC2012 val sorted into classes)

  python train.py --config=configs/imagenet_resnet50.py --config.dataset.data_dir=/data/imagenet \
      --config.model.dtype=bfloat16 --workdir=runs/imagenet_resnet50

On accelerators use ``--config.model.dtype=bfloat16`` (bf16 compute, fp32 parameters); scale the
learning rate with the batch (``--config.batch_size=1024 --config.optimizer.learning_rate=0.4``), or
use LARS for very large batches (``--config.optimizer.name=lars``).
"""

from resnet_jax.config_check import base_config


def get_config():
  c = base_config()
  c.dataset.name = "image_folder"
  c.dataset.image_size = 224
  c.dataset.augment = "random_resized_crop_flip"
  c.dataset.num_threads = 8
  c.dataset.num_workers = 0
  c.model.name = "resnet50"
  c.model.dtype = "float32"
  c.batch_size = 256
  c.eval_batch_size = 250
  c.num_epochs = 90.0
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "cosine"
  c.schedule.unit = "epochs"
  c.schedule.warmup = 5.0
  c.label_smoothing = 0.1
  c.log_every_steps = 100
  c.keep_checkpoints = 3
  return c
