"""PyTorch counterparts of the registered models, for ``bench.py --compare-torch``.

ImageNet ResNets come from torchvision (same architecture: v1.5 bottlenecks, projection shortcuts).
torchvision has no CIFAR ResNets, so the CIFAR ResNet-20..110 of He et al. (2015) and their plain twins are
written here the way ``resnet_jax.models`` builds them: 3x3 stem with 16 filters, BN, ReLU, three stages of
16/32/64 filters with ``n = (depth - 2) / 6`` basic blocks each, option A shortcuts (strided identity with
zero channels appended), global average pool, linear head. ``resnet9`` is Page's DAWNBench ResNet-9 at full
width, as ``resnet_jax.models.ResNet9`` builds it (max-pool before BN and ReLU, relu_before_add blocks).

torch is imported lazily: this module can be imported (and ``torch_counterpart`` asked) without torch.
"""

from __future__ import annotations

import re
from typing import Any

TORCHVISION_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d")
_CIFAR = re.compile(r"^(resnet|plain)(20|32|44|56|110)$")


def has_counterpart(name: str, num_filters: bool = False) -> bool:
  """Whether ``name`` has a PyTorch model with the same architecture here (with ``num_filters``: one whose
  width can be set, as ``create_model(name, num_filters=...)`` sets it)."""
  if num_filters:
    return name == "resnet9"
  return name in TORCHVISION_NAMES or name == "resnet9" or _CIFAR.match(name) is not None


def create_torch_model(name: str, num_classes: int, num_filters: int | None = None) -> Any:
  """The ``torch.nn.Module`` with the same architecture as ``resnet_jax.create_model(name, num_classes)``,
  or, with ``num_filters`` (``resnet9`` only), as ``create_model(name, num_classes, num_filters=...)``."""
  if num_filters is not None and not has_counterpart(name, num_filters=True):
    raise ValueError(f"the PyTorch {name} has a fixed width; num_filters applies to resnet9 only")
  if name in TORCHVISION_NAMES:
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
  if name == "resnet9":
    return _resnet9(num_classes, 64 if num_filters is None else num_filters)
  m = _CIFAR.match(name)
  if m is None:
    raise KeyError(name)
  return _cifar_resnet(int(m.group(2)), num_classes, residual=m.group(1) == "resnet")


SGD_OPTIMIZERS = ("sgd", "nesterov")


def torch_sgd(model: Any, optimizer: Any) -> Any:
  """PyTorch's counterpart of ``resnet_jax.optim.make_optimizer`` for ``optimizer.name`` sgd or nesterov
  (``optimizer``: a config's ``optimizer`` section): SGD with momentum, L2 weight decay added to the
  gradients of the kernels (parameters of >= 2 dims) only, as ``optim.decay_mask``."""
  import torch

  if optimizer.name not in SGD_OPTIMIZERS:
    raise ValueError(f"optimizer {optimizer.name!r}: the PyTorch counterpart implements {SGD_OPTIMIZERS}")
  params = list(model.parameters())
  groups = [
    {"params": [p for p in params if p.ndim > 1], "weight_decay": float(optimizer.weight_decay)},
    {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
  ]
  return torch.optim.SGD(
    groups,
    lr=float(optimizer.learning_rate),
    momentum=float(optimizer.momentum),
    nesterov=optimizer.name == "nesterov",
  )


def _cifar_resnet(depth: int, num_classes: int, residual: bool) -> Any:
  import torch
  import torch.nn.functional as F
  from torch import nn

  class Block(nn.Module):
    """Basic block, v1 ordering: y = ReLU(BN(conv(ReLU(BN(conv(x))))) + S(x)), S option A."""

    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      if residual:
        s = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra:
          s = F.pad(s, (0, 0, 0, 0, 0, self.extra))
        out = out + s
      return F.relu(out)

  n = (depth - 2) // 6
  layers: list = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
  cin = 16
  for i, cout in enumerate((16, 32, 64)):
    for j in range(n):
      layers.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
  return torch.nn.Sequential(*layers)


def _resnet9(num_classes: int, w: int = 64) -> Any:
  import torch
  from torch import nn

  def layer(cin: int, cout: int, pool: bool) -> nn.Module:
    parts = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False)] + ([nn.MaxPool2d(2)] if pool else [])
    return nn.Sequential(*parts, nn.BatchNorm2d(cout), nn.ReLU())

  class Residual(nn.Module):
    """y = ReLU(BN(conv(ReLU(BN(conv(x)))))) + x."""

    def __init__(self, c: int):
      super().__init__()
      self.branch = nn.Sequential(layer(c, c, False), layer(c, c, False))

    def forward(self, x):
      return self.branch(x) + x

  class Scale(nn.Module):
    def forward(self, x):
      return 0.125 * x

  return torch.nn.Sequential(
    layer(3, w, False),
    layer(w, 2 * w, True),
    Residual(2 * w),
    layer(2 * w, 4 * w, True),
    layer(4 * w, 8 * w, True),
    Residual(8 * w),
    nn.AdaptiveMaxPool2d(1),
    nn.Flatten(),
    nn.Linear(8 * w, num_classes, bias=False),
    Scale(),
  )
