"""sqlite autoincrement ids

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 09:12:41.318207

On SQLite a plain INTEGER PRIMARY KEY hands the id of the newest row out again once that row
is deleted (retention, a superseded result, a revoked token), so that a job or audit entry id
already shown or logged could name another row. Each table is rebuilt as INTEGER PRIMARY KEY
AUTOINCREMENT with its rows, indexes, unique constraints and foreign keys, and
sqlite_sequence continues after its highest id. PostgreSQL sequences never reuse an id: there
this migration does nothing.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Every table at revision 0002, parents before their children.
TABLES = (
    "studies",
    "series",
    "instances",
    "jobs",
    "findings",
    "results",
    "audit_log",
    "users",
    "api_tokens",
)


def _prepare_sqlite(bind: sa.Connection) -> None:
    """Foreign keys off and one transaction for the whole rebuild.

    Each rebuild drops the old table: with foreign keys on, SQLite would first delete its
    rows, and ON DELETE CASCADE would take the child rows with them. The node's own engines
    turn foreign keys on; alembic's (env.py) leaves SQLite's default, off. The pragma is a
    no-op inside a transaction, so it is set before the one begun here. Without that BEGIN,
    pysqlite would run the first CREATE TABLE outside any transaction (it begins one only
    before an INSERT): a failed upgrade would leave that copy behind, in the way of the next
    try (tests/test_row_ids.py).
    """
    dbapi_connection = bind.connection.dbapi_connection
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        bind.exec_driver_sql("PRAGMA foreign_keys=OFF")
        if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
            raise RuntimeError(
                "migration 0003 rebuilds every table and needs SQLite's foreign keys off "
                "(PRAGMA foreign_keys=OFF outside a transaction); they are on, and dropping "
                "a table would delete its child rows"
            )
    if not dbapi_connection.in_transaction:
        bind.exec_driver_sql("BEGIN")


def _rebuild(*, autoincrement: bool) -> None:
    bind = op.get_bind()
    _prepare_sqlite(bind)
    orphans = sorted(bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall())
    for table in TABLES:
        rows = bind.exec_driver_sql(f'SELECT count(*) FROM "{table}"').scalar()
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass
        after = bind.exec_driver_sql(f'SELECT count(*) FROM "{table}"').scalar()
        if after != rows:
            raise RuntimeError(f"rebuilding {table} kept {after} of its {rows} rows")
        if autoincrement:
            # The next id follows the highest one now in the table (ids deleted above it
            # before this migration were never recorded anywhere and cannot be known).
            bind.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": table})
            bind.execute(
                sa.text(
                    "INSERT INTO sqlite_sequence (name, seq) "
                    f'SELECT :t, max(id) FROM "{table}" HAVING max(id) IS NOT NULL'
                ),
                {"t": table},
            )
    # Rows whose parent is missing: the same as before (a row deleted by hand with foreign
    # keys off may have left some), none new.
    if sorted(bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()) != orphans:
        raise RuntimeError("rebuilding the tables changed which rows have a parent")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild(autoincrement=True)


def downgrade() -> None:
    # Back to 0002's plain INTEGER PRIMARY KEY (ids of deleted rows may be reused again).
    if op.get_bind().dialect.name == "sqlite":
        _rebuild(autoincrement=False)
