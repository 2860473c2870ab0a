"""Data parallelism over 4 CPU devices (a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4).

The same config trained on 1 device and on 4 devices, same global batch, must give the same loss
trajectory, final parameters and weight average to float tolerance: BatchNorm statistics and gradients
are over the global batch, not per device. The same holds when the step makes its batch on the devices
(``dataset.augment_on='device'``: the training images replicated, the draws sharded), and with three steps
per compiled call (``steps_per_call=3``: the stacked batches sharded along their batch axis).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import json, os, sys
    import jax
    import numpy as np
    sys.path.insert(0, os.path.join({root!r}, "tests"))
    from test_train import tiny_config
    from resnet_jax import metrics, run_setup, train_loop
    from resnet_jax.checkpoint import Checkpointer

    assert jax.device_count() == 4, jax.devices()
    config = tiny_config("resnet20", num_train_steps=6, log_every_steps=1, eval_every_steps=3,
                         checkpoint_every_steps=6, ema_decay=0.5)
    out = {{}}
    for n, where, k in ((1, "host", 1), (4, "host", 1), (4, "device", 1), (4, "device", 3)):
      config.dataset.augment_on, config.steps_per_call = where, k
      config.log_every_steps = k  # Steps 1-3 and 4-6 in one call each.
      workdir = os.path.join({tmp!r}, f"dev{{n}}_{{where}}_{{k}}")
      setup = run_setup.Setup(config, devices=jax.devices()[:n])
      batch = setup.dp.put_batch(next(setup.train_iterator()))
      shards = len(batch["label"].addressable_shards)
      summary = train_loop.train_and_evaluate(config, workdir, log=lambda *_: None, setup=setup)
      state, _, _ = Checkpointer(os.path.join(workdir, "checkpoints")).restore(setup.abstract_state())
      out[f"{{n}}_{{where}}" + (f"_{{k}}" if k > 1 else "")] = {{
          "shards": shards,
          "devices": summary["devices"],
          "train_loss": [r["loss"] for r in metrics.read_metrics(workdir) if r["split"] == "train"],
          "test": [r["accuracy"] for r in metrics.read_metrics(workdir) if r["split"] == "test"],
          "params": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(state.params)],
          "batch_stats": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(state.batch_stats)],
          "ema": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(state.ema)],
      }}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_four_devices_match_one_device(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", CHILD.format(root=ROOT, tmp=str(tmp_path))],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  out = json.loads(line[len("RESULT ") :])
  one = out["1_host"]
  assert one["shards"] == 1 and one["devices"] == 1
  assert len(one["train_loss"]) == 6
  three = out["4_device_3"]  # Three steps per call: a record per call, the mean of its steps' losses.
  np.testing.assert_allclose(three["train_loss"], np.reshape(one["train_loss"], (2, 3)).mean(1), rtol=2e-5, atol=1e-6)
  for four in (out["4_host"], out["4_device"], three):  # The device-made batches are sharded the same way.
    assert four["shards"] == 4 and four["devices"] == 4
    if four is not three:
      np.testing.assert_allclose(four["train_loss"], one["train_loss"], rtol=2e-5, atol=1e-6)
    assert four["test"] == one["test"]
    assert len(four["ema"]) == len(one["ema"]) > 1  # The weight average, kept on every device alike.
    keys = ("params", "batch_stats", "ema")
    for a, b in zip(sum((four[k] for k in keys), []), sum((one[k] for k in keys), []), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
