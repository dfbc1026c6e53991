"""The worker while PostgreSQL refuses connections: its job threads back off (doubling up to
30 s) and log one line when the database becomes unavailable and one when it is available
again, instead of a traceback per thread and poll (the admin review measured 1 MB of log in
12 s); the jobs queued meanwhile run once it answers.

The outage is real: the worker's URL points at a port where nothing listens, until a TCP
forwarder to the test PostgreSQL starts listening there.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import spool_and_index, wait_for
from sqlalchemy import select
from test_assembly_outage import _refuse_connections, private_database  # noqa: F401

from dicomnode import worker as worker_module
from dicomnode.config import Settings
from dicomnode.db.models import Job
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
from dicomnode.jobs.queue import enqueue
from dicomnode.ports import free_port
from dicomnode.synth.cxr import make_cxr
from dicomnode.worker import Worker

OUTAGE_SECONDS = 3.0


class Forwarder:
    """Accepts on ``port`` and relays each connection to ``target`` (the database answers
    again on the port the worker uses)."""

    def __init__(self, port: int, target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server(("127.0.0.1", port))
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop listening and drop every relayed connection (as a stopped server does)."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _analysis(db_url: str, settings: Settings, seed: int) -> int:
    """Queue an analysis of a new study (no models: it is done at once); its job's id."""
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            ds, _ = make_cxr(seed, size=64)
            study_id, _ = spool_and_index(session, settings.storage_path, ds)
            job = enqueue(session, "analyse", study_id, {"generation": 1})
            session.commit()
            return job.id
    finally:
        engine.dispose()


def _done(db_url: str, job_id: int) -> bool:
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            return session.scalar(select(Job.state).where(Job.id == job_id)) == "done"
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_worker_waits_out_a_refusing_database_with_one_line_each_way(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    upgrade(db_url)
    settings = Settings(
        storage={"path": tmp_path / "storage"}, worker={"threads": 2, "poll_seconds": 0.05}
    )
    real = urlsplit(db_url)
    target = (real.hostname or "127.0.0.1", real.port or 5432)
    port = free_port()
    engine = make_engine(db_url.replace(f"{real.hostname}:{real.port}", f"127.0.0.1:{port}"))
    worker = Worker(settings, make_sessionmaker(engine), cards=[])
    stop = threading.Event()
    runner = threading.Thread(target=worker.run_forever, args=(stop,))
    forwarder = Forwarder(port, target)
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode"):
            runner.start()
            before = _analysis(db_url, settings, 940_001)
            wait_for(lambda: _done(db_url, before), timeout=30, what="the first analysis done")
            # PostgreSQL goes away: connections dropped, new ones refused. (Counted from before
            # the close: the first line may come at once.)
            seen = len(caplog.records)
            forwarder.close()
            time.sleep(OUTAGE_SECONDS / 2)
            during_outage = _analysis(db_url, settings, 940_002)
            time.sleep(OUTAGE_SECONDS / 2)
            during = [r for r in caplog.records[seen:] if r.name.startswith("dicomnode")]
            forwarder = Forwarder(port, target)
            wait_for(
                lambda: _done(db_url, during_outage),
                timeout=45,
                what="the analysis queued during the outage done once the database answers",
            )
            after = [r.getMessage() for r in caplog.records[seen + len(during) :]]
    finally:
        stop.set()
        runner.join(timeout=30)
        forwarder.close()
        engine.dispose()
    lines = [r.getMessage() for r in during if r.levelno >= logging.WARNING]
    # The outage and the job notifications lost; no traceback, nothing per retry (a line of
    # the first analysis's jobs ending may still come at INFO).
    assert len(lines) <= 3, lines
    assert sum(line.startswith("database unavailable: ") for line in lines) == 1, lines
    assert not any(r.exc_info for r in during), lines
    assert sum(line.startswith("database available again") for line in after) == 1, after


def test_a_lasting_outage_is_recalled_at_most_every_reminder_period(
    tmp_path: Path,
    private_database: tuple[str, str],  # noqa: F811 (the fixture imported above)
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL refusing the worker's database (ALLOW_CONNECTIONS false, its connections
    ended): one WARNING when the job threads' failures start, a reminder with how long it has
    lasted while they go on (at most every DATABASE_REMINDER_SECONDS, patched to 2 s; before,
    none however long the outage), one line when the database answers again."""
    monkeypatch.setattr(worker_module, "DATABASE_REMINDER_SECONDS", 2.0)
    url, name = private_database
    settings = Settings(
        storage={"path": tmp_path / "storage"}, worker={"threads": 2, "poll_seconds": 0.05}
    )
    engine = make_engine(url)
    worker = Worker(settings, make_sessionmaker(engine), cards=[])
    stop = threading.Event()
    runner = threading.Thread(target=worker.run_forever, args=(stop,))

    def unavailable(since: int) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records[since:]
            if r.name == "dicomnode.worker"
            and r.levelno >= logging.WARNING
            and r.getMessage().startswith("database unavailable: ")
        ]

    try:
        with caplog.at_level(logging.INFO, logger="dicomnode"):
            runner.start()
            first = _analysis(url, settings, 940_003)
            wait_for(lambda: _done(url, first), timeout=60, what="the first analysis done")
            seen = len(caplog.records)
            _refuse_connections(name, refused=True)
            # The job threads retry after 0.5, 1, 2, 4, 8 s: a reminder is due from the
            # failure 2 s or more after the first line; two of them come within ~16 s.
            wait_for(
                lambda: len(unavailable(seen)) >= 3,
                timeout=60,
                interval=0.1,
                what="the outage's line and two reminders",
            )
            during = len(caplog.records)
            _refuse_connections(name, refused=False)
            wait_for(
                lambda: any(
                    r.getMessage().startswith("database available again")
                    for r in caplog.records[during:]
                ),
                timeout=90,
                interval=0.1,
                what="the line saying the database is available again",
            )
            later = _analysis(url, settings, 940_004)
            wait_for(lambda: _done(url, later), timeout=60, what="an analysis done after it")
            records = caplog.records[seen:]
    finally:
        stop.set()
        runner.join(timeout=30)
        engine.dispose()
    lines = unavailable(0)
    said = [(r.levelname, r.getMessage()) for r in lines]
    assert all(level == "WARNING" for level, _ in said), said
    start, *reminders = said
    assert "(for " not in start[1], start
    # Why, in the driver's words (they depend on when the termination reaches it): the
    # connection ended, or refused.
    assert any(
        words in start[1]
        for words in ("not currently accepting connections", "terminating", "server closed")
    ), start
    assert len(reminders) >= 2 and all(" s now)" in line for _, line in reminders), said
    # At most one per period, whichever thread failed (stamps of the same clock as the log's).
    stamps = [r.created for r in lines]
    assert all(b - a >= 1.9 for a, b in itertools.pairwise(stamps)), stamps
    assert not any(r.exc_info for r in records if r.levelno >= logging.WARNING), said
    back = [r.getMessage() for r in records if r.getMessage().startswith("database available")]
    assert len(back) == 1, back
