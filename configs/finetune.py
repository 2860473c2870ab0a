"""Fine-tune a pretrained ResNet-18 on your own image folder (DATA_DIR/{train,test}/<class>/*.jpg).

Starts from torchvision weights on disk (or another run's workdir), replaces the head when the number of
classes differs, trains the backbone at a tenth of the head's learning rate, with the ImageNet
preprocessing the weights were trained with (224 pixels, random resized crops and flips for training,
resize + centre crop for evaluation, ImageNet mean and std):

  python train.py --config=configs/finetune.py --config.dataset.data_dir=/data/flowers \
      --config.finetune.weights=resnet18.pth --workdir=runs/flowers

Add --config.finetune.freeze_backbone=True to train the head only (a linear probe), and
--config.finetune.freeze_batch_stats=True to keep the BatchNorm statistics of the weights.
See docs/finetune.md.
"""

from resnet_jax.config_check import base_config


def get_config():
  c = base_config()
  c.dataset.name = "image_folder"
  c.dataset.image_size = 224
  c.dataset.augment = "random_resized_crop_flip"
  c.model.name = "resnet18"
  c.model.options.stem = "imagenet"  # cifar: 3x3/1 stem without max-pool, for weights trained on 32x32 images
  c.finetune.weights = ""  # set --config.finetune.weights=FILE.pth|.safetensors|.npz or a workdir
  c.finetune.backbone_lr_scale = 0.1
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_epochs = 10.0
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "cosine"
  c.schedule.unit = "epochs"
  c.schedule.warmup = 0.5
  c.log_every_steps = 10
  return c
