"""Errors a user can act on, and the one place where the command-line tools turn them into one line.

Every error raised because of user input (a config value, a file, a shape, a name) derives from
:class:`ResNetJaxError`, itself a :class:`ValueError`, and says what was wrong, what was expected and
where. The command-line entry points (``train.py``, ``python -m resnet_jax.gradcheck``, ...) wrap their
``main`` in :func:`run_cli`, which prints such an error as a single ``error: ...`` line on stderr and
exits with status 2, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn


class ResNetJaxError(ValueError):
  """Bad input that the user can fix. The message names the problem, the expectation and the place."""


class ConfigError(ResNetJaxError):
  """A configuration key, type or value is wrong."""


class DataError(ResNetJaxError):
  """A dataset folder, file or label is missing, empty, corrupt or out of range."""


class CheckpointError(ResNetJaxError):
  """A checkpoint or weight file is missing, corrupt, or belongs to another model."""


class ModelError(ResNetJaxError):
  """A model name or architecture option is unknown or does not fit the input."""


class DistributedError(ResNetJaxError):
  """The processes of a multi-host run cannot connect, disagree on their config, or lost one of them."""


class WorkdirBusyError(ResNetJaxError):
  """Another live process is training in the same workdir (it holds the workdir's lock)."""


class Interrupted(Exception):
  """The run was stopped by a signal (SIGTERM, SIGINT) after a step, with a checkpoint written.

  Not a user error: :func:`run_cli` prints its message as one line and exits with ``128 + signum``,
  the shell's convention for a process ended by that signal.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


EXIT_USER_ERROR = 2


def parse_args(parser, argv, usage: str):
  """``parser.parse_args(argv)`` where a bad command line is a :class:`ConfigError` saying what argparse
  found wrong and ``usage`` (one line through :func:`run_cli`) instead of argparse's several lines and
  exit, also for a sub-command's parser; ``--help`` still prints and exits 0."""
  import argparse

  def error(message: str) -> NoReturn:
    raise ConfigError(f"{message}; {usage}")

  parsers = [parser]
  while parsers:
    p = parsers.pop()
    p.error = error
    for action in p._actions:  # argparse keeps a sub-command's parser only there
      if isinstance(action, argparse._SubParsersAction):
        parsers.extend(action.choices.values())
  return parser.parse_args(argv)


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
  """Print ``error: message`` as one line on stderr and exit with ``code``."""
  one_line = " ".join(str(message).split())
  silence_stray_async_errors()  # The reads that failed alongside a reported one (see there).
  print(f"error: {one_line}", file=sys.stderr, flush=True)
  raise SystemExit(code)


# What the reads and writes still in flight after a failed checkpoint operation raise (see below).
_STRAY_ERRORS = ("Event loop is closed", "cannot schedule new futures after interpreter shutdown")


def _drops_stray_async_errors(previous: Callable) -> Callable:
  """An unraisable-exception hook, or a thread exception hook (both hooks' arguments have ``exc_value``),
  that drops the ``RuntimeError`` of :data:`_STRAY_ERRORS` and passes every other exception on to
  ``previous``."""

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) in _STRAY_ERRORS:
      return
    previous(unraisable)

  hook.previous = previous
  return hook


def silence_stray_async_errors() -> None:
  """Keep the reads and writes still in flight after a failed checkpoint operation from printing tracebacks.

  orbax runs a checkpoint's reads and writes on an event loop of its own and closes it when the first
  one fails. tensorstore then completes the others: their callbacks find the loop closed (``RuntimeError:
  Event loop is closed``, reported through :func:`sys.unraisablehook`), and asyncio logs the errors of
  their futures when they are collected. A writer thread still running when the process exits after the
  reported error fails with ``RuntimeError: cannot schedule new futures after interpreter shutdown``,
  reported through :func:`threading.excepthook`. orbax's API offers no way to wait for or cancel them, and
  the failure has been reported once already: this disables the asyncio logger and installs (once) hooks
  that drop those two RuntimeErrors, every other exception still reaching the previous hooks.
  """
  logging.getLogger("asyncio").disabled = True
  if not hasattr(sys.unraisablehook, "previous"):
    sys.unraisablehook = _drops_stray_async_errors(sys.unraisablehook)
  if not hasattr(threading.excepthook, "previous"):
    threading.excepthook = _drops_stray_async_errors(threading.excepthook)


@contextlib.contextmanager
def stray_async_errors_silenced() -> Iterator[None]:
  """Around one orbax read or write: when it fails, :func:`silence_stray_async_errors` from then on.

  The hook is installed on entry already (the first stray callbacks may come before the failure has
  reached the caller) and removed again when the block ends without an error.
  """
  previous = sys.unraisablehook
  if not hasattr(previous, "previous"):
    sys.unraisablehook = _drops_stray_async_errors(previous)
  try:
    yield
  except BaseException:
    silence_stray_async_errors()
    raise
  if getattr(sys.unraisablehook, "previous", None) is previous:
    sys.unraisablehook = previous


class DropErrorRecords(logging.Filter):
  """A logging filter that drops the records whose exception ``matches`` (a predicate on the exception);
  every other record, with or without an exception, goes through. ``reason`` names what it drops."""

  def __init__(self, reason: str, matches: Callable[[BaseException], bool]):
    super().__init__()
    self.reason, self.matches = reason, matches

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return error is None or not self.matches(error)


def drop_error_records(logger_name: str, reason: str, matches: Callable[[BaseException], bool]) -> None:
  """From now on, drop the records of ``logger_name`` whose exception ``matches``
  (:class:`DropErrorRecords`): for an error that a library's background thread logs with its traceback
  after the main thread has reported it in one line already. Installed once per process for each
  ``reason``, however often it is called."""
  logger = logging.getLogger(logger_name)
  if not any(isinstance(f, DropErrorRecords) and f.reason == reason for f in logger.filters):
    logger.addFilter(DropErrorRecords(reason, matches))


def describe_os_error(e: OSError) -> str:
  """``PATH: reason (ERRNO_NAME)`` for an OSError: the file it is about and what the system said."""
  import errno as errno_lib

  paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
  reason = e.strerror or (str(e.args[0]) if e.args else type(e).__name__)
  code = f" ({errno_lib.errorcode.get(e.errno, e.errno)})" if e.errno is not None else ""
  where = " -> ".join(paths) if paths else "(no path given by the system)"
  return f"{where}: {reason}{code}"


def run_cli(main: Callable[..., int | None], *args, **kwargs) -> NoReturn:
  """Run a command-line ``main`` and exit; user errors become one stderr line and exit status 2.

  ``ResNetJaxError`` (and therefore every error above) and every ``OSError`` (a missing file, a full
  disk, a read-only folder, a permission: the line names the path and the system's reason) are
  reported without a traceback, exit status 2. :class:`Interrupted` (a run stopped by a signal after
  writing its checkpoint) prints its one line and exits with ``128 + signum``; ``KeyboardInterrupt``
  exits with 130. Anything else is a bug and keeps its traceback.
  """
  try:
    code = main(*args, **kwargs)
  except ResNetJaxError as e:
    fail(str(e))
  except FileNotFoundError as e:
    fail(f"file not found: {describe_os_error(e)}")
  except OSError as e:
    fail(f"cannot read or write {describe_os_error(e)}")
  except Interrupted as e:
    print(" ".join(str(e).split()), file=sys.stderr, flush=True)
    raise SystemExit(128 + e.signum) from None
  except KeyboardInterrupt:
    fail("interrupted", code=130)
  raise SystemExit(int(code or 0))
