"""Engine and sessions for SQLite (embedded default, WAL) and PostgreSQL; migrations."""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from dicomnode.db.errors import behind, no_database, unknown_revision, unreachable
from dicomnode.folders import make_folders

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

log = logging.getLogger("dicomnode.db")
MIGRATIONS = Path(__file__).parent / "migrations"
# Execution options of a transaction that only reads: on SQLite it begins deferred and so
# takes no write lock (every other transaction takes it at BEGIN). For a session:
# ``session.connection(execution_options=READ_ONLY)`` before its first statement.
READ_ONLY = {"dicomnode_read_only": True}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were stored as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite ``url`` (any driver: ``sqlite+pysqlite:///``), None
    for another database or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, full sync and a busy timeout."""
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        if path is not None:
            make_folders(path.parent)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)

        # pysqlite's own transaction handling defers BEGIN; take the write lock up front so
        # concurrent writers queue on busy_timeout instead of failing to upgrade a read lock.
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection) -> None:
            read_only = connection.get_execution_options().get("dicomnode_read_only", False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> AlembicConfig:
    # Imported here: listeners and workers never migrate, and alembic costs each of them
    # ~70 ms and several MB at start.
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str) -> tuple[str | None, str | None]:
    """Bring the database schema to the newest migration; the revisions before and after.

    Raises :class:`~dicomnode.db.errors.DatabaseUnusable` (one line, no password) when the
    database cannot be opened or is at a revision this code does not have."""
    path = sqlite_file(url)
    if path is not None:
        try:
            make_folders(path.parent)
            # Patient names and IDs: a new database is readable by the node's account
            # only (SQLite gives its -wal and -shm files the database file's mode).
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise unreachable(url, exc) from exc
        _warn_if_others_may_read(path)
    from alembic import command

    before = schema_revision(url)
    config = alembic_config(url)
    _refuse_unknown(_migrations(), before)
    command.upgrade(config, "head")
    after = schema_revision(url)
    if after != before:
        log.info("database schema upgraded from %s to %s", before or "empty", after)
    return before, after


def _warn_if_others_may_read(database: Path) -> None:
    """One WARNING when other accounts may read the SQLite database or its -wal/-shm files
    (made by an older release or under a shell's umask 022): it holds patient data."""
    exposed = []
    for path in (database, *database.parent.glob(database.name + "-*")):
        with contextlib.suppress(OSError):
            if path.stat().st_mode & 0o007:
                exposed.append(f"{path.name} ({path.stat().st_mode & 0o777:04o})")
    if exposed:
        log.warning(
            "database files readable by other accounts: %s; they hold patient data: "
            "chmod o-rwx %s*",
            ", ".join(exposed),
            database,
        )


def _refuse_unknown(script: ScriptDirectory, revision: str | None) -> None:
    """A revision this code's migrations lack means a newer dicomnode upgraded the database
    (then was rolled back): no migration path exists, and guessing would corrupt it."""
    if revision is None:
        return
    if revision not in {migration.revision for migration in script.walk_revisions()}:
        raise unknown_revision(revision, script.get_current_head())


def _migrations() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS))


def newest_revision() -> str:
    """The newest migration this code has: the revision ``upgrade`` brings a database to."""
    head = _migrations().get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS}"
    return head


def current_revision(url: str) -> str | None:
    """The migration the database is at, None where it has no schema (an SQLite file not
    made yet included); it only reads: a missing SQLite file is not created.

    Raises :class:`~dicomnode.db.errors.DatabaseUnusable` when the database cannot be opened
    or is at a revision this code does not have (a newer dicomnode upgraded it)."""
    path = sqlite_file(url)
    if path is not None:
        try:
            os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise unreachable(url, exc) from exc
    revision = schema_revision(url)
    _refuse_unknown(_migrations(), revision)
    return revision


def require_newest(url: str) -> None:
    """For the commands that only read (worklist, users list, jobs list): the database must
    be at this code's newest revision. They never migrate it: an older node may still run on
    it, and would refuse it at its next start.

    Raises :class:`~dicomnode.db.errors.DatabaseUnusable`, saying what to run, otherwise."""
    revision = current_revision(url)
    if revision is None:
        raise no_database(url)
    head = newest_revision()
    if revision != head:
        raise behind(revision, head)


def schema_revision(url: str) -> str | None:
    """The migration the database is at (None for a database without the schema).

    Raises :class:`~dicomnode.db.errors.DatabaseUnusable` when it cannot connect. An SQLite
    file that does not exist is not created (it would be, readable by every account under a
    shell's umask 022, before :func:`upgrade` makes it the node's alone)."""
    from alembic.runtime.migration import MigrationContext

    path = sqlite_file(url)
    if path is not None and not path.exists():
        return None
    engine = create_engine(url, poolclass=NullPool)
    try:
        try:
            connection = engine.connect()
        except DBAPIError as exc:
            raise unreachable(url, exc) from exc
        with connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
