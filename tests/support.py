"""Helpers shared by the tests (importable as `support`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import async_sessionmaker

from zkeb.core.database import create_app_engine
from zkeb.core.tenancy import install_tenant_setter
from zkeb.domain.accounts.services import OrganizationService
from zkeb.settings import Settings

__all__ = ("create_org", "free_port", "granian_server", "make_settings", "problem")


def make_settings(base: dict[str, str], **overrides: str) -> Settings:
    """Settings from the shared test environment plus `overrides` (env-var names as keys)."""
    return Settings.from_env({**base, **overrides})


def problem(response: Any) -> dict[str, Any]:
    """Assert `response` is RFC 9457 problem+json and return its body."""
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == response.status_code
    assert body["title"]
    return body


async def create_org(settings: Settings, name: str | None = None) -> tuple[uuid.UUID, str]:
    """A new organization and its first org admin key, made as `zkeb admin create-org` does (own engine)."""
    assert settings.database_url is not None
    install_tenant_setter()
    engine = create_app_engine(settings, settings.database_url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            organization, admin_key = await OrganizationService(session=session).create_with_admin_key(
                name or f"org-{uuid.uuid4().hex[:8]}", salt=settings.secrets.api_key_salt, settings=settings
            )
    finally:
        await engine.dispose()
    return organization.id, admin_key.key


def free_port() -> int:
    """A TCP port free right now on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def granian_server(env: dict[str, str], *, workers: int = 1) -> Iterator[str]:
    """Run `granian --interface asgi --factory zkeb.app:create_app` on a free port; yields its base URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "granian",
        "--interface",
        "asgi",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--workers-kill-timeout",
        "10",
        "zkeb.app:create_app",
    ]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"granian exited with {process.returncode}: {log.read().decode()[-4000:]}")
            try:
                if httpx.get(f"{base_url}/api/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("granian did not become ready in 60 s")
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
