"""Zero-downtime behaviour of `zkeb serve`: SIGTERM drains an upload in flight; SIGKILL loses nothing visible."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from backups_support import MIB, Tenant, auth, make_tenant, sign_envelope, tus_headers

from support import free_port, make_settings

OCTETS = "application/offset+octet-stream"
GRACE_SECONDS = 30


@contextmanager
def zkeb_serve(env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m zkeb serve` in its own process group on a free port; yields the process and its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "zkeb", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env, "SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS), "LOG_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"zkeb serve exited with {process.returncode}: {process.stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/api/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("zkeb serve was not ready within 60 s")
            time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _payload(size: int) -> bytes:
    return hashlib.sha256(b"zkeb-shutdown").digest() * (size // 32) + b"x" * (size % 32)


async def _create_upload(client: httpx.AsyncClient, tenant: Tenant, envelope: Any, size: int) -> str:
    created = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(
            tenant.project_key, **{"Upload-Length": str(size), "Upload-Metadata": envelope.tus_metadata()}
        ),
    )
    assert created.status_code == 201, created.text
    location: str = created.headers["location"]
    return location


@pytest.fixture
def server_env(base_settings_env: dict[str, str], database_url: str) -> dict[str, str]:
    return {**base_settings_env, "DATABASE_URL": database_url}


async def test_sigterm_mid_upload_lets_the_upload_finish_then_exits_zero(
    server_env: dict[str, str],
    base_settings_env: dict[str, str],
    database_url: str,
    owner_connection: asyncpg.Connection,
) -> None:
    size = 50 * 1000 * 1000
    payload = _payload(size)
    refused_or_503: list[str] = []
    with zkeb_serve(server_env) as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            tenant = await make_tenant(client, make_settings(base_settings_env, DATABASE_URL=database_url))
            envelope = sign_envelope(tenant, payload)
            location = await _create_upload(client, tenant, envelope, size)

            async def body() -> AsyncIterator[bytes]:
                for offset in range(0, size, MIB):
                    if offset == 10 * MIB:
                        os.kill(process.pid, signal.SIGTERM)
                        await asyncio.sleep(1)
                        try:
                            async with httpx.AsyncClient(timeout=3) as fresh:
                                probe = await fresh.get(f"{url}/api/health/ready")
                            refused_or_503.append(str(probe.status_code))
                        except httpx.HTTPError as exc:
                            refused_or_503.append(type(exc).__name__)
                    yield payload[offset : offset + MIB]
                    await asyncio.sleep(0.01)

            patched = await client.patch(
                location,
                content=body(),
                headers=tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": OCTETS}),
            )
        assert patched.status_code == 204, patched.text
        backup_id = patched.headers["zkeb-backup-id"]
        returncode = process.wait(timeout=GRACE_SECONDS + 10)
    assert returncode == 0, process.stderr.read().decode()[-3000:] if process.stderr else ""
    assert refused_or_503, "the probe during the drain did not run"
    assert refused_or_503[0] in {"503", "ConnectError"}
    stored = await owner_connection.fetchrow(
        "SELECT encrypted_payload_size, payload_sha256 FROM backups WHERE id = $1", uuid.UUID(backup_id)
    )
    assert stored is not None
    assert stored["encrypted_payload_size"] == size
    assert bytes(stored["payload_sha256"]) == hashlib.sha256(payload).digest()


async def test_sigkill_mid_upload_leaves_no_backup_and_the_upload_resumes_on_a_fresh_process(
    server_env: dict[str, str],
    base_settings_env: dict[str, str],
    database_url: str,
    owner_connection: asyncpg.Connection,
) -> None:
    size = 12 * MIB + 12345
    payload = _payload(size)
    with zkeb_serve(server_env) as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            tenant = await make_tenant(client, make_settings(base_settings_env, DATABASE_URL=database_url))
            envelope = sign_envelope(tenant, payload)
            location = await _create_upload(client, tenant, envelope, size)

            async def body() -> AsyncIterator[bytes]:
                for offset in range(0, size, MIB):
                    if offset == 5 * MIB:
                        await asyncio.sleep(0.5)
                        os.killpg(process.pid, signal.SIGKILL)
                        await asyncio.sleep(0.5)
                    yield payload[offset : offset + MIB]

            with pytest.raises(httpx.HTTPError):
                await client.patch(
                    location,
                    content=body(),
                    headers=tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": OCTETS}),
                )
        process.wait(timeout=30)
    assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 0
    with zkeb_serve(server_env) as (_, url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            path = httpx.URL(location).path
            head = await client.head(path, headers=tus_headers(tenant.project_key))
            assert head.status_code == 200
            offset = int(head.headers["upload-offset"])
            assert 0 <= offset < size
            resumed = await client.patch(
                path,
                content=payload[offset:],
                headers=tus_headers(tenant.project_key, **{"Upload-Offset": str(offset), "Content-Type": OCTETS}),
            )
            assert resumed.status_code == 204, resumed.text
            backup_id = resumed.headers["zkeb-backup-id"]
            restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert restored.status_code == 200
    assert hashlib.sha256(restored.content).digest() == hashlib.sha256(payload).digest()
