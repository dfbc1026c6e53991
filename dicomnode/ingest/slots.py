"""The node-wide association limit shared by several listener processes.

Each listener process owns one counter (a little-endian uint32) in a small file; a
listener admits an association only if the sum of all counters is below
``[node] max_associations``, checking and counting under an exclusive ``flock`` so two
processes cannot both take the last slot. A lock held by a process that dies is released
by the kernel; the supervisor zeroes a dead listener's counter before restarting it.

``flock`` excludes other processes only: the association threads of one listener share its
descriptor, and one holder of a lock is not kept out by another of the same descriptor. A
lock of the instance's own keeps them apart (else two threads read the same count and one
increment or release is lost: a slot over the limit, or one taken until the restart).
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_COUNTER = struct.Struct("<I")


def create_slots(path: Path, listeners: int) -> None:
    """Write a slots file with one zero counter per listener."""
    path.write_bytes(b"\0" * (_COUNTER.size * listeners))


@contextmanager
def locked(fd: int, threads: threading.Lock) -> Iterator[None]:
    """Hold a file shared by listener processes: this process's threads one at a time
    (``threads``), then the other processes (``flock`` on ``fd``). Both are needed: ``flock``
    does not keep apart the threads that share one descriptor. Used by the association
    counters here and the per-address counts (:mod:`dicomnode.ingest.addresses`)."""
    with threads:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


class AssociationSlots:
    """One listener's view of the shared association counters."""

    def __init__(self, path: Path, index: int):
        self.path = path
        self.index = index
        self._fd = os.open(path, os.O_RDWR)
        self._threads = threading.Lock()

    def _counters(self) -> list[int]:
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        return [value for (value,) in _COUNTER.iter_unpack(data)]

    def _write(self, value: int) -> None:
        os.pwrite(self._fd, _COUNTER.pack(value), self.index * _COUNTER.size)

    def acquire(self, limit: int) -> bool:
        """Count one more association here unless the node already serves ``limit``."""
        with locked(self._fd, self._threads):
            counters = self._counters()
            if sum(counters) >= limit:
                return False
            self._write(counters[self.index] + 1)
            return True

    def add(self) -> None:
        """Count one more here, whatever the others count (a connection, not a slot)."""
        self.acquire(sys.maxsize)

    def release(self) -> None:
        """Count one association less here."""
        with locked(self._fd, self._threads):
            self._write(max(0, self._counters()[self.index] - 1))

    def reset(self) -> None:
        """Zero this listener's counter (its process is gone)."""
        with locked(self._fd, self._threads):
            self._write(0)

    def counters(self) -> list[int]:
        """Every listener's count, this one's at :attr:`index`."""
        return self._counters()

    def total(self) -> int:
        """Associations counted over all listeners."""
        return sum(self._counters())

    def close(self) -> None:
        os.close(self._fd)
