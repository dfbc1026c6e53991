"""The log lines of :class:`~dicomnode.jobs.waiting.JobSignal`'s threads while the database
cannot be reached: one WARNING when the outage starts, its retries at DEBUG (backing off 1 s,
2 s, ...), one INFO when the thread watches or listens again; and then a queued job wakes an
idle worker again, which is what the thread is for.

The outages are real: an SQLite file in a folder that does not exist yet, moved into place
already migrated; a PostgreSQL database that does not exist yet, then created.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import POSTGRES_URL, require_postgres, wait_for
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker
from test_jobs import make_study

from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
from dicomnode.jobs.queue import enqueue
from dicomnode.jobs.waiting import JobSignal

LOGGER = "dicomnode.jobs"


def signal_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The job signal's log records so far."""
    return [record for record in caplog.records if record.name == LOGGER]


def signal_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """The job signal's log lines so far: (level, message)."""
    return [(record.levelno, record.getMessage()) for record in signal_records(caplog)]


def retried_at_debug(caplog: pytest.LogCaptureFixture, failure: str) -> bool:
    """Whether the outage's first retry has been logged (and failed) at DEBUG."""
    return any(
        level == logging.DEBUG and failure in message for level, message in signal_lines(caplog)
    )


def assert_one_outage(
    caplog: pytest.LogCaptureFixture, warning: str, failure: str, info: str
) -> None:
    """One WARNING ``warning``, then only DEBUG retries that say ``failure``, backing off
    (1 s, 2 s, ...), then one INFO ``info``, and nothing after it above DEBUG."""
    lines = signal_lines(caplog)
    levels = [level for level, _ in lines]
    assert levels.count(logging.WARNING) == 1, lines
    assert levels.count(logging.INFO) == 1, lines
    start, end = levels.index(logging.WARNING), levels.index(logging.INFO)
    assert lines[start][1] == warning, lines
    assert lines[end][1] == info, lines
    retries = lines[start + 1 : end]
    assert retries, f"no retry logged between the WARNING and the INFO: {lines}"
    assert all(level == logging.DEBUG and failure in text for level, text in retries), lines
    assert all(level == logging.DEBUG for level in levels[:start] + levels[end + 1 :]), lines
    failed_at = [record.created for record in signal_records(caplog)[start:end]]
    gaps = [later - earlier for earlier, later in pairwise(failed_at)]
    backoff = [min(5.0, 2.0**n) for n in range(len(gaps))]
    assert all(gap >= 0.9 * wait for gap, wait in zip(gaps, backoff, strict=True)), gaps


def wakes_waiter(signal: JobSignal, queue_job: Callable[[], None]) -> None:
    """A worker waiting on ``signal`` stays asleep until ``queue_job`` runs, then wakes
    (long before its wait's timeout, however loaded the machine)."""
    seen = signal.generation
    woken: list[tuple[int, float]] = []

    def idle_worker() -> None:
        started = time.monotonic()
        woken.append((signal.wait(seen, timeout=30.0), time.monotonic() - started))

    waiter = threading.Thread(target=idle_worker, daemon=True)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), f"woken with no job queued: {woken}"
    queue_job()
    waiter.join(timeout=40)
    ((generation, waited),) = woken
    assert generation > seen, f"not woken by the queued job (waited {waited:.1f} s)"
    assert waited < 10.0, waited


@pytest.fixture
def job_signal_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="dicomnode"):
        yield caplog


def _queue_analysis(sessions: sessionmaker[Session], study_id: int) -> Callable[[], None]:
    """What queues an analysis job of ``study_id`` (its commit is what wakes the signal)."""

    def queue() -> None:
        with sessions() as session:
            enqueue(session, "analyse", study_id, {"generation": 1})
            session.commit()

    return queue


def test_sqlite_watch_logs_one_warning_then_debug_then_info(
    tmp_path: Path, job_signal_log: pytest.LogCaptureFixture
) -> None:
    caplog = job_signal_log
    # The node's folder is not there yet (an unmounted volume): SQLite cannot open the file.
    database = tmp_path / "node" / "dicomnode.db"
    engine = create_engine(f"sqlite:///{database}")  # make_engine would create the folder
    signal = JobSignal(engine).start()
    node = None
    try:
        failure = "unable to open database file"
        wait_for(lambda: retried_at_debug(caplog, failure), timeout=20, what="a DEBUG retry")
        # The folder appears with the database already migrated (one rename: the thread never
        # sees a file without the jobs table).
        staging = tmp_path / "staging"
        url = f"sqlite:///{staging / 'dicomnode.db'}"
        upgrade(url)
        staged = make_engine(url)
        with make_sessionmaker(staged)() as session:
            study_id = make_study(session)
        staged.dispose()
        os.rename(staging, database.parent)
        wait_for(
            lambda: (logging.INFO, "job watch works again") in signal_lines(caplog),
            timeout=30,  # the next retry: up to 5 s (the backoff's longest) after the fix
            what="the INFO that the watch works again",
        )

        node = make_engine(f"sqlite:///{database}")
        wakes_waiter(signal, _queue_analysis(make_sessionmaker(node), study_id))
    finally:
        signal.stop()
        if node is not None:
            node.dispose()
    assert_one_outage(
        caplog,
        warning=f"job watch failed ({failure}); watching again",
        failure=failure,
        info="job watch works again",
    )


def test_postgresql_listen_logs_one_warning_then_debug_then_info(
    job_signal_log: pytest.LogCaptureFixture,
) -> None:
    require_postgres()
    import psycopg

    caplog = job_signal_log
    admin = POSTGRES_URL.replace("postgresql+psycopg", "postgresql")
    name = f"dicomnode_signal_{uuid.uuid4().hex[:12]}"
    # The same server, a database that does not exist yet: every connection is refused.
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    signal = JobSignal(create_engine(url)).start()
    engine = None
    try:
        failure = "job notifications lost (OperationalError)"
        wait_for(lambda: retried_at_debug(caplog, failure), timeout=20, what="a DEBUG retry")
        before = signal.generation
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        upgrade(url)
        wait_for(
            lambda: (logging.INFO, "job notifications listened to again") in signal_lines(caplog),
            timeout=30,  # the next retry: up to 5 s (the backoff's longest) after the fix
            what="the INFO that notifications are listened to again",
        )
        # Listening again counts as a wake-up (notifications were missed meanwhile).
        wait_for(lambda: signal.generation > before, timeout=10, what="the wake-up on listening")
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            study_id = make_study(session)
        wakes_waiter(signal, _queue_analysis(sessions, study_id))
    finally:
        signal.stop()
        if engine is not None:
            engine.dispose()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert_one_outage(
        caplog,
        warning="job notifications lost (OperationalError); listening again, idle workers poll",
        failure=failure,
        info="job notifications listened to again",
    )
