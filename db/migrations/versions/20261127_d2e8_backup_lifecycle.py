"""Backup lifecycle: restored backups are exempt from retention; cross-tenant lookups for sweepers and key rotation.

Revision ID: d2e8
Revises: c6e2
Create Date: 2026-11-27 16:00:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

RUNTIME_ROLE = "zkeb_app"
FUNCTIONS = (
    "zkeb_expired_trash(integer, timestamptz)",
    "zkeb_retention_projects(uuid, integer)",
    "zkeb_payload_key_usage()",
)

revision = "d2e8"
down_revision = "c6e2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    # Nullable without a default: a catalog-only change, no table rewrite.
    op.add_column("backups", sa.Column("restored_at", sa.DateTime(timezone=True), nullable=True))
    # The maintenance runner and `zkeb keys` run outside any tenant. These functions (run as the owner) name only
    # what the runtime role then acts on inside each tenant's own transaction, re-checking every row under lock.
    op.execute(
        """
        CREATE FUNCTION zkeb_expired_trash(p_limit integer, p_deleted_before timestamptz)
        RETURNS TABLE (organization_id uuid, backup_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT b.organization_id, b.id FROM backups b
            WHERE b.deleted_at IS NOT NULL AND b.deleted_at < p_deleted_before
            ORDER BY b.deleted_at LIMIT p_limit
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION zkeb_retention_projects(p_after uuid, p_limit integer)
        RETURNS TABLE (organization_id uuid, project_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT p.organization_id, p.id FROM projects p
            WHERE (p.retention_keep_last IS NOT NULL OR p.retention_days IS NOT NULL)
              AND (p_after IS NULL OR p.id > p_after)
            ORDER BY p.id LIMIT p_limit
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION zkeb_payload_key_usage()
        RETURNS TABLE (organization_id uuid, key_id varchar, payloads bigint)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT p.organization_id, p.key_id, count(*) FROM payloads p
            GROUP BY p.organization_id, p.key_id ORDER BY p.organization_id, p.key_id
        $$
        """
    )
    for function in FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {RUNTIME_ROLE}")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
    op.drop_column("backups", "restored_at")
