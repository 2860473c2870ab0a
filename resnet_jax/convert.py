"""torchvision ResNet weights in and out: ``from_torchvision``, ``to_torchvision``, ``load_checkpoint``.

The flax modules carry torchvision's names (``layer2_0/downsample_conv`` for ``layer2.0.downsample.0``), so
conversion is a renaming plus layout changes:

- conv weight OIHW (torch) <-> HWIO (flax): ``transpose(2, 3, 1, 0)``; grouped convs keep I = C_in / groups;
- linear weight (out, in) <-> Dense kernel (in, out);
- BatchNorm ``weight/bias`` <-> ``scale/bias`` in ``params``; ``running_mean/running_var`` <-> ``mean/var`` in
  ``batch_stats``; ``num_batches_tracked`` has no counterpart (dropped on import, written as 0 on export).

Any torchvision-layout model of the registry converts (``resnet18 .. resnet200``, ``wide_resnet50_2``,
``resnext50_32x4d``, the CIFAR ``resnet20 .. resnet110`` with their option-A shortcuts); the number of classes
is read from ``fc.weight``. torch is imported only to read ``.pth`` files.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax.errors import CheckpointError
from resnet_jax.models import create_model, list_models

# Registered names whose layout is torchvision's (the pre-activation nets have no torchvision counterpart).
TORCHVISION_LAYOUT = tuple(n for n in list_models() if n.startswith(("resnet", "wide_resnet", "resnext")))
_BN_PARAM = {"scale": "weight", "bias": "bias"}
_BN_STAT = {"mean": "running_mean", "var": "running_var"}


def _torch_module_path(path: tuple[str, ...]) -> str:
  """('layer2_0', 'downsample_conv') -> 'layer2.0.downsample.0'."""
  out = []
  for part in path:
    if part.startswith("layer") and "_" in part:
      out.append(part.replace("_", "."))
    elif part == "downsample_conv":
      out.append("downsample.0")
    elif part == "downsample_bn":
      out.append("downsample.1")
    else:
      out.append(part)
  return ".".join(out)


def _torch_key(collection: str, path: tuple[str, ...], ndim: int) -> str:
  module, leaf = _torch_module_path(path[:-1]), path[-1]
  if collection == "batch_stats":
    name = _BN_STAT[leaf]
  elif leaf == "kernel":
    name = "weight"
  else:  # BatchNorm scale/bias or Dense bias
    name = _BN_PARAM.get(leaf, leaf)
  return f"{module}.{name}"


def _to_flax_layout(a: np.ndarray, flax_ndim: int, leaf: str) -> np.ndarray:
  if leaf == "kernel" and flax_ndim == 4:
    return a.transpose(2, 3, 1, 0)
  if leaf == "kernel" and flax_ndim == 2:
    return a.T
  return a


def _to_torch_layout(a: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and a.ndim == 4:
    return a.transpose(3, 2, 0, 1)
  if leaf == "kernel" and a.ndim == 2:
    return a.T
  return a


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


@functools.lru_cache(maxsize=64)
def _layout(name: str, num_classes: int) -> tuple[tuple[str, str, tuple[str, ...], tuple[int, ...]], ...]:
  """(torch key, collection, flax path, flax shape) for every tensor of model ``name``, without running it."""
  if name not in TORCHVISION_LAYOUT:
    create_model(name)  # an unknown name raises ModelError with close names
    raise CheckpointError(
      f"model {name!r} has no torchvision layout; convertible models: {', '.join(TORCHVISION_LAYOUT)}"
    )
  model = create_model(name, num_classes=num_classes)
  size = model.min_input_size
  shapes = jax.eval_shape(
    lambda k, x: model.init(k, x, train=False), jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  )
  rows = []
  for collection in ("params", "batch_stats"):
    for path, leaf in traverse_util.flatten_dict(shapes[collection]).items():
      rows.append((_torch_key(collection, path, leaf.ndim), collection, path, tuple(leaf.shape)))
  return tuple(rows)


def _as_numpy(value: Any) -> np.ndarray:
  """A torch tensor (without importing torch) or an array-like as a numpy array of its own.

  Always a copy: ``tensor.numpy()`` shares the tensor's memory, and jax may keep using a numpy buffer
  without copying on CPU, so a later in-place update of the torch model (a training-mode forward moves
  the BN running statistics) would otherwise change the converted variables.
  """
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(getattr(value, "dtype", "")) == "torch.bfloat16":
      value = value.float()
    return np.array(value.numpy(), copy=True)
  return np.array(value, copy=True)


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):  # saved from DataParallel / DDP
    return {k[len("module.") :]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _num_classes(state_dict: Mapping[str, Any], name: str) -> int:
  if "fc.weight" not in state_dict:
    raise CheckpointError(
      f"state dict for {name!r} has no 'fc.weight' (is it a torchvision ResNet state dict? "
      f"first keys: {', '.join(list(state_dict)[:5])})"
    )
  shape = np.shape(_as_numpy(state_dict["fc.weight"]))
  if len(shape) != 2:
    raise CheckpointError(f"'fc.weight' should be (num_classes, features), got shape {shape}")
  return int(shape[0])


def _problems(shapes: Mapping[str, tuple[int, ...]], name: str, num_classes: int) -> tuple[list, list, list]:
  expected = {key: _torch_shape(shape, path[-1]) for key, _, path, shape in _layout(name, num_classes)}
  missing = [k for k in expected if k not in shapes]
  unexpected = [k for k in shapes if k not in expected and not k.endswith("num_batches_tracked")]
  misshaped = [
    f"{k} {tuple(shapes[k])} (expected {expected[k]})"
    for k in expected
    if k in shapes and tuple(shapes[k]) != expected[k]
  ]
  return missing, unexpected, misshaped


def guess_architecture(state_dict: Mapping[str, Any]) -> str | None:
  """The registered torchvision-layout model whose keys and shapes the state dict matches, if any."""
  state_dict = _strip_prefix(state_dict)
  shapes = {k: tuple(np.shape(_as_numpy(v))) for k, v in state_dict.items()}
  try:
    num_classes = _num_classes(state_dict, "?")
  except CheckpointError:
    return None
  for candidate in TORCHVISION_LAYOUT:
    if not any(_problems(shapes, candidate, num_classes)):
      return candidate
  return None


def _listing(label: str, keys: list[str], limit: int = 8) -> str:
  more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
  return f"{label} ({len(keys)}): {', '.join(keys[:limit])}{more}"


def from_torchvision(state_dict: Mapping[str, Any], name: str) -> dict[str, dict]:
  """Convert a torchvision ResNet state dict to flax variables ``{"params", "batch_stats"}`` for ``name``.

  ``state_dict`` maps torchvision keys (``layer1.0.conv1.weight``, ...) to torch tensors or numpy arrays;
  a ``module.`` prefix (DataParallel) is removed. Missing, unexpected or mis-shaped keys raise
  :class:`~resnet_jax.errors.CheckpointError` naming them, and the architecture the dict does match if any.
  """
  state_dict = _strip_prefix(state_dict)
  num_classes = _num_classes(state_dict, name)
  arrays = {k: _as_numpy(v) for k, v in state_dict.items()}
  missing, unexpected, misshaped = _problems({k: a.shape for k, a in arrays.items()}, name, num_classes)
  if missing or unexpected or misshaped:
    parts = [
      _listing(label, keys)
      for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", misshaped))
      if keys
    ]
    guess = guess_architecture(arrays)
    hint = f"; it looks like a {guess} state dict" if guess and guess != name else ""
    raise CheckpointError(f"state dict does not fit {name!r}: {'; '.join(parts)}{hint}")
  flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for key, collection, path, shape in _layout(name, num_classes):
    a = _to_flax_layout(arrays[key], len(shape), path[-1])
    flat[collection][path] = jnp.asarray(a, dtype=jnp.float32 if a.dtype.kind == "f" else a.dtype)
  return {c: traverse_util.unflatten_dict(f) for c, f in flat.items()}


def to_torchvision(variables: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
  """Flax variables of model ``name`` as a torchvision state dict of numpy arrays.

  Includes ``num_batches_tracked`` (int64 zeros) so that ``torch_model.load_state_dict`` accepts it with
  ``strict=True``. ``from_torchvision(to_torchvision(v, name), name)`` returns ``v``.
  """
  try:
    num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[1])
  except (KeyError, TypeError, IndexError) as e:
    raise CheckpointError(
      f"variables for {name!r} need params/fc/kernel (got top-level keys "
      f"{sorted(variables) if isinstance(variables, Mapping) else type(variables)})"
    ) from e
  out: dict[str, np.ndarray] = {}
  flat = {c: traverse_util.flatten_dict(dict(variables[c])) for c in ("params", "batch_stats") if c in variables}
  expected = {(collection, path): (key, shape) for key, collection, path, shape in _layout(name, num_classes)}
  have = {(c, p) for c, f in flat.items() for p in f}
  missing = ["/".join((c,) + p) for c, p in expected if (c, p) not in have]
  unexpected = ["/".join((c,) + p) for c, p in have if (c, p) not in expected]
  misshaped = [
    f"{'/'.join((c,) + p)} {tuple(np.shape(flat[c][p]))} (expected {expected[c, p][1]})"
    for c, p in expected
    if (c, p) in have and tuple(np.shape(flat[c][p])) != expected[c, p][1]
  ]
  if missing or unexpected or misshaped:
    parts = [
      _listing(label, keys)
      for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
      if keys
    ]
    raise CheckpointError(f"variables do not fit {name!r}: {'; '.join(parts)}")
  for (collection, path), (key, _) in expected.items():
    # a writable, contiguous copy (torch.from_numpy warns on the read-only views of jax arrays)
    out[key] = np.array(_to_torch_layout(np.asarray(flat[collection][path]), path[-1]), order="C", copy=True)
    if collection == "batch_stats" and path[-1] == "mean":
      out[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, dtype=np.int64)
  return out


def _read_pth(path: str) -> Mapping[str, Any]:
  try:
    import torch  # only needed for .pth files
  except ImportError as e:
    raise CheckpointError(
      f"reading {path} needs PyTorch: pip install 'resnet_jax[torch]', or convert the file to .safetensors / .npz"
    ) from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict")
  return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """The state dict (torchvision key -> array) stored in a ``.pth``/``.pt``, ``.safetensors`` or ``.npz`` file.

  A ``module.`` prefix (DataParallel) is removed. A missing, unreadable or unknown file raises
  :class:`~resnet_jax.errors.CheckpointError` naming it.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file not found: {path}")
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext in (".pth", ".pt"):
      state_dict = _read_pth(path)
    elif ext == ".safetensors":
      from safetensors.numpy import load_file

      state_dict = load_file(path)
    elif ext == ".npz":
      with np.load(path, allow_pickle=False) as f:
        state_dict = {k: f[k] for k in f.files}
    else:
      raise CheckpointError(f"unknown checkpoint format {ext!r} for {path}: expected .pth, .pt, .safetensors or .npz")
  except CheckpointError:
    raise
  except Exception as e:  # corrupt or truncated files: report which file and why
    raise CheckpointError(f"cannot read {path} as {ext}: {type(e).__name__}: {e}") from e
  if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
    raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
  return _strip_prefix(state_dict)


def load_checkpoint(path: str | os.PathLike, name: str) -> dict[str, dict]:
  """Read torchvision weights from ``.pth``/``.pt`` (torch), ``.safetensors`` or ``.npz`` into flax variables."""
  path = os.fspath(path)
  state_dict = read_state_dict(path)
  try:
    return from_torchvision(state_dict, name)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from e


def save_checkpoint(variables: Mapping[str, Any], name: str, path: str | os.PathLike) -> None:
  """Write ``to_torchvision(variables, name)`` as ``.safetensors`` or ``.npz`` (no torch needed)."""
  write_state_dict(to_torchvision(variables, name), path)


def write_state_dict(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Write a state dict of numpy arrays as ``.safetensors`` or ``.npz``, chosen by the file name."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    from safetensors.numpy import save_file

    save_file(tensors, path)
  elif ext == ".npz":
    np.savez(path, **tensors)
  else:
    raise CheckpointError(f"cannot write {path}: expected a .safetensors or .npz file name")


__all__ = [
  "from_torchvision",
  "to_torchvision",
  "load_checkpoint",
  "read_state_dict",
  "save_checkpoint",
  "guess_architecture",
  "TORCHVISION_LAYOUT",
]
