"""Master keys: the distinct key ids that wrap stored data keys, for the readiness check that they are all configured.

Revision ID: f7a3
Revises: e5f1
Create Date: 2026-11-28 01:00:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.
"""

from __future__ import annotations

from alembic import op

RUNTIME_ROLE = "zkeb_app"
FUNCTION = "zkeb_payload_key_ids()"

revision = "f7a3"
down_revision = "e5f1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    # Every process checks at start that each key id in use is configured. A loose index scan over
    # ix_payloads_key_id: one index probe per distinct id (a handful), whatever the number of payloads, where
    # zkeb_payload_key_usage() counts every row. Run as the owner, across tenants; it reveals key ids only.
    op.execute(
        """
        CREATE FUNCTION zkeb_payload_key_ids() RETURNS SETOF varchar
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            WITH RECURSIVE ids(key_id) AS (
                (SELECT key_id FROM payloads ORDER BY key_id LIMIT 1)
                UNION ALL
                SELECT (SELECT p.key_id FROM payloads p WHERE p.key_id > ids.key_id ORDER BY p.key_id LIMIT 1)
                FROM ids WHERE ids.key_id IS NOT NULL
            )
            SELECT key_id FROM ids WHERE key_id IS NOT NULL
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {FUNCTION} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTION} TO {RUNTIME_ROLE}")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}")
