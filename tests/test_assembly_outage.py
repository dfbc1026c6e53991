"""The supervisor's assembly check while it cannot do its work: one line when the failures
start, the retries at DEBUG (backing off), a reminder at most every
``ASSEMBLY_REMINDER_SECONDS``, one line when they end; and the studies are queued once it
works again. Before, each retry logged ERROR with a ~110-line traceback, once a second
(3,400 lines of log in 30 s of a database outage).

The failures are real: a PostgreSQL database of the test's own whose connections are refused
(``ALLOW_CONNECTIONS false``, its server processes terminated), and a table gone from under
the check (renamed: an unexpected error, which keeps its traceback, rate-limited).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from conftest import POSTGRES_URL, require_postgres, wait_for
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from test_assembly import FACTS, STUDY_UID

from dicomnode import serve
from dicomnode.config import WorklistSettings
from dicomnode.db.models import Study
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade, utcnow
from dicomnode.ingest.assembly import ReadyTimes
from dicomnode.ingest.index import index_instance

ADMIN_URL = POSTGRES_URL.replace("postgresql+psycopg", "postgresql")
QUIET = 0.2


class AssemblyLoop:
    """:func:`dicomnode.serve.assembly_loop` in a thread, as serve runs it (its period), with
    the times of its checks."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.checks: list[float] = []
        self.ready, self.stop = ReadyTimes(), threading.Event()

        def counted() -> Session:
            self.checks.append(time.monotonic())
            return sessions()

        self.thread = threading.Thread(
            target=serve.assembly_loop,
            args=(counted, self.stop, self.ready, serve.ASSEMBLY_PERIOD_SECONDS),
            daemon=True,
            name="assembly",
        )
        self.thread.start()

    def wait_for_first_check(self) -> None:
        wait_for(lambda: self.checks, timeout=60, interval=0.05, what="the first check")

    @staticmethod
    def wait_for_failures(caplog: pytest.LogCaptureFixture, since: int, count: int) -> None:
        """Until ``count`` failed checks have been logged (at any level) after the first
        ``since`` records; their retries back off: 1, 2, 4 s."""
        wait_for(
            lambda: len(_failures(caplog, since)) >= count,
            timeout=60,
            interval=0.05,
            what=f"{count} failed checks",
        )

    def close(self) -> None:
        self.stop.set()
        self.ready.written(utcnow())  # wakes its wait
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def _index_a_quiet_study(sessions: sessionmaker[Session]) -> None:
    """A study whose quiet period ends at once, as the index writer writes it."""
    with sessions() as session:
        index_instance(
            session,
            FACTS,
            path="/spool/x.dcm",
            size_bytes=1,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_ae="MODALITY",
            now=utcnow() - timedelta(seconds=QUIET),
            quiet_seconds=QUIET,
            worklist=WorklistSettings(),
        )


def _queued(sessions: sessionmaker[Session]) -> bool:
    with sessions() as session:
        status = session.scalar(
            select(Study.analysis_status).where(Study.study_instance_uid == STUDY_UID)
        )
    return status == "queued"


def _failures(caplog: pytest.LogCaptureFixture, since: int) -> list[logging.LogRecord]:
    """The failed checks logged after the first ``since`` records."""
    return [
        record
        for record in _assembly_lines(caplog, since)
        if record.getMessage().startswith(("assembly check failed", "assembly check: database un"))
    ]


def _assembly_lines(caplog: pytest.LogCaptureFixture, since: int) -> list[logging.LogRecord]:
    """The assembly loop's records (logger ``dicomnode``) after the first ``since``."""
    return [record for record in caplog.records[since:] if record.name == "dicomnode"]


@pytest.fixture
def private_database() -> Iterator[tuple[str, str]]:
    """A migrated PostgreSQL database of this test's own (its connections are refused, no
    other test's): its URL and name."""
    require_postgres()
    name = f"dicomnode_assembly_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
        upgrade(url)
        yield url, name
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _refuse_connections(name: str, refused: bool) -> None:
    """``ALTER DATABASE ... ALLOW_CONNECTIONS``; when refused, its open connections are ended
    too (as a server restart or an admin does)."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if refused else "true"}')
        if refused:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


def test_a_database_refusing_connections_is_logged_once_each_way(
    private_database: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url, name = private_database
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    loop = AssemblyLoop(sessions)
    try:
        with caplog.at_level(logging.DEBUG, logger="dicomnode"):
            loop.wait_for_first_check()
            seen = len(caplog.records)
            _refuse_connections(name, refused=True)
            # Four failed checks: before, four ERROR lines with a traceback each.
            loop.wait_for_failures(caplog, seen, 4)
            during = _assembly_lines(caplog, seen)
            _refuse_connections(name, refused=False)
            _index_a_quiet_study(sessions)
            wait_for(lambda: _queued(sessions), timeout=30, what="the study queued after it")
            after = _assembly_lines(caplog, seen)[len(during) :]
    finally:
        loop.close()
        engine.dispose()
    said = [(r.levelname, r.getMessage()) for r in during if r.levelno > logging.DEBUG]
    assert len(said) == 1, said
    ((level, line),) = said
    assert level == "WARNING", said
    # Why, in the driver's words: the connection ended (libpq's words depend on when the
    # termination reached it), or refused.
    assert line.startswith("assembly check: database unavailable: "), line
    assert any(
        words in line
        for words in ("not currently accepting connections", "terminating", "server closed")
    ), line
    assert not any(r.exc_info for r in during if r.levelno > logging.DEBUG), said
    # The retries are there, at DEBUG.
    retries = [r for r in during if r.levelno == logging.DEBUG]
    assert len(retries) >= 3, said
    back = [r.getMessage() for r in after if r.getMessage().startswith("assembly check: ")]
    assert len(back) == 1, back
    assert back[0].startswith("assembly check: database available again after "), back


# PostgreSQL: SQLite's "no such table" is an OperationalError, which outage.database_unavailable
# takes for the database unavailable.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_unexpected_error_keeps_its_traceback_rate_limited(
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A reminder every 2.5 s: the checks below span 1 + 2 + 4 s at least.
    monkeypatch.setattr(serve, "ASSEMBLY_REMINDER_SECONDS", 2.5)
    loop = AssemblyLoop(sessions)
    try:
        with caplog.at_level(logging.DEBUG, logger="dicomnode"):
            loop.wait_for_first_check()
            seen = len(caplog.records)
            with sessions() as session:
                session.execute(text("ALTER TABLE studies RENAME TO studies_away"))
                session.commit()
            loop.wait_for_failures(caplog, seen, 4)
            during = _assembly_lines(caplog, seen)
            with sessions() as session:
                session.execute(text("ALTER TABLE studies_away RENAME TO studies"))
                session.commit()
            _index_a_quiet_study(sessions)
            wait_for(lambda: _queued(sessions), timeout=30, what="the study queued after it")
            after = _assembly_lines(caplog, seen)[len(during) :]
    finally:
        loop.close()
    errors = [r for r in during if r.levelno >= logging.ERROR]
    failed = [r for r in during if r.getMessage().startswith("assembly check failed")]
    assert len(failed) >= 4, [r.getMessage() for r in during]
    # The first failure and the reminders (each with how long it has lasted) at ERROR with
    # their traceback; the others at DEBUG.
    assert errors[0] is failed[0], [r.getMessage() for r in errors]
    assert "(for " not in errors[0].getMessage(), errors[0].getMessage()
    assert 2 <= len(errors) < len(failed), [r.getMessage() for r in errors]
    assert all(r.exc_info for r in errors), [r.getMessage() for r in errors]
    assert all(" s now)" in r.getMessage() for r in errors[1:]), [r.getMessage() for r in errors]
    back = [r.getMessage() for r in after if r.getMessage().startswith("assembly check")]
    assert len(back) == 1, back
    assert back[0].startswith("assembly check works again after "), back
