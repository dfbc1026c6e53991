"""Database migrations, on SQLite and PostgreSQL: the schema they build is the one the ORM
models describe, an upgrade says in the node's own log line what it changed, and migration
0006 moves a result object's first UID from its file name to its row."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import column, create_engine, insert, inspect, select, table, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from dicomnode.db.models import Base, Study
from dicomnode.db.session import alembic_config, make_engine, schema_revision, upgrade
from dicomnode.results.versions import earlier_versions


def _head(url: str) -> str:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def test_migrations_build_the_schema_the_models_describe(db_url: str) -> None:
    upgrade(db_url)
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert differences == [], f"models and migrations differ: {differences}"


def test_an_upgrade_logs_the_revisions_it_moved_between_once(db_url: str, caplog) -> None:
    head = _head(db_url)
    assert schema_revision(db_url) is None
    with caplog.at_level(logging.INFO, logger="dicomnode.db"):
        upgrade(db_url)
    assert schema_revision(db_url) == head
    assert [r.getMessage() for r in caplog.records if r.name == "dicomnode.db"] == [
        f"database schema upgraded from empty to {head}"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dicomnode.db"):
        upgrade(db_url)  # already at the head: nothing to say
    assert [r for r in caplog.records if r.name == "dicomnode.db"] == []


# Migration 0006 ----------------------------------------------------------------------------

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
# Result rows at 0005: (SOP Instance UID, path, the first UID 0006 gives it). Before 0006 a
# later version's file was named '<first UID>-<16 hex digits of its digest>.dcm'.
ROWS_AT_0005 = [
    ("1.2.9.1.1", "/srv/dicom-node/results/1.2.9/1.2.9.1/1.2.9.1.1.dcm", "1.2.9.1.1"),
    (
        "2.25.1234567890",
        "/srv/dicom-node/results/1.2.9/1.2.9.1/1.2.9.1.2-0123456789abcdef.dcm",
        "1.2.9.1.2",
    ),
    # A folder's '-' 16 characters before '.dcm': like a later version's path, but the file's
    # name is its own UID.
    ("1.2.9.1.3", "/srv/store-abcdef/1.2.9.1.3.dcm", "1.2.9.1.3"),
]


def _result_rows(url: str) -> list[tuple]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT * FROM results ORDER BY id")).all()
    finally:
        engine.dispose()


def _result_columns(url: str) -> list[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return [column["name"] for column in inspect(engine).get_columns("results")]
    finally:
        engine.dispose()


def _study_at_revision(session, **values) -> int:
    """A study row as the ORM would add it (its defaults, then ``values``), in only the columns
    the studies table has at the database's revision (later migrations add some); its id."""
    present = {column["name"] for column in inspect(session.connection()).get_columns("studies")}
    row = {
        column.name: column.default.arg
        for column in Study.__table__.columns
        if column.name in present and column.default is not None and column.default.is_scalar
    }
    row.update(values)
    studies = table("studies", *(column(name) for name in row))
    session.execute(insert(studies).values(row))
    return session.scalar(
        select(Study.__table__.c.id).where(
            Study.__table__.c.study_instance_uid == values["study_instance_uid"]
        )
    )


def test_migration_0006_keeps_the_first_uid_of_each_result_on_its_row_and_back(
    db_url: str,
) -> None:
    """From 0005 (a later version's first UID only in its file name) to 0006 with result rows
    in place: each row has the UID its object was first made with, from the file name of a
    later version and its own UID otherwise, and the results job finds the rows by it; back to
    0005 drops the column and keeps the rows."""
    config = alembic_config(db_url)
    command.upgrade(config, "0005")
    engine = make_engine(db_url)
    try:
        with sessionmaker(engine)() as session:
            study_id = _study_at_revision(
                session,
                study_instance_uid="1.2.9",
                received_at=T0,
                last_instance_at=T0,
                ready_at=T0,
                due_at=T0,
            )
            for sop_instance_uid, path, _ in ROWS_AT_0005:
                session.execute(
                    text(
                        "INSERT INTO results (study_id, kind, model_name, model_version,"
                        " sop_class_uid, sop_instance_uid, series_instance_uid, path, created_at)"
                        " VALUES (:study_id, 'overlay', 'm', '1', '1.2.840.10008.5.1.4.1.1.7',"
                        " :sop_instance_uid, '1.2.9.1', :path, :created_at)"
                    ),
                    {
                        "study_id": study_id,
                        "sop_instance_uid": sop_instance_uid,
                        "path": path,
                        "created_at": T0,
                    },
                )
            session.commit()
        rows, columns = _result_rows(db_url), _result_columns(db_url)
        assert "first_sop_instance_uid" not in columns

        command.upgrade(config, "0006")
        assert _result_columns(db_url) == [*columns, "first_sop_instance_uid"]
        # The results job's query reads the columns of later revisions too.
        command.upgrade(config, "head")
        with sessionmaker(engine)() as session:
            earlier = earlier_versions(session, study_id)
            assert {
                first_uid: (row.sop_instance_uid, row.path) for first_uid, row in earlier.items()
            } == {first: (uid, path) for uid, path, first in ROWS_AT_0005}

        command.downgrade(config, "0005")
        assert schema_revision(db_url) == "0005"
        assert _result_columns(db_url) == columns
        assert _result_rows(db_url) == rows
    finally:
        engine.dispose()


def test_an_sqlite_database_other_accounts_may_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database an older release made 0644 (or a shell's umask 022), found at start: one
    WARNING names each such file and how to close it (patient data); a 0600 one says nothing."""
    database = tmp_path / "dicomnode.db"
    url = f"sqlite:///{database}"
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        upgrade(url)
    assert "readable by other accounts" not in caplog.text
    os.chmod(database, 0o644)
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        upgrade(url)
    [line] = [r.getMessage() for r in caplog.records if "readable by other" in r.getMessage()]
    assert "dicomnode.db (0644)" in line and f"chmod o-rwx {database}*" in line


# Migration 0010 ----------------------------------------------------------------------------


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migration_0010_adds_the_node_facts_table_and_back(db_url: str) -> None:
    """0010 adds the empty node_facts table (serve fills it at its next start); back to 0009
    drops it with its rows and leaves the other tables, up again makes it anew."""
    config = alembic_config(db_url)
    command.upgrade(config, "0009")
    before = _tables(db_url)
    assert "node_facts" not in before
    command.upgrade(config, "0010")
    assert _tables(db_url) == before | {"node_facts"}
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(table("node_facts", column("name"), column("value"), column("updated_at"))),
                {"name": "storage_id", "value": "0123", "updated_at": T0},
            )
        command.downgrade(config, "0009")
        assert schema_revision(db_url) == "0009"
        assert _tables(db_url) == before
        command.upgrade(config, "head")
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM node_facts")).scalar() == 0
    finally:
        engine.dispose()
