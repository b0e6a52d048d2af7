"""Payload stores: each payload records where its chunk bytes are, `postgres` (in `backup_chunks.data`) or `s3`.

Revision ID: b8e4
Revises: c3d9
Create Date: 2026-12-06 08:40:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.

A column with a constant default: instant, and every existing payload is `postgres`, as it is. A release that does
not know the column keeps writing `postgres` payloads; one that reads an `s3` payload's rows would find no bytes and
fail the restore (never return wrong ones), so `PAYLOAD_STORE=s3` is for a fleet that all runs this release
(docs/storage.md). The downgrade refuses while payloads live in S3: dropping the column would strand them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "b8e4"
down_revision = "c3d9"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column(
        "payloads",
        sa.Column("store", sa.String(length=16), server_default=sa.text("'postgres'"), nullable=False),
    )
    op.create_check_constraint(op.f("ck_payloads_store"), "payloads", "store IN ('postgres', 's3')")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM payloads WHERE store <> 'postgres') THEN
                RAISE EXCEPTION 'payloads are stored in S3: move them back to PostgreSQL first (docs/storage.md)';
            END IF;
        END
        $$
        """
    )
    op.drop_constraint(op.f("ck_payloads_store"), "payloads", type_="check")
    op.drop_column("payloads", "store")
