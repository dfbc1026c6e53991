"""Child processes watched without polling: serve's listener and worker pools sleep until one
of their children exits or the node stops.

Each pool looked at its children once a second (``stop.wait(1.0)`` then ``poll()``), one
wake-up a second each for a node doing nothing. Now a pool's thread blocks in ``poll(2)`` on a
pidfd per child (Linux 5.3+: readable once the child has exited) and on its :class:`StopEvent`,
which ``set()`` makes readable. Where there are no pidfds it looks once a second, as before.

A child that ends on a SIGTERM says so by its exit status (:data:`TERMINATED`; killed by the
signal before it took it: -SIGTERM). One that serve did not send (systemd's
KillMode=control-group signals every process of the unit at once, and a child may end before
serve's own stop begins; an admin's ``kill``) is no crash: :func:`wait_to_restart` waits the
restart's delay first, and the node's stop meanwhile ends the wait without a word; else the
child is started again after one INFO line. Any other exit is logged as an ERROR.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import subprocess
import threading
from collections.abc import Sequence

log = logging.getLogger("dicomnode.supervision")

# The exit status of a child of serve that ended because it took a SIGTERM (the shell's
# 128 + signal number): under serve only; run by itself, a worker or listener exits 0.
TERMINATED = 128 + signal.SIGTERM

# Where pidfds are missing (not Linux, or a kernel before 5.3): how often to look.
POLL_SECONDS = 1.0
_said_polling = False


class StopEvent(threading.Event):
    """A :class:`threading.Event` that ``poll(2)`` can wait on too: ``set()`` makes
    :meth:`fileno` readable, ``clear()`` empties it again."""

    def __init__(self) -> None:
        super().__init__()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        # The event and the pipe change together: a set() between clear()'s two steps would
        # leave a set event with an empty pipe, or a clear one whose pipe ends every wait.
        self._pipe_lock = threading.Lock()

    def set(self) -> None:
        with self._pipe_lock:
            super().set()
            # One byte is enough: it stays unread while the event stays set (a full pipe too).
            with contextlib.suppress(BlockingIOError):
                os.write(self._write, b"\0")

    def clear(self) -> None:
        with self._pipe_lock:
            super().clear()
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 4096):
                    pass

    def fileno(self) -> int:
        return self._read


def _pidfd(process: subprocess.Popen) -> int | None:
    try:
        return os.pidfd_open(process.pid)
    except AttributeError:  # not Linux
        _say_polling()
    except OSError as error:  # reaped already (ESRCH), or no pidfds here
        if error.errno != errno.ESRCH:
            _say_polling()
    return None


def _say_polling() -> None:
    """Once per process: the pools look at their children every second (no pidfds here, or
    a system-call filter refuses them), which costs an idle node a wake-up a second each."""
    global _said_polling
    if not _said_polling:
        _said_polling = True
        log.info("no pidfds here: child processes are looked at every %g s", POLL_SECONDS)


def wait_for_exit(processes: Sequence[subprocess.Popen], stop: threading.Event) -> bool:
    """Block until one of ``processes`` has exited or ``stop`` is set; True when ``stop`` is
    set. The exited process is left for the caller's ``poll()`` to reap."""
    if stop.is_set():
        return True
    # Reaped already (another thread's poll()): its pid may be another process's by now.
    if any(process.poll() is not None for process in processes):
        return False
    stop_fd = getattr(stop, "fileno", None)
    pidfds = [_pidfd(process) for process in processes]
    try:
        if stop_fd is None or None in pidfds:
            return stop.wait(POLL_SECONDS)
        # Opened before this look: a process still running here is the one each pidfd names.
        if any(process.poll() is not None for process in processes):
            return False
        waiting = select.poll()
        waiting.register(stop_fd(), select.POLLIN)
        for pidfd in pidfds:
            waiting.register(pidfd, select.POLLIN)
        waiting.poll()
        return stop.is_set()
    finally:
        for pidfd in pidfds:
            if pidfd is not None:
                os.close(pidfd)


def terminated(code: int | None) -> bool:
    """Whether a child's exit status says that it ended on a SIGTERM: its handler's
    :data:`TERMINATED`, or the signal's default action before it had one."""
    return code in (TERMINATED, -signal.SIGTERM)


def wait_to_restart(
    logger: logging.Logger, name: str, code: int, delay: float, stop: threading.Event
) -> bool:
    """Before ``name`` (a child that exited with ``code``) is started again after ``delay``
    s: its exit logged, the delay waited; True when ``stop`` is set meanwhile (the node
    stops: no restart). An exit on a SIGTERM serve did not send is logged only if the node
    is not stopping once the delay is over (a SIGTERM to the whole process group reaches
    serve too, which then stops), at INFO; any other exit at once, as an ERROR."""
    if terminated(code):
        if stop.wait(delay):
            return True
        logger.info("%s stopped on a SIGTERM from outside serve; starting it again", name)
        return False
    logger.error("%s exited with status %s; restarting in %.0f s", name, code, delay)
    return stop.wait(delay)
