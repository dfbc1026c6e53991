"""Row ids are never handed out twice: a job or audit entry id once returned or logged names
that row for good, even after the newest row is deleted (retention, a superseded result, a
revoked token). PostgreSQL sequences never reuse an id; SQLite needs AUTOINCREMENT, which
migration 0003 gives the tables of a database created before it, keeping every row."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, delete, inspect, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from dicomnode.db.models import AuditEntry, Base, Job, Study
from dicomnode.db.session import (
    alembic_config,
    make_engine,
    make_sessionmaker,
    schema_revision,
    upgrade,
)
from dicomnode.jobs.queue import enqueue

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
STAMP = "2024-05-01 12:00:00.000000"
# Tables that migrations after 0002 add (the others are 0002's, with rows in these tests).
LATER_TABLES = {"node_facts"}
TABLES = sorted(set(Base.metadata.tables) - LATER_TABLES)


def _study(session: Session, uid: str) -> int:
    study = Study(
        study_instance_uid=uid, received_at=T0, last_instance_at=T0, ready_at=T0, due_at=T0
    )
    session.add(study)
    session.flush()
    return study.id


def _job(sessions: sessionmaker[Session], study_id: int) -> int:
    with sessions() as session:
        job = enqueue(session, "analyse", study_id, now=T0)
        session.commit()
        return job.id


def _delete_job(sessions: sessionmaker[Session], job_id: int) -> None:
    with sessions() as session:
        session.execute(delete(Job).where(Job.id == job_id))
        session.commit()


def test_every_table_asks_sqlite_for_ids_that_are_never_reused() -> None:
    assert {
        name: table.dialect_options["sqlite"]["autoincrement"]
        for name, table in Base.metadata.tables.items()
    } == dict.fromkeys(Base.metadata.tables, True)


def test_the_id_of_a_deleted_newest_job_is_not_given_to_the_next(sessions) -> None:
    with sessions() as session:
        study_id = _study(session, "1.2.3.4")
        session.commit()
    first, newest = _job(sessions, study_id), _job(sessions, study_id)
    assert newest > first
    _delete_job(sessions, newest)
    assert _job(sessions, study_id) > newest

    with sessions() as session:
        session.add(AuditEntry(at=T0, actor="test", action="first"))
        session.commit()
        entry = session.scalars(select(AuditEntry)).one()
        entry_id = entry.id
        session.delete(entry)
        session.commit()
        session.add(AuditEntry(at=T0, actor="test", action="second"))
        session.commit()
        assert session.scalars(select(AuditEntry.id)).one() > entry_id


def test_a_fresh_sqlite_database_has_autoincrement_on_every_table(tmp_path: Path) -> None:
    path = tmp_path / "dicomnode.db"
    upgrade(f"sqlite:///{path}")
    with sqlite3.connect(path) as connection:
        schema = dict(connection.execute("SELECT name, sql FROM sqlite_master WHERE type='table'"))
    for table in Base.metadata.tables:
        assert "AUTOINCREMENT" in schema[table], table


# Two of everything at revision 0002, in plain SQL (the models describe the newest schema):
# the second study's rows and the second user's token are the newest of their tables.
ROWS_AT_0002 = [
    *(
        f"INSERT INTO studies (id, study_instance_uid, patient_id, patient_name,"
        f" accession_number, modality, study_description, received_at, last_instance_at,"
        f" ready_at, received_generation, queued_generation, analysis_status, analysis_error,"
        f" tier, tier_rank, score, reason, ups_priority, due_at, reading_status, claimed_by,"
        f" reported_by, override_tier) VALUES ({n}, '1.2.{n}', 'P{n}', 'Doe^{n}', 'A{n}', 'CR',"
        f" 'chest', '{STAMP}', '{STAMP}', '{STAMP}', 1, 1, 'analysed', '', 'urgent', 1, 0.{n},"
        f" 'why', 'HIGH', '{STAMP}', 'reported', 'dr{n}', 'dr{n}', '')"
        for n in (1, 2)
    ),
    *(
        f"INSERT INTO series (id, study_id, series_instance_uid, modality, body_part,"
        f" view_position, series_description) VALUES ({n}, {n}, '1.2.{n}.1', 'CR', 'CHEST',"
        f" 'PA', 's{n}')"
        for n in (1, 2)
    ),
    *(
        f"INSERT INTO instances (id, series_id, sop_instance_uid, sop_class_uid,"
        f" transfer_syntax_uid, instance_number, path, size_bytes, calling_ae, received_at)"
        f" VALUES ({n}, {n}, '1.2.{n}.1.1', '1.2.840.10008.5.1.4.1.1.1', '1.2.840.10008.1.2.1',"
        f" 1, 'storage/{n}.dcm', 1000, 'MODALITY', '{STAMP}')"
        for n in (1, 2)
    ),
    *(
        f"INSERT INTO jobs (id, kind, study_id, payload, state, attempts, run_after, lease_owner,"
        f" last_error, created_at) VALUES ({n}, 'analyse', {n}, '{{\"generation\": {n}}}',"
        f" 'done', 1, '{STAMP}', '', '', '{STAMP}')"
        for n in (1, 2)
    ),
    *(
        f"INSERT INTO findings (id, study_id, model_name, model_version, code_value, code_scheme,"
        f" code_meaning, probability, threshold, critical) VALUES ({n}, {n}, 'm', '1', 'RID5352',"
        f" 'RADLEX', 'Pneumothorax', 0.9, 0.5, {n - 1})"
        for n in (1, 2)
    ),
    *(
        f"INSERT INTO results (id, study_id, kind, model_name, model_version, sop_class_uid,"
        f" sop_instance_uid, series_instance_uid, path, created_at) VALUES ({n}, {n}, 'sr', 'm',"
        f" '1', '1.2.840.10008.5.1.4.1.1.88.33', '1.2.{n}.9.1', '1.2.{n}.9', 'results/{n}.dcm',"
        f" '{STAMP}')"
        for n in (1, 2)
    ),
    *(
        f"INSERT INTO audit_log (id, at, actor, action, study_instance_uid, detail, reason)"
        f" VALUES ({n}, '{STAMP}', 'dr{n}', 'report', '1.2.{n}', 'detail', 'reason')"
        for n in (1, 2)
    ),
    *(
        f"INSERT INTO users (id, username, role, password_hash, disabled, created_at) VALUES"
        f" ({n}, 'dr{n}', 'radiologist', 'hash', {n - 1}, '{STAMP}')"
        for n in (1, 2)
    ),
    *(
        f"INSERT INTO api_tokens (id, user_id, token_hash, kind, created_at, expires_at) VALUES"
        f" ({n}, {n}, '{n:064x}', 'api', '{STAMP}', NULL)"
        for n in (1, 2)
    ),
]


def _database_at_0002(path: Path) -> str:
    url = f"sqlite:///{path}"
    command.upgrade(alembic_config(url), "0002")
    with sqlite3.connect(path) as connection:
        for statement in ROWS_AT_0002:
            connection.execute(statement)
    return url


def _contents(path: Path, columns: dict[str, dict] | None = None) -> dict[str, list[tuple]]:
    """Each table's rows; ``columns``: only those of this :func:`_structure` (columns added by
    later migrations left out)."""
    with sqlite3.connect(path) as connection:
        return {
            table: connection.execute(
                f'SELECT {_names(columns[table]) if columns else "*"} FROM "{table}" ORDER BY id'
            ).fetchall()
            for table in TABLES
        }


def _names(structure: dict) -> str:
    return ", ".join(f'"{column[0]}"' for column in structure["columns"])


# Columns that migrations after 0003 add to the tables of 0002, as reflected.
LATER_COLUMNS = {
    "studies": [
        ("models_not_run", "TEXT", False, "''"),
        ("image_count", "INTEGER", False, "'0'"),
        ("unreadable_image_count", "INTEGER", False, "'0'"),
        ("new_images", "INTEGER", False, "'0'"),
        ("new_images_at", "DATETIME", True, None),
    ],
    "results": [
        ("first_sop_instance_uid", "VARCHAR(64)", False, "''"),
        ("inputs_digest", "VARCHAR(64)", False, "''"),
    ],
}


def _with_later_columns(structure: dict[str, dict]) -> dict[str, dict]:
    return {
        table: {**shape, "columns": shape["columns"] + LATER_COLUMNS.get(table, [])}
        for table, shape in structure.items()
    }


def _structure(url: str) -> dict[str, dict]:
    """Each table's columns, foreign keys, unique constraints and indexes as reflected."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        inspector = inspect(engine)
        return {
            table: {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"], c["default"])
                    for c in inspector.get_columns(table)
                ],
                "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
                "foreign_keys": inspector.get_foreign_keys(table),
                "unique": sorted(
                    tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
                ),
                "indexes": sorted(
                    (
                        i["name"],
                        tuple(i["column_names"]),
                        bool(i["unique"]),
                        str(i["dialect_options"].get("sqlite_where", "")),
                    )
                    for i in inspector.get_indexes(table)
                ),
            }
            for table in TABLES
        }
    finally:
        engine.dispose()


def test_an_upgrade_from_0002_keeps_every_row_and_key_and_then_never_reuses_an_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dicomnode.db"
    url = _database_at_0002(path)
    rows, structure = _contents(path), _structure(url)
    assert all(len(rows[table]) == 2 for table in TABLES)
    assert sum(len(s["foreign_keys"]) for s in structure.values()) == 6

    upgrade(url)

    assert _contents(path, structure) == rows
    # Migration 0004 makes a Series Instance UID unique per study (tests/test_index_integrity.py).
    per_study = {**structure["series"], "unique": [("series_instance_uid", "study_id")]}
    assert _structure(url) == _with_later_columns({**structure, "series": per_study})
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
        schema = dict(connection.execute("SELECT name, sql FROM sqlite_master WHERE type='table'"))
        assert dict(connection.execute("SELECT name, seq FROM sqlite_sequence")) == dict.fromkeys(
            TABLES, 2
        )
    for table in TABLES:
        assert "AUTOINCREMENT" in schema[table], table

    engine = make_engine(url)  # the node's own engine: foreign keys on
    sessions = make_sessionmaker(engine)
    try:
        _delete_job(sessions, 2)
        assert _job(sessions, 2) == 3
        # The foreign keys still cascade: a deleted study takes its rows with it.
        with sessions() as session:
            session.execute(delete(Study).where(Study.id == 1))
            session.commit()
        after = _contents(path)
        for table in ("series", "instances", "findings", "results"):
            assert [row[0] for row in after[table]] == [2], table
        assert [row[0] for row in after["jobs"]] == [3]
        with sessions() as session:
            assert _study(session, "1.2.3") == 3
            session.commit()
    finally:
        engine.dispose()


def test_a_downgrade_to_0002_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "dicomnode.db"
    url = _database_at_0002(path)
    rows, structure = _contents(path), _structure(url)
    upgrade(url)
    command.downgrade(alembic_config(url), "0002")
    assert _contents(path) == rows
    assert _structure(url) == structure
    with sqlite3.connect(path) as connection:
        schema = dict(connection.execute("SELECT name, sql FROM sqlite_master WHERE type='table'"))
    for table in TABLES:
        assert "AUTOINCREMENT" not in schema[table], table


def test_a_failed_upgrade_from_0002_changes_nothing(tmp_path: Path) -> None:
    """The rebuild is one transaction: a failure at the last table leaves no table half
    rebuilt (nor a leftover copy that would stop the next try)."""
    path = tmp_path / "dicomnode.db"
    url = _database_at_0002(path)
    with sqlite3.connect(path) as connection:
        # In the way of the last table's rebuild.
        connection.execute("CREATE TABLE _alembic_tmp_api_tokens (id INTEGER)")
        schema = connection.execute("SELECT * FROM sqlite_master ORDER BY name").fetchall()
    rows, structure = _contents(path), _structure(url)
    with pytest.raises(OperationalError, match="_alembic_tmp_api_tokens"):
        upgrade(url)
    assert schema_revision(url) == "0002"
    assert _contents(path) == rows
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT * FROM sqlite_master ORDER BY name").fetchall() == schema
        connection.execute("DROP TABLE _alembic_tmp_api_tokens")
    upgrade(url)
    assert schema_revision(url) != "0002"
    assert _contents(path, structure) == rows
