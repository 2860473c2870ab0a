"""Run the processes of a multi-host job on this machine: each with its own CPU devices, coordinated by
``jax.distributed`` on a free localhost port (gloo collectives).

:class:`Processes` starts one child per process in its own process group (``XLA_FLAGS`` sets its
device count before jax is imported; ``PYTHONPATH`` is this repository), waits with a deadline and
kills every process group it started when the deadline passes, when one process fails (unless told
otherwise) and when the block ends. Nothing it starts outlives the test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import portpicker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "multihost_child.py")
TRAIN = os.path.join(ROOT, "train.py")


def child_env(devices: int) -> dict[str, str]:
  """The environment of a child: ``devices`` CPU devices, this repository first on the path, no proxy
  (gRPC would send the coordinator's localhost traffic through it)."""
  env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
  env.update(
    {
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
      "PYTHONUNBUFFERED": "1",
    }
  )
  return env


def distributed_flags(
  port: int, process_id: int, num_processes: int, timeout_s: int = 60, heartbeat_s: int = 10
) -> list[str]:
  """train.py flags of process ``process_id`` of ``num_processes`` with the coordinator on ``port``."""
  return [
    "--config.distributed.initialize=True",
    f"--config.distributed.coordinator_address=localhost:{port}",
    f"--config.distributed.num_processes={num_processes}",
    f"--config.distributed.process_id={process_id}",
    f"--config.distributed.init_timeout_s={timeout_s}",
    f"--config.distributed.heartbeat_timeout_s={heartbeat_s}",
  ]


def write_config(path: str, config) -> str:
  """A config file for ``train.py --config=PATH`` holding ``config`` (a ConfigDict)."""
  text = json.dumps(config.to_dict())
  with open(path, "w") as f:
    f.write(
      "import json\nimport ml_collections\n\n\ndef get_config():\n"
      f"  return ml_collections.ConfigDict(json.loads({text!r}))\n"
    )
  return path


@dataclasses.dataclass
class Result:
  process_id: int
  returncode: int | None  # None: still running when killed at the deadline
  stdout: str
  stderr: str
  seconds: float  # from the start to its exit (or to the kill)

  def error_lines(self) -> list[str]:
    return [l for l in self.stderr.splitlines() if l.startswith("error: ")]


class Processes:
  """Context manager: the processes ``argvs[i]`` (process i), ``devices`` CPU devices each.

  ``wait(timeout)`` returns one :class:`Result` per process; a process still running at the deadline
  is killed (its whole group) and has ``returncode`` None. Leaving the block kills whatever is left.
  """

  def __init__(self, argvs: list[list[str]], devices: int, logdir: str, name: str = "p"):
    self.argvs, self.devices, self.logdir, self.name = argvs, devices, logdir, name
    self.procs: list[subprocess.Popen] = []
    self.files: list[tuple] = []
    self.start_time = 0.0
    self.ended: dict[int, float] = {}

  def __enter__(self) -> Processes:
    os.makedirs(self.logdir, exist_ok=True)
    self.start_time = time.monotonic()
    for i, argv in enumerate(self.argvs):
      out = open(os.path.join(self.logdir, f"{self.name}{i}.out"), "w+")
      err = open(os.path.join(self.logdir, f"{self.name}{i}.err"), "w+")
      self.files.append((out, err))
      self.procs.append(
        subprocess.Popen(argv, cwd=ROOT, env=child_env(self.devices), stdout=out, stderr=err, start_new_session=True)
      )
    return self

  def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to process ``i``'s group (SIGKILL: the process and anything it started)."""
    try:
      os.killpg(self.procs[i].pid, sig)
    except ProcessLookupError:
      pass

  def _group_gone(self, i: int, timeout: float = 3.0) -> None:
    """Wait (at most ``timeout`` s) until nothing of process ``i``'s group runs any more: train.py's
    stderr filter writes its last line after the process itself ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      try:
        os.killpg(self.procs[i].pid, 0)
      except (ProcessLookupError, PermissionError):
        return
      time.sleep(0.05)

  def poll(self) -> list[int | None]:
    codes = [p.poll() for p in self.procs]
    for i, c in enumerate(codes):
      if c is not None and i not in self.ended:
        self.ended[i] = time.monotonic() - self.start_time
    return codes

  def wait(self, timeout: float, stop_all_on_failure: bool = True) -> list[Result]:
    """Wait until every process ended or ``timeout`` seconds passed (then kill the rest); with
    ``stop_all_on_failure``, the first failure kills the others at once."""
    deadline = self.start_time + timeout
    while time.monotonic() < deadline:
      codes = self.poll()
      if all(c is not None for c in codes):
        break
      if stop_all_on_failure and any(c not in (None, 0) for c in codes):
        break
      time.sleep(0.1)
    self.poll()
    for i in range(len(self.procs)):
      if i not in self.ended:
        self.kill(i)
    for i, p in enumerate(self.procs):
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass
      self._group_gone(i)
    return self.results()

  def results(self) -> list[Result]:
    out = []
    for i, (p, (fo, fe)) in enumerate(zip(self.procs, self.files)):
      fo.flush(), fe.flush()
      fo.seek(0), fe.seek(0)
      code = p.returncode if i in self.ended else None
      out.append(Result(i, code, fo.read(), fe.read(), self.ended.get(i, time.monotonic() - self.start_time)))
    return out

  def __exit__(self, *exc) -> None:
    for i, p in enumerate(self.procs):
      if p.poll() is None:
        self.kill(i)
    for p in self.procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass
    for fo, fe in self.files:
      fo.close(), fe.close()


def describe(results: list[Result], tail: int = 2500) -> str:
  """Exit codes and stderr tails of ``results``, for an assertion message."""
  return "\n".join(
    f"--- process {r.process_id}: exit {r.returncode} after {r.seconds:.1f} s\n{r.stderr[-tail:]}" for r in results
  )


def run(argvs: list[list[str]], devices: int, logdir: str, timeout: float, name: str = "p") -> list[Result]:
  """Start the processes ``argvs``, wait at most ``timeout`` s; assert that every one exited with 0."""
  with Processes(argvs, devices, logdir, name) as ps:
    results = ps.wait(timeout)
  assert all(r.returncode == 0 for r in results), describe(results)
  return results


def child_argvs(spec: dict, num_processes: int, spec_path: str) -> list[list[str]]:
  """Argument lists of ``num_processes`` runs of ``multihost_child.py`` with ``spec`` (a JSON file);
  a free coordinator port is picked when there are several processes."""
  if num_processes > 1:
    spec = {**spec, "port": portpicker.pick_unused_port(), "num_processes": num_processes}
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  return [[sys.executable, CHILD, spec_path, str(i)] for i in range(num_processes)]


def child_outputs(results: list[Result]) -> list[dict]:
  """The JSON each ``multihost_child.py`` printed on its ``RESULT`` line, by process."""
  out = []
  for r in results:
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))
    out.append(json.loads(line[len("RESULT ") :]))
  return out
