"""Outages the worker waits out instead of failing its jobs: the database unavailable (a
job thread backs off and retries) and a file system out of space (a results job waits for
room). What tells them from errors that should fail a job, and the log lines of an outage.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

# The worker's lines: operators and their log filters know them by this name.
log = logging.getLogger("dicomnode.worker")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it, e.g. a ``SpoolError``) is a file system out of
    space or quota."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__
    return False


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or used now (refused, restarting,
    connection lost), not that a statement is wrong."""
    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def database_reason(exc: BaseException) -> str:
    """The driver's first line of why (SQLAlchemy's own text quotes the statement and its
    parameters, which may hold patient data)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class DatabaseOutage:
    """The database as the job threads see it, shared by them: one WARNING when it becomes
    unavailable and one when it is available again, instead of a traceback per thread and
    retry (1 MB of log in 12 s of outage); each retry's error is at DEBUG.
    ``retry_last_seconds``: the longest wait between the threads' retries, for the WARNING."""

    def __init__(self, retry_last_seconds: float) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None
        self.retry_last_seconds = retry_last_seconds

    def failed(self, exc: BaseException, retry: float) -> None:
        with self._lock:
            first = self.since is None
            if first:
                self.since = time.monotonic()
        if first:
            log.warning(
                "database unavailable: %s; retrying in %.1f s, then at least every %.0f s",
                database_reason(exc),
                retry,
                self.retry_last_seconds,
            )
        log.debug("job thread: database unavailable; retrying in %.1f s", retry, exc_info=exc)

    def recovered(self) -> None:
        if self.since is None:
            return  # the common case, without the lock
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            log.info("database available again after %.0f s", time.monotonic() - since)
