"""Backups: a cross-tenant lookup of payloads the upload sweeper may purge; chunk data stored uncompressed.

Revision ID: b4c1
Revises: 0001
Create Date: 2026-11-27 14:00:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.
"""

from __future__ import annotations

from alembic import op

RUNTIME_ROLE = "zkeb_app"
FUNCTION = "zkeb_sweepable_payloads(integer, timestamptz)"

revision = "b4c1"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    # The sweeper runs outside any tenant: this function (run as the owner) names only the payloads it may purge,
    # each with its organization, and the sweeper then deletes them inside that tenant's transaction.
    # Candidates: payloads of expired tus sessions, and payloads that neither a backup nor a session references
    # (a single-shot upload whose process died before commit) once they are older than `p_orphan_before`.
    op.execute(
        """
        CREATE FUNCTION zkeb_sweepable_payloads(p_limit integer, p_orphan_before timestamptz)
        RETURNS TABLE (organization_id uuid, payload_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            (SELECT s.organization_id, s.payload_id FROM upload_sessions s
             WHERE s.expires_at < now() ORDER BY s.expires_at LIMIT p_limit)
            UNION
            (SELECT p.organization_id, p.id FROM payloads p
             WHERE p.created_at < p_orphan_before
               AND NOT EXISTS (SELECT 1 FROM backups b WHERE b.payload_id = p.id)
               AND NOT EXISTS (SELECT 1 FROM upload_sessions s WHERE s.payload_id = p.id)
             ORDER BY p.created_at LIMIT p_limit)
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {FUNCTION} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTION} TO {RUNTIME_ROLE}")
    # Chunks are ciphertext, which never compresses: store them out of line without trying (metadata only).
    op.execute("ALTER TABLE backup_chunks ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("ALTER TABLE backup_chunks ALTER COLUMN data SET STORAGE EXTENDED")
    op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}")
