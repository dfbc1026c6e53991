"""study new images

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 18:40:00.000000

Instances that arrive after a reader looked at a study (claimed or reported) and that no
report covers yet, counted on the study with when the first of them arrived
(dicomnode.worklist.policy): a reported study that receives them is back on the worklist,
flagged 'new images after report (n)', until it is reported again. Existing studies get 0 and
NULL (none).
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "studies", sa.Column("new_images", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column("studies", sa.Column("new_images_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE on both (SQLite 3.35+), as in 0005.
    op.execute("ALTER TABLE studies DROP COLUMN new_images_at")
    op.execute("ALTER TABLE studies DROP COLUMN new_images")
