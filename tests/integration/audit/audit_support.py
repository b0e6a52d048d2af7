"""Helpers for the audit tests: organizations with admin keys, and events written through the real writer."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from zkeb.core.audit import record_event
from zkeb.core.tenancy import install_tenant_setter, tenant_scope
from zkeb.domain.accounts.services import OrganizationService
from zkeb.settings import Settings


async def create_org(engine: AsyncEngine, settings: Settings, name: str = "acme") -> tuple[uuid.UUID, str]:
    """A new organization and its first org admin key."""
    install_tenant_setter()
    async with async_sessionmaker(engine, expire_on_commit=False)() as session:
        organization, admin_key = await OrganizationService(session=session).create_with_admin_key(
            name, salt=settings.secrets.api_key_salt
        )
    return organization.id, admin_key.key


async def write_events(engine: AsyncEngine, settings: Settings, org_id: uuid.UUID, count: int, **fields: Any) -> None:
    """Append `count` events to `org_id`'s chain, one transaction each."""
    install_tenant_setter()
    for n in range(count):
        with tenant_scope(org_id):
            async with async_sessionmaker(engine)() as session, session.begin():
                await record_event(
                    session,
                    organization_id=org_id,
                    action=fields.get("action", "test.event"),
                    actor_type="cli",
                    actor_id=f"writer-{n}",
                    details={"n": n},
                    settings=settings,
                )
