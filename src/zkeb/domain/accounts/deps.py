"""Litestar dependency providers of the accounts domain: the services a handler receives as parameters.

Each service works in the request's ORM session (`db_session`, from the SQLAlchemy plugin); the accounts plugin
registers these providers on the app, so a handler asks for `project_service`, `api_key_service`,
`device_service` or `device_token_service` by name.
"""

from __future__ import annotations

from litestar.di import NamedDependency, Provide
from sqlalchemy.ext.asyncio import AsyncSession

from zkeb.domain.accounts.services import ApiKeyService, DeviceService, DeviceTokenService, ProjectService

__all__ = (
    "dependencies",
    "provide_api_key_service",
    "provide_device_service",
    "provide_device_token_service",
    "provide_project_service",
)


async def provide_project_service(db_session: NamedDependency[AsyncSession]) -> ProjectService:
    """Projects and their storage policy in the request's session."""
    return ProjectService(session=db_session)


async def provide_api_key_service(db_session: NamedDependency[AsyncSession]) -> ApiKeyService:
    """API keys (issue, list, revoke) in the request's session."""
    return ApiKeyService(session=db_session)


async def provide_device_service(db_session: NamedDependency[AsyncSession]) -> DeviceService:
    """Devices (enroll, list, revoke) in the request's session."""
    return DeviceService(session=db_session)


async def provide_device_token_service(db_session: NamedDependency[AsyncSession]) -> DeviceTokenService:
    """Device-token issuance from a proof of possession, in the request's session."""
    return DeviceTokenService(session=db_session)


def dependencies() -> dict[str, Provide]:
    """The domain's providers, by the parameter name handlers use."""
    return {
        "project_service": Provide(provide_project_service),
        "api_key_service": Provide(provide_api_key_service),
        "device_service": Provide(provide_device_service),
        "device_token_service": Provide(provide_device_token_service),
    }
