"""Moving payloads between stores: the listings `zkeb storage migrate` and `reconcile` start from, and the outbox
record of a payload that leaves S3.

Revision ID: e9b2
Revises: d4a7
Create Date: 2026-12-06 11:45:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.

`zkeb_payloads_in_store()` pages through the payloads of one store across tenants (ids only), by payload id;
`zkeb_payload_store_organizations()` names the organizations that have payloads in a store. Both run as the owner
and only name what the runtime role then reads and changes inside each tenant's own transaction, as the maintenance
functions do. A payload whose `store` changes from `s3` (a migration to PostgreSQL) is recorded in
`payload_object_deletions` by the same trigger function as a deleted one, in the switching transaction, so its
objects are freed by the maintenance pass exactly like those of a deleted payload (docs/storage.md §8).
"""

from __future__ import annotations

from alembic import op

RUNTIME_ROLE = "zkeb_app"
FUNCTIONS = ("zkeb_payloads_in_store(varchar, uuid, integer)", "zkeb_payload_store_organizations(varchar)")

revision = "e9b2"
down_revision = "d4a7"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(
        """
        CREATE FUNCTION zkeb_payloads_in_store(p_store varchar, p_after uuid, p_limit integer)
        RETURNS TABLE (organization_id uuid, payload_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT p.organization_id, p.id FROM payloads p
            WHERE p.store = p_store AND (p_after IS NULL OR p.id > p_after)
            ORDER BY p.id LIMIT p_limit
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION zkeb_payload_store_organizations(p_store varchar) RETURNS SETOF uuid
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT DISTINCT p.organization_id FROM payloads p WHERE p.store = p_store ORDER BY 1
        $$
        """
    )
    for function in FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {RUNTIME_ROLE}")
    op.execute(
        "CREATE TRIGGER payloads_record_object_move AFTER UPDATE OF store ON payloads FOR EACH ROW"
        " WHEN (OLD.store = 's3' AND NEW.store <> 's3') EXECUTE FUNCTION zkeb_record_payload_object_deletion()"
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("DROP TRIGGER IF EXISTS payloads_record_object_move ON payloads")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
