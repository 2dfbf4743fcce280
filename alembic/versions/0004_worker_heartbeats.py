"""worker_heartbeats: Celery workers seen by the store

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 13:40:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa



revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'worker_heartbeats',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('worker_id', sa.String(length=128), nullable=False),
        sa.Column('hostname', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('queues', sa.JSON(), nullable=False),
        sa.Column('device', sa.String(length=32), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_seen_at', sa.DateTime(timezone=True),
                  nullable=False),
        sa.Column('current_audit_id', sa.Integer(), nullable=True),
        sa.Column('audits_done', sa.Integer(), nullable=False),
        sa.Column('audits_failed', sa.Integer(), nullable=False),
        sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_worker_heartbeats')),
        sa.UniqueConstraint('worker_id', name=op.f('uq_worker_heartbeats_worker_id')),
    )
    with op.batch_alter_table('worker_heartbeats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_worker_heartbeats_last_seen_at'),
                              ['last_seen_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('worker_heartbeats', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_worker_heartbeats_last_seen_at'))
    op.drop_table('worker_heartbeats')
