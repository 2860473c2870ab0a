"""torchvision parity and weight conversion (resnet_jax.convert) against the real torchvision."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from resnet_jax import CheckpointError, ModelError, create_model
from resnet_jax.convert import from_torchvision, guess_architecture, load_checkpoint, save_checkpoint, to_torchvision

# Parameters are initialised with the "rbg" PRNG: compiling threefry for every parameter shape costs
# about 10 s of CPU per model, rbg about 1.5 s.
INIT_KEY = jax.random.key(0, impl="rbg")

NUM_CLASSES = 10


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
  old = torch.get_num_threads()
  torch.set_num_threads(2)
  yield
  torch.set_num_threads(old)


def random_torchvision(name: str, seed: int = 0) -> torch.nn.Module:
  """A torchvision model with random weights and randomised BatchNorm parameters and running statistics.

  The last BN of each block gets a small gamma so that the logits stay of order one in eval mode.
  """
  torch.manual_seed(seed)
  model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
  last = set()
  for m in model.modules():
    if isinstance(m, torchvision.models.resnet.BasicBlock):
      last.add(m.bn2)
    elif isinstance(m, torchvision.models.resnet.Bottleneck):
      last.add(m.bn3)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.1, 0.4) if m in last else m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return model


def images(seed: int = 0, size: int = 64) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def assert_logits_close(ours, theirs, tol=1e-4):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  scale = max(1.0, float(np.abs(theirs).max()))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol * scale)


@functools.cache
def compiled_forward(name: str):
  """One compiled function per architecture: (eval logits, (train logits, batch_stats updates))."""
  model = create_model(name, num_classes=NUM_CLASSES)

  @jax.jit
  def forward(v, x):
    with jax.default_matmul_precision("highest"):
      return model.apply(v, x, train=False), model.apply(v, x, train=True, mutable=["batch_stats"])

  return forward


def check_parity(name: str) -> None:
  tm = random_torchvision(name)
  x = images()
  variables = from_torchvision(tm.state_dict(), name)
  tm.eval()
  with torch.no_grad():
    ref_eval = tm(torch.from_numpy(x)).numpy()
  tm.train()  # updates torch's running statistics in place; the converted variables must not follow
  with torch.no_grad():
    ref_train = tm(torch.from_numpy(x)).numpy()
  logits, (train_logits, updates) = compiled_forward(name)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert_logits_close(logits, ref_eval)
  assert_logits_close(train_logits, ref_train)
  # running means move the same way (flax momentum 0.9 == torch momentum 0.1)
  ours = to_torchvision({"params": variables["params"], "batch_stats": updates["batch_stats"]}, name)
  theirs = tm.state_dict()
  for key in ours:
    if key.endswith("running_mean"):
      np.testing.assert_allclose(ours[key], theirs[key].numpy(), atol=1e-4, err_msg=key)


@pytest.mark.parametrize(
  "name",
  [
    "resnet18",
    "resnet50",
    pytest.param("resnet34", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", marks=pytest.mark.slow),
    pytest.param("resnet101", marks=pytest.mark.slow),
    pytest.param("resnet152", marks=pytest.mark.slow),
    pytest.param("wide_resnet50_2", marks=pytest.mark.slow),
  ],
)
def test_torchvision_parity_eval_and_train(name):
  check_parity(name)


def test_export_loads_into_torchvision_strictly():
  """Our own initialisation, exported, gives the same logits in torchvision (eval mode)."""
  model = create_model("resnet18", num_classes=NUM_CLASSES, zero_init_residual=False)
  x = images(1)  # same shape as in the parity test: the compiled forward is reused
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  variables = jax.jit(lambda k, x: model.init(k, x))(INIT_KEY, xj)
  variables = {
    "params": variables["params"],
    "batch_stats": jax.tree.map(lambda a: a + 0.05 * jnp.ones_like(a), variables["batch_stats"]),
  }
  tm = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in to_torchvision(variables, "resnet18").items()}, strict=True)
  tm.eval()
  with torch.no_grad():
    ref = tm(torch.from_numpy(x)).numpy()
  ours, _ = compiled_forward("resnet18")(variables, xj)
  assert_logits_close(ours, ref)


@pytest.fixture(scope="module")
def resnet18_state():
  return {k: v.clone() for k, v in random_torchvision("resnet18", seed=3).state_dict().items()}


def test_round_trips_are_identities(resnet18_state):
  variables = from_torchvision(resnet18_state, "resnet18")
  back = to_torchvision(variables, "resnet18")
  assert set(back) == set(resnet18_state)
  for key, value in resnet18_state.items():
    np.testing.assert_array_equal(back[key], value.numpy() if not key.endswith("tracked") else 0, err_msg=key)
  chex.assert_trees_all_equal(from_torchvision(back, "resnet18"), variables)
  model = create_model("resnet18", num_classes=NUM_CLASSES)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))), jax.random.key(0))
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, shapes)


def test_cifar_layout_round_trip():
  model = create_model("resnet20", num_classes=NUM_CLASSES)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))))(INIT_KEY)
  sd = to_torchvision(variables, "resnet20")
  assert "layer3.2.conv2.weight" in sd and not any("downsample" in k for k in sd)
  chex.assert_trees_all_equal(from_torchvision(sd, "resnet20"), variables)


@pytest.mark.parametrize("ext", [".pth", ".safetensors", ".npz"])
def test_load_checkpoint_formats(tmp_path, resnet18_state, ext):
  path = tmp_path / f"weights{ext}"
  if ext == ".pth":
    torch.save({"state_dict": resnet18_state}, path)
  else:
    save_checkpoint(from_torchvision(resnet18_state, "resnet18"), "resnet18", path)
  chex.assert_trees_all_equal(load_checkpoint(path, "resnet18"), from_torchvision(resnet18_state, "resnet18"))


def test_data_parallel_prefix_is_removed(resnet18_state):
  prefixed = {f"module.{k}": v for k, v in resnet18_state.items()}
  chex.assert_trees_all_equal(from_torchvision(prefixed, "resnet18"), from_torchvision(resnet18_state, "resnet18"))


# ----- errors ---------------------------------------------------------------------------------------------


def test_wrong_architecture_is_named():
  sd = {k: np.zeros(v.shape, np.float32) for k, v in random_torchvision("resnet34").state_dict().items()}
  with pytest.raises(
    CheckpointError, match=r"does not fit 'resnet18'.*unexpected keys.*layer1\.2\..*looks like a resnet34"
  ):
    from_torchvision(sd, "resnet18")
  assert guess_architecture(sd) == "resnet34"


def test_missing_unexpected_and_misshaped_keys_are_named(resnet18_state):
  sd = dict(resnet18_state)
  del sd["layer2.1.bn1.running_var"]
  sd["layer9.0.conv1.weight"] = sd["conv1.weight"]
  sd["layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)
  with pytest.raises(CheckpointError) as info:
    from_torchvision(sd, "resnet18")
  message = str(info.value)
  assert "missing keys (1): layer2.1.bn1.running_var" in message
  assert "unexpected keys (1): layer9.0.conv1.weight" in message
  assert "layer3.0.conv2.weight (256, 256, 1, 1) (expected (256, 256, 3, 3))" in message


def test_names_without_torchvision_layout(resnet18_state):
  with pytest.raises(CheckpointError, match="no torchvision layout"):
    from_torchvision(resnet18_state, "preact_resnet18")
  with pytest.raises(ModelError, match="unknown model"):
    from_torchvision(resnet18_state, "resnet19")
  with pytest.raises(CheckpointError, match="fc.weight"):
    from_torchvision({"conv1.weight": np.zeros((64, 3, 7, 7))}, "resnet18")


def test_bad_files(tmp_path, resnet18_state):
  with pytest.raises(CheckpointError, match="not found"):
    load_checkpoint(tmp_path / "nothing.pth", "resnet18")
  (tmp_path / "w.bin").write_bytes(b"1234")
  with pytest.raises(CheckpointError, match="unknown checkpoint format '.bin'"):
    load_checkpoint(tmp_path / "w.bin", "resnet18")
  (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(CheckpointError, match="cannot read .*w.safetensors"):
    load_checkpoint(tmp_path / "w.safetensors", "resnet18")
  np.savez(tmp_path / "w.npz", **{"fc.weight": np.zeros((10, 512)), "fc.bias": np.zeros(10)})
  with pytest.raises(CheckpointError, match=r"w\.npz: .*missing keys"):
    load_checkpoint(tmp_path / "w.npz", "resnet18")
  with pytest.raises(CheckpointError, match="expected a .safetensors or .npz"):
    save_checkpoint(from_torchvision(resnet18_state, "resnet18"), "resnet18", tmp_path / "w.pth")
  with pytest.raises(CheckpointError, match="missing"):
    to_torchvision({"params": {"fc": {"kernel": np.zeros((512, 10)), "bias": np.zeros(10)}}}, "resnet18")
