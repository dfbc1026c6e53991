"""Database migrations, on SQLite and PostgreSQL: the schema they build is the one the ORM
models describe, and an upgrade says in the node's own log line what it changed."""

from __future__ import annotations

import logging

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from dicomnode.db.models import Base
from dicomnode.db.session import alembic_config, schema_revision, upgrade


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
