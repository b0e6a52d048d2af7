"""Development seed data: a demo organization, project, project key and device, made through the services.

Idempotent: fixed ids (those of the reference deployment design's seed), so a second run finds what the
first made and creates nothing. Keys are shown only by the run that creates them. The demo device's
Ed25519 private key is derived from a published constant so a developer can sign envelopes with it:
it is for local development only, and the seed refuses to run with `ZKEB_ENV=production`.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from uuid import UUID

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from zkeb.core.database import create_app_engine
from zkeb.core.tenancy import TENANT_INFO_KEY, install_tenant_setter
from zkeb.db.models import Device, Organization, Project
from zkeb.domain.accounts.schemas import DeviceEnroll, ProjectCreate
from zkeb.domain.accounts.services import ApiKeyService, DeviceService, OrganizationService, ProjectService
from zkeb.settings import Settings

__all__ = (
    "DEMO_DEVICE_ID_HASH",
    "DEMO_ORGANIZATION_ID",
    "DEMO_PROJECT_ID",
    "SeedResult",
    "demo_device_private_key",
    "seed_demo_data",
)

DEMO_ORGANIZATION_ID = UUID("123e4567-e89b-12d3-a456-426614174000")
DEMO_PROJECT_ID = UUID("323e4567-e89b-12d3-a456-426614174000")
DEMO_DEVICE_ID_HASH = hashlib.sha256(b"zkeb-demo-device").digest()
_DEMO_DEVICE_KEY_SEED = hashlib.sha256(b"zkeb-demo-device-private-key (development only)").digest()


def demo_device_private_key() -> Ed25519PrivateKey:
    """The demo device's signing key (published: development only)."""
    return Ed25519PrivateKey.from_private_bytes(_DEMO_DEVICE_KEY_SEED)


@dataclass(frozen=True)
class SeedResult:
    """What the seed made or found. Keys are set only when this run created them."""

    organization_id: UUID
    project_id: UUID
    device_id: UUID
    device_id_hash: str
    device_private_key_seed: str
    admin_key: str | None
    project_key: str | None
    created: tuple[str, ...]


async def _seed(session: AsyncSession, settings: Settings) -> SeedResult:
    created: list[str] = []
    admin_key = project_key = None
    session.info[TENANT_INFO_KEY] = DEMO_ORGANIZATION_ID
    if await session.get(Organization, DEMO_ORGANIZATION_ID) is None:
        _, new_admin = await OrganizationService(session=session).create_with_admin_key(
            "Demo Organization",
            salt=settings.secrets.api_key_salt_new or settings.secrets.api_key_salt,
            settings=settings,
            organization_id=DEMO_ORGANIZATION_ID,
        )
        admin_key = new_admin.key
        created.append("organization")
    if await session.get(Project, DEMO_PROJECT_ID) is None:
        await ProjectService(session=session).create_project(
            ProjectCreate(name="Demo Project"),
            organization_id=DEMO_ORGANIZATION_ID,
            default_quota=settings.default_project_quota,
            project_id=DEMO_PROJECT_ID,
        )
        new_key = await ApiKeyService(session=session).issue(
            organization_id=DEMO_ORGANIZATION_ID,
            project_id=DEMO_PROJECT_ID,
            name="demo project key",
            salt=settings.secrets.api_key_salt_new or settings.secrets.api_key_salt,
        )
        project_key = new_key.key
        created.append("project")
    devices = DeviceService(session=session)
    device = await devices.get_one_or_none(
        Device.project_id == DEMO_PROJECT_ID, Device.device_id_hash == DEMO_DEVICE_ID_HASH
    )
    if device is None:
        public = demo_device_private_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        device = await devices.enroll(
            DeviceEnroll(
                device_id_hash=DEMO_DEVICE_ID_HASH.hex(),
                public_key=base64.b64encode(public).decode(),
                label="Demo device",
            ),
            organization_id=DEMO_ORGANIZATION_ID,
            project_id=DEMO_PROJECT_ID,
        )
        created.append("device")
    await session.commit()
    return SeedResult(
        organization_id=DEMO_ORGANIZATION_ID,
        project_id=DEMO_PROJECT_ID,
        device_id=device.id,
        device_id_hash=DEMO_DEVICE_ID_HASH.hex(),
        device_private_key_seed=_DEMO_DEVICE_KEY_SEED.hex(),
        admin_key=admin_key,
        project_key=project_key,
        created=tuple(created),
    )


async def seed_demo_data(settings: Settings, url: str) -> SeedResult:
    """Create whatever part of the demo data is missing (as the runtime role, under the demo tenant).

    Raises:
        RuntimeError: `ZKEB_ENV=production`.
    """
    if settings.is_production:
        msg = "refusing to seed demo data with ZKEB_ENV=production"
        raise RuntimeError(msg)
    install_tenant_setter()
    engine = create_app_engine(settings, url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            return await _seed(session, settings)
    finally:
        await engine.dispose()
