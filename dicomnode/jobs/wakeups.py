"""Idle workers on SQLite woken by whoever queues a job: one Unix datagram socket per
waiting worker, in a folder beside the database file (``dicomnode.db-workers``).

PostgreSQL has ``LISTEN``/``NOTIFY`` for this; SQLite has nothing a process can block on,
and reading the file's ``data_version`` often enough for a study's triage to start at once
(every 20 ms) woke an idle worker 50 times a second. Here the process that commits a job
sends one empty datagram to each socket in the folder; a worker blocks on its socket. A
socket that refuses the datagram belongs to a worker that is gone (killed before it removed
it): the sender removes it. The worker's slow ``data_version`` check stays as a fallback for
a wake-up that could not be sent (the folder not writable by that process).

Linux limits a socket's path to 107 bytes; a longer one is reached through the folder's
descriptor (``/proc/self/fd/N/name``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
from pathlib import Path

from dicomnode.folders import make_folders

log = logging.getLogger("dicomnode.jobs")

# The folder's name: the database file's, with this after it.
FOLDER_SUFFIX = "-workers"
# Socket paths up to this long are used as they are; longer ones through /proc/self/fd.
_SHORT_PATH = 100
# A datagram's content does not matter: one or many queued, the worker looks once.
_RING = b"!"
_numbers = itertools.count()
# The sockets whose wake-up failed for a reason other than a worker gone or busy, logged
# once each per process (every commit of a job tries them again).
_warned: set[str] = set()


def wake_folder(database: str | None) -> Path | None:
    """The folder of the wake-up sockets of the SQLite file ``database`` (None for an
    in-memory database: no other process can queue a job in it)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    # Every process names the folder of the same file (a relative path or a link to it).
    return Path(os.path.realpath(database) + FOLDER_SUFFIX)


def _address(folder: Path, folder_fd: int, name: str) -> str:
    path = str(folder / name)
    return path if len(os.fsencode(path)) <= _SHORT_PATH else f"/proc/self/fd/{folder_fd}/{name}"


def wake_all(folder: Path) -> int:
    """Send a wake-up to every worker socket in ``folder``, never blocking; remove the
    sockets of workers that are gone. A socket that cannot be reached otherwise (another
    user's: a root worker's left by a kill) is skipped, not the ones after it. Returns how
    many were sent (0 when the folder is not there: no worker waits on one)."""
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return 0
    sent = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            for name in os.listdir(folder_fd):
                sent += _send(sender, folder, folder_fd, name)
    except OSError as exc:
        log.debug("idle workers not woken through %s: %s", folder, exc)
    finally:
        os.close(folder_fd)
    return sent


def _send(sender: socket.socket, folder: Path, folder_fd: int, name: str) -> int:
    try:
        sender.sendto(_RING, socket.MSG_DONTWAIT, _address(folder, folder_fd, name))
    except ConnectionRefusedError:  # nobody reads it: its worker is gone
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=folder_fd)
        return 0
    except (BlockingIOError, FileNotFoundError):
        # Its queue is full (it has wake-ups to read already), or it has just stopped.
        return 0
    except OSError as exc:
        path = str(folder / name)
        if path not in _warned:
            _warned.add(path)
            log.warning(
                "idle worker socket %s cannot be woken (%s); a worker waiting on it finds new "
                "jobs only by its slower look at the database",
                path,
                exc,
            )
        return 0
    return 1


class Doorbell:
    """A waiting worker's socket in the wake folder: bound on creation, removed by
    :meth:`close`."""

    def __init__(self, folder: Path):
        make_folders(folder)
        self.folder = folder
        self.name = f"{os.getpid()}.{next(_numbers)}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Connected to the socket, for ring(): the path may be the folder descriptor's.
        self._ringer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            address = _address(folder, folder_fd, self.name)
            with contextlib.suppress(FileNotFoundError):  # a dead process's with this pid
                os.unlink(self.name, dir_fd=folder_fd)
            self.socket.bind(address)
            self._ringer.connect(address)
        except OSError:
            self.socket.close()
            self._ringer.close()
            raise
        finally:
            os.close(folder_fd)

    def wait(self, timeout: float) -> bool:
        """Block until a wake-up comes (True; every one queued is read) or ``timeout``
        seconds pass (False)."""
        self.socket.settimeout(timeout)
        try:
            self.socket.recv(16)
        except TimeoutError:
            return False
        self.socket.setblocking(False)  # with a timeout, recv would wait for more
        with contextlib.suppress(BlockingIOError):
            while True:
                self.socket.recv(16)
        return True

    def ring(self) -> None:
        """Wake this doorbell's :meth:`wait` (from another thread: a stop)."""
        with contextlib.suppress(OSError):  # its queue is full: it wakes anyway
            self._ringer.send(_RING, socket.MSG_DONTWAIT)

    def close(self) -> None:
        """Remove the socket from the folder and close it."""
        with contextlib.suppress(OSError):
            folder_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.unlink(self.name, dir_fd=folder_fd)
            finally:
                os.close(folder_fd)
        self._ringer.close()
        self.socket.close()
