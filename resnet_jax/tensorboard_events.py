"""TensorBoard event files of a training run, written with tensorboardX beside ``metrics.jsonl``.

Each metrics record becomes one event at its step holding every number of the record (NaN too) as
a scalar tagged ``SPLIT/KEY``: ``train/loss``, ``train/accuracy``, ``train/learning_rate``,
``train/images_per_sec``, ``train/nonfinite_steps``, ``test/loss``, ``test/accuracy``, ``test/epoch``.
Events are written and flushed one record at a time, before the run goes on, so that what a
checkpoint covers is on disk. A resumed run first cuts the event files of its workdir back to the
step it resumes from (a killed run's records after its last checkpoint are trained again, as in
``metrics.jsonl``), keeping their wall times, and then appends in a new file: every step appears once.

``tensorboard --logdir runs/`` (``pip install -e ".[tensorboard]"``; writing does not need it) shows
every run under ``runs/`` side by side, named by its workdir.
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
import sys
import time

from google.protobuf.message import DecodeError

# tensorboardX imports torch whenever it is installed (seconds, and hundreds of MB), only to accept
# torch tensors, which writing scalars never needs: `import torch` fails while tensorboardX loads.
_torch_hidden = "torch" not in sys.modules
if _torch_hidden:
  sys.modules["torch"] = None  # type: ignore[assignment]
try:
  from tensorboardX.event_file_writer import EventsWriter
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.proto.summary_pb2 import Summary
  from tensorboardX.record_writer import RecordWriter
finally:
  if _torch_hidden and sys.modules.get("torch", 0) is None:
    del sys.modules["torch"]

PATTERN = "events.out.tfevents.*"


def read_events(path: str) -> tuple[list[Event], bool]:
  """The events of an event file, and whether it ends on a whole record (a kill can cut the last short).

  The file is a sequence of TFRecords: length (uint64), its CRC, the serialized Event, its CRC.
  """
  with open(path, "rb") as f:
    data = f.read()
  events, pos = [], 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    end = pos + 12 + length + 4
    if end > len(data):
      break
    try:
      events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
    except DecodeError:
      break
    pos = end
  return events, pos == len(data)


def cut_events(logdir: str, step: int) -> None:
  """Drop every event after ``step`` from the event files of ``logdir`` (a file left empty is removed)."""
  for path in sorted(glob.glob(os.path.join(logdir, PATTERN))):
    events, whole = read_events(path)
    kept = [e for e in events if e.step <= step]
    if whole and len(kept) == len(events):
      continue
    if not any(e.HasField("summary") for e in kept):
      os.remove(path)
      continue
    tmp = os.path.join(logdir, "events.tmp")  # Not an event file name: TensorBoard does not read it.
    writer = RecordWriter(tmp)
    for event in kept:
      writer.write(event.SerializeToString())
    writer.flush()
    writer.close()
    os.replace(tmp, path)


class EventWriter:
  """Metrics records into a new event file of ``logdir``, once the old ones are cut to ``start_step``."""

  def __init__(self, logdir: str, start_step: int):
    cut_events(logdir, start_step)
    # The suffix keeps the file of a resumed run apart from one opened in the same second.
    prefix, suffix = os.path.join(logdir, "events"), f".step{start_step:09d}"
    self.path = f"{prefix}.out.tfevents.*{suffix}"  # for messages; tensorboardX adds time and host
    with self._naming_the_file():
      self._writer = EventsWriter(prefix, suffix)
    self.path = getattr(self._writer, "_file_name", self.path)

  @contextlib.contextmanager
  def _naming_the_file(self):
    """An OSError without a file name (a full disk while writing) gets the event file's."""
    try:
      yield
    except OSError as e:
      if e.filename:
        raise
      raise OSError(e.errno, e.strerror, self.path) from None

  def write(self, record: dict) -> None:
    """One event at ``record["step"]`` with the record's numbers, tagged ``SPLIT/KEY``, flushed to disk."""
    values = [
      Summary.Value(tag=f"{record['split']}/{key}", simple_value=value)
      for key, value in record.items()
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    with self._naming_the_file():
      self._writer.write_event(Event(wall_time=time.time(), step=int(record["step"]), summary=Summary(value=values)))
      self._writer.flush()

  def close(self) -> None:
    with self._naming_the_file():
      self._writer.close()
