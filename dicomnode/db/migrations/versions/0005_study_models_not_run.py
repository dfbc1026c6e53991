"""study models not run

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 15:40:00.000000

The finding models that would have read a study's images but did not run (their ONNX file
cannot be loaded), kept on the study so that every re-prioritisation (an override set or
cleared) still names them instead of reading as "no finding above threshold".
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "studies", sa.Column("models_not_run", sa.Text(), nullable=False, server_default="")
    )


def downgrade() -> None:
    # Plain ALTER TABLE on both (SQLite 3.35+): a batch rebuild of studies would have to
    # restore its partial indexes and AUTOINCREMENT.
    op.execute("ALTER TABLE studies DROP COLUMN models_not_run")
