"""The records of a training run and what is made of them: ``metrics.jsonl``, TensorBoard scalars, curves.

:class:`MetricsWriter` writes each record, one call (:meth:`MetricsWriter.write`), as a line of
``WORKDIR/metrics.jsonl`` (``"split": "train"`` per log step, ``"split": "test"`` per evaluation) and as
TensorBoard scalars (:mod:`resnet_jax.tensorboard_events`); a resumed run first cuts both back to the step
it resumes from. :func:`read_metrics` reads the records back, :func:`plot_curves` draws them, and
:func:`strict_json` / :func:`write_json` write JSON that strict parsers accept (NaN and Infinity as ``null``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

REJECTED_METRICS = "metrics_rejected_lines.txt"


def is_number(v: Any) -> bool:
  """A finite int or float (not a bool): what a record's ``step`` must be."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def strict_json(obj: Any) -> Any:
  """A copy of ``obj`` that strict JSON accepts: numpy scalars as numbers, non-finite floats as ``None``
  (NaN and Infinity are not JSON), tuples as lists."""
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def _metrics_lines(workdir: str) -> list[tuple[bytes, dict | None]]:
  """Each line of ``WORKDIR/metrics.jsonl`` with its record, or ``None`` where it is not one: not
  UTF-8, not JSON, not an object, or without a finite numeric ``step`` (e.g. a line cut by a kill)."""
  path = os.path.join(workdir, "metrics.jsonl")
  out: list[tuple[bytes, dict | None]] = []
  if os.path.exists(path):
    with open(path, "rb") as f:
      for line in f:
        try:
          r = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
          r = None
        out.append((line, r if isinstance(r, dict) and is_number(r.get("step")) else None))
  return out


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``WORKDIR/metrics.jsonl``; lines that are not records are left out (see
  :func:`_metrics_lines`)."""
  return [r for _, r in _metrics_lines(workdir) if r is not None]


def rewrite_metrics(workdir: str, upto_step: int) -> tuple[list[dict], int, list[int]]:
  """Keep only the records up to ``upto_step`` (a resumed run recomputes the later ones).

  Lines that are not records are moved, as they were, to ``WORKDIR/metrics_rejected_lines.txt``
  (appended), except a last line cut short by a kill. Returns the records kept, the number of lines
  moved and the steps of the records left out.
  """
  lines = _metrics_lines(workdir)
  records = [r for _, r in lines if r is not None and r["step"] <= upto_step]
  replaced = [r["step"] for _, r in lines if r is not None and r["step"] > upto_step]
  rejected = [line for i, (line, r) in enumerate(lines) if r is None and (line.endswith(b"\n") or i < len(lines) - 1)]
  path = os.path.join(workdir, "metrics.jsonl")
  if rejected:
    with open(os.path.join(workdir, REJECTED_METRICS), "ab") as f:
      f.write(b"".join(x if x.endswith(b"\n") else x + b"\n" for x in rejected))
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(strict_json(r), allow_nan=False) + "\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return records, len(rejected), replaced


def _number(v: Any) -> float:
  """``v`` as a float for a plot: NaN where it is not a number (``null``, a string, missing)."""
  return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def plot_curves(records: list[dict], path: str, title: str = "") -> None:
  """Loss and accuracy against step, train and test, into ``path`` (matplotlib, Agg backend)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  for split, style in (("train", "-"), ("test", "o-")):
    rs = [r for r in records if r.get("split") == split]
    if not rs:
      continue
    steps = [_number(r.get("step")) for r in rs]
    ax_loss.plot(steps, [_number(r.get("loss")) for r in rs], style, label=split, markersize=3)
    ax_acc.plot(steps, [_number(r.get("accuracy")) for r in rs], style, label=split, markersize=3)
  for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()
  ax_loss.set_yscale("log")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """Write ``obj`` to ``path`` through a temporary file renamed when complete (removed on failure; an
  OSError names the file)."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(strict_json(obj), f, indent=2, allow_nan=False)
    os.replace(tmp, path)
  except OSError as e:
    raise OSError(e.errno, e.strerror, e.filename or tmp) from None
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


class MetricsWriter:
  """The records of a run into ``WORKDIR/metrics.jsonl`` and TensorBoard event files, from ``start_step`` on.

  Opening keeps the records up to ``start_step`` (:func:`rewrite_metrics`: a resumed run recomputes the
  later ones, whose steps ``replaced`` lists; ``rejected`` counts the lines moved aside) and cuts the event
  files back to it. ``records`` holds every record of the run, the kept ones and those written since. With
  ``enabled=False`` (every process of a multi-host run but process 0) nothing is read or written;
  ``records`` still collects.
  """

  def __init__(self, workdir: str, start_step: int, enabled: bool = True):
    from resnet_jax.tensorboard_events import EventWriter

    self.path = os.path.join(workdir, "metrics.jsonl")
    self.records, self.rejected, self.replaced = rewrite_metrics(workdir, start_step) if enabled else ([], 0, [])
    # Unbuffered: each record is written at once, and a failed write leaves nothing for close() to retry.
    self._file = open(self.path, "ab", buffering=0) if enabled else None
    self._events = EventWriter(workdir, start_step) if enabled else None  # TensorBoard, the same records.

  def write(self, step: int, record: dict) -> dict:
    """Write ``{"step": step, **record}`` (a line of ``metrics.jsonl``, TensorBoard scalars); returns it."""
    rec = {"step": step, **record}
    self.records.append(rec)
    if self._file is not None:
      line = json.dumps(strict_json(rec), allow_nan=False) + "\n"  # NaN is not JSON: null.
      try:
        self._file.write(line.encode())
      except OSError as e:  # A full disk: name the file.
        raise OSError(e.errno, e.strerror, self.path) from None
      self._events.write(rec)
    return rec

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._events.close()
