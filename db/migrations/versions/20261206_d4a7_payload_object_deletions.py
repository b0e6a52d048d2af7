"""Deleted S3 payloads: an outbox of payloads whose objects are still to be deleted; store usage for the operator.

Revision ID: d4a7
Revises: b8e4
Create Date: 2026-12-06 09:05:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.

Payload rows are deleted in many places (trash purge, retention, expired, terminated or abandoned tus uploads,
cascades from project and organization deletion). A trigger records every deleted payload whose chunks are in S3 in
`payload_object_deletions`, in the deleting transaction, and the maintenance pass deletes the objects, then the row
(docs/storage.md §6). The table has no foreign key: its rows outlive their payload, project and organization on
purpose. `zkeb_payload_object_deletions()` lists them across tenants for the maintenance pass (ids only), and
`zkeb_payload_store_usage()` counts payloads, bytes and chunks per store for `zkeb storage status` (totals only).

The downgrade keeps a table that holds rows (objects still to delete), with them; an empty one goes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

RUNTIME_ROLE = "zkeb_app"
TENANT = "NULLIF(current_setting('zkeb.org_id', true), '')::uuid"
LISTING = "zkeb_payload_object_deletions(integer)"
USAGE = "zkeb_payload_store_usage()"
TRIGGER_FUNCTION = "zkeb_record_payload_object_deletion()"

revision = "d4a7"
down_revision = "b8e4"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    if "payload_object_deletions" not in set(sa.inspect(op.get_bind()).get_table_names()):
        op.create_table(
            "payload_object_deletions",
            sa.Column("organization_id", sa.Uuid(), nullable=False),
            sa.Column("payload_id", sa.Uuid(), nullable=False),
            sa.Column("id", sa.Uuid(), nullable=False),
            sa.Column("sa_orm_sentinel", sa.Integer(), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_payload_object_deletions")),
            sa.UniqueConstraint("payload_id", name="uq_payload_object_deletions_payload"),
        )
    table = "payload_object_deletions"
    op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    op.execute(f"DROP POLICY IF EXISTS tenant_isolation ON {table}")
    op.execute(
        f"CREATE POLICY tenant_isolation ON {table} "
        f"USING (organization_id = {TENANT}) WITH CHECK (organization_id = {TENANT})"
    )
    op.execute(f"GRANT SELECT, DELETE ON {table} TO {RUNTIME_ROLE}")
    # The owner's function inserts, whichever role deletes the payload and whatever tenant it acts for (a cascade
    # from an organization's deletion included).
    op.execute(
        """
        CREATE FUNCTION zkeb_record_payload_object_deletion() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
        BEGIN
            INSERT INTO payload_object_deletions (id, organization_id, payload_id, created_at, updated_at)
            VALUES (gen_random_uuid(), OLD.organization_id, OLD.id, now(), now())
            ON CONFLICT (payload_id) DO NOTHING;
            RETURN OLD;
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {TRIGGER_FUNCTION} FROM PUBLIC")
    op.execute(
        "CREATE TRIGGER payloads_record_object_deletion AFTER DELETE ON payloads FOR EACH ROW"
        f" WHEN (OLD.store = 's3') EXECUTE FUNCTION {TRIGGER_FUNCTION}"
    )
    op.execute(
        """
        CREATE FUNCTION zkeb_payload_object_deletions(p_limit integer)
        RETURNS TABLE (organization_id uuid, payload_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT d.organization_id, d.payload_id FROM payload_object_deletions d ORDER BY d.created_at LIMIT p_limit
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {LISTING} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {LISTING} TO {RUNTIME_ROLE}")
    op.execute(
        """
        CREATE FUNCTION zkeb_payload_store_usage()
        RETURNS TABLE (store varchar, payloads bigint, bytes bigint, chunks bigint)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT p.store, count(*), coalesce(sum(p.size), 0)::bigint, coalesce(sum(p.chunk_count), 0)::bigint
            FROM payloads p GROUP BY p.store ORDER BY p.store
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {USAGE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {USAGE} TO {RUNTIME_ROLE}")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(f"DROP FUNCTION IF EXISTS {USAGE}")
    op.execute(f"DROP FUNCTION IF EXISTS {LISTING}")
    op.execute("DROP TRIGGER IF EXISTS payloads_record_object_deletion ON payloads")
    op.execute(f"DROP FUNCTION IF EXISTS {TRIGGER_FUNCTION}")
    op.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM payload_object_deletions) THEN"
        " DROP TABLE payload_object_deletions; END IF; END $$"
    )
