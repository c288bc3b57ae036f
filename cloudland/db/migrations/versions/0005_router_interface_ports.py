"""router interface ports: a partial index

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

ROUTER_INTERFACE = "device_owner IN ('network:router_interface_distributed', 'network:router_interface')"


def upgrade() -> None:
    op.create_index('ix_ports_router_interfaces', 'ports', ['network_id', 'device_id'],
                    postgresql_where=sa.text(ROUTER_INTERFACE), sqlite_where=sa.text(ROUTER_INTERFACE))


def downgrade() -> None:
    op.drop_index('ix_ports_router_interfaces', 'ports')
