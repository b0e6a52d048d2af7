"""Account services. Every call runs inside a transaction whose tenant is the organization acted for."""

from __future__ import annotations

from dataclasses import dataclass

from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from advanced_alchemy.service import SQLAlchemyAsyncRepositoryService
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from zkeb.core.tenancy import TENANT_INFO_KEY
from zkeb.db.models import ApiKey, Organization
from zkeb.lib.apikeys import generate_api_key, hash_api_key, public_prefix

__all__ = ("ApiKeyService", "NewApiKey", "OrganizationService")


@dataclass(frozen=True)
class NewApiKey:
    """A freshly issued key: `key` is shown once and never stored."""

    record: ApiKey
    key: str


class OrganizationService(SQLAlchemyAsyncRepositoryService[Organization]):
    """Organizations (tenants)."""

    class Repo(SQLAlchemyAsyncRepository[Organization]):
        """Organization repository."""

        model_type = Organization

    repository_type = Repo

    async def create_with_admin_key(self, name: str, *, salt: str) -> tuple[Organization, NewApiKey]:
        """Create an organization and its first org admin key in one transaction."""
        organization = Organization(id=uuid7(), name=name)
        # The new row is only visible to (and insertable by) a transaction acting for it.
        self.repository.session.info[TENANT_INFO_KEY] = organization.id
        organization = await self.create(organization, auto_commit=False)
        admin_key = await ApiKeyService(session=self.repository.session).issue(
            organization_id=organization.id, project_id=None, name="bootstrap admin key", salt=salt
        )
        await self.repository.session.commit()
        return organization, admin_key


class ApiKeyService(SQLAlchemyAsyncRepositoryService[ApiKey]):
    """API keys: issued once, stored as HMACs."""

    class Repo(SQLAlchemyAsyncRepository[ApiKey]):
        """API key repository."""

        model_type = ApiKey

    repository_type = Repo

    async def issue(self, *, organization_id: object, project_id: object | None, name: str, salt: str) -> NewApiKey:
        """Create a key for a project (or, with no project, an org admin key)."""
        key = generate_api_key()
        prefix = public_prefix(key)
        assert prefix is not None
        record = ApiKey(
            organization_id=organization_id,
            project_id=project_id,
            kind="project" if project_id else "org_admin",
            name=name,
            prefix=prefix,
            key_hash=hash_api_key(salt, key),
        )
        record = await self.create(record, auto_commit=False)
        return NewApiKey(record=record, key=key)


_ = AsyncSession
