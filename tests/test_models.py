"""Model registry, parameter counts, forward/training steps and user errors of resnet_jax.models."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import resnet_jax
from resnet_jax import ModelError, create_model, list_models
from resnet_jax.models import ResNet, zero_perturbations

# Parameters are initialised with the "rbg" PRNG: compiling threefry for every parameter shape costs
# about 10 s of CPU per model, rbg about 1.5 s.
INIT_KEY = jax.random.key(0, impl="rbg")


def normal(seed: int, shape, dtype=np.float32, scale: float = 1.0) -> jax.Array:
  """Test data from numpy's generator (jax.random would compile a kernel for every new shape)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


# Published parameter counts (shared reference table: torchvision weight metadata, He et al. 2015 Table 6).
TORCHVISION_PARAMS = {
  "resnet18": 11_689_512,
  "resnet34": 21_797_672,
  "resnet50": 25_557_032,
  "resnet101": 44_549_160,
  "resnet152": 60_192_808,
  "resnext50_32x4d": 25_028_904,
  "wide_resnet50_2": 68_883_240,
}
CIFAR_PARAMS = {
  "resnet20": 269_722,
  "resnet32": 464_154,
  "resnet44": 658_586,
  "resnet56": 853_018,
  "resnet110": 1_727_962,
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def _shapes(model, size: int = 32, channels: int = 3):
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  return jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)


@functools.cache
def count_named(name: str, num_classes: int) -> int:
  return count_params(create_model(name, num_classes=num_classes))


def count_params(model, size: int = 32) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(_shapes(model, size)["params"]))


def expected_params(
  depth: int,
  num_classes: int,
  *,
  cifar: bool = False,
  order: str = "v1",
  shortcut: str = "B",
  residual: bool = True,
  groups: int = 1,
  width_per_group: int = 64,
) -> int:
  """Count a ResNet's parameters from its description (conv weights, BN gamma+beta, Dense)."""

  def conv(k, cin, cout, g=1):
    return k * k * (cin // g) * cout

  def bn(c):
    return 2 * c

  if cifar:
    n = (depth - 2) // 6
    stages, nf, stem_k, bottleneck = (n, n, n), 16, 3, False
  else:
    stages = {
      18: (2, 2, 2, 2),
      34: (3, 4, 6, 3),
      50: (3, 4, 6, 3),
      101: (3, 4, 23, 3),
      152: (3, 8, 36, 3),
      200: (3, 24, 36, 3),
    }[depth]
    nf, stem_k, bottleneck = 64, 7, depth >= 50
  v2 = order == "v2"
  total = conv(stem_k, 3, nf) + (0 if v2 else bn(nf))
  cin = nf
  for i, blocks in enumerate(stages):
    planes = nf * 2**i
    for j in range(blocks):
      stride = 2 if i > 0 and j == 0 else 1
      if bottleneck:
        width, out = int(planes * width_per_group / 64) * groups, planes * 4
        total += conv(1, cin, width) + conv(3, width, width, groups) + conv(1, width, out)
        total += bn(cin) + 2 * bn(width) if v2 else 2 * bn(width) + bn(out)
      else:
        out = planes
        total += conv(3, cin, out) + conv(3, out, out)
        total += bn(cin) + bn(out) if v2 else 2 * bn(out)
      if residual and shortcut == "B" and (stride != 1 or cin != out):
        total += conv(1, cin, out) + (0 if v2 else bn(out))
      cin = out
  if v2:
    total += bn(cin)
  return total + cin * num_classes + num_classes


def test_list_models_has_every_family():
  names = list_models()
  assert names == sorted(names)
  expected = {
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet200",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "residual_mlp",
    "resnet9",
  }
  expected |= {f"preact_resnet{d}" for d in (18, 34, 50, 101, 152)}
  expected |= {f"{p}{d}" for p in ("resnet", "preact_resnet", "plain") for d in CIFAR_DEPTHS}
  assert expected <= set(names)
  assert resnet_jax.list_models is list_models and resnet_jax.create_model is create_model


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_torchvision_parameter_counts(name):
  assert count_named(name, 1000) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_cifar_option_a_parameter_counts(name):
  assert count_named(name, 10) == CIFAR_PARAMS[name]


def test_count_formula_reproduces_published_counts():
  """The formula used for the unpublished variants agrees with every published count."""
  for name, n in TORCHVISION_PARAMS.items():
    depth = int(name[6:].split("_")[0]) if name.startswith("resnet") else 50
    kw = {"wide_resnet50_2": dict(width_per_group=128), "resnext50_32x4d": dict(groups=32, width_per_group=4)}
    assert expected_params(depth, 1000, **kw.get(name, {})) == n, name
  for name, n in CIFAR_PARAMS.items():
    assert expected_params(int(name[6:]), 10, cifar=True, shortcut="A") == n, name


@pytest.mark.parametrize("name", [n for n in list_models() if n not in ("residual_mlp", "resnet9")])
def test_every_conv_model_counts_as_its_description(name):
  """Every ResNet of the registry (ResNet-9 has its own count, tests/test_resnet9.py)."""
  base = name.replace("preact_", "").replace("plain", "resnet")
  depth = int(base[len("resnet") :].split("_")[0]) if base.startswith("resnet") else 50
  cifar = depth in CIFAR_DEPTHS
  kw = {"wide_resnet50_2": dict(width_per_group=128), "resnext50_32x4d": dict(groups=32, width_per_group=4)}
  num_classes = 10 if cifar else 1000
  expected = expected_params(
    depth,
    num_classes,
    cifar=cifar,
    shortcut="A" if cifar else "B",
    order="v2" if name.startswith("preact_") else "v1",
    residual=not name.startswith("plain"),
    **kw.get(name, {}),
  )
  assert count_named(name, num_classes) == expected


@pytest.mark.parametrize(
  "name,options",
  [
    ("resnet20", dict(shortcut="B")),
    ("plain20", dict(shortcut="B")),
    ("resnet18", dict(residual=False)),
    ("resnet18", dict(block_order="v2")),
    ("resnet20", dict(block_order="relu_before_add")),
    ("resnet50", dict(block_order="v2", groups=2, width_per_group=32)),
  ],
)
def test_option_variants_count_as_described(name, options):
  cifar = name in ("resnet20", "plain20")
  opts = dict(options)
  expected = expected_params(
    int(name.removeprefix("resnet").removeprefix("plain")),
    5,
    cifar=cifar,
    shortcut=opts.get("shortcut", "A" if cifar else "B"),
    order="v2" if opts.get("block_order") == "v2" else "v1",
    residual=opts.get("residual", not name.startswith("plain")),
    groups=opts.get("groups", 1),
    width_per_group=opts.get("width_per_group", 64),
  )
  assert count_params(create_model(name, num_classes=5, **options)) == expected


def test_cifar_stem_on_resnet18():
  """The usual CIFAR ResNet-18: 3x3/1 stem, no max-pool, 11,173,962 parameters for 10 classes."""
  model = create_model("resnet18", num_classes=10, stem="cifar")
  stem_difference = (7 * 7 - 3 * 3) * 3 * 64 + 1000 * 512 + 1000 - (10 * 512 + 10)
  assert count_params(model) == 11_173_962 == TORCHVISION_PARAMS["resnet18"] - stem_difference
  assert model.min_input_size == 8  # three stride-2 stages, no stem downsampling
  logits = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False), _shapes(model, 8), jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  )
  assert logits.shape == (2, 10)


def test_plain_twin_has_the_residual_nets_layers():
  for d in (20, 56):
    plain = jax.tree.map(lambda s: s.shape, _shapes(create_model(f"plain{d}", 10)))
    res = jax.tree.map(lambda s: s.shape, _shapes(create_model(f"resnet{d}", 10)))
    assert plain == res


def test_residual_mlp_is_registered():
  from resnet_jax.residual_unit import ResidualMLP

  model = create_model("residual_mlp", num_classes=10, depth=3, dim=16, hidden=32, activation="tanh")
  assert isinstance(model, ResidualMLP)
  x = jnp.ones((2, 8, 8, 1))
  variables = init(model, x)
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  assert n == (64 * 16 + 16) + 3 * (2 * 16 * 32 + 32 + 16) + (16 * 10 + 10)
  assert model.apply(variables, x, train=False).shape == (2, 10)


# ----- forward and one training step on tiny inputs -------------------------------------------------------


def init(model, x):
  """Jitted ``model.init`` (op-by-op initialisation is slower than compiling it on CPU)."""
  return jax.jit(lambda k, x: model.init(k, x, train=False))(INIT_KEY, x)


def small_cifar(stage_sizes=(1, 1, 1), **options) -> ResNet:
  """A CIFAR-style ResNet with few blocks and 4 base filters: cheap to compile."""
  from resnet_jax.blocks import BasicBlock

  return ResNet(
    stage_sizes=stage_sizes,
    block_cls=BasicBlock,
    num_classes=10,
    num_filters=4,
    stem="cifar",
    **{"shortcut": "A", **options},
  )


@functools.cache
def init_eval_and_train_step(name: str, options: tuple = ()):
  """Compile once: init, an eval forward and one SGD step (train-mode BN) on a 2x32x32x3 batch."""
  model = create_model(name, num_classes=10, **dict(options))
  tx = optax.sgd(0.1, momentum=0.9)

  @jax.jit
  def run(key, x, y):
    variables = model.init(key, x, train=False)
    params = variables["params"]

    def loss_fn(p):
      logits, updates = model.apply(
        {"params": p, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return (
      variables,
      model.apply(variables, x, train=False),
      optax.apply_updates(params, updates),
      new_stats,
      loss,
      grads,
    )

  x = normal(1, (2, 32, 32, 3))
  return run(INIT_KEY, x, jnp.array([3, 7]))


@pytest.mark.parametrize(
  "name,options",
  [
    ("resnet20", ()),
    ("preact_resnet20", ()),
    pytest.param("resnet18", (), marks=pytest.mark.slow),
    pytest.param("plain20", (), marks=pytest.mark.slow),
    pytest.param("resnet50", (("num_filters", 8),), marks=pytest.mark.slow),
    # zero-init at 8 filters: the 1x1 last stage of a 32x32 input would be the same for both images
    pytest.param("preact_resnet50", (("num_filters", 8), ("zero_init_residual", False)), marks=pytest.mark.slow),
    pytest.param("resnet20", (("block_order", "relu_before_add"), ("shortcut", "B")), marks=pytest.mark.slow),
  ],
)
def test_forward_and_training_step(name, options):
  variables, logits, params, stats, loss, grads = init_eval_and_train_step(name, options)
  assert set(variables) == {"params", "batch_stats"}
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  assert np.isfinite(float(loss))
  chex.assert_trees_all_equal_structs(params, variables["params"])
  chex.assert_trees_all_equal_structs(stats, variables["batch_stats"])
  assert not np.allclose(stats["layer1_0"]["bn2"]["mean"], 0.0)
  assert float(optax.tree.norm(grads)) > 0
  assert float(jnp.abs(grads["conv1"]["kernel"]).max()) > 0  # the gradient reaches the stem
  assert not np.array_equal(params["fc"]["kernel"], variables["params"]["fc"]["kernel"])


def test_zero_init_residual_makes_preact_blocks_identities():
  """With zero-init, every identity block of a v2 net is y = x, so dL/d(block input) is equal along a stage."""
  model = small_cifar((2, 2, 2), block_order="v2")
  x = normal(2, (2, 8, 8, 3))
  variables = init(model, x)
  assert not np.any(variables["params"]["layer1_0"]["bn2"]["scale"])
  pert = zero_perturbations(model, variables, x, train=False)
  assert sorted(pert) == [f"block{i:02d}" for i in range(6)]
  chex.assert_shape(
    [pert["block00"], pert["block02"], pert["block03"], pert["block05"]],
    [(2, 8, 8, 4), (2, 8, 8, 4), (2, 4, 4, 8), (2, 2, 2, 16)],
  )

  def loss(p):
    return jnp.sum(model.apply({**variables, "perturbations": p}, x, train=False) ** 2)

  g = jax.jit(jax.grad(loss))(pert)
  assert float(jnp.abs(g["block05"]).sum()) > 0
  # block i is the identity: its input gradient equals the next block's (blocks 2 and 4 downsample)
  for i, j in ((0, 1), (1, 2), (3, 4)):
    chex.assert_trees_all_close(g[f"block{i:02d}"], g[f"block{j:02d}"], atol=1e-6)
  v2 = small_cifar((2, 2, 2), block_order="v2", zero_init_residual=False)
  assert np.all(init(v2, x)["params"]["layer1_0"]["bn2"]["scale"] == 1)


def test_perturbation_equals_block_input_gradient():
  """d loss / d p_i is the gradient at block i's input: checked against a central difference in float64."""
  with jax.enable_x64(True):
    model = small_cifar(zero_init_residual=False, dtype=jnp.float64, param_dtype=jnp.float64)
    x = normal(3, (2, 8, 8, 3), jnp.float64)
    variables = init(model, x)
    pert = zero_perturbations(model, variables, x)

    @jax.jit
    def loss(p):
      return jnp.sum(jnp.tanh(model.apply({**variables, "perturbations": p}, x)))

    g = jax.jit(jax.grad(loss))(pert)
    d = normal(4, pert["block01"].shape, jnp.float64)
    eps = 1e-6
    fd = (loss({**pert, "block01": eps * d}) - loss({**pert, "block01": -eps * d})) / (2 * eps)
    np.testing.assert_allclose(fd, jnp.vdot(g["block01"], d), rtol=1e-6)


def test_bf16_compute_with_float32_params():
  x = normal(5, (2, 8, 8, 3))
  m32 = small_cifar(zero_init_residual=False)
  m16 = small_cifar(zero_init_residual=False, dtype=jnp.bfloat16)
  variables = init(m16, x)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  _, inter = jax.eval_shape(
    lambda v, x: m16.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), variables, x
  )
  assert inter["intermediates"]["layer2_0"]["conv1"]["__call__"][0].dtype == jnp.bfloat16
  y16, y32 = jax.jit(m16.apply)(variables, x), jax.jit(m32.apply)(variables, x)
  assert y16.dtype == jnp.float32
  assert not np.array_equal(y16, y32)
  np.testing.assert_allclose(y16, y32, atol=0.1 * float(jnp.abs(y32).max()) + 1e-2)
  m_bf = create_model("resnet20", num_classes=10, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  assert {p.dtype for p in jax.tree.leaves(_shapes(m_bf)["params"])} == {jnp.dtype(jnp.bfloat16)}


def test_bottleneck_stride_placement():
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)

  def conv_shapes(model):
    def run(x):
      v = model.init(INIT_KEY, x)
      _, s = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
      blk = s["intermediates"]["layer2_0"]
      return blk["conv1"]["__call__"][0], blk["conv2"]["__call__"][0]

    return jax.eval_shape(run, x)

  c1, c2 = conv_shapes(create_model("resnet50", num_filters=8))
  assert (c1.shape[1], c2.shape[1]) == (16, 8)  # v1.5: stride on the 3x3 (64 / 4 = 16 after the stem)
  c1, c2 = conv_shapes(create_model("resnet50", num_filters=8, stride_in_1x1=True))
  assert (c1.shape[1], c2.shape[1]) == (8, 8)


def test_kaiming_fan_out_and_linear_like_init():
  params = init_eval_and_train_step("resnet18", ())[0]["params"]
  w = params["layer4_1"]["conv2"]["kernel"]  # 3x3x512x512: fan_out = 9 * 512
  np.testing.assert_allclose(float(jnp.std(w)), (2.0 / (9 * 512)) ** 0.5, rtol=0.02)
  fc = params["fc"]
  bound = 1 / 512**0.5
  assert fc["kernel"].shape == (512, 10)
  assert float(jnp.abs(fc["kernel"]).max()) <= bound and float(jnp.abs(fc["bias"]).max()) <= bound
  assert float(jnp.abs(fc["kernel"]).max()) > 0.9 * bound


# ----- errors a user can act on ---------------------------------------------------------------------------


def test_unknown_name_suggests_close_names():
  with pytest.raises(ModelError, match="resnet50"):
    create_model("resnet05")
  with pytest.raises(ModelError, match="unknown model"):
    create_model("alexnet")
  with pytest.raises(ModelError, match="residual_mlp"):  # a shared word, not only similar characters
    create_model("resnet_mlp")


@pytest.mark.parametrize(
  "options,match",
  [
    (dict(depth=3), "unknown option.*depth"),
    (dict(block_order="v3"), "block order"),
    (dict(shortcut="C"), "shortcut"),
    (dict(residual=False, zero_init_residual=True), "zero_init_residual"),
    (dict(groups=32), "BasicBlock"),
    (dict(conv_backend="mkl"), "conv_backend.*xla, onednn"),
  ],
)
def test_bad_options(options, match):
  with pytest.raises(ModelError, match=match):
    create_model("resnet18", **options)


@pytest.mark.parametrize(
  "name,num_classes", [("resnet18", -1), ("resnet18", 2.0), ("resnet18", "10"), ("residual_mlp", 0)]
)
def test_bad_num_classes(name, num_classes):
  # 0 is a headless backbone for the conv models (tests/test_features.py), not for residual_mlp.
  with pytest.raises(ModelError, match="num_classes"):
    create_model(name, num_classes=num_classes)


@pytest.mark.parametrize("name,size,minimum", [("resnet18", 16, 32), ("resnet20", 2, 4), ("resnet50", 31, 32)])
def test_input_too_small(name, size, minimum):
  model = create_model(name, num_classes=10)
  assert model.min_input_size == minimum
  with pytest.raises(ModelError, match=f"{size}x{size}.*{minimum}x{minimum}"):
    _shapes(model, size)


def test_input_must_be_nhwc():
  with pytest.raises(ModelError, match="rank 4"):
    create_model("resnet20").init(jax.random.key(0), jnp.zeros((32, 32, 3)))


def test_resnet_module_is_public():
  model = create_model("resnet34")
  assert isinstance(model, ResNet) and model.stage_sizes == (3, 4, 6, 3)


@pytest.mark.parametrize(
  "name,options,size",
  [
    ("resnet20", {}, 8),  # basic blocks, CIFAR stem, option A shortcuts
    ("resnet9", {"num_filters": 8}, 16),  # max-pools, relu_before_add blocks, global max pool
    # Bottlenecks, 7x7/2 stem, max-pool, projections; at 64x64 the last stage's BatchNorm still sees 2x2
    # pixels per image (at 32x32, one pixel of two images makes the float32 gradients ill-conditioned).
    pytest.param("resnet50", {"num_filters": 8}, 64, marks=pytest.mark.slow),
    pytest.param(  # grouped 3x3 convs
      "resnext50_32x4d", {"num_filters": 16, "width_per_group": 16, "groups": 4}, 64, marks=pytest.mark.slow
    ),
  ],
)
def test_onednn_conv_backend_equals_xla(name, options, size):
  """conv_backend="onednn" has the same parameters and computes the same training step as XLA's convolutions."""
  xla = create_model(name, num_classes=10, **options)
  onednn = create_model(name, num_classes=10, conv_backend="onednn", **options)
  x, y = normal(3, (2, size, size, 3)), jnp.array([1, 4])
  variables = xla.init(INIT_KEY, x)
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, onednn.init(INIT_KEY, x))

  def loss_and_grads(model):
    def loss_fn(params):
      logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])

  (loss_x, logits_x), grads_x = loss_and_grads(xla)
  (loss_o, logits_o), grads_o = loss_and_grads(onednn)
  chex.assert_trees_all_close(logits_o, logits_x, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(loss_o, loss_x, rtol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_x))
  chex.assert_trees_all_close(grads_o, grads_x, atol=2e-4 * scale)
  chex.assert_trees_all_close(onednn.apply(variables, x), xla.apply(variables, x), rtol=1e-4, atol=1e-4)
