"""Helpers shared by the tests (importable as `support`)."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import msgspec
import pgserver
import pytest
from aiobotocore.session import get_session
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import async_sessionmaker

from zkeb.core.database import create_app_engine
from zkeb.core.tenancy import install_tenant_setter
from zkeb.domain.accounts.services import OrganizationService
from zkeb.domain.backups.jobs.maintenance import MaintenanceReport, MaintenanceRunner
from zkeb.domain.backups.plugin import payload_stores
from zkeb.domain.backups.store.payloads import PostgresPayloadStore
from zkeb.domain.backups.store.s3 import S3PayloadStore
from zkeb.lib.envelope import backup_signed_message, format_rfc3339_utc
from zkeb.settings import PayloadStoreSettings, Settings, normalize_database_url

__all__ = (
    "PROJECT_USED_BYTES",
    "Envelope",
    "assert_bucket_holds_exactly_the_chunks",
    "audit_linked",
    "create_org",
    "free_port",
    "granian_server",
    "maintenance_pass",
    "make_settings",
    "problem",
    "raw_s3_client",
    "sign_backup",
)

#: A project's used bytes in SQL over `projects p`: its counter plus its usage shards (what the API reports).
PROJECT_USED_BYTES = (
    "(p.used_bytes"
    " + coalesce((SELECT sum(s.used_bytes) FROM project_usage_shards s WHERE s.project_id = p.id), 0)::bigint)"
)


async def audit_linked(connection: Any, organization_id: uuid.UUID) -> None:
    """Wait until the server's audit linker has chained the organization's waiting events (asyncpg, as the owner).

    A backup's commit leaves its events unchained for a moment (see `zkeb.core.audit_linker`); a test that reads
    `audit_events` itself, rather than through the audit API (which links first), waits for them here.
    """
    for _ in range(750):  # 15 s
        waiting = await connection.fetchval(
            "SELECT count(*) FROM audit_pending_events WHERE organization_id = $1", organization_id
        )
        if not waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{waiting} audit events were never linked")


#: The payload stores a server can write to (the `payload_store_env` fixture of conftest.py).
STORES = ("postgres", "s3")
#: For a test about one store's own storage (PostgreSQL's `backup_chunks.data`, or the bucket's objects); in the
#: directories that `parametrize_stores` covers, every other test runs with each store.
POSTGRES_ONLY = pytest.mark.parametrize("payload_store_env", ["postgres"], indirect=True)
S3_ONLY = pytest.mark.parametrize("payload_store_env", ["s3"], indirect=True)


def parametrize_stores(metafunc: pytest.Metafunc) -> None:
    """Run a test whose app is built from `payload_store_env` (through `settings`, `app` or `client`) once per
    store, unless it names its own (`POSTGRES_ONLY`, `S3_ONLY`); conftest.py applies it to backups and lifecycle."""
    if "payload_store_env" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if "payload_store_env" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return
    metafunc.parametrize("payload_store_env", STORES, indirect=True)


def store_chunk_size(settings: Settings) -> int:
    """Plaintext bytes per chunk of the payloads a server with `settings` writes (each store cuts its own)."""
    return S3PayloadStore.chunk_size if settings.payload_store.kind == "s3" else PostgresPayloadStore.chunk_size


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


@dataclass(frozen=True)
class Envelope:
    """A backup envelope with raw bytes fields, as a device builds it."""

    container_id: uuid.UUID
    device_id_hash: bytes
    payload: bytes
    payload_nonce: bytes
    payload_auth_tag: bytes
    metadata: bytes
    metadata_nonce: bytes
    metadata_auth_tag: bytes
    signature: bytes
    backup_timestamp: str

    def with_(self, **changes: Any) -> Envelope:
        """A copy with some fields changed (the signature stays as it was)."""
        return replace(self, **changes)

    def fields(self) -> dict[str, Any]:
        """Every field in wire order, as the msgpack body carries it: bytes as bytes, the id and time as strings."""
        return {
            "container_id": str(self.container_id),
            "device_id_hash": self.device_id_hash,
            "payload": self.payload,
            "payload_nonce": self.payload_nonce,
            "payload_auth_tag": self.payload_auth_tag,
            "metadata": self.metadata,
            "metadata_nonce": self.metadata_nonce,
            "metadata_auth_tag": self.metadata_auth_tag,
            "signature": self.signature,
            "backup_timestamp": self.backup_timestamp,
        }

    def json(self) -> dict[str, Any]:
        """The JSON body: bytes as standard base64, `device_id_hash` as hex."""
        body = {name: _b64(value) if isinstance(value, bytes) else value for name, value in self.fields().items()}
        body["device_id_hash"] = self.device_id_hash.hex()
        return body

    def msgpack(self) -> bytes:
        """The msgpack body: bytes as `bin`."""
        return msgspec.msgpack.encode(self.fields())

    def tus_metadata_values(self) -> dict[str, bytes]:
        """The `Upload-Metadata` values (raw, before tus's base64): every field but the payload."""
        return {
            name: value if isinstance(value, bytes) else value.encode()
            for name, value in self.fields().items()
            if name != "payload"
        }

    def tus_text_metadata(self) -> dict[str, str]:
        """The metadata map a string-only tus client sends: every field but the payload in its JSON text form."""
        return {name: value for name, value in self.json().items() if name != "payload"}

    def tus_metadata(self, *, text: bool = False) -> str:
        """The `Upload-Metadata` header: bytes fields raw, or in their JSON text form when `text`."""
        if text:
            values = {name: value.encode() for name, value in self.tus_text_metadata().items()}
        else:
            values = self.tus_metadata_values()
        return ",".join(f"{k} {base64.b64encode(v).decode()}" for k, v in values.items())


def sign_backup(
    private_key: Ed25519PrivateKey,
    *,
    project_id: uuid.UUID,
    device_id_hash: bytes,
    payload: bytes,
    container_id: uuid.UUID | None = None,
    payload_nonce: bytes | None = None,
    metadata: bytes = b"encrypted-metadata",
    timestamp: datetime | None = None,
) -> Envelope:
    """An envelope for `payload` signed with the device's `private_key` as DESIGN.md specifies.

    The nonces and tags are random: the server checks the signature over them, not that they decrypt anything.
    """
    container = container_id or uuid.uuid4()
    nonce = payload_nonce or os.urandom(12)
    tag, metadata_nonce, metadata_tag = os.urandom(16), os.urandom(12), os.urandom(16)
    when = timestamp or datetime.now(UTC)
    message = backup_signed_message(
        project_id=project_id,
        container_id=container,
        device_id_hash=device_id_hash,
        backup_timestamp=when,
        payload_nonce=nonce,
        payload_auth_tag=tag,
        payload_sha256=hashlib.sha256(payload).digest(),
        payload_size=len(payload),
        metadata_nonce=metadata_nonce,
        metadata_auth_tag=metadata_tag,
        metadata_sha256=hashlib.sha256(metadata).digest(),
        metadata_size=len(metadata),
    )
    return Envelope(
        container_id=container,
        device_id_hash=device_id_hash,
        payload=payload,
        payload_nonce=nonce,
        payload_auth_tag=tag,
        metadata=metadata,
        metadata_nonce=metadata_nonce,
        metadata_auth_tag=metadata_tag,
        signature=private_key.sign(message),
        backup_timestamp=format_rfc3339_utc(when),
    )


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


@contextmanager
def embedded_cluster() -> Iterator[str]:
    """A PostgreSQL server of its own (pgserver, in a temporary directory), stopped and deleted at the end; yields
    its URL as `postgresql+asyncpg://` (the `postgres` database)."""
    # Not under pytest's basetemp: pytest prunes old basetemp folders, which would delete the data directory
    # of a server still in use by a concurrent run.
    root = Path(tempfile.mkdtemp(prefix="zkeb-pg-"))
    server = pgserver.get_server(root / "pgdata", cleanup_mode="stop")
    try:
        yield normalize_database_url(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector off (after one collection): whatever a reference cycle keeps stays kept."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def open_server_connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the server a PostgreSQL or Redis URL names: its TCP host and port, or its Unix socket (the
    embedded servers': PostgreSQL's socket directory in `?host=`, as libpq writes it, or Redis's `unix://` path)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return await asyncio.open_unix_connection(parts.path)
    port = parts.port or (6379 if parts.scheme.startswith("redis") else 5432)
    socket_directory = parse_qs(parts.query).get("host", [""])[0]
    if socket_directory.startswith("/"):
        return await asyncio.open_unix_connection(f"{socket_directory}/.s.PGSQL.{port}")
    return await asyncio.open_connection(parts.hostname or "127.0.0.1", port)


def url_through_loopback_port(url: str, port: int) -> str:
    """`url` naming a relay on 127.0.0.1:`port` in front of its server (a Unix socket's address dropped)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"redis://127.0.0.1:{port}/0"
    query = urlencode([(name, value) for name, value in parse_qsl(parts.query) if name != "host"])
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, f"{credentials}127.0.0.1:{port}", parts.path, query, parts.fragment))


def free_port() -> int:
    """A TCP port free right now on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def granian_server(env: dict[str, str], *, workers: int = 1, log_path: Path | None = None) -> Iterator[str]:
    """Run `granian --interface asgi --factory zkeb.app:create_app` on a free port; yields its base URL.

    The server's output goes to `log_path` when given (for a test to read), else to a temporary file.
    """
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
    log = log_path.open("w+b") if log_path is not None else tempfile.TemporaryFile()  # noqa: SIM115 - closed below
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


@asynccontextmanager
async def raw_s3_client(settings: PayloadStoreSettings) -> AsyncIterator[Any]:
    """A plain S3 client of the store's endpoint, to look at (and tamper with) objects as anyone with access could."""
    async with get_session().create_client(
        "s3", region_name=settings.region, endpoint_url=settings.endpoint_url
    ) as client:
        yield client


async def maintenance_pass(settings: Settings, **runner_options: Any) -> MaintenanceReport:
    """One maintenance pass as `zkeb maintenance run --once` makes it: its own engine and, when payloads go to S3,
    its own S3 client, so the pass also drains the object deletions (the test client's app runs in another thread)."""
    assert settings.database_url is not None
    engine = create_app_engine(settings, settings.database_url)
    _, objects = payload_stores(settings)
    try:
        if objects is None:
            return await MaintenanceRunner(engine, settings, **runner_options).run_once()
        async with objects:
            return await MaintenanceRunner(engine, settings, objects=objects, **runner_options).run_once()
    finally:
        await engine.dispose()


async def assert_bucket_holds_exactly_the_chunks(settings: Settings, owner: Any) -> None:
    """After a maintenance pass: with `PAYLOAD_STORE=s3`, the bucket holds one object per chunk row of an `s3` payload
    and nothing else (no object of a deleted payload, of an expired upload or of a refused commit is left), and no
    deletion waits; with either, every payload lives in the configured store. `owner`: asyncpg, as the owner."""
    store = settings.payload_store
    assert await owner.fetchval("SELECT count(*) FROM payloads WHERE store <> $1", store.kind) == 0
    waiting = await owner.fetchval("SELECT count(*) FROM payload_object_deletions")
    assert waiting == 0, f"{waiting} payloads' objects still wait for deletion"
    if store.kind != "s3":
        return
    rows = await owner.fetch(
        "SELECT p.organization_id, p.id, c.seq FROM backup_chunks c JOIN payloads p ON p.id = c.payload_id"
        " WHERE p.store = 's3'"
    )
    expected = {f"{store.prefix}payloads/{r['organization_id']}/{r['id']}/{r['seq']:08d}" for r in rows}
    async with raw_s3_client(store) as client:
        paginator = client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=store.bucket)
        stored = {item["Key"] async for page in pages for item in page.get("Contents", [])}
    assert stored - expected == set(), "objects with no chunk row are left in the bucket"
    assert expected - stored == set(), "chunk rows have no object"


class StandInRequest:
    """Stands for the request a handler's frames hold (and granian's connection with it): tests that look for a
    reference cycle keeping a request alive hold one of these where a handler would hold its request."""
