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
    """An outage in the log, for the threads that share it: a line at ``level`` when it
    starts, its further failures at DEBUG, one INFO when it ends (a line per thread and retry
    made 1 MB of log in 12 s of a database outage). ``remind_seconds``: while it lasts, a
    failure that long after the last line at ``level`` is logged at ``level`` again, with how
    long the outage has lasted (an admin who comes to the log later still sees it)."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        remind_seconds: float | None = None,
    ) -> None:
        self.logger = logger
        self.level = level
        self.remind_seconds = remind_seconds
        self._lock = threading.Lock()
        self._since: float | None = None
        self._said: float = 0.0

    def failed(
        self, message: str | None = None, *args: object, exc_info: BaseException | None = None
    ) -> bool:
        """A failure: ``message % args`` (and the traceback of ``exc_info``) at ``level`` if
        it starts the outage or is due as a reminder, else at DEBUG (nothing without a
        message); returns whether it started the outage."""
        with self._lock:
            now = time.monotonic()
            first = self._since is None
            if first:
                self._since = now
            since = self._since if self._since is not None else now
            remind = (
                not first
                and self.remind_seconds is not None
                and now - self._said >= self.remind_seconds
            )
            if first or remind:
                self._said = now
        if message is None:
            return first
        if remind:
            self.logger.log(
                self.level, f"{message} (for %.0f s now)", *args, now - since, exc_info=exc_info
            )
        else:
            level = self.level if first else logging.DEBUG
            self.logger.log(level, message, *args, exc_info=exc_info)
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
