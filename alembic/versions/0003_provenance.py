"""provenance of derivatives (declared, family tree, discovered) and discovery state

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 14:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa



revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'provenance',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('repo_id', sa.String(length=255), nullable=False),
        sa.Column('base_repo_id', sa.String(length=255), nullable=False),
        sa.Column('found_by', sa.String(length=16), nullable=False),
        sa.Column('sha', sa.String(length=64), nullable=True),
        sa.Column('evidence', sa.JSON(), nullable=False),
        sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_provenance')),
        sa.UniqueConstraint('repo_id', 'base_repo_id', 'found_by',
                            name=op.f('uq_provenance_repo_id_base_repo_id_found_by')),
    )
    with op.batch_alter_table('provenance', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_provenance_repo_id'), ['repo_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_provenance_base_repo_id'), ['base_repo_id'],
                              unique=False)
    op.create_table(
        'discovery_state',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('base_repo_id', sa.String(length=255), nullable=False),
        sa.Column('listed_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('tree_resume', sa.String(length=255), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_discovery_state')),
        sa.UniqueConstraint('base_repo_id', name=op.f('uq_discovery_state_base_repo_id')),
    )


def downgrade() -> None:
    op.drop_table('discovery_state')
    with op.batch_alter_table('provenance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_provenance_base_repo_id'))
        batch_op.drop_index(batch_op.f('ix_provenance_repo_id'))
    op.drop_table('provenance')
