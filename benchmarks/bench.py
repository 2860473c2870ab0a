"""Training and inference throughput of a resnet_jax model, optionally side by side with PyTorch.

    python benchmarks/bench.py --model resnet18 --batch 16 --size 224 --mode both --compare-torch --json out.json

Measures, on synthetic data (random images and labels, generated once):

- training images/s: the jit-compiled training step of ``train.py`` (``resnet_jax.train_step``, built by
  ``resnet_jax.run_setup``) = forward, backward, the optimizer of the default config (SGD with momentum,
  weight decay on the kernels), BatchNorm statistics update, finiteness checks; the state (params,
  batch_stats, optimizer state) is donated to the step;
- inference images/s: forward pass in evaluation mode (running BN statistics);
- compile time of the first step, split into trace+lower and XLA compile;
- peak memory: host RSS (``resource.getrusage``) on CPU, the device's ``peak_bytes_in_use`` on GPU;
- FLOPs per image: the convolutions and matrix products of the program (counted in its jaxpr, the same
  on every platform), the achieved FLOP/s and, on a GPU with a known peak, the model FLOP utilisation
  (training FLOPs taken as 3 x forward FLOPs).

Each figure is the median over ``--repeats`` timed repeats after ``--warmup`` untimed steps; a repeat runs as
many steps as fill ``--min-repeat-seconds`` (at least one). The repeats of all measured steps (jax and torch,
training and inference) are interleaved, round by round, so that each sees the same load on a shared machine.
``--compare-torch`` measures the same architecture
in PyTorch (torchvision, or ``benchmarks/torch_models.py`` for the CIFAR nets) in the same process, with the
same batch, the same thread count as XLA, in ``channels_last`` and contiguous NCHW memory formats, and prints
the ratio jax / torch.

``--compare-batch-norm`` also times the same training step with ``batch_norm_rule.BatchNorm`` (flax's
BatchNorm with a derivative rule of its own, two sums per channel) in place of ``flax.linen.BatchNorm``
(the model option ``norm_layer``), interleaved with the others, and prints the ratio: what that rule gains
over the gradient that autodiff derives from flax's formula.

``--profile N`` traces N more training steps with ``jax.profiler`` and splits their time by the compiled
program's operations: convolutions against everything else (BatchNorm, activations, conversions, pooling,
the optimizer), forward against backward against the update (from each operation's source location in the
model), and the operations that take longest. It reads the per-operation events of XLA's CPU runtime; on
other platforms it says that the trace has none.

XLA's CPU options are read once, when jax starts: pass them with ``--xla-flags`` (added to ``XLA_FLAGS``)
rather than after the fact. ``--cpu-conv eigen`` turns off the YNNPACK convolution fusion that jaxlib 0.10
to 0.12 use by default on CPU, giving Eigen's convolutions back: faster for CIFAR ResNets (16-64 channels at
32x32), slower for ResNet-18 at 224x224 (see ``benchmarks/README.md``); ``--cpu-conv default`` (the default)
leaves XLA's choice alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import torch_models  # noqa: E402 -- imports torch only when a PyTorch model is built

from resnet_jax import machine  # noqa: E402
from resnet_jax.errors import ConfigError, ModelError, run_cli  # noqa: E402

# XLA flag that turns off the YNNPACK convolution fusion of jaxlib 0.10's CPU backend (Eigen convs instead).
EIGEN_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
EIGEN_CONV_JAXLIB = ("0.10.", "0.11.", "0.12.")  # jaxlib versions where that flag exists

# Forward multiply-accumulates at 224x224, 1000 classes (torchvision's weight metadata, GMACs).
REFERENCE_GMACS_224 = {
  "resnet18": 1.814,
  "resnet34": 3.664,
  "resnet50": 4.089,
  "resnet101": 7.801,
  "resnet152": 11.514,
  "resnext50_32x4d": 4.23,
  "wide_resnet50_2": 11.398,
}

# Dense peak FLOP/s per device kind substring (first match wins): bfloat16, float32 (TF32 tensor cores).
PEAK_FLOPS = (
  ("H100 PCIe", 756e12, 378e12),
  ("H100", 989e12, 494e12),  # SXM
  ("H200", 989e12, 494e12),
  ("A100", 312e12, 156e12),
  ("L4", 121e12, 60e12),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default="resnet18", help="registered model name (resnet_jax.list_models())")
  p.add_argument("--batch", type=int, default=16, help="images per step")
  p.add_argument(
    "--size", type=int, default=None, help="image height = width (default 32 for CIFAR models, 224 otherwise)"
  )
  p.add_argument("--num-classes", type=int, default=None, help="default 10 for CIFAR models, 1000 otherwise")
  p.add_argument(
    "--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (parameters stay float32)"
  )
  p.add_argument(
    "--num-filters",
    type=int,
    default=None,
    help="the model's num_filters option (first-stage width; default: the registered model's own)",
  )
  p.add_argument("--mode", choices=("train", "infer", "both"), default="both")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument(
    "--min-repeat-seconds", type=float, default=0.5, help="each repeat runs enough steps to last at least this long"
  )
  p.add_argument("--json", dest="json_out", default=None, help="write all results to this JSON file")
  p.add_argument("--compare-torch", action="store_true", help="also measure PyTorch (needs torch, torchvision)")
  p.add_argument(
    "--compare-batch-norm",
    action="store_true",
    help="also time the training step with batch_norm_rule.BatchNorm (its own derivative rule) instead of "
    "flax.linen.BatchNorm",
  )
  p.add_argument(
    "--torch-formats", default="channels_last,contiguous", help="comma-separated torch memory formats to measure"
  )
  p.add_argument(
    "--conv-backend",
    choices=("auto", "xla", "onednn"),
    default="auto",
    help="the models' convolutions: auto (the models' default: oneDNN's where it runs, else XLA's), "
    "XLA's (flax nn.Conv) or oneDNN's called from the compiled step (x86-64 CPU only)",
  )
  p.add_argument(
    "--host-memory",
    choices=("auto", "keep", "default"),
    default="auto",
    help="keep: glibc keeps and reuses freed host memory (resnet_jax.host_memory), applied before "
    "jax starts; it holds for torch in the same process too; auto (as train.py): keep from 65,536 "
    "input pixels per step (batch x size x size) on, on the CPU only",
  )
  p.add_argument(
    "--cpu-conv",
    choices=("eigen", "default"),
    default="default",
    help=f"'eigen' adds {EIGEN_CONV_FLAG} to XLA_FLAGS (Eigen convolutions instead of YNNPACK: "
    "faster for CIFAR-sized nets, slower at 224x224 here); 'default' leaves XLA's choice",
  )
  p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS, appended before jax starts")
  p.add_argument(
    "--threads", type=int, default=None, help="threads for torch (default: the CPUs this process may use, as XLA does)"
  )
  p.add_argument(
    "--profile",
    type=int,
    default=0,
    help="N > 0: trace N more training steps and split their time by operation (see above; CPU)",
  )
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name in ("batch", "repeats"):
    if getattr(args, name) < 1:
      raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
  if args.warmup < 0:
    raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
  if args.profile < 0:
    raise ConfigError(f"--profile must be >= 0 (steps to trace), got {args.profile}")
  if args.profile and args.mode == "infer":
    raise ConfigError("--profile traces training steps: use it with --mode train or both")
  if args.compare_batch_norm and args.mode == "infer":
    raise ConfigError("--compare-batch-norm times training steps: use it with --mode train or both")
  if args.num_filters is not None and args.num_filters < 1:
    raise ConfigError(f"--num-filters must be at least 1, got {args.num_filters}")
  return args


def is_cifar_model(name: str) -> bool:
  """Whether the registered model ``name`` is a net for 32x32 images (the CIFAR ResNets and ResNet-9), as the
  model registry builds it: one that downsamples by less than 32."""
  from resnet_jax import models

  return getattr(models.create_model(name, num_classes=10), "min_input_size", 32) < 32


def set_model_defaults(args: argparse.Namespace) -> None:
  """``--size`` and ``--num-classes`` when not given: 32 and 10 for CIFAR models, 224 and 1000 otherwise."""
  cifar = is_cifar_model(args.model)
  if args.size is None:
    args.size = 32 if cifar else 224
  if args.num_classes is None:
    args.num_classes = 10 if cifar else 1000
  if args.size < 1 or args.num_classes < 1:
    raise ConfigError(f"--size and --num-classes must be positive, got {args.size} and {args.num_classes}")


def set_xla_flags(args: argparse.Namespace) -> str:
  """Add the requested flags to XLA_FLAGS; must run before jax is imported."""
  if "jax" in sys.modules and "jax._src.xla_bridge" in sys.modules:
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
      return os.environ.get("XLA_FLAGS", "")  # too late to change: report what is in effect
  flags = os.environ.get("XLA_FLAGS", "").split()
  extra = args.xla_flags.split()
  if args.cpu_conv == "eigen":
    import jaxlib.version  # does not start a backend

    if jaxlib.version.__version__.startswith(EIGEN_CONV_JAXLIB):
      extra.insert(0, EIGEN_CONV_FLAG)
    else:  # XLA aborts on flags it does not know: add it only where it was checked
      print(
        f"note: --cpu-conv eigen was checked with jaxlib {', '.join(v + 'x' for v in EIGEN_CONV_JAXLIB)} "
        f"only; jaxlib {jaxlib.version.__version__} keeps its default convolutions",
        file=sys.stderr,
      )
  for f in extra:
    if f not in flags:
      flags.append(f)
  os.environ["XLA_FLAGS"] = " ".join(flags)
  return os.environ["XLA_FLAGS"]


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r / 1024.0 if sys.platform != "darwin" else r / 2**20


class Schedule:
  """Timed repeats of several steps (jax and torch, training and inference), interleaved.

  ``add`` runs a step's warm-up at once (``warmup`` untimed calls, at least one) and fixes how many calls n
  make one repeat (enough to last ``min_seconds``). ``run`` then times ``repeats`` rounds; each round times one
  repeat of every step in turn, so that all of them see the same machine load, which matters on a shared
  machine. Each step's ``dest`` dict receives the median seconds per call and images/s, the per-repeat
  seconds, and the median process CPU seconds per call (all threads: on a loaded machine it depends less on
  the load than the wall time does; it includes spin-waiting).
  """

  def __init__(self, batch: int, warmup: int, min_seconds: float):
    self.batch, self.warmup, self.min_seconds = batch, warmup, min_seconds
    self.items: list[tuple[Callable[[], Any], Callable[[Any], Any], int, dict]] = []

  def add(self, run: Callable[[], Any], sync: Callable[[Any], Any], dest: dict) -> None:
    t_last = 0.0
    for _ in range(max(self.warmup, 1)):
      t0 = time.perf_counter()
      sync(run())
      t_last = time.perf_counter() - t0
    n = max(1, min(1000, math.ceil(self.min_seconds / max(t_last, 1e-6))))
    self.items.append((run, sync, n, dest))

  def run(self, repeats: int) -> None:
    walls: list[list[float]] = [[] for _ in self.items]
    cpus: list[list[float]] = [[] for _ in self.items]
    for _ in range(repeats):
      for i, (run, sync, n, _) in enumerate(self.items):
        t0, c0 = time.perf_counter(), time.process_time()
        out = None
        for _ in range(n):
          out = run()
        sync(out)
        walls[i].append((time.perf_counter() - t0) / n)
        cpus[i].append((time.process_time() - c0) / n)
    for (_, _, n, dest), w, c in zip(self.items, walls, cpus):
      sec = statistics.median(w)
      dest.update(
        images_per_s=self.batch / sec,
        seconds_per_step=sec,
        steps_per_repeat=n,
        all_seconds_per_step=w,
        cpu_seconds_per_step=statistics.median(c),
      )


# ------------------------------------------------------------------------------------------------ JAX


def matmul_flops(closed_jaxpr) -> float:
  """FLOPs of the convolutions and matrix products in a jaxpr (2 per multiply-add), sub-jaxprs included.

  This is the count that model FLOP utilisation is conventionally based on. It is read off the program
  itself, so it is the same on every platform (XLA's cost analysis of a compiled GPU program does not see
  inside the cuDNN convolution calls); oneDNN's convolutions are counted from the spec their FFI calls
  carry. Elementwise work (BatchNorm, ReLU) is not counted.
  """
  from resnet_jax import onednn_conv, onednn_lib

  total = 0.0
  jaxpr = getattr(closed_jaxpr, "jaxpr", closed_jaxpr)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
      macs_per_output = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * macs_per_output
    elif name == "dot_general":
      (contract_lhs, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract_lhs)
    elif name == "ffi_call" and eqn.params["target_name"] == onednn_conv.CUSTOM_CALL_TARGET:
      config = dict(eqn.params["attributes"])["config"]
      total += onednn_lib.ConvSpec.decode(config.split(" ", 1)[1]).flops
    for param in eqn.params.values():  # pjit, custom_jvp/vjp, remat, scan, cond: count their bodies
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += matmul_flops(sub) * (eqn.params.get("length", 1) if name == "scan" else 1)
  return total


def bench_config(args: argparse.Namespace):
  """The training config the benchmark builds its model, optimizer and step from: the defaults of
  ``resnet_jax.config_check.base_config()`` (SGD with momentum 0.9, learning rate 0.1, weight decay 5e-4 on
  the kernels) at a constant learning rate, with the model, dtype and convolutions of the command line."""
  from resnet_jax.config_check import base_config

  config = base_config()
  config.model.name = args.model
  config.model.dtype = args.dtype
  config.model.conv_backend = args.conv_backend
  if args.num_filters is not None:
    config.model.options.num_filters = args.num_filters
  config.schedule.name = "constant"
  config.schedule.warmup = 0.0
  return config


def torch_optimizer(model, config):
  """PyTorch's counterpart of ``config``'s optimizer (``resnet_jax.optim.make_optimizer``):
  :func:`torch_models.torch_sgd`."""
  if config.optimizer.name != "sgd":
    raise ConfigError(f"the PyTorch comparison implements optimizer sgd; the config has {config.optimizer.name!r}")
  return torch_models.torch_sgd(model, config.optimizer)


def sync(tree):
  import jax

  return jax.block_until_ready(tree)


def hlo_flops(compiled) -> float | None:
  """FLOPs of a compiled program by XLA's cost analysis (best effort: on GPU the cuDNN calls are not counted)."""
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"]) if ca and "flops" in ca else None
  except Exception:
    return None


def bench_jax(args: argparse.Namespace, schedule: Schedule) -> tuple[dict, tuple | None]:
  """Compile and warm up the jax steps, adding them to ``schedule``; the returned dict is filled by it, and
  returned with the training step's ``(run, compiled)`` (``None`` with ``--mode infer``).

  The model, the train state and the jitted training step are built as training builds them
  (``resnet_jax.run_setup``: ``build_model``, ``build_optimizer``, ``create_train_state``, ``build_train_step``).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from resnet_jax import optim, run_setup
  from resnet_jax.train_step import count_parameters, create_train_state

  config = bench_config(args)
  model = run_setup.build_model(config, args.num_classes)
  tx = run_setup.build_optimizer(config, optim.make_schedule(config, steps_per_epoch=1, total_steps=1))
  state = create_train_state(model, tx, (args.size, args.size, 3), jax.random.PRNGKey(args.seed))
  variables = (
    {"params": state.params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": state.params}
  )
  rng = np.random.default_rng(args.seed)
  images = rng.standard_normal((args.batch, args.size, args.size, 3), dtype=np.float32)
  labels = rng.integers(0, args.num_classes, args.batch).astype(np.int32)
  dev = jax.devices()[0]
  out: dict = {"device": f"{dev.platform}:{dev.device_kind}", "params": count_parameters(variables["params"])}
  x = jnp.asarray(images, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
  forward = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  out["forward_flops_per_image"] = matmul_flops(forward) / args.batch
  time_infer(args, model, variables, x, schedule, out)
  train = None
  if args.mode in ("train", "both"):
    # Own copies: each step donates its state, while the inference step keeps using ``variables``.
    def fresh_state():
      return jax.tree.map(lambda a: jnp.array(a, copy=True), state)

    batch = {"image": images, "label": labels}
    train = time_train(args, config, fresh_state(), batch, schedule, out)
    if args.compare_batch_norm:
      out["batch_norm_rule"] = time_batch_norm_rule(args, fresh_state(), batch, schedule)
  if dev.platform == "gpu":
    try:
      stats = dev.memory_stats() or {}
      out["device_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    except Exception:
      out["device_peak_mb"] = None
  return out, train


def time_infer(args: argparse.Namespace, model, variables: dict, x, schedule: Schedule, out: dict) -> None:
  """Compile the forward pass in evaluation mode (its FLOPs by XLA into ``out``) and, for ``--mode``
  infer or both, add it to ``schedule`` (``out["infer"]``)."""
  import jax

  infer = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
  t0 = time.perf_counter()
  infer_lowered = infer.lower(variables, x)
  t1 = time.perf_counter()
  infer_compiled = infer_lowered.compile()
  t2 = time.perf_counter()
  fwd_hlo = hlo_flops(infer_compiled)
  out["forward_hlo_flops_per_image"] = fwd_hlo / args.batch if fwd_hlo else None
  if args.mode in ("infer", "both"):
    out["infer"] = {"lower_s": t1 - t0, "compile_s": t2 - t1}
    schedule.add(lambda: infer_compiled(variables, x), sync, out["infer"])
    out["infer"]["peak_rss_mb"] = peak_rss_mb()


def time_batch_norm_rule(args: argparse.Namespace, state, batch: dict, schedule: Schedule) -> dict:
  """The training step of :func:`time_train` with ``batch_norm_rule.BatchNorm`` (model option ``norm_layer``;
  the same variables, so the same ``state``); timed in the same schedule."""
  import batch_norm_rule

  config = bench_config(args)
  config.model.options.norm_layer = batch_norm_rule.BatchNorm
  out: dict = {}
  time_train(args, config, state, batch, schedule, out)
  return out["train"]


def time_train(args: argparse.Namespace, config, state, batch: dict, schedule: Schedule, out: dict) -> tuple:
  """Compile the training step of ``resnet_jax`` (``run_setup.build_train_step``: the step ``train.py`` runs,
  on a one-device mesh, its state donated), run it once and add it to ``schedule`` (``out["train"]``).
  Returns ``(run, compiled)``: one more step, and the compiled program (for :func:`profile_train`)."""
  import jax

  from resnet_jax import run_setup
  from resnet_jax.distributed import DataParallel

  dp = DataParallel(devices=jax.devices()[:1])
  step = run_setup.build_train_step(config, args.num_classes, dp)
  holder = {"state": dp.replicate(state), "batch": dp.put_batch(batch)}
  t0 = time.perf_counter()
  lowered = step.lower(holder["state"], holder["batch"])
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  train_flops = hlo_flops(compiled)

  def run():
    holder["state"], metrics = compiled(holder["state"], holder["batch"])
    return metrics["loss"]

  t3 = time.perf_counter()
  first_loss = float(sync(run()))
  first_step_s = time.perf_counter() - t3
  if not math.isfinite(first_loss):
    raise ConfigError(f"training loss of {args.model} is {first_loss} on the first step")
  out["train"] = {
    "lower_s": t1 - t0,
    "compile_s": t2 - t1,
    "first_step_s": t1 - t0 + t2 - t1 + first_step_s,
    "hlo_flops_per_image": train_flops / args.batch if train_flops else None,
  }
  schedule.add(run, sync, out["train"])
  out["train"]["peak_rss_mb"] = peak_rss_mb()
  return run, compiled


def utilisation(args: argparse.Namespace, res: dict) -> dict:
  """Achieved FLOP/s of the training step (3 x forward FLOPs per image) and MFU where the peak is known."""
  fwd = res.get("forward_flops_per_image")
  ref = REFERENCE_GMACS_224.get(args.model)
  ref_fwd = 2e9 * ref * (args.size / 224) ** 2 if ref and args.num_classes == 1000 else None
  info: dict = {"forward_flops_per_image": fwd, "forward_flops_per_image_reference": ref_fwd}
  fwd = fwd or ref_fwd
  if not fwd or "train" not in res:
    return info
  achieved = 3 * fwd * res["train"]["images_per_s"]
  info["train_flops_per_image"] = 3 * fwd
  info["train_achieved_tflops"] = achieved / 1e12
  kind = res["device"]
  if kind.startswith("gpu:"):
    for key, bf16, f32 in PEAK_FLOPS:
      if key in kind:
        peak = bf16 if args.dtype == "bfloat16" else f32
        info["peak_tflops"] = peak / 1e12
        info["mfu"] = achieved / peak
        break
  return info


_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([^\s=]+) = .*? ([a-z][a-z0-9-]*)\(")
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([^\s(]+) ")


def hlo_operations(hlo_text: str) -> dict[str, dict]:
  """Each instruction of a compiled program's text (``compiled.as_text()``) by name: its ``kind``
  (``convolution``: a convolution, a custom call whose target names one, or a fusion that holds one; else
  ``other``), its ``pass`` (``forward`` / ``backward`` / ``update``, from the ``jvp`` / ``transpose`` of its
  source location, ``op_name``; ``unattributed`` where XLA's rewrites left it none, as for XLA's own
  weight-gradient convolutions) and its ``group`` (the name without its numeric suffix)."""
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      m = _HLO_COMPUTATION.match(line)
      current = m.group(1) if m else None
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  has_conv = {name: any(" convolution(" in ln for ln in body) for name, body in computations.items()}
  ops = {}
  for body in computations.values():
    for line in body:
      m = _HLO_INSTRUCTION.match(line)
      if not m:
        continue
      name, opcode = m.groups()
      target = re.search(r'custom_call_target="([^"]+)"', line)
      called = re.search(r"calls=%?([^\s,}]+)", line)
      conv = (
        opcode == "convolution"
        or (opcode == "custom-call" and target is not None and "conv" in target.group(1))
        or (opcode == "fusion" and called is not None and has_conv.get(called.group(1), False))
      )
      op_name = re.search(r'op_name="([^"]*)"', line)
      where = op_name.group(1) if op_name else ""
      step_pass = (
        "backward" if "transpose(" in where else "forward" if "jvp(" in where else "update" if where else "unattributed"
      )
      ops[name] = {"kind": "convolution" if conv else "other", "pass": step_pass, "group": re.sub(r"\.\d+$", "", name)}
  return ops


def profile_train(run: Callable[[], Any], compiled, steps: int) -> dict:
  """Trace ``steps`` calls of the training step ``run`` with ``jax.profiler`` and add up the time of each of
  ``compiled``'s operations (:func:`hlo_operations`) over the trace's events: milliseconds per step by kind,
  by pass and by group. ``busy_ms_per_step`` sums the operations over all threads; XLA's CPU runtime runs
  one operation at a time when the program is a chain, and then it is close to ``wall_ms_per_step``."""
  import glob
  import tempfile

  import jax
  from jax.profiler import ProfileData

  ops = hlo_operations(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
      out = run()
    sync(out)
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(files[0]) if files else None
  totals: dict[str, dict[str, float]] = {"kind": {}, "pass": {}, "pass_kind": {}, "group": {}}
  busy = 0.0
  for plane in data.planes if data is not None else ():
    for line in plane.lines:
      for event in line.events:
        op = ops.get(event.name)
        if op is None:
          continue
        ms = event.duration_ns / 1e6 / steps
        busy += ms
        keys = {"kind": op["kind"], "pass": op["pass"], "pass_kind": f"{op['pass']} {op['kind']}", "group": op["group"]}
        for table_name, key in keys.items():
          totals[table_name][key] = totals[table_name].get(key, 0.0) + ms
  ordered = {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in totals.items()}
  return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "busy_ms_per_step": busy, **ordered}


def profile_table(prof: dict) -> str:
  """The profile of :func:`profile_train` as text: the split by kind and pass, then the longest groups."""
  busy = prof["busy_ms_per_step"]
  if not busy:
    return "profile: the trace has no per-operation events of the compiled step (XLA's CPU runtime gives them)"
  lines = [
    f"profile of {prof['steps']} training steps: {prof['wall_ms_per_step']:.1f} ms per step (wall), "
    f"{busy:.1f} ms in the program's operations (summed over threads)"
  ]
  for title in ("kind", "pass_kind"):
    lines += [f"  {k:<24} {ms:9.1f} ms {100 * ms / busy:5.1f}%" for k, ms in prof[title].items()]
  lines.append("  longest operations (name without its number):")
  lines += [f"    {k:<40} {ms:9.1f} ms {100 * ms / busy:5.1f}%" for k, ms in list(prof["group"].items())[:12]]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- torch


def import_torch():
  """torch and torchvision, or a ConfigError saying how to install them."""
  try:
    import torch
    import torchvision  # noqa: F401
  except ImportError as e:
    raise ConfigError(
      f"--compare-torch needs torch and torchvision, which cannot be imported ({e}); "
      "install them with: pip install -e '.[torch]', or run without --compare-torch"
    ) from None
  return torch


def bench_torch(args: argparse.Namespace, threads: int, schedule: Schedule) -> dict:
  """Build and warm up the torch steps, adding them to ``schedule``; the returned dict is filled by it."""
  torch = import_torch()
  if not torch_models.has_counterpart(args.model):
    print(
      f"note: no PyTorch counterpart for {args.model!r} (known: torchvision ResNets and CIFAR "
      "resnet/plain 20..110); torch not measured",
      file=sys.stderr,
    )
    return {}
  if args.num_filters is not None and not torch_models.has_counterpart(args.model, num_filters=True):
    print(f"note: the PyTorch {args.model} has its fixed width, not --num-filters; torch not measured", file=sys.stderr)
    return {}
  torch.set_num_threads(threads)
  torch.manual_seed(args.seed)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithms, as XLA's autotuner does
  bf16 = args.dtype == "bfloat16"
  results: dict = {"version": torch.__version__, "threads": torch.get_num_threads(), "device": device}

  def sync(_):
    if device == "cuda":
      torch.cuda.synchronize()

  for fmt in [f.strip() for f in args.torch_formats.split(",") if f.strip()]:
    if fmt not in ("channels_last", "contiguous"):
      raise ConfigError(f"unknown torch memory format {fmt!r}: expected channels_last or contiguous")
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    model = (
      torch_models.create_torch_model(args.model, args.num_classes, args.num_filters).to(device).to(memory_format=mf)
    )
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=mf)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    opt = torch_optimizer(model, bench_config(args))
    loss_fn = torch.nn.CrossEntropyLoss()
    r: dict = {}
    if args.mode in ("train", "both"):

      def train_step(model=model, opt=opt, x=x, y=y):
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
          loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

      r["train"] = {}
      schedule.add(train_step, sync, r["train"])
    if args.mode in ("infer", "both"):

      def infer_step(model=model, x=x):
        model.eval()
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
          return model(x)

      r["infer"] = {}
      schedule.add(infer_step, sync, r["infer"])
    results[fmt] = r
  results["peak_rss_mb"] = peak_rss_mb()
  return results


# ----------------------------------------------------------------------------------------------- main


def table(args: argparse.Namespace, res: dict) -> str:
  """Images/s (wall clock) and CPU seconds per training step, jax and torch, with the ratios."""
  rows = [("", "train img/s", "infer img/s", "train CPU s/step")]

  def cell(d: dict, k: str) -> str:
    return f"{d[k]['images_per_s']:.1f}" if k in d else "-"

  def cpu(d: dict) -> str:
    return f"{d['train']['cpu_seconds_per_step']:.3f}" if "train" in d else "-"

  from resnet_jax import models

  has_convs = "conv_backend" in models.model_options(args.model)
  backend = f", {args.conv_backend} convolutions" if has_convs and args.conv_backend != "xla" else ""
  rows.append((f"jax ({args.dtype}{backend})", cell(res["jax"], "train"), cell(res["jax"], "infer"), cpu(res["jax"])))
  if "batch_norm_rule" in res["jax"]:
    rule = {"train": res["jax"]["batch_norm_rule"]}
    rows.append(("jax, BatchNorm with its own rule", cell(rule, "train"), "-", cpu(rule)))
  torch_res = res.get("torch") or {}
  for fmt in ("channels_last", "contiguous"):
    if fmt in torch_res:
      t = torch_res[fmt]
      rows.append((f"torch {fmt}", cell(t, "train"), cell(t, "infer"), cpu(t)))
  for key, ratio in res.get("ratios", {}).items():
    rows.append(
      (
        f"ratio jax/torch {key}",
        f"{ratio['train']:.2f}" if "train" in ratio else "-",
        f"{ratio['infer']:.2f}" if "infer" in ratio else "-",
        "",
      )
    )
  if "batch_norm_rule_ratio" in res:
    rows.append(("ratio rule/flax BatchNorm", f"{res['batch_norm_rule_ratio']:.3f}", "-", ""))
  w0 = max(len(r[0]) for r in rows)
  return "\n".join(f"{r[0]:<{w0}}  {r[1]:>12}  {r[2]:>12}  {r[3]:>16}" for r in rows)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.compare_torch:
    import_torch()  # fail fast, before the long JAX measurement
  if args.cpu_conv == "eigen" and "--xla_cpu_experimental_ynn_fusion_type" in args.xla_flags:
    raise ConfigError("--xla-flags sets xla_cpu_experimental_ynn_fusion_type: use --cpu-conv default with it")
  xla_flags = set_xla_flags(args)

  import jax

  from resnet_jax import models

  if args.model not in models.list_models():
    models.create_model(args.model)  # raises ModelError naming close matches
    raise ModelError(f"unknown model {args.model!r}")
  if args.num_filters is not None and "num_filters" not in models.model_options(args.model):
    raise ConfigError(
      f"--num-filters: {args.model} has no num_filters option (its options: {models.model_options(args.model)})"
    )
  if args.compare_batch_norm and "norm_layer" not in models.model_options(args.model):
    raise ConfigError(f"--compare-batch-norm: {args.model} has no BatchNorm to compare (no norm_layer option)")
  set_model_defaults(args)
  from resnet_jax import host_memory  # before jax starts its backend (the model above is only described)

  choice = host_memory.choose(args.host_memory, args.batch, args.size, host_memory.expected_platform())
  args.host_memory_kept = host_memory.apply(choice)
  threads = args.threads or machine.available_cpus()
  res: dict = {
    "machine": {**machine.describe(), "xla_flags": xla_flags},
    "config": {k: v for k, v in vars(args).items() if k != "json_out"},
  }
  print(
    f"{args.model}{'' if args.num_filters is None else f' (num_filters={args.num_filters})'}: "
    f"batch {args.batch}, {args.size}x{args.size}, {args.dtype}, {args.num_classes} classes, "
    f"{jax.default_backend()} ({machine.one_line()}), "
    f"XLA_FLAGS={xla_flags!r}, host memory {'kept' if args.host_memory_kept else 'default'}",
    flush=True,
  )
  schedule = Schedule(args.batch, args.warmup, args.min_repeat_seconds)
  res["jax"], train = bench_jax(args, schedule)
  if args.compare_torch:
    res["torch"] = bench_torch(args, threads, schedule)
  schedule.run(args.repeats)
  if args.profile:
    res["jax"]["train"]["profile"] = profile_train(*train, args.profile)
  res["utilisation"] = utilisation(args, res["jax"])
  if "batch_norm_rule" in res["jax"]:
    res["batch_norm_rule_ratio"] = res["jax"]["batch_norm_rule"]["images_per_s"] / res["jax"]["train"]["images_per_s"]
  if args.compare_torch:
    res["ratios"] = {}
    for fmt in ("channels_last", "contiguous"):
      tr = res["torch"].get(fmt)
      if tr:
        res["ratios"][fmt] = {
          k: res["jax"][k]["images_per_s"] / tr[k]["images_per_s"]
          for k in ("train", "infer")
          if k in tr and k in res["jax"]
        }
  print(table(args, res))
  j = res["jax"]
  if "train" in j:
    t = j["train"]
    print(
      f"jax training step: trace+lower {t['lower_s']:.2f} s, compile {t['compile_s']:.2f} s, "
      f"first step {t['first_step_s']:.2f} s (incl. compile); peak host RSS {t['peak_rss_mb']:.0f} MiB"
    )
  if "profile" in j.get("train", {}):
    print(profile_table(j["train"]["profile"]))
  if j.get("device_peak_mb") is not None:
    print(f"peak device memory: {j['device_peak_mb']:.0f} MiB")
  u = res["utilisation"]
  if "train_achieved_tflops" in u:
    line = (
      f"training: {u['train_flops_per_image'] / 1e9:.2f} GFLOP/image (3 x forward), "
      f"{u['train_achieved_tflops'] * 1e3:.1f} GFLOP/s achieved"
    )
    if "mfu" in u:
      line += f", MFU {100 * u['mfu']:.1f}% of {u['peak_tflops']:.0f} TFLOP/s"
    print(line)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(res, f, indent=2, default=str)
    print(f"wrote {args.json_out}")
  return 0


if __name__ == "__main__":
  run_cli(main)
