"""ResNet-9 (Page's DAWNBench CIFAR net): parameters, structure, residual blocks, backends and user errors."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import ModelError, create_model, list_models
from resnet_jax.models import ResNet9, describe_model

INIT_KEY = jax.random.key(0, impl="rbg")


def normal(seed: int, shape, dtype=np.float32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def expected_params(w: int, num_classes: int) -> int:
  """3x3 convs 3->w, w->2w, two 2w->2w, 2w->4w, 4w->8w, two 8w->8w; a BN (scale, bias) after each; a bias-free
  Dense 8w->classes."""
  convs = [(3, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w), (8 * w, 8 * w)]
  convs.append((8 * w, 8 * w))
  return sum(9 * i * o + 2 * o for i, o in convs) + 8 * w * num_classes


def count(model, size: int = 32) -> int:
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))


def test_registered_with_pages_parameter_count():
  assert "resnet9" in list_models() and "DAWNBench" in describe_model("resnet9")
  model = create_model("resnet9", num_classes=10)
  assert isinstance(model, ResNet9)
  assert count(model) == expected_params(64, 10) == 6_573_120  # Page's ResNet-9: 6.57M parameters
  assert count(create_model("resnet9", num_classes=100, num_filters=32)) == expected_params(32, 100)
  # The plain twin drops no layer: the blocks keep their convs and BNs.
  assert count(create_model("resnet9", num_classes=10, residual=False)) == expected_params(64, 10)


def test_residual_blocks_add_a_nonnegative_branch_to_their_input():
  """relu_before_add: y = ReLU(BN(conv(ReLU(BN(conv(x)))))) + x, so y - x >= 0 with some entries > 0; the
  plain twin returns the branch alone (y >= 0)."""
  x = normal(0, (4, 16, 16, 3))
  for residual in (True, False):
    model = create_model("resnet9", num_classes=10, num_filters=8, residual=residual)
    variables = model.init(INIT_KEY, x)
    _, state = model.apply(
      variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
    )
    inter = state["intermediates"]
    block_in = nn.relu(inter["layer1_bn"]["__call__"][0])  # the block's input: layer1's ReLU(BN(pool(conv)))
    block_out = inter["layer1_res"]["__call__"][0]
    assert block_in.shape == block_out.shape == (4, 8, 8, 16)
    branch = block_out - block_in if residual else block_out
    assert float(branch.min()) >= 0.0
    assert float(jnp.mean(branch > 0)) > 0.1
    if residual:
      assert float(jnp.mean(jnp.abs(block_out - block_in))) > 0.0


def test_shapes_dtypes_and_any_size_from_8():
  model = create_model("resnet9", num_classes=7, num_filters=8)
  for size in (8, 32, 40):
    x = normal(1, (2, size, size, 3))
    variables = model.init(INIT_KEY, x)
    logits = model.apply(variables, x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  bf16 = create_model("resnet9", num_classes=7, num_filters=8, dtype=jnp.bfloat16)
  x = normal(1, (2, 32, 32, 3))
  logits = bf16.apply(bf16.init(INIT_KEY, x), x)
  assert logits.dtype == jnp.float32  # logits in float32 for a bfloat16 compute dtype


def test_logit_scale_scales_the_logits():
  x = normal(2, (2, 16, 16, 3))
  one = create_model("resnet9", num_classes=5, num_filters=8, logit_scale=1.0)
  eighth = create_model("resnet9", num_classes=5, num_filters=8)
  variables = one.init(INIT_KEY, x)
  chex.assert_trees_all_close(eighth.apply(variables, x), 0.125 * one.apply(variables, x), rtol=1e-6)


@pytest.mark.parametrize(
  "options,needle",
  [
    (dict(block_order="literal_bottleneck"), "v1, v2 or relu_before_add"),
    (dict(block_order="v3"), "unknown block order 'v3'"),
    (dict(conv_backend="cudnn"), "unknown conv_backend 'cudnn'"),
    (dict(num_filters=0), "num_filters=0 is invalid"),
    (dict(stem="imagenet"), "unknown option(s) stem"),
  ],
)
def test_bad_options_are_model_errors(options, needle):
  with pytest.raises(ModelError) as e:
    model = create_model("resnet9", num_classes=10, **options)
    model.init(INIT_KEY, normal(0, (1, 32, 32, 3)))
  assert needle in str(e.value)


def test_too_small_an_image_is_a_model_error():
  model = create_model("resnet9", num_classes=10, num_filters=8)
  with pytest.raises(ModelError, match=r"at least 8x8, got shape \(1, 7, 7, 3\)"):
    model.init(INIT_KEY, normal(0, (1, 7, 7, 3)))


def test_float64_gradient_matches_finite_differences():
  """jax.grad of the whole net (max-pools, residual blocks, global max pool) against central differences
  in float64, along a random direction of the parameters."""
  with jax.enable_x64(True):
    model = create_model("resnet9", num_classes=3, num_filters=2, dtype=jnp.float64, param_dtype=jnp.float64)
    model = model.clone(conv_backend="xla")
    x = normal(4, (3, 8, 8, 3), np.float64)
    y = jnp.array([0, 2, 1])
    variables = model.init(INIT_KEY, x)

    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    params = variables["params"]
    grads = jax.grad(loss)(params)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(5)
    direction = [rng.standard_normal(p.shape) for p in leaves]
    norm = np.sqrt(sum(np.sum(d**2) for d in direction))
    # A unit direction: a longer step would cross the kinks of ReLU and the max-pools.
    direction = jax.tree.unflatten(treedef, [jnp.asarray(d / norm) for d in direction])
    eps = 1e-6
    plus = jax.tree.map(lambda p, d: p + eps * d, params, direction)
    minus = jax.tree.map(lambda p, d: p - eps * d, params, direction)
    numeric = (loss(plus) - loss(minus)) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)


def test_pytorch_counterpart_computes_the_same_logits():
  """benchmarks/torch_models.py's ResNet-9 (what ``bench.py --model resnet9 --compare-torch`` measures) with
  this net's weights gives its logits, in evaluation mode and in training mode (batch statistics)."""
  torch = pytest.importorskip("torch")
  import os
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
  try:
    import torch_models
  finally:
    sys.path.pop(0)

  model = create_model("resnet9", num_classes=10, conv_backend="xla")
  x = normal(6, (3, 16, 16, 3))
  variables = model.init(INIT_KEY, x)
  # Running statistics that are not the initial 0 and 1, so that evaluation mode tests them.
  rng = np.random.default_rng(7)
  stats = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), variables["batch_stats"])
  variables = {**variables, "batch_stats": stats}
  params = variables["params"]
  net = torch_models.create_torch_model("resnet9", 10)

  def conv(module, kernel):
    module.weight.data = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())

  def bn(module, p, s):
    for name, value in (
      ("weight", p["scale"]),
      ("bias", p["bias"]),
      ("running_mean", s["mean"]),
      ("running_var", s["var"]),
    ):
      getattr(module, name).data = torch.from_numpy(np.asarray(value).copy())

  for index, name in ((0, "prep"), (1, "layer1"), (3, "layer2"), (4, "layer3")):
    conv(net[index][0], params[f"{name}_conv"]["kernel"])
    bn(net[index][-2], params[f"{name}_bn"], stats[f"{name}_bn"])
  for index, name in ((2, "layer1_res"), (5, "layer3_res")):
    for i in (0, 1):
      conv(net[index].branch[i][0], params[name][f"conv{i + 1}"]["kernel"])
      bn(net[index].branch[i][1], params[name][f"bn{i + 1}"], stats[name][f"bn{i + 1}"])
  net[8].weight.data = torch.from_numpy(np.asarray(params["fc"]["kernel"]).T.copy())

  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  for train in (False, True):
    net.train(train)
    with torch.no_grad():
      expected = net(xt).numpy()
    got = model.apply(variables, x, train=train, mutable=["batch_stats"])[0] if train else model.apply(variables, x)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
