"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 17:52:50.489423

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    
    op.create_table('authorizations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('subject', sa.String(length=255), nullable=False),
    sa.Column('related_repo', sa.String(length=255), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_authorizations'))
    )
    with op.batch_alter_table('authorizations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_authorizations_owner'), ['owner'], unique=False)

    op.create_table('crawl_cursors',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('base_repo_id', sa.String(length=255), nullable=False),
    sa.Column('last_created_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_sha', sa.String(length=64), nullable=True),
    sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('last_error_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_crawl_cursors')),
    sa.UniqueConstraint('base_repo_id', name=op.f('uq_crawl_cursors_base_repo_id'))
    )
    op.create_table('repos',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('repo_id', sa.String(length=255), nullable=False),
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('declared_base_models', sa.JSON(), nullable=False),
    sa.Column('declared_relation', sa.String(length=32), nullable=True),
    sa.Column('gated', sa.Boolean(), nullable=False),
    sa.Column('private', sa.Boolean(), nullable=False),
    sa.Column('skip_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_repos')),
    sa.UniqueConstraint('repo_id', name=op.f('uq_repos_repo_id'))
    )
    with op.batch_alter_table('repos', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_repos_owner'), ['owner'], unique=False)

    op.create_table('watched_bases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('repo_id', sa.String(length=255), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_watched_bases')),
    sa.UniqueConstraint('repo_id', name=op.f('uq_watched_bases_repo_id'))
    )
    op.create_table('revisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('repo_pk', sa.Integer(), nullable=False),
    sa.Column('sha', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('formats', sa.JSON(), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['repo_pk'], ['repos.id'], name=op.f('fk_revisions_repo_pk_repos'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_revisions')),
    sa.UniqueConstraint('repo_pk', 'sha', name=op.f('uq_revisions_repo_pk_sha'))
    )
    op.create_table('audits',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('revision_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('tool_version', sa.String(length=32), nullable=True),
    sa.Column('analysis_version', sa.String(length=32), nullable=False),
    sa.Column('config_hash', sa.String(length=64), nullable=False),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('worker_id', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('report', sa.JSON(), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'skipped')", name=op.f('ck_audits_status')),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], name=op.f('fk_audits_revision_id_revisions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audits')),
    sa.UniqueConstraint('revision_id', 'analysis_version', 'config_hash', name=op.f('uq_audits_revision_id_analysis_version_config_hash'))
    )
    with op.batch_alter_table('audits', schema=None) as batch_op:
        batch_op.create_index('ix_audits_status_next_attempt_at', ['status', 'next_attempt_at'], unique=False)

    op.create_table('fingerprints',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('revision_id', sa.Integer(), nullable=False),
    sa.Column('analysis_version', sa.String(length=32), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=True),
    sa.Column('path', sa.Text(), nullable=True),
    sa.Column('error_bound', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], name=op.f('fk_fingerprints_revision_id_revisions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fingerprints')),
    sa.UniqueConstraint('revision_id', 'analysis_version', name=op.f('uq_fingerprints_revision_id_analysis_version'))
    )
    op.create_table('comparisons',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('audit_id', sa.Integer(), nullable=False),
    sa.Column('other_repo_id', sa.String(length=255), nullable=False),
    sa.Column('other_revision', sa.String(length=64), nullable=True),
    sa.Column('relation', sa.String(length=32), nullable=False),
    sa.Column('cosine', sa.Float(), nullable=True),
    sa.Column('p_value', sa.Float(), nullable=True),
    sa.Column('coefficient', sa.Float(), nullable=True),
    sa.Column('barrier', sa.Float(), nullable=True),
    sa.Column('barrier_curve', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['audit_id'], ['audits.id'], name=op.f('fk_comparisons_audit_id_audits'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_comparisons'))
    )
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_comparisons_audit_id'), ['audit_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_comparisons_other_repo_id'), ['other_repo_id'], unique=False)

    op.create_table('findings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('audit_id', sa.Integer(), nullable=False),
    sa.Column('rule_id', sa.String(length=32), nullable=False),
    sa.Column('severity', sa.String(length=16), nullable=False),
    sa.Column('confidence', sa.String(length=16), nullable=False),
    sa.Column('title', sa.Text(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('subject_repo', sa.String(length=255), nullable=False),
    sa.Column('related_repo', sa.String(length=255), nullable=True),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.Column('suppressed', sa.Boolean(), nullable=False),
    sa.Column('suppressed_reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['audit_id'], ['audits.id'], name=op.f('fk_findings_audit_id_audits'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_findings'))
    )
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_findings_audit_id'), ['audit_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_findings_related_repo'), ['related_repo'], unique=False)
        batch_op.create_index(batch_op.f('ix_findings_rule_id'), ['rule_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_findings_subject_repo'), ['subject_repo'], unique=False)

    


def downgrade() -> None:
    """Downgrade schema."""
    
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_findings_subject_repo'))
        batch_op.drop_index(batch_op.f('ix_findings_rule_id'))
        batch_op.drop_index(batch_op.f('ix_findings_related_repo'))
        batch_op.drop_index(batch_op.f('ix_findings_audit_id'))

    op.drop_table('findings')
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_comparisons_other_repo_id'))
        batch_op.drop_index(batch_op.f('ix_comparisons_audit_id'))

    op.drop_table('comparisons')
    op.drop_table('fingerprints')
    with op.batch_alter_table('audits', schema=None) as batch_op:
        batch_op.drop_index('ix_audits_status_next_attempt_at')

    op.drop_table('audits')
    op.drop_table('revisions')
    op.drop_table('watched_bases')
    with op.batch_alter_table('repos', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_repos_owner'))

    op.drop_table('repos')
    op.drop_table('crawl_cursors')
    with op.batch_alter_table('authorizations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_authorizations_owner'))

    op.drop_table('authorizations')
    
