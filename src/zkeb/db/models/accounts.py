"""Accounts aggregate: organizations, projects, API keys, devices and used proofs of possession."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING
from uuid import UUID

from advanced_alchemy.base import UUIDv7AuditBase
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    LargeBinary,
    SmallInteger,
    String,
    UniqueConstraint,
    cast,
    func,
    select,
    text,
)
from sqlalchemy.orm import Mapped, column_property, mapped_column

from zkeb.db.models._base import TenantModel, TimestampUTC

__all__ = ("ApiKey", "Device", "DeviceProof", "Organization", "Project", "ProjectUsageShard")


class Organization(UUIDv7AuditBase):
    """A tenant. Row-level security shows a transaction only its own organization."""

    __tablename__ = "organizations"

    name: Mapped[str] = mapped_column(String(200))


class Project(TenantModel):
    """A project groups devices and their backups, with its storage policy."""

    __tablename__ = "projects"
    __table_args__ = (
        UniqueConstraint("organization_id", "name", name="uq_projects_org_name"),
        CheckConstraint("storage_quota_bytes IS NULL OR storage_quota_bytes >= 0", name="quota"),
        CheckConstraint("retention_keep_last IS NULL OR retention_keep_last >= 1", name="keep_last"),
        CheckConstraint("retention_days IS NULL OR retention_days >= 1", name="retention_days"),
        CheckConstraint("append_only_min_age_days >= 0", name="min_age"),
    )

    name: Mapped[str] = mapped_column(String(200))
    storage_quota_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    retention_keep_last: Mapped[int | None] = mapped_column(default=None)
    retention_days: Mapped[int | None] = mapped_column(default=None)
    append_only: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    append_only_min_age_days: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    if TYPE_CHECKING:
        #: `used_bytes` plus the project's usage shards: what its backups use (mapped below, after the shards).
        total_used_bytes: int


class ProjectUsageShard(TenantModel):
    """Payload bytes committed to a project through one database connection (`pg_backend_pid() % SHARDS`).

    A project's usage is `projects.used_bytes` plus its shards: commits to a project without a quota add to their
    connection's shard, so they never wait for one another on the project row (`zkeb.domain.backups.store`).
    """

    __tablename__ = "project_usage_shards"
    __table_args__ = (UniqueConstraint("project_id", "shard", name="uq_project_usage_shards_project_shard"),)

    project_id: Mapped[UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    shard: Mapped[int] = mapped_column(SmallInteger)
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


Project.total_used_bytes = column_property(  # type: ignore[assignment]
    Project.__table__.c.used_bytes
    + func.coalesce(
        select(cast(func.sum(ProjectUsageShard.used_bytes), BigInteger))
        .where(ProjectUsageShard.project_id == Project.__table__.c.id)
        .correlate_except(ProjectUsageShard)
        .scalar_subquery(),
        0,
    )
)


class ApiKey(TenantModel):
    """An API key; only its HMAC is stored. `project_id` is null for an organization admin key."""

    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("organization_id", "prefix", name="uq_api_keys_org_prefix"),
        CheckConstraint("octet_length(key_hash) = 32", name="hash_len"),
        CheckConstraint("kind IN ('org_admin', 'project')", name="kind"),
        CheckConstraint("(kind = 'org_admin') = (project_id IS NULL)", name="kind_project"),
        Index("ix_api_keys_prefix", "prefix"),
        Index("ix_api_keys_project", "organization_id", "project_id", "created_at"),
    )

    project_id: Mapped[UUID | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), default=None)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[bytes] = mapped_column(LargeBinary)
    salt_generation: Mapped[str] = mapped_column(String(8), default="current", server_default=text("'current'"))
    last_used_at: Mapped[datetime.datetime | None] = mapped_column(TimestampUTC, default=None)
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(TimestampUTC, default=None)


class Device(TenantModel):
    """An enrolled device: the SHA-256 of its identifier and its Ed25519 public key."""

    __tablename__ = "devices"
    __table_args__ = (
        UniqueConstraint("organization_id", "project_id", "device_id_hash", name="uq_devices_project_hash"),
        CheckConstraint("octet_length(device_id_hash) = 32", name="hash_len"),
        CheckConstraint("octet_length(public_key) = 32", name="public_key_len"),
        Index("ix_devices_project", "organization_id", "project_id", "created_at"),
    )

    project_id: Mapped[UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    device_id_hash: Mapped[bytes] = mapped_column(LargeBinary)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    label: Mapped[str | None] = mapped_column(String(200), default=None)
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(TimestampUTC, default=None)


class DeviceProof(TenantModel):
    """A proof of possession already spent; kept until it could no longer pass the clock-skew check."""

    __tablename__ = "device_proofs"
    __table_args__ = (
        UniqueConstraint("organization_id", "proof_sha256", name="uq_device_proofs_hash"),
        CheckConstraint("octet_length(proof_sha256) = 32", name="hash_len"),
        Index("ix_device_proofs_expires", "expires_at"),
    )

    proof_sha256: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime.datetime] = mapped_column(TimestampUTC)
