"""The `images` table as the embedded service created it before migrations existed.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(1000), nullable=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("weights_id", sa.String(16), nullable=False),
        sa.Column("quality", sa.Float(), nullable=False),
        sa.Column("widths", sa.JSON(), nullable=True),
        sa.Column("scales", sa.JSON(), nullable=True),
        sa.Column("source_format", sa.String(16), nullable=False),
        sa.Column("source_bytes", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=True),
        sa.Column("etag", sa.String(64), nullable=True),
        sa.Column("header", sa.JSON(), nullable=True),
        sa.Column("encode_seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_images_id", "images", ["id"], unique=True)
    op.create_index("ix_images_status", "images", ["status"])


def downgrade() -> None:
    op.drop_index("ix_images_status", table_name="images")
    op.drop_index("ix_images_id", table_name="images")
    op.drop_table("images")
