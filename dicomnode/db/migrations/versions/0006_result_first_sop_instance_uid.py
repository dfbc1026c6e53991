"""result first sop instance uid

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 16:00:00.000000

The UID a result object was first made with, kept on its row: a later version of an object
(same UID, other content: a new UID from the first one and its content) was known as such
only by its file name, ``<first UID>-<digest>.dcm``, so that a result file moved or renamed
(other storage, a restore) made the next results job take it for a new object and send its
first UID again with the new content. Existing rows get it from that file name where it has
that form, else their own SOP Instance UID. The files keep their names (one per version), so a
downgrade loses nothing that 0005's code reads.
"""

import re

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# A later version's file name (dicomnode.results.job before 0006): the first UID, '-', the
# first 16 hex digits of its content digest.
_VERSION_FILE = re.compile(r"([0-9.]+)-[0-9a-f]{16}\.dcm")

_RESULTS = sa.table(
    "results",
    sa.column("id", sa.Integer),
    sa.column("sop_instance_uid", sa.String),
    sa.column("first_sop_instance_uid", sa.String),
    sa.column("path", sa.Text),
)


def first_uid(sop_instance_uid: str, path: str) -> str:
    """The UID a result row's object was first made with, as its file name said before 0006."""
    version = _VERSION_FILE.fullmatch(path.rsplit("/", 1)[-1])
    return version.group(1) if version else sop_instance_uid


def upgrade() -> None:
    # NOT NULL needs a default to be added on SQLite without rebuilding the table.
    op.add_column(
        "results",
        sa.Column("first_sop_instance_uid", sa.String(64), nullable=False, server_default=""),
    )
    bind = op.get_bind()
    bind.execute(_RESULTS.update().values(first_sop_instance_uid=_RESULTS.c.sop_instance_uid))
    # Only a path ending in '-', 16 characters and '.dcm' can be a later version's (LIKE's '_'
    # is any one character); the file name decides.
    candidates = bind.execute(
        sa.select(_RESULTS.c.id, _RESULTS.c.sop_instance_uid, _RESULTS.c.path).where(
            _RESULTS.c.path.like("%-" + "_" * 16 + ".dcm")
        )
    ).all()
    for row_id, sop_instance_uid, path in candidates:
        first = first_uid(sop_instance_uid, path)
        if first != sop_instance_uid:
            bind.execute(
                _RESULTS.update()
                .where(_RESULTS.c.id == row_id)
                .values(first_sop_instance_uid=first)
            )


def downgrade() -> None:
    # Plain ALTER TABLE on both (SQLite 3.35+), as in 0005: a batch rebuild of results would
    # have to restore its AUTOINCREMENT.
    op.execute("ALTER TABLE results DROP COLUMN first_sop_instance_uid")
