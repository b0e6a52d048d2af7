"""Migration safety: every migration steps down and up again on a populated database without losing a row."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid

import asyncpg
import pytest
from alembic.script import ScriptDirectory
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import async_sessionmaker

from zkeb.app import create_app
from zkeb.core.database import create_app_engine, migrations_dir
from zkeb.core.migrations import run_alembic
from zkeb.core.tenancy import install_tenant_setter
from zkeb.db.models import TENANT_TABLES
from zkeb.domain.accounts.services import OrganizationService
from zkeb.settings import Settings

from support import sign_backup


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


async def _populate(settings: Settings) -> None:
    """An organization with a project, a key, a device and two backups, made through the service and the API."""
    assert settings.database_url
    install_tenant_setter()
    engine = create_app_engine(settings, settings.database_url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            _, admin = await OrganizationService(session=session).create_with_admin_key(
                "migrating", salt=settings.secrets.api_key_salt, settings=settings
            )
    finally:
        await engine.dispose()
    headers = {"Authorization": f"Bearer {admin.key}"}
    async with AsyncTestClient(app=create_app(settings)) as client:
        project = (await client.post("/api/v1/projects", json={"name": "app"}, headers=headers)).json()
        key = (
            await client.post(f"/api/v1/projects/{project['id']}/api-keys", json={"name": "k"}, headers=headers)
        ).json()["key"]
        private = Ed25519PrivateKey.generate()
        device_hash = hashlib.sha256(b"device").digest()
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        enrolled = await client.post(
            f"/api/v1/projects/{project['id']}/devices",
            json={"device_id_hash": device_hash.hex(), "public_key": _b64(public)},
            headers=headers,
        )
        assert enrolled.status_code == 201, enrolled.text
        for _ in range(2):
            envelope = sign_backup(
                private,
                project_id=uuid.UUID(project["id"]),
                device_id_hash=device_hash,
                payload=os.urandom(3 * 1024 * 1024 + 7),
                metadata=b"meta",
            )
            created = await client.post(
                "/api/v1/backups",
                json=envelope.json(),
                headers={"Authorization": f"Bearer {key}"},
            )
            assert created.status_code == 201, created.text


async def _snapshot(url: str) -> dict[str, list[str]]:
    """Every tenant table's row ids and content digests, as the owner sees them."""
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        snapshot: dict[str, list[str]] = {}
        for table in ("organizations", *TENANT_TABLES):
            rows = await connection.fetch(f"SELECT id, md5(t::text) AS digest FROM {table} t ORDER BY id")
            snapshot[table] = [f"{row['id']}:{row['digest']}" for row in rows]
        chunks = await connection.fetch("SELECT md5(data) AS digest FROM backup_chunks ORDER BY id")
        snapshot["backup_chunks.data"] = [row["digest"] for row in chunks]
        return snapshot
    finally:
        await connection.close()


def _revisions_after_the_first() -> list[str]:
    script = ScriptDirectory(str(migrations_dir()))
    ordered = [revision.revision for revision in reversed(list(script.walk_revisions()))]
    return ordered[1:]


@pytest.mark.parametrize("revision", _revisions_after_the_first())
async def test_each_migration_down_and_up_again_loses_no_row(
    revision: str, settings: Settings, database_url: str
) -> None:
    await _populate(settings)
    before = await _snapshot(database_url)
    assert before["backups"]
    assert len(before["backup_chunks.data"]) >= 8
    script = ScriptDirectory(str(migrations_dir()))
    down_to = script.get_revision(revision).down_revision
    assert isinstance(down_to, str)
    run_alembic(settings, database_url, "downgrade", down_to)
    run_alembic(settings, database_url, "upgrade", "head")
    assert await _snapshot(database_url) == before
    async with AsyncTestClient(app=create_app(settings)) as client:
        assert (await client.get("/api/health/ready")).status_code == 200


async def test_all_the_way_down_and_up_again_leaves_an_empty_working_schema(
    settings: Settings, database_url: str
) -> None:
    await _populate(settings)
    run_alembic(settings, database_url, "downgrade", "base")
    run_alembic(settings, database_url, "upgrade", "head")
    after = await _snapshot(database_url)
    assert all(not rows for rows in after.values())
    async with AsyncTestClient(app=create_app(settings)) as client:
        assert (await client.get("/api/health/ready")).status_code == 200
