"""Job bookkeeping for remote workers: how often an encode was started, and on which device.

`attempts` > 1 means a job was redelivered (its worker died or a store was unreachable); the
device says whether the stream was encoded on cuda or cpu.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("device", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("device")
        batch.drop_column("attempts")
