"""The training step: one function ``(state, batch) -> (state, metrics)`` that every training of the
library runs (``train.py``, the gradient-flow experiments, ``benchmarks/bench.py``), and the evaluation step.

The training step is a forward pass in train mode (BatchNorm statistics of the batch, updated in the
step), softmax cross-entropy with optional label smoothing, gradients and the optax update (the weight
decay and its mask are the optimizer's: :func:`resnet_jax.optim.make_optimizer`), and, when the state
keeps one, the update of the weight average (``config.ema_decay``, :func:`averaged_variables`). It is not jitted here:
:class:`resnet_jax.distributed.DataParallel` jits it over the device mesh, with the state donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, opt_state) plus the BatchNorm statistics and, with ``ema_decay > 0``,
  an exponential moving average of both (``ema``: the :class:`optax.EmaState` of ``{"params",
  "batch_stats"}``; :func:`averaged_variables`)."""

  batch_stats: Any = None
  ema: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)


def create_train_state(
  model: Any,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, ...],
  key: jax.Array,
  apply_fn: Callable | None = None,
  ema_decay: float = 0.0,
) -> TrainState:
  """Initialise parameters and BatchNorm statistics on a dummy batch and wrap them with ``tx``.

  ``apply_fn`` replaces ``model.apply`` in the state (fine-tuning with frozen BatchNorm statistics).
  ``ema_decay`` in (0, 1): the state also keeps the weight average of :func:`averaged_variables`.
  """
  variables = init_variables(model, image_shape, key)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  state = TrainState.create(apply_fn=apply_fn or model.apply, params=params, tx=tx, batch_stats=batch_stats)
  return with_weight_average(state, ema_decay)


def with_weight_average(state: TrainState, ema_decay: float) -> TrainState:
  """``state`` with a fresh weight average of decay ``ema_decay`` (none when it is 0): nothing averaged
  yet, so :func:`averaged_variables` gives the state's own variables until the first training step."""
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
  if ema_decay == 0.0:
    return state.replace(ema=None, ema_decay=0.0)
  tracked = {"params": state.params, "batch_stats": state.batch_stats}
  return state.replace(ema=optax.ema(ema_decay).init(tracked), ema_decay=float(ema_decay))


def averaged_variables(state: TrainState) -> dict:
  """The variables a run evaluates, exports and predicts with: ``{"params", "batch_stats"}`` of the state,
  or, when it keeps a weight average (``ema_decay`` d > 0), their exponential moving average over the
  training steps, debiased (Polyak & Juditsky 1992; as in Adam, Kingma & Ba 2015, section 3):

      m_t = d m_{t-1} + (1 - d) theta_t,  m_0 = 0,    theta_bar_t = m_t / (1 - d^t)

  ``theta_t`` is the parameters and BatchNorm statistics after step t, and ``theta_bar_t`` is a weighted
  mean of ``theta_1 .. theta_t`` with weights proportional to d^(t-k), which sum to 1 from the first step
  on (no warm-up of the decay is needed). Before the first step (t = 0) it is the state's own variables.
  """
  if state.ema is None:
    return _variables(state.params, state.batch_stats)
  avg = debiased_average(state.ema.ema, state.ema_decay, state.ema.count)
  own = {"params": state.params, "batch_stats": state.batch_stats}
  avg = jax.tree.map(lambda a, x: jnp.where(state.ema.count > 0, a, x), avg, own)
  return _variables(avg["params"], avg["batch_stats"])


def debiased_average(moment: Any, decay: float, count: Any) -> Any:
  """``moment / (1 - decay**count)`` leaf by leaf (:func:`optax.tree.bias_correction`), for ``count >= 1``."""
  return optax.tree.bias_correction(moment, decay, jnp.asarray(count, jnp.int32))


def init_variables(model: Any, image_shape: tuple[int, ...], key: jax.Array) -> dict:
  """``model.init(key, zeros((1, *image_shape)), train=False)``, as one compiled program per model and shape.

  On the CPU the program is compiled without XLA's LLVM optimisation (``xla_backend_optimization_level=0``):
  it runs once, and optimising the threefry random bits of every parameter's initialiser costs far more than
  it saves (on a 2-core CPU, longer than an op-by-op ``model.init``, which compiles one small program per
  operation and shape; docs/training.md, "Start-up", has the measured start-up of ``train.py``). The values
  are those of ``model.init`` up to rounding in the last bit or two of the normal samples (the same random
  bits, another evaluation order of the float math).
  ``model`` (a flax module) must be hashable: it and ``image_shape`` key the compiled programs. Inside a
  transformation (``jax.eval_shape``, ``jax.jit``) it is traced as part of the outer program.
  """
  if isinstance(key, jax.core.Tracer):  # compiler options belong to a top-level program only
    return _init_fn(model, tuple(image_shape), key)
  init = _init_unoptimised if jax.default_backend() == "cpu" else _init
  return init(model, tuple(image_shape), key)


def _init_fn(model: Any, image_shape: tuple[int, ...], key: jax.Array) -> dict:
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


_init = jax.jit(_init_fn, static_argnums=(0, 1))
_init_unoptimised = jax.jit(_init_fn, static_argnums=(0, 1), compiler_options={"xla_backend_optimization_level": 0})


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy in float32; targets ``(1 - s) onehot + s / num_classes``."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing > 0:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _variables(params: Any, batch_stats: Any) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(
  num_classes: int, label_smoothing: float = 0.0, skip_nonfinite: bool = True, grad_norms: bool = False
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The (un-jitted) training step ``(state, batch) -> (state, metrics)``.

  metrics: ``loss`` (mean cross-entropy of the batch), ``accuracy``, ``finite`` (1 when the loss, every
  gradient and every floating-point array of the updated state, parameters, optimizer state,
  BatchNorm statistics and weight average, are finite), ``grads_finite`` (the loss and gradients alone),
  ``state_finite`` (the updated state alone). With
  ``skip_nonfinite`` a non-finite step leaves the state unchanged, so a NaN or Inf never reaches the
  state that is kept (and checkpointed). With ``grad_norms``, ``grad_norm``: for each top-level
  module of the parameters (``conv1``, ``layer1_0``, ..., ``fc``: the stem, each block, the head), the
  L2 norm of the loss's gradient with respect to its parameters (:func:`module_grad_norms`).
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    def loss_fn(params):
      logits, updates = state.apply_fn(
        _variables(params, state.batch_stats), batch["image"], train=True, mutable=["batch_stats"]
      )
      loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    if state.ema is not None:
      tracked = {"params": new_state.params, "batch_stats": new_state.batch_stats}
      _, ema = optax.ema(state.ema_decay).update(tracked, state.ema)
      new_state = new_state.replace(ema=ema)
    state_finite = all_finite((new_state.params, new_state.opt_state, new_state.batch_stats, new_state.ema))
    grads_finite = jnp.isfinite(loss) & all_finite(grads)
    finite = grads_finite & state_finite
    if skip_nonfinite:  # Keep the old parameters and optimizer state; the step count still advances.
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = new_state.replace(step=state.step + 1)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics = {
      "loss": loss,
      "accuracy": accuracy,
      "finite": finite,
      "state_finite": state_finite,
      "grads_finite": grads_finite,
    }
    if grad_norms:
      metrics["grad_norm"] = module_grad_norms(grads)
    return new_state, metrics

  return train_step


def module_grad_norms(grads: Any) -> dict[str, jax.Array]:
  """``{name: ||dL/dtheta_name||_2}`` for each top-level entry of the gradient tree (one per block)."""
  return {
    name: jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(sub)))
    for name, sub in grads.items()
  }


def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point leaf of ``tree`` is finite (integer leaves, e.g. counts, are)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.asarray(checks)) if checks else jnp.asarray(True)


def eval_logits(apply: Callable[[jax.Array], jax.Array], images: jax.Array, flip: bool, translate: int) -> jax.Array:
  """The logits of ``images`` (NHWC) under test-time augmentation; ``apply`` (``f``) maps images to logits.

  With ``flip``, each view scores the mean of its and its mirror image's logits. With ``translate = n > 0``,
  the result is half the view of the image itself and half the mean of the views of the image shifted by
  ``n`` pixels down-right and up-left, the uncovered border filled by reflection (padded by ``n`` on each
  side, then the top-left and the bottom-right crop):

    logits = 1/2 v(x) + 1/4 v(shift(x, n)) + 1/4 v(shift(x, -n)),   v(x) = (f(x) + f(mirror x)) / 2

  (``v = f`` without ``flip``), where ``shift(x, n)[i, j] = x[i - n, j - n]``, reflected at the borders.
  """

  def view(x):
    logits = apply(x)
    if flip:  # NHWC: axis 2 is the width.
      logits = (logits + apply(x[:, :, ::-1])) / 2
    return logits

  logits = view(images)
  if translate:
    n = int(translate)
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (n, n), (n, n), (0, 0)), mode="reflect")
    shifted = (view(padded[:, :h, :w]) + view(padded[:, 2 * n :, 2 * n :])) / 2
    logits = (logits + shifted) / 2
  return logits


def make_eval_step(num_classes: int, flip: bool = False, translate: int = 0) -> Callable[[TrainState, dict], dict]:
  """The (un-jitted) evaluation step: sums of loss and correct predictions over ``batch["mask"]``.

  ``flip`` and ``translate`` are the test-time augmentation of :func:`eval_logits`: with ``flip`` the
  logits are the mean of the image's and its mirror image's; ``translate = n`` adds the image shifted by
  ``n`` pixels both ways. A state that keeps a weight average is evaluated with it
  (:func:`averaged_variables`).
  """

  def eval_step(state: TrainState, batch: dict) -> dict:
    variables = averaged_variables(state)
    logits = eval_logits(lambda x: state.apply_fn(variables, x, train=False), batch["image"], flip, translate)
    mask = batch["mask"]
    loss = cross_entropy(logits, batch["label"], num_classes)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

  return eval_step


def count_parameters(params: Any) -> int:
  return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))
