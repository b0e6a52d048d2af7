"""The repository service both backup services build on: committed backups in the request's session."""

from __future__ import annotations

from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from advanced_alchemy.service import SQLAlchemyAsyncRepositoryService
from sqlalchemy.ext.asyncio import AsyncSession

from zkeb.db.models import Backup

__all__ = ("BackupRepository", "BackupRepositoryService")


class BackupRepository(SQLAlchemyAsyncRepository[Backup]):
    """Backup repository."""

    model_type = Backup


class BackupRepositoryService(SQLAlchemyAsyncRepositoryService[Backup]):
    """A service over `BackupRepository` that also works with the request's session directly."""

    repository_type = BackupRepository

    @property
    def session(self) -> AsyncSession:
        """The unit of work (the request's session)."""
        session: AsyncSession = self.repository.session
        return session
