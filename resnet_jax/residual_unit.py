"""The residual unit ``y_hat = H(x) + x``, its hand-derived gradients, deep stacks and Flax modules.

Notation (the derivation's; rows of ``x`` are examples, so every product is written for a batch)::

  x      (batch, dim)      input, one example per row
  w1     (hidden, dim)     b1 (hidden,)
  w2     (dim, hidden)     b2 (dim,)
  z1     = x w1^T + b1                      (batch, hidden)   pre-activation
  a1     = sigma(z1)                        (batch, hidden)
  H      = a1 w2^T + b2                     (batch, dim)      the residual branch H(x)
  y_hat  = H + x                            (batch, dim)      the shortcut adds x back
  L      = 1/batch * sum_n 1/2 ||y_hat_n - y_n||^2            mean over the batch

Backward pass (no autodiff; ``docs/residual-unit.md`` derives every line)::

  delta   = (y_hat - y) / batch             (batch, dim)      dL/dy_hat; the 1/batch of the mean enters here, once
  dL/dw2  = delta^T a1                      (dim, hidden)
  dL/db2  = sum_n delta_n                   (dim,)
  delta1  = (delta w2) * sigma'(z1)         (batch, hidden)   sigmoid: sigma'(z1) = a1 (1 - a1)
  dL/dw1  = delta1^T x                      (hidden, dim)
  dL/db1  = sum_n delta1_n                  (hidden,)
  dL/dx   = delta1 w1  +  delta             (batch, dim)      branch term + the original error, untouched

The plain twin (``shortcut=False``) drops the shortcut: ``y_hat = H(x)`` and ``dL/dx = delta1 w1``.

Every function checks the shapes of its arguments in Python (shapes are static under ``jax.jit``) and
raises :class:`resnet_jax.errors.ModelError` (a ``ValueError``) naming the argument, its shape and the
expected one; an unknown activation name raises the same error listing the known ones.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.errors import ModelError

Array = jax.Array
Params = dict[str, Array]

# Every product uses full precision so that the hand-derived and the autodiff gradients agree to the
# documented tolerances on any backend (GPUs would otherwise use TF32 for float32 matrix products).
_PRECISION = jax.lax.Precision.HIGHEST


def _mm(a: Array, b: Array) -> Array:
  return jnp.matmul(a, b, precision=_PRECISION)


class Activation(NamedTuple):
  """An activation ``sigma`` and its derivative, written by hand.

  ``sigma_prime(z1, a1)`` returns ``sigma'(z1)`` elementwise, given both the pre-activation ``z1`` and
  the activation ``a1 = sigma(z1)`` (the sigmoid's and tanh's derivatives are cheapest from ``a1``).
  """

  sigma: Callable[[Array], Array]
  sigma_prime: Callable[[Array, Array], Array]


def _sigmoid_prime(z1: Array, a1: Array) -> Array:
  """sigma'(z1) = a1 (1 - a1) for the logistic sigmoid."""
  del z1
  return a1 * (1 - a1)


def _tanh_prime(z1: Array, a1: Array) -> Array:
  """tanh'(z1) = 1 - a1^2, computed as (1 - a1)(1 + a1): no cancellation where tanh saturates (|a1| ~ 1)."""
  del z1
  return (1 - a1) * (1 + a1)


def _relu_prime(z1: Array, a1: Array) -> Array:
  """relu'(z1) = 1 where z1 > 0, else 0 (0 at z1 = 0, as ``jax.nn.relu``)."""
  del a1
  return (z1 > 0).astype(z1.dtype)


ACTIVATIONS: Mapping[str, Activation] = types.MappingProxyType(
  {
    "sigmoid": Activation(jax.nn.sigmoid, _sigmoid_prime),
    "tanh": Activation(jnp.tanh, _tanh_prime),
    "relu": Activation(jax.nn.relu, _relu_prime),
  }
)

_KEYS = ("w1", "b1", "w2", "b2")


def sigma_prime(z: Array, activation: str) -> Array:
  """Elementwise ``sigma'(z)`` at pre-activations ``z``, by the hand-written derivative of :data:`ACTIVATIONS`."""
  act = _activation(activation, "sigma_prime")
  return act.sigma_prime(z, act.sigma(z))


# ----------------------------------------------------------------------------------------------------
# Validation (Python level: shapes are static, so these checks also run, once, under jax.jit).
# ----------------------------------------------------------------------------------------------------


def _activation(activation: str, where: str) -> Activation:
  if not isinstance(activation, str) or activation not in ACTIVATIONS:
    known = ", ".join(repr(k) for k in ACTIVATIONS)
    raise ModelError(f"{where}: unknown activation {activation!r}; expected one of {known}")
  return ACTIVATIONS[activation]


def _shape(a: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in jnp.shape(a))


def _check_params(params: Any, where: str, name: str = "params", dim: int | None = None) -> tuple[int, int]:
  """Checks one unit's parameter dict and returns ``(dim, hidden)``."""
  if not isinstance(params, Mapping):
    raise ModelError(
      f"{where}: {name} must be a dict with keys w1, b1, w2, b2 (see init_params), got {type(params).__name__}"
    )
  missing = [k for k in _KEYS if k not in params]
  if missing:
    raise ModelError(
      f"{where}: {name} is missing {', '.join(missing)}; expected a dict with keys "
      f"w1 (hidden, dim), b1 (hidden,), w2 (dim, hidden), b2 (dim,) (see init_params)"
    )
  w1 = _shape(params["w1"])
  if len(w1) != 2:
    raise ModelError(f"{where}: {name}['w1'] has shape {w1}, expected a matrix (hidden, dim)")
  hidden, d = w1
  if dim is not None and d != dim:
    raise ModelError(
      f"{where}: {name}['w1'] has shape {w1}, expected (hidden, dim) = ({hidden}, {dim}) to match the input width {dim}"
    )
  expected = {"b1": (hidden,), "w2": (d, hidden), "b2": (d,)}
  for k, want in expected.items():
    got = _shape(params[k])
    if got != want:
      raise ModelError(
        f"{where}: {name}['{k}'] has shape {got}, expected {want} to match "
        f"{name}['w1'] of shape {w1} (hidden={hidden}, dim={d})"
      )
  return d, hidden


def _check_x(x: Any, dim: int, where: str, name: str = "x") -> Array:
  x = jnp.asarray(x)
  if x.ndim != 2 or x.shape[1] != dim:
    hint = " (a single example is x[None, :])" if x.ndim == 1 else ""
    raise ModelError(
      f"{where}: {name} has shape {tuple(x.shape)}, expected (batch, dim) = (batch, {dim}) "
      f"with the width of the parameters{hint}"
    )
  if x.shape[0] < 1:
    raise ModelError(f"{where}: {name} has shape {tuple(x.shape)}, expected at least one row (batch >= 1)")
  return x


def _check_y(y: Any, x: Array, where: str) -> Array:
  y = jnp.asarray(y)
  if tuple(y.shape) != tuple(x.shape):
    raise ModelError(f"{where}: y has shape {tuple(y.shape)}, expected {tuple(x.shape)}, the shape of x")
  return y


def _check_stack(params: Any, where: str, dim: int | None = None) -> int:
  """Checks a stack (a non-empty list of unit dicts of one width) and returns its width ``dim``."""
  if not isinstance(params, Sequence) or isinstance(params, (str, bytes)) or isinstance(params, Mapping):
    raise ModelError(f"{where}: params must be a list of unit dicts (see init_stack), got {type(params).__name__}")
  if len(params) == 0:
    raise ModelError(f"{where}: params is an empty list, expected at least one unit (see init_stack)")
  for l, p in enumerate(params):
    d, _ = _check_params(p, where, name=f"params[{l}]", dim=dim)
    dim = d
  return dim  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# One unit.
# ----------------------------------------------------------------------------------------------------


def uniform_fan_in(fan_in: int) -> Callable:
  """The initialiser ``(key, shape, dtype) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, ``torch.nn.Linear``'s."""
  bound = float(fan_in) ** -0.5

  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def init_params(key: Array, dim: int, hidden: int, dtype: Any = jnp.float32) -> Params:
  """Random parameters of one unit, drawn as ``torch.nn.Linear`` does.

  ``w1, b1 ~ U(-1/sqrt(dim), 1/sqrt(dim))`` and ``w2, b2 ~ U(-1/sqrt(hidden), 1/sqrt(hidden))``.

  Returns:
    ``{"w1": (hidden, dim), "b1": (hidden,), "w2": (dim, hidden), "b2": (dim,)}`` in ``dtype``.
  """
  dim, hidden = int(dim), int(hidden)
  if dim < 1 or hidden < 1:
    raise ModelError(f"init_params: dim and hidden must be >= 1, got dim={dim}, hidden={hidden}")
  k1, k2, k3, k4 = jax.random.split(key, 4)
  u1, u2 = uniform_fan_in(dim), uniform_fan_in(hidden)
  return {
    "w1": u1(k1, (hidden, dim), dtype),
    "b1": u1(k2, (hidden,), dtype),
    "w2": u2(k3, (dim, hidden), dtype),
    "b2": u2(k4, (dim,), dtype),
  }


def _branch(params: Mapping[str, Array], x: Array, act: Activation) -> tuple[Array, Array, Array]:
  """z1 = x w1^T + b1, a1 = sigma(z1), H = a1 w2^T + b2; returns (z1, a1, H)."""
  z1 = _mm(x, params["w1"].T) + params["b1"]
  a1 = act.sigma(z1)
  H = _mm(a1, params["w2"].T) + params["b2"]
  return z1, a1, H


def _backward(
  params: Mapping[str, Array], x: Array, z1: Array, a1: Array, delta: Array, act: Activation
) -> tuple[Params, Array]:
  """Hand-derived backward pass of one unit's branch, given ``delta`` = dL/dy_hat.

  Returns ``({"w1","b1","w2","b2"}, branch)`` with ``branch = delta1 w1``, the part of dL/dx that flows
  through H; the caller adds ``delta`` itself for the shortcut.
  """
  dw2 = _mm(delta.T, a1)  # dL/dw2 = delta^T a1
  db2 = jnp.sum(delta, axis=0)  # dL/db2 = sum delta
  delta1 = _mm(delta, params["w2"]) * act.sigma_prime(z1, a1)  # delta1 = (delta w2) * sigma'(z1)
  dw1 = _mm(delta1.T, x)  # dL/dw1 = delta1^T x
  db1 = jnp.sum(delta1, axis=0)  # dL/db1 = sum delta1
  branch = _mm(delta1, params["w1"])  # branch term of dL/dx = delta1 w1
  return {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}, branch


def forward(params: Mapping[str, Array], x: Array, activation: str = "sigmoid") -> Array:
  """y_hat = H(x) + x with H(x) = sigma(x w1^T + b1) w2^T + b2 (rows of ``x`` are examples).

  Args:
    params: ``{"w1": (hidden, dim), "b1": (hidden,), "w2": (dim, hidden), "b2": (dim,)}``.
    x: ``(batch, dim)``.
    activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"`` (see :data:`ACTIVATIONS`).

  Returns:
    ``y_hat`` of shape ``(batch, dim)``.
  """
  act = _activation(activation, "forward")
  dim, _ = _check_params(params, "forward")
  x = _check_x(x, dim, "forward")
  return _branch(params, x, act)[2] + x


def loss(params: Mapping[str, Array], x: Array, y: Array, activation: str = "sigmoid") -> Array:
  """L = 1/batch * sum_n 1/2 ||y_hat_n - y_n||^2, the mean over the batch of the squared error."""
  act = _activation(activation, "loss")
  dim, _ = _check_params(params, "loss")
  x = _check_x(x, dim, "loss")
  y = _check_y(y, x, "loss")
  y_hat = _branch(params, x, act)[2] + x
  return 0.5 * jnp.sum(jnp.square(y_hat - y)) / x.shape[0]


def _unit_grads(params, x, y, activation, where) -> tuple[Params, Array, Array]:
  act = _activation(activation, where)
  dim, _ = _check_params(params, where)
  x = _check_x(x, dim, where)
  y = _check_y(y, x, where)
  z1, a1, H = _branch(params, x, act)
  y_hat = H + x
  delta = (y_hat - y) / x.shape[0]  # dL/dy_hat for the batch-mean loss
  grads, branch = _backward(params, x, z1, a1, delta, act)
  return grads, branch, delta


def manual_grads(params: Mapping[str, Array], x: Array, y: Array, activation: str = "sigmoid") -> Params:
  """Gradients of :func:`loss`, from the derivation (no autodiff).

  ::

    delta  = (y_hat - y) / batch
    dL/dw2 = delta^T a1              dL/db2 = sum_n delta_n
    delta1 = (delta w2) * sigma'(z1) (sigmoid: a1 (1 - a1))
    dL/dw1 = delta1^T x              dL/db1 = sum_n delta1_n
    dL/dx  = delta1 w1 + delta

  Returns:
    ``{"w1", "b1", "w2", "b2", "x"}``, each with the shape of the corresponding argument.
  """
  grads, branch, delta = _unit_grads(params, x, y, activation, "manual_grads")
  return {**grads, "x": branch + delta}


def input_grad_parts(
  params: Mapping[str, Array], x: Array, y: Array, activation: str = "sigmoid"
) -> tuple[Array, Array]:
  """The two parts of dL/dx = branch + shortcut, separately.

  Returns:
    ``(branch, shortcut)`` with ``branch = delta1 w1`` (the error that flows back through H, scaled by
    w2, sigma' and w1) and ``shortcut = delta = (y_hat - y) / batch``, the original error handed down
    untouched by the identity path. Their sum is ``manual_grads(...)["x"]``.
  """
  _, branch, delta = _unit_grads(params, x, y, activation, "input_grad_parts")
  return branch, delta


# ----------------------------------------------------------------------------------------------------
# custom_vjp: the unit with the hand-derived backward pass, for training with jax.grad / optax.
# ----------------------------------------------------------------------------------------------------


def _unit_primal(params, x, activation, shortcut):
  H = _branch(params, x, ACTIVATIONS[activation])[2]
  return H + x if shortcut else H


def _unit_vjp_fwd(params, x, activation, shortcut):
  z1, a1, H = _branch(params, x, ACTIVATIONS[activation])
  return (H + x if shortcut else H), (params, x, z1, a1)


def _unit_vjp_bwd(activation, shortcut, res, g):
  params, x, z1, a1 = res
  # The cotangent g (dL/dy_hat for whatever loss is being differentiated) takes the place of delta.
  grads, branch = _backward(params, x, z1, a1, g, ACTIVATIONS[activation])
  dx = branch + g if shortcut else branch
  grads = {k: grads[k].astype(params[k].dtype) for k in _KEYS}
  return grads, dx.astype(x.dtype)


_unit_vjp = jax.custom_vjp(_unit_primal, nondiff_argnums=(2, 3))
_unit_vjp.defvjp(_unit_vjp_fwd, _unit_vjp_bwd)


def hand_derived_unit(
  params: Mapping[str, Array], x: Array, activation: str = "sigmoid", shortcut: bool = True
) -> Array:
  """The unit's output (``forward``, or ``H(x)`` if ``shortcut=False``) with the hand-derived backward pass.

  A ``jax.custom_vjp`` function: under ``jax.grad`` / ``jax.vjp`` its backward pass is the derivation's,
  with the incoming cotangent ``g`` = dL/dy_hat in place of ``delta``::

    dL/dw2 = g^T a1, dL/db2 = sum g, delta1 = (g w2) * sigma'(z1), dL/dw1 = delta1^T x,
    dL/db1 = sum delta1, dL/dx = delta1 w1 + g   (plain unit: delta1 w1)

  So any loss built on it (e.g. with optax) trains with the analytic gradients, which equal autodiff's.
  """
  _activation(activation, "hand_derived_unit")
  dim, _ = _check_params(params, "hand_derived_unit")
  x = _check_x(x, dim, "hand_derived_unit")
  return _unit_vjp({k: params[k] for k in _KEYS}, x, activation, bool(shortcut))


# ----------------------------------------------------------------------------------------------------
# Stacks of L units: x_{l+1} = H_l(x_l) + x_l (residual) or x_{l+1} = H_l(x_l) (plain).
# ----------------------------------------------------------------------------------------------------


def init_stack(key: Array, depth: int, dim: int, hidden: int, dtype: Any = jnp.float32) -> list[Params]:
  """``depth`` independent units of width ``dim`` (see :func:`init_params`), one dict per unit."""
  depth = int(depth)
  if depth < 1:
    raise ModelError(f"init_stack: depth must be >= 1, got {depth}")
  return [init_params(k, dim, hidden, dtype) for k in jax.random.split(key, depth)]


def stack_forward(
  params: Sequence[Mapping[str, Array]], x: Array, shortcut: bool = True, activation: str = "sigmoid"
) -> Array:
  """x_{l+1} = H_l(x_l) + x_l for l = 0..L-1 (``shortcut=False``: x_{l+1} = H_l(x_l)); returns x_L."""
  act = _activation(activation, "stack_forward")
  dim = _check_stack(params, "stack_forward")
  x = _check_x(x, dim, "stack_forward")
  for p in params:
    H = _branch(p, x, act)[2]
    x = H + x if shortcut else H
  return x


def stack_loss(
  params: Sequence[Mapping[str, Array]], x: Array, y: Array, shortcut: bool = True, activation: str = "sigmoid"
) -> Array:
  """1/batch * sum_n 1/2 ||x_L,n - y_n||^2 for the stack's output x_L."""
  _activation(activation, "stack_loss")
  dim = _check_stack(params, "stack_loss")
  x = _check_x(x, dim, "stack_loss")
  y = _check_y(y, x, "stack_loss")
  y_hat = stack_forward(params, x, shortcut, activation)
  return 0.5 * jnp.sum(jnp.square(y_hat - y)) / x.shape[0]


def manual_stack_grads(
  params: Sequence[Mapping[str, Array]], x: Array, y: Array, shortcut: bool = True, activation: str = "sigmoid"
) -> dict[str, Any]:
  """Gradients of :func:`stack_loss`, back-propagated by hand one unit at a time (no autodiff).

  With ``delta_L = (x_L - y) / batch`` and, for l = L-1 down to 0, the unit formulas applied to
  ``delta_{l+1}`` = dL/dx_{l+1}::

    dL/dx_l = delta1_l w1_l + delta_{l+1}   (residual: the error from above passes through untouched)
    dL/dx_l = delta1_l w1_l                 (plain)

  Returns:
    ``{"params": [per-unit {"w1","b1","w2","b2"}], "x": dL/dx_0, "inputs": [dL/dx_l for l = 0..L-1]}``
    (``inputs[0]`` is ``x``'s gradient; ``inputs[l]`` is the gradient with respect to unit l's input).
  """
  grads, inputs, _, _ = _stack_backward(params, x, y, shortcut, activation, "manual_stack_grads")
  return {"params": grads, "x": inputs[0], "inputs": inputs}


def _stack_backward(params, x, y, shortcut, activation, where):
  """Forward pass keeping z1, a1 and x_l per unit, then the backward loop, one unit at a time.

  Returns ``(grads, inputs, branches, delta_L)``: per-unit parameter gradients, dL/dx_l, the branch
  terms ``delta1_l w1_l`` and dL/dx_L = (x_L - y) / batch.
  """
  act = _activation(activation, where)
  dim = _check_stack(params, where)
  x = _check_x(x, dim, where)
  y = _check_y(y, x, where)
  depth = len(params)
  xs, z1s, a1s = [], [], []
  for p in params:  # forward, keeping what the backward needs
    z1, a1, H = _branch(p, x, act)
    xs.append(x)
    z1s.append(z1)
    a1s.append(a1)
    x = H + x if shortcut else H
  delta_L = (x - y) / x.shape[0]  # dL/dx_L; the 1/batch of the mean enters here
  delta = delta_L
  grads: list[Params] = [{}] * depth
  inputs: list[Array] = [delta] * depth
  branches: list[Array] = [delta] * depth
  for l in range(depth - 1, -1, -1):  # backward, by hand, layer by layer
    grads[l], branches[l] = _backward(params[l], xs[l], z1s[l], a1s[l], delta, act)
    delta = branches[l] + delta if shortcut else branches[l]  # delta is now dL/dx_l
    inputs[l] = delta
  return grads, inputs, branches, delta_L


def stack_input_grad_parts(
  params: Sequence[Mapping[str, Array]], x: Array, y: Array, shortcut: bool = True, activation: str = "sigmoid"
) -> list[tuple[Array, Array]]:
  """For each unit l, the two parts of dL/dx_l: ``(branch_l, shortcut_l)``.

  ``branch_l = delta1_l w1_l`` flows back through unit l's branch; ``shortcut_l = dL/dx_{l+1}`` is the
  error from above handed down untouched by the identity (zeros for the plain stack). Their sum is
  ``manual_stack_grads(...)["inputs"][l]``.
  """
  _, inputs, branches, delta_L = _stack_backward(params, x, y, shortcut, activation, "stack_input_grad_parts")
  above = inputs[1:] + [delta_L]
  return [(b, a if shortcut else jnp.zeros_like(a)) for b, a in zip(branches, above)]


# ----------------------------------------------------------------------------------------------------
# Flax (linen) modules.
# ----------------------------------------------------------------------------------------------------


class ResidualUnit(nn.Module):
  """The residual unit as a Flax module: ``y_hat = sigma(x w1^T + b1) w2^T + b2 (+ x if residual)``.

  Parameter mapping: the module's ``params`` collection *is* the dict of :func:`init_params`, same keys,
  same shapes, same layout (``w1`` (hidden, dim), ``b1`` (hidden,), ``w2`` (dim, hidden), ``b2`` (dim,);
  note that ``w1`` is the transpose of a ``flax.linen.Dense`` kernel). Hence, for a unit ``m``::

    m.apply({"params": p}, x) == forward(p, x, m.activation)       # residual=True
    variables = {"params": init_params(key, dim, hidden)}         # usable directly by the module

  Initialisation is ``init_params``' distribution (``torch.nn.Linear``'s uniform), drawn per parameter.

  Attributes:
    dim: width of the input and output.
    hidden: width of the branch's hidden layer.
    activation: a key of :data:`ACTIVATIONS`.
    residual: ``False`` gives the plain twin ``y_hat = H(x)``.
    hand_derived_grad: ``True`` computes the unit with :func:`hand_derived_unit`, whose backward pass is the
      hand-derived one (same values and gradients as autodiff).
    param_dtype: dtype of the parameters.
  """

  dim: int
  hidden: int
  activation: str = "sigmoid"
  residual: bool = True
  hand_derived_grad: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    act = _activation(self.activation, "ResidualUnit")
    x = _check_x(x, self.dim, "ResidualUnit")
    p = {
      "w1": self.param("w1", uniform_fan_in(self.dim), (self.hidden, self.dim), self.param_dtype),
      "b1": self.param("b1", uniform_fan_in(self.dim), (self.hidden,), self.param_dtype),
      "w2": self.param("w2", uniform_fan_in(self.hidden), (self.dim, self.hidden), self.param_dtype),
      "b2": self.param("b2", uniform_fan_in(self.hidden), (self.dim,), self.param_dtype),
    }
    if self.hand_derived_grad:
      return hand_derived_unit(p, x, self.activation, self.residual)
    H = _branch(p, x, act)[2]
    return H + x if self.residual else H


class ResidualMLP(nn.Module):
  """A classifier: flatten -> Dense(dim) -> depth x ResidualUnit(dim, hidden) -> Dense(num_classes).

  Unit l's parameters live under ``params["unit{l:03d}"]`` in the layout of :func:`init_params`; the
  input layer is ``params["embed"]`` and the classifier ``params["head"]`` (``flax.linen.Dense``).
  Each unit's input is exposed as the perturbation ``block{l:02d}`` (collection ``"perturbations"``), so
  ``jax.grad`` with respect to the perturbations gives dL/d(unit input), as for the convolutional ResNets.

  ``__call__(x, train=False)``: ``x`` of any shape ``(batch, ...)``; ``train`` is accepted and ignored
  (there is no batch norm or dropout), so the call matches the convolutional models'.
  """

  depth: int
  dim: int
  hidden: int
  num_classes: int
  activation: str = "relu"
  residual: bool = True
  hand_derived_grad: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    _activation(self.activation, "ResidualMLP")
    if int(self.depth) < 0:
      raise ModelError(f"ResidualMLP: depth must be >= 0, got {self.depth}")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] < 1:
      raise ModelError(f"ResidualMLP: input has shape {tuple(x.shape)}, expected (batch, ...) with batch >= 1")
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.dim, param_dtype=self.param_dtype, name="embed")(x)
    for l in range(self.depth):
      x = self.perturb(f"block{l:02d}", x)
      x = ResidualUnit(
        self.dim,
        self.hidden,
        self.activation,
        self.residual,
        self.hand_derived_grad,
        self.param_dtype,
        name=f"unit{l:03d}",
      )(x)
    return nn.Dense(self.num_classes, param_dtype=self.param_dtype, name="head")(x)
