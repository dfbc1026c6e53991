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

A signal that came while a pool started a child raised inside ``subprocess.Popen``, after the
fork: that child was nobody's to stop (and a pool whose constructor it left was never
assigned, which lost the children started before it). A pool starts each child in a
:func:`held` block, which raises the signal's exception once the child is in the pool's list,
and stops what it started when an exception leaves its constructor.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

# A Ctrl-C or SIGTERM came while serve started (read once its web server takes them itself).
requested = threading.Event()
# The one that came in a :func:`held` block (the main thread's), raised at the block's end.
_held: list[int] | None = None


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


def _exception(number: int) -> BaseException:
    return Terminated() if number == signal.SIGTERM else KeyboardInterrupt()


def _interrupt(number: int, frame: object) -> None:
    # Before anything else: a second signal that came with this one runs its handler right
    # after this one raises, in the unwinding (or in serve's clean-up).
    stopping()
    requested.set()
    if _held is not None:
        _held.append(number)
        return
    raise _exception(number)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """In serve's main thread, where the start-up's handler raises: a Ctrl-C or SIGTERM that
    comes in the block is raised at its end, not inside it (a child being started and put in
    its pool's list). Elsewhere it does nothing (signal handlers run in the main thread)."""
    global _held
    if threading.current_thread() is not threading.main_thread() or _held is not None:
        yield
        return
    _held = []
    try:
        yield
    except BaseException as failure:
        numbers, _held = _held, None
        if numbers:  # the signal is what serve stops for; the block's error is its cause
            raise _exception(numbers[0]) from failure
        raise
    numbers, _held = _held, None
    if numbers:
        raise _exception(numbers[0])


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
