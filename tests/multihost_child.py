"""One process of a multi-host test run (started by tests/multihost.py): ``python multihost_child.py SPEC ID``.

SPEC is a JSON file: ``config`` (a training config as a dict), ``workdir``, ``stop_at_step``, and for
several processes ``port`` and ``num_processes``. The process joins the run as process ID, reports
its slices of the first ``batches`` global training batches, the evaluation count and accuracy of the
initial state, trains (``train_loop.train_and_evaluate``), and reports the train and test records and
a digest of every array of the newest checkpoint's state. Without a ``port`` it runs alone: on all
its devices, or once per entry of ``device_counts`` (on that many, workdir ``WORKDIR/devN``). One ``RESULT
{json}`` line on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from resnet_jax import distributed, metrics, run_setup, train_loop
from resnet_jax.checkpoint import Checkpointer


def digest(tree) -> str:
  """sha256 of every array of ``tree`` (this process's copy of each replicated array), in order."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    a = np.asarray(leaf.addressable_data(0) if hasattr(leaf, "addressable_data") else leaf)
    h.update(str((a.dtype, a.shape)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def run(config: ml_collections.ConfigDict, workdir: str, spec: dict, devices=None) -> dict:
  setup = run_setup.Setup(config, devices)
  out = {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "devices": len(setup.dp.devices),
    "local_devices": jax.local_device_count(),
  }
  if spec.get("batches"):
    it = setup.train_iterator()
    out["batches"] = []
    for _ in range(spec["batches"]):
      b = next(it)
      out["batches"].append(
        {
          "label": b["label"].tolist(),
          "image": hashlib.sha256(np.ascontiguousarray(b["image"])).hexdigest(),
          "rows": [hashlib.sha256(np.ascontiguousarray(x)).hexdigest()[:16] for x in b["image"]],
        }
      )
    it.close()
  if spec.get("evaluate_init"):
    out["eval_init"] = setup.evaluate(setup.init_state(lambda *_: None))
  summary = train_loop.train_and_evaluate(
    config, workdir, log=lambda *_: None, stop_at_step=spec.get("stop_at_step"), setup=setup
  )
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  state, data_state, _ = ckpt.restore(setup.abstract_state())
  ckpt.close()
  records = metrics.read_metrics(workdir) if jax.process_index() == 0 else []
  out.update(
    {
      "finished": summary is not None,
      "step": int(jax.device_get(state.step.addressable_data(0))),
      "data_state": data_state,
      "train_loss": [r["loss"] for r in records if r["split"] == "train"],
      "train_steps": [r["step"] for r in records if r["split"] == "train"],
      "test": [[r["step"], r["loss"], r["accuracy"]] for r in records if r["split"] == "test"],
      "state": digest(state),
      "params": [np.asarray(p.addressable_data(0)).ravel().tolist() for p in jax.tree.leaves(state.params)],
    }
  )
  return out


def main() -> None:
  with open(sys.argv[1]) as f:
    spec = json.load(f)
  process_id = int(sys.argv[2])
  config = ml_collections.ConfigDict(spec["config"])
  if spec.get("port"):
    d = config.distributed
    d.initialize, d.coordinator_address = True, f"localhost:{spec['port']}"
    d.num_processes, d.process_id = spec["num_processes"], process_id
    d.init_timeout_s, d.heartbeat_timeout_s = spec.get("timeout_s", 60), spec.get("heartbeat_s", 10)
    distributed.maybe_initialize_distributed(config)
    out = run(config, spec["workdir"], spec)
  elif "device_counts" in spec:
    out = {
      str(n): run(config, os.path.join(spec["workdir"], f"dev{n}"), spec, jax.devices()[:n])
      for n in spec["device_counts"]
    }
  else:
    out = run(config, spec["workdir"], spec)
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
