"""Stage outputs, pre-logits and headless backbones (``return_features=True``, ``num_classes=0``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import create_model
from resnet_jax.errors import ModelError

# One model per architecture family, with the input size used (ImageNet stem 64, CIFAR stem 32).
FAMILIES = [
  ("resnet18", {}, 64),
  ("resnet50", {}, 64),
  ("resnext50_32x4d", {}, 64),
  ("wide_resnet50_2", {}, 64),
  ("preact_resnet18", {}, 64),
  ("preact_resnet50", {}, 64),
  ("resnet18", {"stem": "cifar"}, 32),
  ("resnet20", {}, 32),
  ("preact_resnet20", {}, 32),
  ("plain20", {}, 32),
]


def _abstract_features(model, size):
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
  return variables, jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True), variables, x)


@pytest.mark.parametrize(
  "name,options,size", FAMILIES, ids=[f"{n}{'-' + '-'.join(o.values()) if o else ''}" for n, o, _ in FAMILIES]
)
def test_stage_shapes_and_strides(name, options, size):
  model = create_model(name, num_classes=7, **options)
  _, feats = _abstract_features(model, size)
  stages = len(model.stage_sizes)
  expected_strides = {
    ("cifar", 3): {"stem": 1, "stage1": 1, "stage2": 2, "stage3": 4},
    ("cifar", 4): {"stem": 1, "stage1": 1, "stage2": 2, "stage3": 4, "stage4": 8},
    ("imagenet", 4): {"stem": 4, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32},
  }[model.stem, stages]
  assert model.feature_strides == expected_strides
  assert set(feats) == set(expected_strides) | {"pre_logits", "logits"}
  for key, stride in expected_strides.items():
    assert feats[key].shape == (2, size // stride, size // stride, model.feature_channels[key]), key
  expansion = 4 if name in ("resnet50", "resnext50_32x4d", "wide_resnet50_2", "preact_resnet50") else 1
  widths = [model.num_filters * 2**i * expansion for i in range(stages)]
  assert [model.feature_channels[f"stage{i + 1}"] for i in range(stages)] == widths
  assert feats["pre_logits"].shape == (2, widths[-1]) and feats["logits"].shape == (2, 7)


@pytest.mark.parametrize(
  "name,options,size",
  [
    ("preact_resnet20", {}, 32),
    ("resnet20", {}, 32),
    pytest.param("resnet18", {"num_filters": 4}, 32, marks=pytest.mark.slow),
    pytest.param("resnet50", {"num_filters": 4}, 32, marks=pytest.mark.slow),
  ],
)
def test_pre_logits_are_what_the_head_consumes(name, options, size):
  model = create_model(name, num_classes=5, **options)
  x = jax.random.normal(jax.random.key(1), (3, size, size, 3))
  variables = model.init(jax.random.key(0), x)
  feats, plain = model.apply(variables, x, return_features=True), model.apply(variables, x)
  last = feats[f"stage{len(model.stage_sizes)}"]
  np.testing.assert_allclose(feats["pre_logits"], jnp.mean(last, axis=(1, 2)), rtol=1e-6, atol=1e-6)
  fc = variables["params"]["fc"]
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(feats["logits"], feats["pre_logits"] @ fc["kernel"] + fc["bias"], rtol=1e-5, atol=1e-5)
  # The plain call returns the same logits; the features are extra outputs, not another computation.
  np.testing.assert_array_equal(plain, feats["logits"])


def test_headless_backbone_has_no_head_and_returns_the_pre_logits():
  full = create_model("resnet20", num_classes=10)
  headless = create_model("resnet20", num_classes=0)
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  variables = full.init(jax.random.key(0), x)
  backbone_vars = jax.eval_shape(headless.init, jax.random.key(0), x)
  assert "fc" not in backbone_vars["params"]
  n_full = sum(a.size for a in jax.tree.leaves(variables["params"]))
  n_backbone = sum(a.size for a in jax.tree.leaves(backbone_vars["params"]))
  assert n_full - n_backbone == 64 * 10 + 10
  trimmed = {
    "params": {k: v for k, v in variables["params"].items() if k != "fc"},
    "batch_stats": variables["batch_stats"],
  }
  out, feats = headless.apply(trimmed, x), headless.apply(trimmed, x, return_features=True)
  ref = full.apply(variables, x, return_features=True)
  np.testing.assert_array_equal(out, ref["pre_logits"])
  assert "logits" not in feats and feats["stage3"].shape == (2, 8, 8, 64)


def test_num_classes_zero_only_for_conv_models():
  with pytest.raises(ModelError, match="num_classes"):
    create_model("residual_mlp", num_classes=0)
  with pytest.raises(ModelError, match="num_classes"):
    create_model("resnet18", num_classes=-1)
