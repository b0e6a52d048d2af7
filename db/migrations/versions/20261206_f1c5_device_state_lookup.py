"""Authentication: a device token's device state in one statement, before the tenant is known.

Revision ID: f1c5
Revises: e9b2
Create Date: 2026-12-06 15:20:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.

`zkeb_device_state(organization_id, id, project_id, device_id_hash)` answers the revocation time of the one device a
verified token names, matched on all four of its claims (so a token never acts for an organization its device is not
in), as `zkeb_find_api_keys` answers the keys of a presented prefix: it runs as
the owner and reveals nothing else. The middleware reads it in one autocommit round trip instead of a tenant
transaction of four (BEGIN, the tenant, the SELECT, COMMIT).
"""

from __future__ import annotations

from alembic import op

RUNTIME_ROLE = "zkeb_app"
FUNCTION = "zkeb_device_state(uuid, uuid, uuid, bytea)"

revision = "f1c5"
down_revision = "e9b2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(
        """
        CREATE FUNCTION zkeb_device_state(p_organization_id uuid, p_id uuid, p_project_id uuid, p_device_id_hash bytea)
        RETURNS TABLE (revoked_at timestamptz)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT d.revoked_at FROM devices d
            WHERE d.organization_id = p_organization_id AND d.id = p_id AND d.project_id = p_project_id
              AND d.device_id_hash = p_device_id_hash
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {FUNCTION} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTION} TO {RUNTIME_ROLE}")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}")
