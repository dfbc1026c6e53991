"""result inputs digest

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 18:30:00.000000

What a result object was made from, as a digest on its row (dicomnode.results.inputs): a
results job that builds the object again from the same instances, settings, models and
release keeps the earlier one without comparing bytes, which a re-run whose inference is not
bitwise repeatable (a GPU) would take for a change. Existing rows get '': the next results
job compares their contents, as before this revision, and records their digest.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "results",
        sa.Column("inputs_digest", sa.String(64), nullable=False, server_default=""),
    )


def downgrade() -> None:
    # Plain ALTER TABLE on both (SQLite 3.35+), as in 0005.
    op.execute("ALTER TABLE results DROP COLUMN inputs_digest")
