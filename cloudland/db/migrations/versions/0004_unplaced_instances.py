"""servers waiting to be placed: a partial index

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

UNPLACED = "host IS NULL AND deleted_at IS NULL AND vm_state = 'building'"


def upgrade() -> None:
    op.create_index('ix_instances_unplaced', 'instances', ['created_at', 'id'],
                    postgresql_where=sa.text(UNPLACED), sqlite_where=sa.text(UNPLACED))


def downgrade() -> None:
    op.drop_index('ix_instances_unplaced', 'instances')
