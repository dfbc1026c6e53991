"""study image counts

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 16:45:00.000000

How many images a study's latest analysis was to read and how many of them could not be read
(corrupt or unsupported pixel data: left out, the study analysed on the others), kept on the
study so that every re-prioritisation (an override set or cleared) still says the AI did not
see every image instead of "no finding above threshold". Existing studies get 0 and 0 (their
reason is unchanged until they are analysed again).
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "studies", sa.Column("image_count", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column(
        "studies",
        sa.Column("unreadable_image_count", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    # Plain ALTER TABLE on both (SQLite 3.35+), as in 0005.
    op.execute("ALTER TABLE studies DROP COLUMN unreadable_image_count")
    op.execute("ALTER TABLE studies DROP COLUMN image_count")
