"""Index rows written behind the acknowledgement (dicomnode/ingest/indexer.py): batches,
order with association ends, the supervisor's writer over a socket pair, the database
going away and coming back, and a node killed with rows still queued."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import dcmtk, launch_node, stop_process, wait_for, write_config
from pydicom.uid import generate_uid
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.orm import Session, sessionmaker
from test_ingest_scale import DCMTK_ENV, instance_rows, sop_instance_uid, write_studies

from dicomnode.config import Settings
from dicomnode.db.models import Instance, Series, Study
from dicomnode.db.session import as_utc, make_engine, make_sessionmaker
from dicomnode.ingest import indexer, sink
from dicomnode.ingest.arrival import Arrival, InstanceFacts
from dicomnode.ingest.indexer import IndexService, LocalIndex, write_items
from dicomnode.ingest.sink import AssociationEnded, RemoteIndex
from dicomnode.ports import wait_for_port

QUIET = 2.0
T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _settings() -> Settings:
    return Settings.model_validate({"assembly": {"quiet_seconds": QUIET}})


def _arrival(study: str, series: str, at: datetime, sop: str | None = None) -> Arrival:
    facts = InstanceFacts(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop or generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        patient_id="IDX",
        modality="CT",
    )
    return Arrival(
        facts, f"/spool/{facts.sop_instance_uid}.dcm", 10, "1.2.840.10008.1.2.1", "CT1", at
    )


def _study(session: Session, uid: str) -> Study:
    return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def test_a_batch_writes_each_series_and_study_once_and_skips_known_instances(
    sessions: sessionmaker[Session],
) -> None:
    study, first_series, second_series = generate_uid(), generate_uid(), generate_uid()
    known = _arrival(study, first_series, T0)
    with sessions() as session:
        write_items(session, [known], _settings())
    batch = [
        _arrival(study, first_series, T0 + timedelta(seconds=1)),
        _arrival(study, second_series, T0 + timedelta(seconds=3)),
        _arrival(study, first_series, T0 + timedelta(seconds=2)),
        known,  # a resent instance: already indexed, must not fail the batch
    ]
    with sessions() as session:
        write_items(session, batch, _settings())
        row = _study(session, study)
        assert row.received_generation == 4  # one per stored instance, the resent one not
        assert as_utc(row.last_instance_at) == T0 + timedelta(seconds=3)
        assert as_utc(row.ready_at) == T0 + timedelta(seconds=3 + QUIET)
        assert session.scalar(select(func.count()).select_from(Instance)) == 4
        assert session.scalar(select(func.count()).select_from(Series)) == 2


def test_an_association_end_applies_after_the_arrivals_before_it_not_after_later_ones(
    sessions: sessionmaker[Session],
) -> None:
    study, series = generate_uid(), generate_uid()
    ended_late = T0 + timedelta(seconds=10)
    with sessions() as session:
        write_items(
            session,
            [_arrival(study, series, T0), AssociationEnded((study,), ended_late)],
            _settings(),
        )
        assert as_utc(_study(session, study).ready_at) == ended_late + timedelta(seconds=QUIET)
    # An end queued before a newer arrival (another association) does not pull the
    # deadline back before that arrival's.
    newer = T0 + timedelta(seconds=30)
    with sessions() as session:
        write_items(
            session,
            [
                AssociationEnded((study,), T0 + timedelta(seconds=20)),
                _arrival(study, series, newer),
            ],
            _settings(),
        )
        assert as_utc(_study(session, study).ready_at) == newer + timedelta(seconds=QUIET)


def test_a_row_the_database_refuses_does_not_hold_up_the_others(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    study, series = generate_uid(), generate_uid()
    refused = dataclasses.replace(_arrival(study, series, T0), path=None)  # NOT NULL column
    good = _arrival(study, series, T0)
    index = LocalIndex(lambda: sessions, _settings)
    try:
        index.add(refused)
        assert index.wait(index.add(good), 10)
        assert index.healthy
    finally:
        index.close()
    with sessions() as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)))
    assert uids == {good.facts.sop_instance_uid}
    assert f"cannot index instance {refused.facts.sop_instance_uid}" in caplog.text
    assert "database unavailable" not in caplog.text


def _refusing_every_write(db_url: str, folder: Path, refusal: str) -> Engine:
    """An engine on a database that answers but takes no rows: read-only (a PostgreSQL
    standby after a failover; an SQLite file opened read-only), or without the node's tables
    (an empty database restored by mistake)."""
    if db_url.startswith("sqlite"):
        if refusal == "read-only":
            engine = make_engine(db_url)
            event.listen(
                engine, "connect", lambda connection, _: connection.execute("PRAGMA query_only=1")
            )
            return engine
        return make_engine(f"sqlite:///{folder / 'empty.db'}")
    if refusal == "read-only":
        return make_engine(f"{db_url}%20-cdefault_transaction_read_only%3Don")
    return make_engine(db_url.replace("search_path%3D", "search_path%3Dno_such_"))


@pytest.mark.parametrize("refusal", ["read-only", "no tables"])
def test_a_database_that_takes_no_rows_holds_them_all_and_refuses_new_instances(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    refusal: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, a PostgreSQL error other than a lost connection (read-only transaction, no
    such table, permission denied) was taken for the row's own: each row was logged as
    "cannot index" and left out, its instance acknowledged, never analysed until a restart
    re-indexed the spool, while new instances were still accepted. Now the database is
    unavailable: the rows wait, new instances are refused (0xA700), and they are written
    once it takes rows again."""
    monkeypatch.setattr(indexer, "RETRY_SECONDS", 0.1)
    refusing = _refusing_every_write(db_url, tmp_path, refusal)
    current = {"sessions": make_sessionmaker(refusing)}
    index = LocalIndex(lambda: current["sessions"], _settings)
    arrival = _arrival(generate_uid(), generate_uid(), T0)
    try:
        waiting = index.add(arrival)
        wait_for(lambda: not index.healthy, timeout=10, what="the database to be unavailable")
        assert not index.wait(waiting, 0.5)
        current["sessions"] = sessions
        assert index.wait(waiting, 10)
        assert index.healthy
    finally:
        index.close()
        refusing.dispose()
    with sessions() as session:
        assert set(session.scalars(select(Instance.sop_instance_uid))) == {
            arrival.facts.sop_instance_uid
        }
    assert "cannot index" not in caplog.text
    assert "database unavailable: 1 index row(s) wait" in caplog.text


def test_supervisor_writer_over_a_socket_pair_reports_rows_and_database_health(
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(indexer, "RETRY_SECONDS", 0.1)
    current = {"sessions": sessions}
    ready_at: list[datetime] = []
    service = IndexService(lambda: current["sessions"], _settings, on_ready=ready_at.append)
    remote = RemoteIndex(service.channel())
    study, series = generate_uid(), generate_uid()
    try:
        tickets = [remote.add(_arrival(study, series, T0 + timedelta(seconds=n))) for n in range(3)]
        assert remote.wait(tickets[-1], 10)
        with sessions() as session:
            assert _study(session, study).received_generation == 3
        # The assembly check is told when the quiet periods it wrote end (at the earliest).
        wait_for(lambda: ready_at, timeout=30, what="a ready time")
        assert min(ready_at) == T0 + timedelta(seconds=QUIET)
        # The database goes away: the listener side learns it, the row waits.
        down = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2")
        current["sessions"] = make_sessionmaker(down)
        waiting = remote.add(_arrival(study, series, T0))
        wait_for(lambda: not remote.healthy, timeout=10, what="the listener to learn of it")
        assert not remote.wait(waiting, 0.2)
        # It is back: the waiting row is written and the listener told, in an INFO line (the
        # outage's end is no warning).
        current["sessions"] = sessions
        with caplog.at_level(logging.INFO, logger="dicomnode.ingest"):
            assert remote.wait(waiting, 10)
            wait_for(lambda: remote.healthy, timeout=10, what="healthy again")
        back = [r for r in caplog.records if r.getMessage().startswith("database available")]
        assert [(r.levelname, r.getMessage()) for r in back] == [
            ("INFO", "database available again: index rows written")
        ]
        with sessions() as session:
            assert _study(session, study).received_generation == 4
        down.dispose()
    finally:
        remote.close()
        service.close()


def test_rows_gather_into_one_transaction_unless_a_release_waits_for_them(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that come one by one share a transaction for up to GATHER_SECONDS; a release
    waiting for them (over the supervisor's socket pair) has them written at once."""
    # Far longer than the five submits take, however slow the machine (at 0.5 s a stall of
    # the submitting thread could split them into two transactions).
    monkeypatch.setattr(indexer, "GATHER_SECONDS", 3.0)
    batches: list[int] = []
    writer = indexer.IndexWriter(lambda: sessions, _settings, on_batch=lambda: batches.append(1))
    study = generate_uid()
    try:
        done = [threading.Event() for _ in range(5)]
        for event in done:
            writer.submit(_arrival(study, generate_uid(), T0), event.set)
            time.sleep(0.02)
        assert all(event.wait(10) for event in done)
    finally:
        writer.close()
    assert len(batches) == 1

    monkeypatch.setattr(indexer, "GATHER_SECONDS", 30.0)
    service = IndexService(lambda: sessions, _settings)
    remote = RemoteIndex(service.channel())
    study = generate_uid()
    try:
        tickets = [remote.add(_arrival(study, generate_uid(), T0)) for _ in range(3)]
        time.sleep(0.5)
        with sessions() as session:
            assert (
                session.scalar(
                    select(func.count()).select_from(Study).where(Study.study_instance_uid == study)
                )
                == 0
            ), "rows written before their gathering time"
        started = time.monotonic()
        assert remote.wait(tickets[-1], 10)
        assert time.monotonic() - started < 5
        with sessions() as session:
            assert _study(session, study).received_generation == 3
    finally:
        remote.close()
        service.close()


def test_rows_are_written_while_other_processes_keep_every_core_busy(
    sessions: sessionmaker[Session],
) -> None:
    """A worker's inference keeps every core busy for minutes at a time: rows (which the
    listeners' releases and the assembly wait for) must still go in within moments. (A
    writer at nice 19 got almost no CPU then: one row at a time took seconds.)"""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(3 * (os.cpu_count() or 1))
    ]
    writer = indexer.IndexWriter(lambda: sessions, _settings)
    try:
        time.sleep(0.5)  # the hogs have started
        study = generate_uid()
        started = time.monotonic()
        for _ in range(20):  # each row waited for before the next, as a release waits
            done = threading.Event()
            writer.submit(_arrival(study, generate_uid(), T0), done.set)
            writer.hurry()  # as a release does: no gathering time, only the writer's own
            assert done.wait(10)
        elapsed = time.monotonic() - started
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        writer.close()
    # A writer at nice 19 took 22-34 s here, one not niced 0.4 s (SQLite) to 3.5 s
    # (PostgreSQL, whose server competes with the hogs too) on a machine loaded by others.
    assert elapsed < 10, f"20 rows one at a time took {elapsed:.1f} s while the cores were busy"
    with sessions() as session:
        assert _study(session, study).received_generation == 20


def test_release_waits_for_the_rows_and_a_killed_node_loses_no_acknowledged_instance(
    tmp_path: Path,
) -> None:
    """With the SQLite writers' lock held by this test, the node acknowledges each C-STORE
    (the file is durable) but cannot write its rows, so the release is not answered;
    the node is then killed. At its next start the spool re-index writes the rows."""
    db_url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    config, port, web_port = write_config(tmp_path, db_url)
    # No worker; two listener processes (one serves the association; the other must die
    # with the supervisor too; the default 4 cost each start ~2 s more on two cores).
    config.write_text(config.read_text().replace("[worker]\ncount = 1\n", "[worker]\ncount = 0\n"))
    (files,) = write_studies(tmp_path / "send", 1, 3)
    process, log = launch_node(tmp_path, config, port, web_port)
    lock = os.open(f"{tmp_path / 'dicomnode.db'}.writers", os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.flock(lock, fcntl.LOCK_EX)
    said = tmp_path / "storescu.log"
    sender: subprocess.Popen | None = None
    try:
        with said.open("w") as output:
            sender = subprocess.Popen(
                [dcmtk("storescu"), "-v", "-aec", "DICOMNODE", "127.0.0.1", str(port)]
                + [str(path) for path in files],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=DCMTK_ENV,
            )
        wait_for(
            lambda: "Releasing Association" in said.read_text(),
            timeout=20,
            interval=0.05,
            what="storescu's release request after its 3 C-STOREs",
        )
        # A release that did not wait for the rows is answered within milliseconds.
        time.sleep(0.5)
        assert sender.poll() is None, "the release was answered before the rows were written"
        assert instance_rows(db_url) == []
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        sender.wait(timeout=30)
        assert said.read_text().count("Received Store Response (Success)") == 3, said.read_text()
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        if process.poll() is None:
            process.kill()
        if sender is not None and sender.poll() is None:
            sender.kill()
    # The listeners died with their supervisor: a new node binds the port (else it exits
    # before its web server starts) after its spool re-index; its listeners need not start.
    log = tmp_path / "node-2.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        wait_for_port(web_port, process, log=log)
        rows = instance_rows(db_url)
        assert {uid for uid, _, _ in rows} == {str(sop_instance_uid(path)) for path in files}
        assert "3 orphan instance(s) indexed" in log.read_text()
    finally:
        stop_process(process)


def test_an_arrival_crosses_the_socket_pair_unchanged() -> None:
    """What a listener sends the supervisor (sink.encode_item) decodes to the same arrival,
    every fact included (a field added to InstanceFacts and not carried fails here)."""
    facts = InstanceFacts(
        **{
            field.name: (7 if field.name == "instance_number" else f"{field.name}-value")
            for field in dataclasses.fields(InstanceFacts)
        }
    )
    arrival = Arrival(facts, "/spool/a.dcm", 524_000, "1.2.840.10008.1.2.1", "CT1", T0)
    line = sink.encode_item(arrival, 12)
    message = json.loads(line)
    assert message["seq"] == 12
    assert sink.decode_item(message) == arrival


def test_only_sqlite_index_commits_skip_the_log_flush(db_url: str) -> None:
    """SQLite loses an unflushed index commit only with the machine, and the spool re-index
    at the next start rebuilds it; a PostgreSQL server can crash while the node runs on, so
    there the index writer's commits stay synchronous."""
    from dicomnode.db.session import upgrade
    from dicomnode.ingest.indexer import ingest_sessions

    upgrade(db_url)
    index_sessions = ingest_sessions(db_url)
    others = make_sessionmaker(make_engine(db_url))
    sqlite = db_url.startswith("sqlite")
    # SQLite: 1 = NORMAL (in WAL mode no fsync at commit), 2 = FULL.
    setting = text("PRAGMA synchronous" if sqlite else "SHOW synchronous_commit")
    try:
        # One at a time: each SQLite transaction here takes the write lock.
        with index_sessions() as ingest:
            assert ingest.execute(setting).scalar() == (1 if sqlite else "on")
        with others() as other:
            assert other.execute(setting).scalar() == (2 if sqlite else "on")
    finally:
        index_sessions.kw["bind"].dispose()
        others.kw["bind"].dispose()


def test_a_listener_under_serve_loads_no_database_code() -> None:
    """The listener processes hand their rows to the supervisor and open no database, so
    they do not import SQLAlchemy (~30 MB and ~0.15 s each at start); only a stand-alone
    listener, which writes its own rows, loads the index writer when it starts."""
    probe = (
        "import sys\n"
        "sys.modules['sqlalchemy'] = None  # any import of it raises\n"
        "import dicomnode.cli.main\n"
        "from dicomnode.ingest import listeners\n"
        "from dicomnode.ingest.scp import StorageSCP\n"
        "from dicomnode.ingest.sink import RemoteIndex\n"
        "from dicomnode.logs import setup_logging\n"
        "from dicomnode import metrics\n"
        "metrics.count_store(0, 1)\n"
        "print('no database code')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no database code" in result.stdout
