"""series uid unique per study

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 09:30:00.000000

A Series Instance UID was unique over the whole database, so the index writer looked a series
up by its UID alone: an instance whose sender reused a series UID in another study (against
PS3.3 C.7.3.1) was filed under the first study's series, analysed with another patient's
images, while its file lay under its own study's folder. The UID is now unique per study:
such an instance gets a series of its own study. The new unique index leads with the UID, so
it still serves a lookup by the UID alone.

SQLite cannot drop a constraint: the series table is rebuilt (rows, indexes, foreign keys and
AUTOINCREMENT kept; its sqlite_sequence entry kept, so no deleted id is handed out again).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

PER_STUDY = "uq_series_uid_study"
# The name SQLite's reflection gives 0001's unnamed UNIQUE (series_instance_uid) in batch mode.
_CONVENTION = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
_WHOLE_DATABASE = "uq_series_series_instance_uid"


def _prepare_sqlite(bind: sa.Connection) -> None:
    """Foreign keys off and one transaction for the rebuild (as in migration 0003): with
    foreign keys on, dropping the old table would delete every instance row through ON
    DELETE CASCADE; without the BEGIN a failed rebuild would leave its copy behind."""
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        bind.exec_driver_sql("PRAGMA foreign_keys=OFF")
        if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
            raise RuntimeError(
                "migration 0004 rebuilds the series table and needs SQLite's foreign keys off "
                "(PRAGMA foreign_keys=OFF outside a transaction); they are on, and dropping "
                "the table would delete its instance rows"
            )
    if not bind.connection.dbapi_connection.in_transaction:
        bind.exec_driver_sql("BEGIN")


def _rebuild_sqlite(drop: str, create: str | None, columns: list[str]) -> None:
    bind = op.get_bind()
    _prepare_sqlite(bind)
    rows = bind.exec_driver_sql("SELECT count(*) FROM series").scalar()
    sequence = bind.exec_driver_sql(
        "SELECT seq FROM sqlite_sequence WHERE name = 'series'"
    ).scalar()
    orphans = sorted(bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall())
    with op.batch_alter_table(
        "series",
        recreate="always",
        naming_convention=_CONVENTION,
        table_kwargs={"sqlite_autoincrement": True},
    ) as batch_op:
        batch_op.drop_constraint(drop, type_="unique")
        batch_op.create_unique_constraint(create, columns)
    if bind.exec_driver_sql("SELECT count(*) FROM series").scalar() != rows:
        raise RuntimeError("rebuilding the series table lost rows")
    if sequence is not None:
        bind.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = 'series'"))
        bind.execute(
            sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('series', :seq)"),
            {"seq": sequence},
        )
    if sorted(bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()) != orphans:
        raise RuntimeError("rebuilding the series table changed which rows have a parent")


def _unique_constraint(bind: sa.Connection, columns: list[str]) -> str:
    for constraint in sa.inspect(bind).get_unique_constraints("series"):
        if constraint["column_names"] == columns and constraint["name"]:
            return constraint["name"]
    raise RuntimeError(f"the series table has no unique constraint on {', '.join(columns)}")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        _rebuild_sqlite(_WHOLE_DATABASE, PER_STUDY, ["series_instance_uid", "study_id"])
        return
    op.drop_constraint(_unique_constraint(bind, ["series_instance_uid"]), "series", type_="unique")
    op.create_unique_constraint(PER_STUDY, "series", ["series_instance_uid", "study_id"])


def downgrade() -> None:
    bind = op.get_bind()
    reused = (
        bind.execute(
            sa.text(
                "SELECT series_instance_uid FROM series GROUP BY series_instance_uid "
                "HAVING count(*) > 1 ORDER BY series_instance_uid"
            )
        )
        .scalars()
        .all()
    )
    if reused:
        raise RuntimeError(
            f"cannot downgrade below 0004: {len(reused)} Series Instance UID(s) are in more "
            f"than one study (e.g. {reused[0]}); delete those studies first"
        )
    if bind.dialect.name == "sqlite":
        _rebuild_sqlite(PER_STUDY, _WHOLE_DATABASE, ["series_instance_uid"])
        return
    op.drop_constraint(PER_STUDY, "series", type_="unique")
    # The name PostgreSQL gave 0001's unnamed constraint.
    op.create_unique_constraint("series_series_instance_uid_key", "series", ["series_instance_uid"])
