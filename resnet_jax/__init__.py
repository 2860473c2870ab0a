"""resnet_jax: residual networks in JAX/Flax.

- :mod:`resnet_jax.residual_unit`: the residual unit ``y_hat = w2 sigma(w1 x + b1) + b2 + x`` as pure functions,
  with its hand-derived gradients and a ``custom_vjp`` version.
- :mod:`resnet_jax.blocks` / :mod:`resnet_jax.models`: Basic and Bottleneck blocks, ResNet-18..200,
  wide/ResNeXt, pre-activation and CIFAR ResNets (``create_model``, ``list_models``).
- :mod:`resnet_jax.convert`: torchvision weights in and out.
- :mod:`resnet_jax.train_loop` (with :mod:`~resnet_jax.train_step`, :mod:`~resnet_jax.optim`,
  :mod:`~resnet_jax.metrics`), :mod:`resnet_jax.data`: jit-compiled optax training and input pipelines.
- :mod:`resnet_jax.gradient_flow`: gradient norms through plain and residual stacks, measured and predicted.
- :mod:`resnet_jax.finetune`, :mod:`resnet_jax.predict`, :mod:`resnet_jax.export`: starting a run from
  weights, classifying image files, ONNX and StableHLO export.

The modules form groups that import only the groups below them: see docs/architecture.md.
"""

from resnet_jax import residual_unit
from resnet_jax.errors import CheckpointError, ConfigError, DataError, ModelError, ResNetJaxError
from resnet_jax.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
  "CheckpointError",
  "ConfigError",
  "DataError",
  "ModelError",
  "ResNetJaxError",
  "create_model",
  "list_models",
  "residual_unit",
]
