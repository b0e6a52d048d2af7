"""Shared column helpers for ZKEB's models."""

from __future__ import annotations

import datetime
from uuid import UUID

from advanced_alchemy.base import UUIDv7AuditBase
from advanced_alchemy.types import DateTimeUTC
from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, declared_attr, mapped_column

__all__ = ("TenantModel", "utcnow")


def utcnow() -> datetime.datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.datetime.now(datetime.UTC)


class TenantModel(UUIDv7AuditBase):
    """A row owned by one organization; row-level security filters on `organization_id`."""

    __abstract__ = True

    @declared_attr
    def organization_id(cls) -> Mapped[UUID]:  # noqa: N805 - SQLAlchemy's declared_attr passes the class
        return mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=False, nullable=False)


TimestampUTC = DateTimeUTC(timezone=True)
