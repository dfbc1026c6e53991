"""SIGINT (a terminal's Ctrl-C) in ``dicomnode serve`` and in the processes it starts, and
SIGTERM while serve starts.

A terminal's Ctrl-C sends SIGINT to every process of its foreground process group: to serve
and to each of its children (DICOM listeners, workers). Serve stops its children itself,
with SIGTERM, once it knows that it is stopping; a child that stopped on its own SIGINT
first was a crash to serve's supervision (logged as an error, restarted), and a worker
printed a KeyboardInterrupt traceback. So a child of serve ignores SIGINT from its start: it
is started with SIGINT blocked (a blocked signal stays blocked across exec, a handler does
not) and ignores it before unblocking it, which also drops one that came meanwhile.

Serve itself, while it starts, ends its start-up on a Ctrl-C (a KeyboardInterrupt: what
has started is stopped); its web server then takes SIGINT as a stop, as SIGTERM. A SIGTERM
before then (``systemctl restart`` right after a start) ends the start-up the same way, with
:class:`Terminated` (serve exits 0, as after a stop); Python's default action ended serve at
once (status -15, nothing logged) and left its listeners to their parent-death signal and
its workers to their check of their parent. Python drops an exception raised in a
finalizer (printing "Exception ignored in" and a traceback), which lost the signal: the
handler also records it in :data:`requested`, which stops the web server as it starts, and
such a dropped one is not printed.

A second SIGTERM or Ctrl-C while serve stops (Ctrl-C pressed twice, ``systemctl stop``
right after a Ctrl-C) raised again inside that stop, which ended there: its listeners and
workers left to their own checks of their parent, its run folder left, no "stopped". Once
serve stops (:func:`stopping`; the start-up's handler calls it first thing), each is
caught and dropped: the stop runs to its end, and serve's exit status is the first signal's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from typing import Any

# A Ctrl-C or SIGTERM came while serve started (read once its web server takes them itself).
requested = threading.Event()


class Terminated(BaseException):
    """A SIGTERM while serve starts: like KeyboardInterrupt, not caught as an Exception."""


def start_child(command: list[str], **options: Any) -> subprocess.Popen:
    """``subprocess.Popen(command, **options)`` with SIGINT blocked in the new process;
    the process calls :func:`leave_sigint_to_supervisor` at its start."""
    # Blocked in this thread only (the one that forks): serve's other threads, the main
    # one included, still take a SIGINT meanwhile.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return subprocess.Popen(command, **options)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def leave_sigint_to_supervisor() -> None:
    """In a process serve started: ignore SIGINT (serve stops it with SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _drop(number: int, frame: object) -> None:
    """A SIGTERM or Ctrl-C while serve stops: the stop is under way already."""


def stopping() -> None:
    """Serve stops: from now on a SIGTERM or Ctrl-C is caught and dropped (by a handler,
    not SIG_IGN, which a process started meanwhile would inherit)."""
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, _drop)


def _interrupt(number: int, frame: object) -> None:
    # Before anything else: a second signal that came with this one runs its handler right
    # after this one raises, in the unwinding (or in serve's clean-up).
    stopping()
    requested.set()
    raise Terminated if number == signal.SIGTERM else KeyboardInterrupt


def _unraisable(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)) and requested.is_set():
        return  # a signal that came in a finalizer: ``requested`` has it
    sys.__unraisablehook__(unraisable)


def interrupt_start_up() -> None:
    """In serve, at its start: a Ctrl-C raises KeyboardInterrupt, a SIGTERM
    :class:`Terminated`; each sets :data:`requested`."""
    sys.unraisablehook = _unraisable
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _interrupt)
