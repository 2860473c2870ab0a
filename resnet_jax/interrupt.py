"""Stop a training run cleanly on SIGTERM or SIGINT.

A cluster scheduler or a preempting cloud sends SIGTERM (and a terminal Ctrl-C sends SIGINT) some
time before it kills a job. Inside :class:`StopOnSignal` such a signal only records itself; the
training loop sees it after the step in progress, logs that step, writes a checkpoint and raises
:class:`~resnet_jax.errors.Interrupted`, which ``train.py`` prints as one line before exiting with
``128 + signum`` (143 for SIGTERM, 130 for SIGINT). A second signal gets the handler that was
installed before (for SIGTERM usually the default: the process ends at once).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
  """Context manager: record the first SIGTERM/SIGINT in ``received`` instead of ending the process.

  Handlers can only be installed from the main thread; elsewhere this does nothing (``received``
  stays ``None``).
  """

  def __init__(self, signals: tuple[int, ...] = SIGNALS):
    self.signals = signals
    self.received: int | None = None
    self._previous: dict[int, object] = {}

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else ""

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.received is None:
      self.received = signum
    for s, previous in self._previous.items():  # A second signal acts as it would have.
      signal.signal(s, previous)

  def __enter__(self) -> StopOnSignal:
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}
