"""Idle workers woken when a job may have become runnable: :class:`JobSignal`.

Whoever queues a job, or puts one back in the queue, wakes them at commit
(:mod:`dicomnode.jobs.queue`): on PostgreSQL a ``NOTIFY`` on
:data:`~dicomnode.jobs.queue.CHANNEL`, which the signal's thread ``LISTEN``s to; on SQLite a
datagram to each waiting worker's socket (:mod:`dicomnode.jobs.wakeups`), with a slower look
at the file's ``data_version`` for a wake-up that could not be sent.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import closing

from sqlalchemy import Engine

from dicomnode.jobs.queue import CHANNEL
from dicomnode.jobs.wakeups import Doorbell, wake_folder
from dicomnode.outage import OutageLog

# On SQLite, how often a worker woken by no datagram looks whether a job was queued anyway
# (by a process that could not reach the workers' sockets).
FALLBACK_CHECK_SECONDS = 2.0
# The longest JobSignal.start() waits for its thread to listen (or to have its socket).
START_SECONDS = 5.0

log = logging.getLogger("dicomnode.jobs")


class JobSignal:
    """Wakes idle workers when a job may have been queued.

    PostgreSQL: a connection that ``LISTEN``s to :data:`~dicomnode.jobs.queue.CHANNEL`
    (enqueue notifies at commit). SQLite: a :class:`~dicomnode.jobs.wakeups.Doorbell`, the
    socket to which enqueue sends a datagram at commit; every ``fallback_seconds`` (and, where
    no doorbell could be made, every ``check_seconds``) the file's ``data_version`` (it
    changes when another connection commits) and then the newest job id are read, without
    taking the write lock.
    Jobs that become due later (backoff, expired leases) the worker waits for itself; a job
    put back in the queue (failed, postponed, its dead worker's lease ended) wakes it to look
    at the job's new time.
    """

    def __init__(
        self,
        engine: Engine,
        check_seconds: float = 0.02,
        fallback_seconds: float = FALLBACK_CHECK_SECONDS,
    ):
        self.url = engine.url
        self.check_seconds = check_seconds
        self.fallback_seconds = fallback_seconds
        self.generation = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._doorbell: Doorbell | None = None
        # Set once the thread listens or has its socket (or has failed to, for now).
        self._started = threading.Event()

    def start(self) -> JobSignal:
        """Start the thread; returns once it listens (PostgreSQL) or has its socket (SQLite),
        so that every job queued after it wakes the workers, or after a failed try
        (logged; the workers look at the queue themselves), or after
        :data:`START_SECONDS`."""
        target = self._listen if self.url.get_backend_name() == "postgresql" else self._watch
        if self.url.get_backend_name() == "sqlite" and not self.url.database:
            return self  # in-memory database: nothing to watch; the poll finds jobs
        self._thread = threading.Thread(target=target, name="job-signal", daemon=True)
        self._thread.start()
        self._started.wait(START_SECONDS)
        return self

    def stop(self) -> None:
        self._stop.set()
        doorbell = self._doorbell
        if doorbell is not None:
            doorbell.ring()
        self._bump()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait(self, seen: int, timeout: float) -> int:
        """Wait until the generation moves past ``seen`` or ``timeout`` passes; returns it."""
        with self._cond:
            if self.generation == seen and not self._stop.is_set():
                self._cond.wait(timeout)
            return self.generation

    def _bump(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def _listen(self) -> None:
        import psycopg

        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        outage = _Outage("job notifications lost (%s); listening again, idle workers poll")
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    outage.ended("job notifications listened to again")
                    self._bump()  # notifications may have been missed while not listening
                    self._started.set()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5):
                            self._bump()
            except Exception as exc:  # the database restarts: listen again
                self._started.set()
                self._stop.wait(outage.retry_in(type(exc).__name__))

    def _watch(self) -> None:
        outage = _Outage("job watch failed (%s); watching again")
        while not self._stop.is_set():
            try:
                with closing(sqlite3.connect(self.url.database, timeout=5)) as conn:
                    self._watch_file(conn, outage)
            except sqlite3.Error as exc:
                self._started.set()
                self._stop.wait(outage.retry_in(str(exc)))

    def _watch_file(self, conn: sqlite3.Connection, outage: _Outage) -> None:
        """Bump on each wake-up, and when a look at the file finds a new job, until stopped."""
        # The socket first: a job queued after the look below rings it.
        doorbell = self._ring_here()
        try:
            version, newest = _newest_job(conn)
            outage.ended("job watch works again")
            self._bump()  # jobs may have been queued while not watching
            self._started.set()
            every = self.check_seconds if doorbell is None else self.fallback_seconds
            while not self._stop.is_set():
                if doorbell is not None and doorbell.wait(every):
                    self._bump()
                    continue
                if doorbell is None and self._stop.wait(every):
                    return
                changed = conn.execute("PRAGMA data_version").fetchone()[0]
                if changed == version:
                    continue
                version, latest = _newest_job(conn)
                if latest != newest:
                    newest = latest
                    self._bump()
        finally:
            self._doorbell = None
            if doorbell is not None:
                doorbell.close()

    def _ring_here(self) -> Doorbell | None:
        """This signal's socket in the database's wake folder; None (logged) if it cannot be
        made: the file is then looked at every ``check_seconds``, as before sockets."""
        folder = wake_folder(self.url.database)
        if folder is None:
            return None
        try:
            self._doorbell = Doorbell(folder)
        except OSError as exc:
            log.warning(
                "idle workers cannot be woken through %s (%s); this worker looks for new jobs "
                "every %.0f ms instead",
                folder,
                exc,
                self.check_seconds * 1000,
            )
            return None
        if self._stop.is_set():  # stopped while it was made: stop() rang no doorbell
            self._doorbell.ring()
        return self._doorbell


def _newest_job(conn: sqlite3.Connection) -> tuple[int, int | None]:
    """The file's ``data_version`` and its newest job id."""
    version = conn.execute("PRAGMA data_version").fetchone()[0]
    return version, conn.execute("SELECT max(id) FROM jobs").fetchone()[0]


class _Outage(OutageLog):
    """A :class:`JobSignal` thread's trouble reaching the database: one WARNING when it
    starts (``message`` with the reason), each retry at DEBUG, one INFO when it ends; retries
    back off from 1 s to 5 s (a database down for seconds logged a line a second)."""

    FIRST_SECONDS = 1.0
    LAST_SECONDS = 5.0

    def __init__(self, message: str):
        super().__init__(log)
        self.message = message
        self.delay = 0.0

    def retry_in(self, reason: str) -> float:
        """Log the failure; returns how long to wait before trying again."""
        first = self.failed(self.message, reason)
        self.delay = self.FIRST_SECONDS if first else min(self.LAST_SECONDS, self.delay * 2)
        return self.delay
