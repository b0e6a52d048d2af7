"""Observability: a cross-tenant count of open tus upload sessions for the `zkeb_tus_sessions_open` gauge.

Revision ID: c6e2
Revises: a7d3
Create Date: 2026-11-27 15:00:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.
"""

from __future__ import annotations

from alembic import op

RUNTIME_ROLE = "zkeb_app"
FUNCTION = "zkeb_open_upload_sessions()"

revision = "c6e2"
down_revision = "a7d3"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    # Metrics are sampled outside any tenant; this function (run as the owner) answers one number for all
    # tenants and reveals nothing else.
    op.execute(
        """
        CREATE FUNCTION zkeb_open_upload_sessions() RETURNS bigint
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT count(*) FROM upload_sessions WHERE expires_at >= now()
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {FUNCTION} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTION} TO {RUNTIME_ROLE}")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}")
