"""Litestar dependency providers of the backups domain: the services a handler receives as parameters.

Each service works in the request's ORM session (`db_session`, from the SQLAlchemy plugin); the backups plugin
registers these providers on the app, so a handler asks for `backup_service` or `lifecycle_service` by name.
"""

from __future__ import annotations

from litestar.di import NamedDependency, Provide
from sqlalchemy.ext.asyncio import AsyncSession

from zkeb.domain.backups.services.backups import BackupService
from zkeb.domain.backups.services.lifecycle import LifecycleService

__all__ = ("dependencies", "provide_backup_service", "provide_lifecycle_service")


async def provide_backup_service(db_session: NamedDependency[AsyncSession]) -> BackupService:
    """Backups (admission, commit, reads) in the request's session."""
    return BackupService(session=db_session)


async def provide_lifecycle_service(db_session: NamedDependency[AsyncSession]) -> LifecycleService:
    """Quota, usage, the trash and append-only rules in the request's session."""
    return LifecycleService(session=db_session)


def dependencies() -> dict[str, Provide]:
    """The domain's providers, by the parameter name handlers use."""
    return {
        "backup_service": Provide(provide_backup_service),
        "lifecycle_service": Provide(provide_lifecycle_service),
    }
