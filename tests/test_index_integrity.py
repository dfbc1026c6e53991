"""The ingest index stays true to what the senders sent and to the files on disk: a Series
Instance UID that a sender reused in another study never files an instance under that other
study, and a database connection that dies under the index writer costs no refusal. A batch
updates its studies in id order, the order in which the assembly and the worklist lock them
(no deadlock on PostgreSQL).

Real pynetdicom associations into the node's listener (in-process StorageSCP) and its index
writer, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from alembic import command
from conftest import POSTGRES_URL, wait_for
from pydicom.uid import generate_uid
from sqlalchemy import event, func, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker
from test_indexer import T0, _arrival, _settings
from test_scp import PREFIX, Node, secondary_capture, start_node

from dicomnode.config import WorklistSettings
from dicomnode.db.models import Instance, Series, Study
from dicomnode.db.session import alembic_config, make_engine, schema_revision, upgrade
from dicomnode.ingest import indexer
from dicomnode.ingest.index import add_rows
from dicomnode.ingest.indexer import ingest_sessions, write_items
from dicomnode.ingest.spool import instance_path
from dicomnode.jobs.queue import lock_studies

PATIENTS = {"PH00000700": "Alpha^Anna", "PH00000701": "Beta^Bert"}


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_node(tmp_path, sessions)


def _image(study: str, series: str, patient_id: str):
    image = secondary_capture(study, series)
    image.PatientID = patient_id
    image.PatientName = PATIENTS[patient_id]
    return image


def _index(sessions: sessionmaker[Session]) -> dict[str, dict[str, set[str]]]:
    """Study UID -> series UID -> SOP Instance UIDs, as the database files them."""
    with sessions() as session:
        rows = session.execute(
            select(Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid)
            .join(Series, Series.study_id == Study.id, isouter=True)
            .join(Instance, Instance.series_id == Series.id, isouter=True)
        ).all()
    index: dict[str, dict[str, set[str]]] = {}
    for study, series, sop in rows:
        series_of_study = index.setdefault(study, {})
        if series is not None:
            series_of_study.setdefault(series, set())
            if sop is not None:
                series_of_study[series].add(sop)
    return index


def _assert_database_agrees_with_disk(node: Node) -> None:
    """Every instance row names the file of its own study and series, and every stored file
    has its row."""
    with node.sessions() as session:
        rows = session.execute(
            select(
                Study.study_instance_uid,
                Series.series_instance_uid,
                Instance.sop_instance_uid,
                Instance.path,
            )
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
        ).all()
    for study, series, sop, path in rows:
        assert Path(path) == instance_path(node.storage, study, series, sop), (study, sop)
    stored = {p for p in node.files() if p.suffix == ".dcm"}
    assert {Path(path) for *_, path in rows} == stored


def test_a_series_uid_reused_in_another_study_never_joins_that_study(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Patient PH00000700's study S1 has series X; another patient's studies S2 (new) and S3
    (already known, with a series of its own) come with the same Series Instance UID X. Each
    instance stays in its own study, in a series of that study."""
    s1, s2, s3 = (generate_uid(PREFIX) for _ in range(3))
    reused, own = generate_uid(PREFIX), generate_uid(PREFIX)
    a = _image(s1, reused, "PH00000700")
    b = _image(s2, reused, "PH00000701")
    c = _image(s3, own, "PH00000701")
    d = _image(s3, reused, "PH00000701")
    with caplog.at_level(logging.WARNING, logger="dicomnode.ingest"):
        for image in (a, b, c, d):
            # Acknowledged: the file is durable before the row is written, so the reuse is
            # found behind the acknowledgement, when it can no longer be refused.
            assert node.store(image) == 0x0000
            assert node.scp.index.flush(10)

    assert _index(node.sessions) == {
        s1: {reused: {a.SOPInstanceUID}},
        s2: {reused: {b.SOPInstanceUID}},
        s3: {own: {c.SOPInstanceUID}, reused: {d.SOPInstanceUID}},
    }
    with node.sessions() as session:
        generations = dict(
            session.execute(select(Study.study_instance_uid, Study.received_generation)).all()
        )
    assert generations == {s1: 1, s2: 1, s3: 2}  # none empty, none counting another's image
    _assert_database_agrees_with_disk(node)

    warnings = [r.getMessage() for r in caplog.records if "reuses the Series" in r.getMessage()]
    assert len(warnings) == 2, caplog.text
    assert all(reused in line for line in warnings)
    assert s2 in warnings[0] and s1 in warnings[0]
    assert s3 in warnings[1] and s1 in warnings[1] and s2 in warnings[1]
    for patient_id, name in PATIENTS.items():
        assert patient_id not in caplog.text and name not in caplog.text


def test_a_reused_series_uid_in_one_batch_is_two_series(
    sessions: sessionmaker[Session],
) -> None:
    """The same, when both instances reach the index writer in one transaction."""
    s1, s2, reused = generate_uid(), generate_uid(), generate_uid()
    now = datetime.now(UTC)
    first, second = _arrival(s1, reused, now), _arrival(s2, reused, now)
    with sessions() as session:
        write_items(session, [first, second], _settings())
    assert _index(sessions) == {
        s1: {reused: {first.facts.sop_instance_uid}},
        s2: {reused: {second.facts.sop_instance_uid}},
    }
    # The same instances again (a resent C-STORE, the spool re-index) add nothing.
    with sessions() as session:
        write_items(session, [second, first], _settings())
        assert session.scalar(select(func.count()).select_from(Instance)) == 2
        assert session.scalar(select(func.count()).select_from(Series)) == 2


# A PostgreSQL server process that goes away ------------------------------------------------


def _terminate(backend_pid: int, application_name: str) -> None:
    """End one server process: this test engine's (its application name and its pid, so no
    other test's connection to the shared server is touched), and wait until it is gone."""
    plain = POSTGRES_URL.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(plain, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid = %s AND pid <> pg_backend_pid()",
            (application_name, backend_pid),
        ).fetchall()
        assert ended == [(True,)], ended
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend_pid,)
        ).fetchall():
            assert time.monotonic() < deadline, "the terminated server process lingers"
            time.sleep(0.01)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_connection_terminated_under_the_index_writer_refuses_nothing(
    tmp_path: Path,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pg_terminate_backend of the writer's connection while it writes a batch: the batch is
    written again on a new connection, the node stays available, and every instance sent
    meanwhile is acknowledged with 0x0000 and indexed."""
    # Were the database declared unavailable, it would stay so long enough to be seen.
    monkeypatch.setattr(indexer, "RETRY_SECONDS", 5.0)
    upgrade(db_url)
    application_name = f"dicomnode_test_{uuid.uuid4().hex[:12]}"
    sessions = ingest_sessions(f"{db_url}&application_name={application_name}")
    engine = sessions.kw["bind"]
    armed, terminated = threading.Event(), threading.Event()

    @event.listens_for(engine, "before_cursor_execute")
    def _terminate_in_the_batch(connection, cursor, statement, *_args) -> None:
        if armed.is_set() and statement.lstrip().startswith("INSERT INTO instances"):
            armed.clear()
            _terminate(connection.connection.dbapi_connection.info.backend_pid, application_name)
            terminated.set()

    study, series = generate_uid(PREFIX), generate_uid(PREFIX)
    images = [_image(study, series, "PH00000700") for _ in range(22)]
    try:
        with caplog.at_level(logging.WARNING, logger="dicomnode.ingest"):
            for running in start_node(tmp_path, sessions):
                assoc = running.associate()
                assert assoc.is_established
                try:
                    statuses = [assoc.send_c_store(images[0]).Status]
                    assert running.scp.index.flush(10)
                    armed.set()
                    statuses.append(assoc.send_c_store(images[1]).Status)
                    assert terminated.wait(10), "the writer's connection was not terminated"

                    # The failed batch has been handled: written again on a new connection,
                    # or (were the lost connection taken for an outage) the database called
                    # unavailable, which would refuse the instances below.
                    def handled(index=running.scp.index) -> bool:
                        written = _index(sessions).get(study, {}).get(series, set())
                        return not index.healthy or images[1].SOPInstanceUID in written

                    wait_for(
                        handled,
                        timeout=30,
                        interval=0.01,
                        what="the failed batch handled",
                    )
                    statuses += [assoc.send_c_store(image).Status for image in images[2:]]
                finally:
                    assoc.release()
                assert running.scp.index.flush(10)
                assert statuses == [0x0000] * len(images)
                assert _index(sessions) == {
                    study: {series: {image.SOPInstanceUID for image in images}}
                }
                _assert_database_agrees_with_disk(running)
    finally:
        engine.dispose()
    assert "database unavailable" not in caplog.text
    assert "database connection lost while writing" in caplog.text


# Migration 0004 ----------------------------------------------------------------------------


def test_migration_0004_keeps_the_series_and_a_downgrade_refuses_a_reused_uid(
    db_url: str,
) -> None:
    """From 0003 (a series UID unique over the database) to 0004 (unique per study) with
    rows in place, and back; back is refused while a series UID is in two studies, since
    0003 cannot hold that."""
    config = alembic_config(db_url)
    command.upgrade(config, "0003")
    # The ORM describes the head schema: the studies columns of later migrations (0005,
    # 0007, 0009) are added by hand, so that it can write rows at 0003 and 0004; 0004 leaves
    # studies alone.
    by_hand = make_engine(db_url)
    with by_hand.begin() as connection:
        for column in (
            "models_not_run TEXT DEFAULT ''",
            "image_count INTEGER DEFAULT 0",
            "unreadable_image_count INTEGER DEFAULT 0",
            "new_images INTEGER DEFAULT 0",
            "new_images_at TIMESTAMP",
        ):
            connection.execute(text(f"ALTER TABLE studies ADD COLUMN {column}"))
    by_hand.dispose()
    now = datetime.now(UTC)
    first, second = (
        _arrival(generate_uid(), "1.2.3.4", now),
        _arrival(generate_uid(), "1.2.3.4", now),
    )
    engine = make_engine(db_url)
    sessions = sessionmaker(engine)
    try:
        with sessions() as session:
            write_items(session, [first], _settings())
        command.upgrade(config, "0004")
        assert {
            tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints("series")
        } == {("series_instance_uid", "study_id")}
        with sessions() as session:
            write_items(session, [second], _settings())
        assert _index(sessions) == {
            first.facts.study_instance_uid: {"1.2.3.4": {first.facts.sop_instance_uid}},
            second.facts.study_instance_uid: {"1.2.3.4": {second.facts.sop_instance_uid}},
        }
        with pytest.raises(RuntimeError, match=r"1 Series Instance UID.* in more than one study"):
            command.downgrade(config, "0003")
        assert schema_revision(db_url) == "0004"
        with engine.begin() as connection:  # the node's engine: series and instances go too
            connection.execute(
                text("DELETE FROM studies WHERE study_instance_uid = :uid"),
                {"uid": second.facts.study_instance_uid},
            )
        command.downgrade(config, "0003")
        assert {
            tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints("series")
        } == {("series_instance_uid",)}
        assert _index(sessions) == {
            first.facts.study_instance_uid: {"1.2.3.4": {first.facts.sop_instance_uid}}
        }
    finally:
        engine.dispose()


def test_a_batch_updates_its_studies_in_id_order(
    db_url: str, sessions: sessionmaker[Session]
) -> None:
    """Review (high): a batch updated its studies in arrival order, while the assembly and the
    worklist lock studies in id order (lock_studies): a batch holding a later study and
    waiting for an earlier one, and a transaction holding the earlier one and waiting for
    the later one, deadlock. Now a batch waiting for study A holds no later study B."""
    if not db_url.startswith("postgresql"):
        pytest.skip("row locks: SQLite serialises writers (BEGIN IMMEDIATE)")
    study_a, study_b = generate_uid(), generate_uid()
    series_a, series_b = generate_uid(), generate_uid()
    with sessions() as session:
        for study, series in ((study_a, series_a), (study_b, series_b)):
            add_rows(session, [_arrival(study, series, T0)], 2.0, WorklistSettings())
        session.commit()
        ids = dict(session.execute(select(Study.study_instance_uid, Study.id)).all())
    id_a, id_b = ids[study_a], ids[study_b]
    assert id_a < id_b

    holder = sessions()  # as the assembly or the worklist: study A locked
    lock_studies(holder, [id_a])
    batch_pid: list[int] = []
    failures: list[BaseException] = []

    def batch() -> None:
        # One batch: B's instance arrived first, then A's (known series: no new rows).
        try:
            with sessions() as session:
                batch_pid.append(session.scalar(text("SELECT pg_backend_pid()")))
                later = datetime(2026, 12, 4, 12, 1, tzinfo=UTC)
                arrivals = [_arrival(study_b, series_b, later), _arrival(study_a, series_a, later)]
                add_rows(session, arrivals, 2.0, WorklistSettings())
                session.commit()
        except BaseException as error:  # reported by the test below
            failures.append(error)

    writer = threading.Thread(target=batch, daemon=True)
    probe = sessions()
    try:
        writer.start()
        wait_for(lambda: batch_pid, timeout=30, what="the batch's connection")
        with sessions() as watcher:

            def batch_waits_for_a_lock() -> bool:
                waiting = watcher.scalar(
                    text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": batch_pid[0]},
                )
                watcher.rollback()
                return waiting == "Lock"

            wait_for(batch_waits_for_a_lock, timeout=60, what="the batch to wait for study A")
        # B is free: the batch waits for A before it touches B.
        locked = probe.scalar(
            text("SELECT id FROM studies WHERE id = :id FOR UPDATE NOWAIT"), {"id": id_b}
        )
        assert locked == id_b
    finally:
        probe.rollback()
        probe.close()
        holder.commit()
        holder.close()
        writer.join(timeout=60)
    assert not writer.is_alive()
    assert failures == []
    with sessions() as session:
        counts = session.execute(
            select(Study.id, Study.received_generation).where(Study.id.in_((id_a, id_b)))
        ).all()
    assert {row.id: row.received_generation for row in counts} == {id_a: 2, id_b: 2}
