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


class OutageLog:
    """An outage in the log, for the threads that share it: a WARNING when it starts, its
    further failures at DEBUG, one INFO when it ends (a line per thread and retry made 1 MB
    of log in 12 s of a database outage)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._lock = threading.Lock()
        self._since: float | None = None

    def failed(self, message: str | None = None, *args: object) -> bool:
        """A failure: ``message % args`` at WARNING if it starts the outage, else at DEBUG
        (nothing without a message); returns whether it started it."""
        with self._lock:
            first = self._since is None
            if first:
                self._since = time.monotonic()
        if message is not None:
            self.logger.log(logging.WARNING if first else logging.DEBUG, message, *args)
        return first

    def ended(self, message: str) -> None:
        """The outage, if there is one, is over: ``message`` at INFO, once; a
        ``%(seconds).0f`` in it says how long the outage lasted."""
        if self._since is None:
            return  # the common case, without the lock
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            self.logger.info(message, {"seconds": time.monotonic() - since})
