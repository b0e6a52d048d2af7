"""Backups commit without a hot row: per-connection usage shards, and audit events linked after their commit.

Revision ID: c3d9
Revises: f7a3
Create Date: 2026-12-06 05:30:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.

- `project_usage_shards`: a project's `used_bytes` is `projects.used_bytes` plus the sum of its shards. A commit
  to a project without a quota adds its bytes to the shard of its database connection instead of the project row,
  so concurrent commits of one project no longer queue on one row lock (see docs/backups-commit.md). Both new
  tables start empty, so a release that does not know them reads the same totals.
- `audit_pending_events`: events written in a busy transaction (a backup's creation) without taking the
  organization's chain head; a short follow-up step moves them into `audit_events`, chained, in order.
  `zkeb_audit_pending_organizations()` lists, across tenants, the organizations that have some waiting.

The downgrade keeps a table that holds rows, with them (see downgrade()); the upgrade takes them back.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

RUNTIME_ROLE = "zkeb_app"
TENANT = "NULLIF(current_setting('zkeb.org_id', true), '')::uuid"
FUNCTION = "zkeb_audit_pending_organizations(integer)"

revision = "c3d9"
down_revision = "f7a3"
branch_labels = None
depends_on = None


def _tenant_table(name: str, privileges: str) -> None:
    op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
    op.execute(f"DROP POLICY IF EXISTS tenant_isolation ON {name}")
    op.execute(
        f"CREATE POLICY tenant_isolation ON {name} "
        f"USING (organization_id = {TENANT}) WITH CHECK (organization_id = {TENANT})"
    )
    op.execute(f"GRANT {privileges} ON {name} TO {RUNTIME_ROLE}")


def _foreign_keys() -> None:
    # Rows a downgrade kept whose organization or project went meanwhile (see downgrade()) cannot be kept.
    op.execute(
        "DELETE FROM project_usage_shards s WHERE NOT EXISTS (SELECT 1 FROM projects p WHERE p.id = s.project_id)"
    )
    op.execute(
        "DELETE FROM audit_pending_events e"
        " WHERE NOT EXISTS (SELECT 1 FROM organizations o WHERE o.id = e.organization_id)"
    )
    op.create_foreign_key(
        op.f("fk_project_usage_shards_organization_id_organizations"),
        "project_usage_shards",
        "organizations",
        ["organization_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_foreign_key(
        op.f("fk_project_usage_shards_project_id_projects"),
        "project_usage_shards",
        "projects",
        ["project_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_foreign_key(
        op.f("fk_audit_pending_events_organization_id_organizations"),
        "audit_pending_events",
        "organizations",
        ["organization_id"],
        ["id"],
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "project_usage_shards" not in existing:
        op.create_table(
            "project_usage_shards",
            sa.Column("project_id", sa.Uuid(), nullable=False),
            sa.Column("shard", sa.SmallInteger(), nullable=False),
            sa.Column("used_bytes", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
            sa.Column("id", sa.Uuid(), nullable=False),
            sa.Column("organization_id", sa.Uuid(), nullable=False),
            sa.Column("sa_orm_sentinel", sa.Integer(), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_project_usage_shards")),
            sa.UniqueConstraint("project_id", "shard", name="uq_project_usage_shards_project_shard"),
        )
    if "audit_pending_events" not in existing:
        op.create_table(
            "audit_pending_events",
            sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("actor_type", sa.String(length=32), nullable=False),
            sa.Column("actor_id", sa.String(length=80), nullable=True),
            sa.Column("action", sa.String(length=64), nullable=False),
            sa.Column("target_type", sa.String(length=32), nullable=True),
            sa.Column("target_id", sa.String(length=80), nullable=True),
            sa.Column("outcome", sa.String(length=16), nullable=False),
            sa.Column("client_ip", sa.String(length=64), nullable=True),
            sa.Column("user_agent", sa.String(length=512), nullable=True),
            sa.Column("request_id", sa.String(length=128), nullable=True),
            sa.Column("trace_id", sa.String(length=32), nullable=True),
            sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
            sa.Column("id", sa.Uuid(), nullable=False),
            sa.Column("organization_id", sa.Uuid(), nullable=False),
            sa.Column("sa_orm_sentinel", sa.Integer(), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.CheckConstraint(
                "outcome IN ('success', 'failure', 'denied')", name=op.f("ck_audit_pending_events_outcome")
            ),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_pending_events")),
        )
        op.create_index("ix_audit_pending_events_org", "audit_pending_events", ["organization_id", "occurred_at", "id"])
    _foreign_keys()
    _tenant_table("project_usage_shards", "SELECT, INSERT, UPDATE, DELETE")
    _tenant_table("audit_pending_events", "SELECT, INSERT, DELETE")
    # The background linker runs outside any tenant: it learns which organizations have events waiting (ids only).
    op.execute(
        """
        CREATE FUNCTION zkeb_audit_pending_organizations(p_limit integer) RETURNS SETOF uuid
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
            SELECT DISTINCT e.organization_id FROM audit_pending_events e LIMIT p_limit
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {FUNCTION} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTION} TO {RUNTIME_ROLE}")


def downgrade() -> None:
    # A table holding rows stays, with them (only its foreign keys go, so that older revisions can still drop what
    # they created): usage shards and waiting audit events are data, and the next upgrade takes them back. A release
    # before c3d9 does not see them: usage of projects without a quota reads low, and waiting events are not linked,
    # until the upgrade. An empty table goes.
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}")
    for table, constraints in (
        ("audit_pending_events", ("fk_audit_pending_events_organization_id_organizations",)),
        (
            "project_usage_shards",
            (
                "fk_project_usage_shards_project_id_projects",
                "fk_project_usage_shards_organization_id_organizations",
            ),
        ),
    ):
        drops = "; ".join(f"ALTER TABLE {table} DROP CONSTRAINT {name}" for name in constraints)
        op.execute(
            f"DO $$ BEGIN IF EXISTS (SELECT 1 FROM {table}) THEN {drops}; ELSE DROP TABLE {table}; END IF; END $$"  # noqa: S608
        )
