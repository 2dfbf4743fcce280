"""fingerprint_cache: fingerprints keyed by content (revision sha) and base

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 14:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'fingerprint_cache',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('content_key', sa.String(length=128), nullable=False),
        sa.Column('base_key', sa.String(length=128), nullable=False),
        sa.Column('analysis_version', sa.String(length=32), nullable=False),
        sa.Column('repo_id', sa.String(length=255), nullable=False),
        sa.Column('base_repo_id', sa.String(length=255), nullable=True),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.Column('meta', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_fingerprint_cache')),
        sa.UniqueConstraint('content_key', 'base_key', 'analysis_version',
                            name=op.f('uq_fingerprint_cache_content_key_base_key_analysis_version')),
    )
    with op.batch_alter_table('fingerprint_cache', schema=None) as batch_op:
        batch_op.create_index('ix_fingerprint_cache_base', ['base_key', 'analysis_version'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('fingerprint_cache', schema=None) as batch_op:
        batch_op.drop_index('ix_fingerprint_cache_base')
    op.drop_table('fingerprint_cache')
