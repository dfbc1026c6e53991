"""node facts

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 23:00:00.000000

What the node's processes on every host share besides the jobs (dicomnode.nodestate): the id
of the node's storage folder (its .dicomnode-storage marker file) and the model cards that
``dicomnode serve`` runs, so that a worker whose storage folder or cards are not the node's
is told from one that shares them. A new table, empty: serve fills it at its next start.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_facts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        # INTEGER PRIMARY KEY AUTOINCREMENT on SQLite, as every table's (0003).
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("node_facts")
