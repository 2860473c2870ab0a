"""One ``error:`` line instead of a C++ stack dump when jax's distributed runtime ends a process.

When the processes of a multi-host run cannot all connect in time, or one of them dies where no
collective notices it, jax's coordination client ends the process from C++ (``LOG(FATAL)``: a
"Terminating process because the JAX distributed service detected fatal errors" line, then a stack
dump, exit status 134), out of Python's reach. ``train.py`` therefore routes its stderr (file
descriptor 2) through a small filter process (:func:`condense_fatal_errors`): everything passes
unchanged, except that this fatal message and the dump after it become one line::

  error: process 1 of 2: jax's distributed runtime ended this process (DEADLINE_EXCEEDED, RPC
  /xla.coordination.CoordinationService/RegisterTask): ...

The filter outlives the process it filters (it reads until the last writer closes the pipe), so the
line is written even though the process aborted. Every other fatal error keeps its stack trace.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

MARK = b"Terminating process because the JAX distributed service detected fatal errors"


def condense_fatal_errors(process_id: int, num_processes: int, coordinator: str, timeout_s: int) -> None:
  """Route this process's file descriptor 2 through the filter (see the module docstring)."""
  sys.stderr.flush()
  original = os.dup(2)
  r, w = os.pipe()
  subprocess.Popen(
    [sys.executable, "-u", os.path.abspath(__file__), str(process_id), str(num_processes), coordinator, str(timeout_s)],
    stdin=r,
    stdout=original,
    stderr=subprocess.DEVNULL,
    close_fds=True,
  )
  os.close(r)
  os.dup2(w, 2)
  os.close(w)
  os.close(original)


def describe_fatal(text: bytes, process_id: int, num_processes: int, coordinator: str, timeout_s: int) -> str:
  """The one line for jax's fatal message ``text`` (the MARK line and what followed it)."""
  s = text.decode(errors="replace")
  status = re.search(r"absl::Status: ([A-Z_]+)", s)
  rpc = re.search(r"RPC: (\S+)", s)
  what = ", ".join(x for x in ((status.group(1) if status else ""), (f"RPC {rpc.group(1)}" if rpc else "")) if x)
  where = f"process {process_id} of {num_processes}" if process_id >= 0 else "this process"
  if rpc and rpc.group(1).endswith(("RegisterTask", "WaitForAllTasks")) or "RegisterTask" in s:
    why = (
      f"not every process connected to the coordinator {coordinator or '(auto-detected)'} within "
      f"config.distributed.init_timeout_s = {timeout_s} s: start every process with the "
      f"same coordinator_address (process 0's host and port) and num_processes, and its own "
      f"process_id in [0, num_processes)"
    )
  else:
    why = (
      "another process stopped or cannot be reached: start every process again with the same "
      "command (the run resumes from its newest complete checkpoint)"
    )
  return f"error: {where}: jax's distributed runtime ended this process ({what or 'fatal error'}): {why}"


def _filter(process_id: int, num_processes: int, coordinator: str, timeout_s: int) -> None:
  for s in (signal.SIGINT, signal.SIGTERM):  # The process it filters decides; this one reads to the end.
    signal.signal(s, signal.SIG_IGN)
  out = sys.stdout.buffer
  pending = b""
  fatal: bytes | None = None
  while True:
    data = os.read(0, 1 << 16)
    if not data:
      break
    if fatal is not None:
      fatal += data
      continue
    pending += data
    while b"\n" in pending:
      line, pending = pending.split(b"\n", 1)
      if MARK in line:
        fatal = line + b"\n" + pending
        pending = b""
        break
      out.write(line + b"\n")
    if fatal is None and pending and not pending.startswith(b"F"):  # A fatal log line is held whole.
      out.write(pending)  # a progress bar's line, without its newline yet
      pending = b""
    out.flush()
  if fatal is None and pending and MARK in pending:
    fatal = pending
  elif pending:
    out.write(pending)
  if fatal is not None:
    out.write(describe_fatal(fatal, process_id, num_processes, coordinator, timeout_s).encode() + b"\n")
  out.flush()


if __name__ == "__main__":
  _filter(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
