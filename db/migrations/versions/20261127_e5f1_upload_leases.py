"""Uploads: a PATCH owns its upload through a lease id on the session row instead of a session advisory lock.

Revision ID: e5f1
Revises: d2e8
Create Date: 2026-11-27 19:00:00.000000+00:00

Expand/contract: see db/migrations/README.md. Each migration runs in its own transaction with
`lock_timeout` set; keep that line below.

The advisory lock pinned a pooled connection for as long as a PATCH body streamed; the lease lets a PATCH take a
connection per chunk batch instead. During the deploy an old process (advisory lock) and a new one (lease) do not
see each other's claim: two PATCHes sent at once to the same upload, one to each release, could both write; the
unique chunk sequence (`uq_backup_chunks_payload_seq`) then fails one of them, and the commit deletes the session
row once, so no backup is committed twice.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "e5f1"
down_revision = "d2e8"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    # Nullable without a default: a catalog-only change, no table rewrite.
    op.add_column("upload_sessions", sa.Column("lease_id", sa.Uuid(), nullable=True))


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.drop_column("upload_sessions", "lease_id")
