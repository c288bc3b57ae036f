"""disabled hosts: a partial index

Revision ID: 0006
Revises: 0005
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

HOST_DISABLED = "enabled = false"


def upgrade() -> None:
    op.create_index('ix_hosts_disabled', 'hosts', ['id'],
                    postgresql_where=sa.text(HOST_DISABLED), sqlite_where=sa.text(HOST_DISABLED))


def downgrade() -> None:
    op.drop_index('ix_hosts_disabled', 'hosts')
