"""Export a trained model (evaluation mode) to ONNX or to serialized StableHLO.

  python -m resnet_jax.export --workdir=RUN --format=onnx --out=model.onnx
  python -m resnet_jax.export --workdir=RUN --format=stablehlo --out=model.stablehlo
  python -m resnet_jax.export --weights=r50.safetensors --model=resnet50 --format=onnx --out=r50.onnx

The exported function maps images ``(batch, H, W, C)`` NHWC float32, normalised as in the run's
evaluation (see :mod:`resnet_jax.predict`), to logits ``(batch, classes)`` float32; BatchNorm uses its
running statistics, and the weights are constants of the artifact.

- ONNX (``pip install 'resnet_jax[export]'``: jax2onnx, onnx, onnxruntime): input ``image``, output
  ``logits``, opset 23, a dynamic batch dimension ``B``. After writing, the file is run in ONNX Runtime on a
  random batch and compared with the JAX model (:func:`check_onnx`).
- StableHLO (``jax.export``, no extra package): a dynamic batch dimension ``b`` (shape polymorphism),
  lowered for the platform(s) given (default: CPU). ``jax.export.deserialize(open(f, "rb").read()).call(x)``
  runs it again from Python, without this library; the file is checked that way after writing.

``--batch=N`` fixes the batch size instead. Errors (an unknown format, a missing run or weights file, a
missing exporter package) are one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from resnet_jax import pooling
from resnet_jax.errors import ConfigError, ModelError, parse_args, run_cli

FORMATS = ("onnx", "stablehlo")


def portable(model: Any) -> Any:
  """``model`` with XLA's convolutions: an exported program cannot call this process's oneDNN handler."""
  return model.clone(conv_backend="xla") if getattr(model, "conv_backend", "xla") != "xla" else model


def inference_function(model: Any, variables: dict) -> Callable:
  """``images -> logits`` of ``model`` in evaluation mode, float32, with ``variables`` closed over, computed
  with XLA's convolutions (:func:`portable`)."""
  import jax.numpy as jnp

  model = portable(model)

  def f(x):
    return jnp.asarray(model.apply(variables, x, train=False), jnp.float32)

  return f


# ----------------------------------------------------------------------------------------------
# ONNX.


def _jax2onnx():
  import logging

  # jax2onnx logs a warning with a traceback for each optional plugin it cannot load (dm_pix's).
  logging.getLogger("jax2onnx").setLevel(logging.ERROR)
  try:
    import jax2onnx
    import onnx  # noqa: F401
  except ImportError as e:
    raise ModelError(f"ONNX export needs jax2onnx and onnx: pip install 'resnet_jax[export]' ({e})") from None
  return jax2onnx


def to_onnx(model: Any, variables: dict, image_shape: Sequence[int], batch: int | None = None, opset: int = 23):
  """The ONNX ``ModelProto`` of the model's evaluation-mode logits (input ``image`` NHWC, output ``logits``).

  ``batch=None`` gives a dynamic batch dimension ``B``. The model is traced with jit inlined
  (``jax.disable_jit`` inside the traced function): jax2onnx's handler of nested jit calls does not run on
  jax >= 0.11, and the graph is the same either way.
  """
  import flax.linen as nn
  import jax

  jax2onnx = _jax2onnx()
  f = inference_function(model, variables)

  def inlined(x):
    with jax.disable_jit(), pooling.export_friendly(), nn.intercept_methods(_plain_layers):
      return f(x)

  shape = ("B" if batch is None else int(batch), *[int(d) for d in image_shape])
  with contextlib.redirect_stdout(io.StringIO()), _without_linen_plugins():
    proto = jax2onnx.to_onnx(
      inlined,
      inputs=[shape],
      model_name="resnet_jax",
      opset=opset,
      return_mode="proto",
      input_names=["image"],
      output_names=["logits"],
    )
  return proto


def _plain_layers(next_fun, args, kwargs, context):
  """A flax interceptor computing ``nn.Conv``, ``nn.BatchNorm`` (running statistics) and ``nn.Dense`` from
  their variables with plain ``lax``/``jnp`` operations, the same arithmetic as flax's, which jax2onnx
  translates primitive by primitive."""
  import flax.linen as nn
  import jax.numpy as jnp
  from jax import lax

  module = context.module
  if context.method_name != "__call__" or type(module) not in (nn.Conv, nn.BatchNorm, nn.Dense):
    return next_fun(*args, **kwargs)
  x = args[0]
  params = module.variables.get("params", {})
  if isinstance(module, nn.Conv):
    kernel = jnp.asarray(params["kernel"], module.dtype or x.dtype)
    strides = module.strides or (1,) * (x.ndim - 2)
    strides = (strides,) * (x.ndim - 2) if isinstance(strides, int) else tuple(strides)
    padding = module.padding if isinstance(module.padding, str) else tuple(tuple(p) for p in module.padding)
    y = lax.conv_general_dilated(
      jnp.asarray(x, kernel.dtype),
      kernel,
      strides,
      padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=module.feature_group_count,
    )
    return y + params["bias"] if module.use_bias else y
  if isinstance(module, nn.BatchNorm):
    stats = module.variables["batch_stats"]
    y = (x - stats["mean"]) * lax.rsqrt(stats["var"] + module.epsilon)
    if module.use_scale:
      y = y * params["scale"]
    if module.use_bias:
      y = y + params["bias"]
    return jnp.asarray(y, module.dtype or x.dtype)
  y = jnp.dot(x, params["kernel"])
  return y + params["bias"] if module.use_bias else y


@contextlib.contextmanager
def _without_linen_plugins():
  """jax2onnx without its ``flax.linen`` layer handlers: the layers are traced to JAX primitives, which it
  translates one by one (its ``linen.BatchNorm`` handler, given a convolution's output, mixes NCHW and NHWC
  in the residual additions, and its ``linen.max_pool`` takes string padding only)."""
  from jax2onnx.plugins import plugin_system

  plugin_system.import_all_plugins()
  registry = plugin_system.PLUGIN_REGISTRY
  removed = {k: v for k, v in registry.items() if type(v).__module__.startswith("jax2onnx.plugins.flax.linen")}
  for k in removed:
    del registry[k]
  try:
    yield
  finally:
    registry.update(removed)


def onnx_session(path_or_bytes: str | bytes):
  """An ONNX Runtime CPU session (warnings silenced)."""
  try:
    import onnxruntime as ort
  except ImportError as e:
    raise ModelError(f"running ONNX needs onnxruntime: pip install 'resnet_jax[export]' ({e})") from None
  options = ort.SessionOptions()
  options.log_severity_level = 3
  return ort.InferenceSession(path_or_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def check_onnx(path_or_bytes: str | bytes, model: Any, variables: dict, images: np.ndarray) -> float:
  """Largest absolute difference between ONNX Runtime's logits and the JAX model's on ``images``."""
  session = onnx_session(path_or_bytes)
  got = session.run(None, {session.get_inputs()[0].name: np.asarray(images, np.float32)})[0]
  want = np.asarray(inference_function(model, variables)(images))
  return float(np.max(np.abs(got - want)))


# ----------------------------------------------------------------------------------------------
# StableHLO.


def to_stablehlo(
  model: Any, variables: dict, image_shape: Sequence[int], batch: int | None = None, platforms: Sequence[str] = ("cpu",)
) -> bytes:
  """Serialized ``jax.export.Exported`` of the model's evaluation-mode logits (batch ``b`` when ``None``)."""
  import jax
  from jax import export as jax_export

  f = jax.jit(inference_function(model, variables))
  if batch is None:
    (b,) = jax_export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, *image_shape), np.float32)
  else:
    spec = jax.ShapeDtypeStruct((int(batch), *image_shape), np.float32)
  exported = jax_export.export(f, platforms=tuple(platforms))(spec)
  return bytes(exported.serialize())


def run_stablehlo(blob: bytes, images: np.ndarray) -> np.ndarray:
  """Deserialize a :func:`to_stablehlo` artifact and run it on ``images``."""
  from jax import export as jax_export

  exported = jax_export.deserialize(bytearray(blob))
  return np.asarray(exported.call(np.asarray(images, np.float32)))


# ----------------------------------------------------------------------------------------------
# The command line.


def export(
  model: Any,
  variables: dict,
  image_shape: Sequence[int],
  fmt: str,
  out: str,
  batch: int | None = None,
  check: bool = True,
  seed: int = 0,
) -> float | None:
  """Write the ``fmt`` artifact to ``out``; with ``check``, return the largest logit difference between the
  reloaded artifact and the JAX model on a random batch of 2 (or ``batch``)."""
  if fmt not in FORMATS:
    raise ConfigError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise ConfigError(f"cannot write {out}: folder {folder} does not exist")
  if fmt == "onnx":
    blob = to_onnx(model, variables, image_shape, batch).SerializeToString()
  else:
    blob = to_stablehlo(model, variables, image_shape, batch)
  tmp = out + ".tmp"
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, out)
  if not check:
    return None
  images = np.random.default_rng(seed).normal(size=(batch or 2, *image_shape)).astype(np.float32)
  if fmt == "onnx":
    return check_onnx(out, model, variables, images)
  with open(out, "rb") as f:
    got = run_stablehlo(f.read(), images)
  return float(np.max(np.abs(got - np.asarray(inference_function(model, variables)(images)))))


def main(argv: list[str]) -> int:
  import argparse

  parser = argparse.ArgumentParser(prog="python -m resnet_jax.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", help="output folder of a train.py run")
  parser.add_argument("--weights", help="a torchvision state dict (.pth/.pt/.safetensors/.npz)")
  parser.add_argument("--model", help="the model of --weights (e.g. resnet50)")
  parser.add_argument("--image-size", type=int, default=None, help="input size (default: the run's, or 224)")
  parser.add_argument("--format", required=True, help="onnx or stablehlo")
  parser.add_argument("--out", required=True, help="file to write")
  parser.add_argument("--batch", type=int, default=None, help="fixed batch size (default: dynamic)")
  parser.add_argument("--platforms", default="cpu", help="stablehlo: comma-separated, e.g. cpu,cuda")
  parser.add_argument("--no-check", action="store_true", help="do not reload and compare the artifact")
  args = parse_args(
    parser,
    argv,
    "usage: python -m resnet_jax.export (--workdir=RUN | --weights=FILE --model=NAME) "
    "--format=onnx|stablehlo --out=FILE",
  )
  if args.format not in FORMATS:
    raise ConfigError(f"unknown export format {args.format!r}: expected one of {', '.join(FORMATS)}")
  if args.batch is not None and args.batch < 1:
    raise ConfigError(f"--batch must be positive, got {args.batch}")
  from resnet_jax import predict

  predictor = predict.load_predictor(args.workdir, args.weights, args.model, args.image_size)
  prep = predictor.preprocessing
  image_shape = (prep.size, prep.size, prep.channels)
  if args.format == "stablehlo" and args.platforms != "cpu":
    blob = to_stablehlo(
      predictor.model,
      predictor.variables,
      image_shape,
      args.batch,
      [p.strip() for p in args.platforms.split(",") if p.strip()],
    )
    with open(args.out, "wb") as f:
      f.write(blob)
    print(f"wrote {args.out} ({len(blob) / 1e6:.1f} MB, platforms {args.platforms}; not checked here)")
    return 0
  diff = export(
    predictor.model, predictor.variables, image_shape, args.format, args.out, args.batch, check=not args.no_check
  )
  batch = "dynamic batch" if args.batch is None else f"batch {args.batch}"
  size = os.path.getsize(args.out) / 1e6
  checked = "" if diff is None else f"; reloaded and compared: max |logit difference| {diff:.2e}"
  print(f"wrote {args.out} ({args.format}, input {batch} x {image_shape}, {size:.1f} MB{checked})")
  return 0


if __name__ == "__main__":
  run_cli(main, sys.argv[1:])
