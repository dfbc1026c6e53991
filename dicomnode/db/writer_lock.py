"""One SQLite index writer at a time, woken without polling.

SQLite allows one write transaction at a time; a second writer waits in SQLite's busy
handler, which sleeps 1, 2, 5, 10 ... ms between tries. Index transactions last about
0.3 ms, so with several writers those sleeps, not the work, would set the pace. The index
writers (:mod:`dicomnode.ingest.indexer`: the supervisor's under ``dicomnode serve``, or
one per process that runs a listener on its own) queue on an ``flock`` of a file beside the
database instead (and on a thread lock, since ``flock`` does not exclude threads that share
one open file): the kernel hands the lock to the next writer as soon as it is released.
Workers and the web do not take it; they meet the index writers in SQLite's busy handler
as before. PostgreSQL waits on row locks without polling, so there this lock is a no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine


class WriterLock:
    """Serialises write transactions of the processes that share ``path`` (None: no-op)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    @classmethod
    def for_engine(cls, engine: Engine | None) -> WriterLock:
        """The lock for an engine's database: a file beside a SQLite database, else none."""
        if engine is None or engine.dialect.name != "sqlite":
            return cls(None)
        database = engine.url.database
        if not database or database == ":memory:":
            return cls(None)
        return cls(Path(f"{database}.writers"))

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the block (a write transaction that commits inside it)."""
        if self.path is None:
            yield
            return
        with self._thread_lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self) -> int:
        if self._fd is None:
            assert self.path is not None
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        return self._fd
