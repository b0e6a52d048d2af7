"""Route guards of the backups domain beyond the core ones (`zkeb.core.auth`)."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from zkeb.core.auth import DEVICE_TOKEN, ORG_ADMIN_KEY, PROJECT_KEY, accepts, principal_of

__all__ = ("requires_backup_or_org_admin",)


@accepts(ORG_ADMIN_KEY, PROJECT_KEY, DEVICE_TOKEN)
def requires_backup_or_org_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: a project key, a device token, or an org admin key (which reaches every backup of its organization)."""
    principal_of(connection)
