"""Audit: a cross-tenant read of every organization's audit chain head, for periodic anchoring.

Revision ID: a7d3
Revises: b4c1
Create Date: 2026-11-27 15:00:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.
"""

from __future__ import annotations

from alembic import op

RUNTIME_ROLE = "zkeb_app"
FUNCTION = "zkeb_audit_chain_heads()"

revision = "a7d3"
down_revision = "b4c1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    # The head logger runs outside any tenant. A head is a count and a hash: it reveals nothing of the events,
    # and logging it lets an operator anchor each chain outside the database (a truncated tail is otherwise
    # undetectable).
    op.execute(
        """
        CREATE FUNCTION zkeb_audit_chain_heads()
        RETURNS TABLE (organization_id uuid, seq bigint, hash bytea, updated_at timestamptz)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT h.organization_id, h.seq, h.hash, h.updated_at FROM audit_chain_heads h
            ORDER BY h.organization_id
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {FUNCTION} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTION} TO {RUNTIME_ROLE}")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}")
