"""Upload and restore throughput of ZKEB end to end, against the raw PostgreSQL ceilings of the same server.

    uv run python bench/upload.py            # DATABASE_URL of a PostgreSQL superuser, default the local one
    uv run python bench/upload.py --store s3 # PAYLOAD_STORE=s3 against raw S3 put/get instead (bench/upload_s3.py)

Starts `granian --interface asgi --factory zkeb.app:create_app` with production settings (ZKEB_ENV=production,
secrets generated for this run, a fresh database on the PostgreSQL server), then for 1, 10 and 100 MiB payloads:

- upload: one tus PATCH (signature verification, hashing and at-rest encryption on), timed from its first byte to
  its response (the backup is committed then), sent twice: streamed by httpx from a generator, as an application
  would, and over a plain socket (the server's rate without the client's cost: the ratio's);
- restore: `GET /api/v1/backups/{id}/payload` streamed and discarded (decryption on);
- first, `WARM_UP_ROUNDS` untimed 1 MiB uploads and restores (a running server's connections and code paths are
  warm; a fresh one's first 1 MiB PATCHes took 24-31 ms against 14-17 ms once warm);
- ceilings, on the same database server in the same run: asyncpg writes the same bytes as 1 MiB bytea rows in one
  transaction (binary COPY and executemany INSERT; the faster is the ceiling), and reads them back with a cursor.

Prints MiB/s, ours/ceiling, and the granian worker's peak RSS (VmHWM) after the 1 MiB and after the 100 MiB runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from harness import (
    ROOT,
    add_database_option,
    create_database,
    create_org,
    drop_database,
    granian,
    production_env,
    with_database,
    worker_pid,
)

from zkeb.lib.envelope import backup_signed_message, format_rfc3339_utc

MIB = 1024 * 1024
SIZES_MIB = (1, 10, 100)
PIECE = MIB  # bytes per piece the client's generator yields
#: Untimed 1 MiB uploads and restores before the measured ones: as many as the server's pooled connections.
WARM_UP_ROUNDS = 10


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


class Device:
    """The benchmark's enrolled device."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.hash = hashlib.sha256(uuid.uuid4().bytes).digest()

    def metadata_header(self, project_id: uuid.UUID, payload: bytes) -> str:
        nonce, tag, metadata_nonce, metadata_tag = os.urandom(12), os.urandom(16), os.urandom(12), os.urandom(16)
        metadata = b"bench-metadata"
        when = datetime.now(UTC)
        container = uuid.uuid4()
        message = backup_signed_message(
            project_id=project_id,
            container_id=container,
            device_id_hash=self.hash,
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
        values = {
            "container_id": str(container).encode(),
            "device_id_hash": self.hash,
            "payload_nonce": nonce,
            "payload_auth_tag": tag,
            "metadata": metadata,
            "metadata_nonce": metadata_nonce,
            "metadata_auth_tag": metadata_tag,
            "signature": self.key.sign(message),
            "backup_timestamp": format_rfc3339_utc(when).encode(),
        }
        return ",".join(f"{k} {base64.b64encode(v).decode()}" for k, v in values.items())


async def provision(client: httpx.AsyncClient, admin_key: str) -> tuple[uuid.UUID, str, Device]:
    """A project, an API key for it and an enrolled device, made with the organization admin key."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    project = (await client.post("/api/v1/projects", json={"name": "bench"}, headers=headers)).json()
    project_id = uuid.UUID(project["id"])
    key = (await client.post(f"/api/v1/projects/{project_id}/api-keys", json={"name": "b"}, headers=headers)).json()
    device = Device()
    public = device.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    enrolled = await client.post(
        f"/api/v1/projects/{project_id}/devices",
        json={"device_id_hash": device.hash.hex(), "public_key": base64.b64encode(public).decode(), "label": "b"},
        headers=headers,
    )
    enrolled.raise_for_status()
    return project_id, key["key"], device


async def _pieces(payload: bytes) -> AsyncIterator[bytes]:
    view = memoryview(payload)
    for start in range(0, len(payload), PIECE):
        yield bytes(view[start : start + PIECE])


async def _create_upload(
    client: httpx.AsyncClient, key: str, project_id: uuid.UUID, device: Device, payload: bytes
) -> str:
    """The location of a new tus upload for `payload` (untimed)."""
    created = await client.post(
        "/api/v1/uploads",
        headers={
            "Tus-Resumable": "1.0.0",
            "Authorization": f"Bearer {key}",
            "Upload-Length": str(len(payload)),
            "Upload-Metadata": device.metadata_header(project_id, payload),
        },
    )
    created.raise_for_status()
    return created.headers["location"]


async def _upload(
    client: httpx.AsyncClient, key: str, project_id: uuid.UUID, device: Device, payload: bytes
) -> tuple[float, str]:
    """One tus PATCH streamed by httpx from a generator, as an application would send it; (seconds, backup id)."""
    tus = {"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {key}"}
    location = await _create_upload(client, key, project_id, device, payload)
    started = time.perf_counter()
    patched = await client.patch(
        location,
        content=_pieces(payload),
        headers={
            **tus,
            "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(len(payload)),
        },
    )
    elapsed = time.perf_counter() - started
    if patched.status_code != 204:
        raise RuntimeError(f"PATCH answered {patched.status_code}: {patched.text}")
    return elapsed, patched.headers["zkeb-backup-id"]


async def _upload_raw(
    client: httpx.AsyncClient, key: str, project_id: uuid.UUID, device: Device, payload: bytes
) -> tuple[float, str]:
    """The same PATCH over a plain socket, in `PIECE`s: the server's rate without an HTTP library's cost.

    Timed from the request's first byte to the end of the response's head (the backup is committed then).
    """
    url = httpx.URL(str(client.base_url))
    location = httpx.URL(await _create_upload(client, key, project_id, device, payload))
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        started = time.perf_counter()
        writer.write(
            (
                f"PATCH {location.path} HTTP/1.1\r\nHost: {url.host}\r\nTus-Resumable: 1.0.0\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/offset+octet-stream\r\n"
                f"Upload-Offset: 0\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        view = memoryview(payload)
        for start in range(0, len(payload), PIECE):  # streamed, as a client reading a file sends it
            writer.write(view[start : start + PIECE])
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        elapsed = time.perf_counter() - started
    finally:
        writer.close()
    if not head.startswith(b"HTTP/1.1 204"):
        status_line = head.split(b"\r\n", 1)[0]
        raise RuntimeError(f"PATCH answered {status_line!r}")
    backup_id = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"zkeb-backup-id:")
    )
    return elapsed, backup_id


async def _restore(client: httpx.AsyncClient, key: str, backup_id: str, expected: int) -> float:
    started = time.perf_counter()
    received = 0
    async with client.stream(
        "GET", f"/api/v1/backups/{backup_id}/payload", headers={"Authorization": f"Bearer {key}"}
    ) as response:
        response.raise_for_status()
        async for piece in response.aiter_raw():
            received += len(piece)
    elapsed = time.perf_counter() - started
    if received != expected:
        raise RuntimeError(f"restored {received} bytes, expected {expected}")
    return elapsed


async def _restore_raw(base_url: str, key: str, backup_id: str, expected: int) -> float:
    """Restore over a plain socket with large reads: the server's throughput without an HTTP library's own cost.

    httpx alone tops out near 470 MiB/s on these machines even for bytes served from memory, below the read
    ceiling; this client only parses the status line and headers, then counts `Content-Length` bytes.
    """
    url = httpx.URL(base_url)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(url.host, url.port, limit=4 * MIB)
    try:
        writer.write(
            (
                f"GET /api/v1/backups/{backup_id}/payload HTTP/1.1\r\nHost: {url.host}\r\n"
                f"Authorization: Bearer {key}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            status_line = head.split(b"\r\n", 1)[0]
            raise RuntimeError(f"restore answered {status_line!r}")
        received = 0
        while chunk := await reader.read(4 * MIB):
            received += len(chunk)
    finally:
        writer.close()
    elapsed = time.perf_counter() - started
    if received != expected:
        raise RuntimeError(f"restored {received} bytes, expected {expected}")
    return elapsed


async def _ceilings(dsn: str, payload: bytes) -> tuple[float, float, float]:
    """(COPY seconds, executemany seconds, cursor read seconds) for `payload` as 1 MiB bytea rows."""
    rows = [(seq, payload[start : start + MIB]) for seq, start in enumerate(range(0, len(payload), MIB))]
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("DROP TABLE IF EXISTS bench_ceiling")
        await connection.execute("CREATE TABLE bench_ceiling (seq integer PRIMARY KEY, data bytea NOT NULL)")
        started = time.perf_counter()
        async with connection.transaction():
            await connection.copy_records_to_table("bench_ceiling", records=rows, columns=["seq", "data"])
        copy_seconds = time.perf_counter() - started
        await connection.execute("TRUNCATE bench_ceiling")
        started = time.perf_counter()
        async with connection.transaction():
            await connection.executemany("INSERT INTO bench_ceiling (seq, data) VALUES ($1, $2)", rows)
        insert_seconds = time.perf_counter() - started
        started = time.perf_counter()
        received = 0
        async with connection.transaction():
            async for record in connection.cursor("SELECT data FROM bench_ceiling ORDER BY seq", prefetch=2):
                received += len(record["data"])
        read_seconds = time.perf_counter() - started
        assert received == len(payload)
        await connection.execute("DROP TABLE bench_ceiling")
    finally:
        await connection.close()
    return copy_seconds, insert_seconds, read_seconds


def _mibps(size: int, seconds: float) -> float:
    return size / MIB / seconds


async def run(server_url: str, repeats: int) -> None:
    """Create a database, start the server, measure, print the table, drop the database."""
    name = await create_database(server_url)
    database_url = with_database(server_url, name)
    env = production_env(database_url, MAX_UPLOAD_SIZE="128MiB", ENABLE_RATE_LIMITING="false", DB_POOL_SIZE="10")
    try:
        subprocess.run(  # noqa: ASYNC221 - set-up before anything is measured
            [sys.executable, "-m", "zkeb", "db", "upgrade"], env={**os.environ, **env}, check=True, cwd=ROOT,
            capture_output=True,
        )  # fmt: skip
        admin_key = create_org(env)
        results: list[tuple[int, float, float, float, float, float, float]] = []
        rss: dict[int, int] = {}
        with granian(env) as (base, server):
            async with httpx.AsyncClient(base_url=base, timeout=300) as client:
                project_id, key, device = await provision(client, admin_key)
                worker = worker_pid(server)
                # Warm-up, not reported: a new server's first requests pay for what a running one has done already
                # (each pooled connection's first statements are prepared on it; lazily built code paths).
                warm = os.urandom(MIB)
                for _ in range(WARM_UP_ROUNDS):
                    _, backup_id = await _upload(client, key, project_id, device, warm)
                    await _restore(client, key, backup_id, len(warm))
                for size_mib in SIZES_MIB:
                    payload = os.urandom(size_mib * MIB)
                    uploads, raw_uploads, restores, raw_restores, writes, reads = [], [], [], [], [], []
                    for _ in range(repeats):
                        seconds, backup_id = await _upload(client, key, project_id, device, payload)
                        uploads.append(seconds)
                        seconds, _ = await _upload_raw(client, key, project_id, device, payload)
                        raw_uploads.append(seconds)
                        restores.append(await _restore(client, key, backup_id, len(payload)))
                        raw_restores.append(await _restore_raw(base, key, backup_id, len(payload)))
                        copy_s, insert_s, read_s = await _ceilings(database_url, payload)
                        writes.append(min(copy_s, insert_s))
                        reads.append(read_s)
                    rss[size_mib] = _vm_hwm_kib(worker)
                    results.append(
                        (
                            size_mib,
                            _mibps(len(payload), statistics.median(uploads)),
                            _mibps(len(payload), statistics.median(raw_uploads)),
                            _mibps(len(payload), statistics.median(writes)),
                            _mibps(len(payload), statistics.median(restores)),
                            _mibps(len(payload), statistics.median(raw_restores)),
                            _mibps(len(payload), statistics.median(reads)),
                        )
                    )
        print(f"\nZKEB upload/restore vs PostgreSQL ceilings (median of {repeats}; MiB/s)\n")
        print(
            "| payload | upload (httpx) | upload (socket) | write ceiling | ratio (socket) | restore (httpx) "
            "| restore (socket) | read ceiling | ratio (socket) |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for size_mib, up, raw_up, write, down, raw_down, read in results:
            print(
                f"| {size_mib} MiB | {up:.0f} | {raw_up:.0f} | {write:.0f} | {raw_up / write:.2f} | {down:.0f} | "
                f"{raw_down:.0f} | {read:.0f} | {raw_down / read:.2f} |"
            )
        first, last = rss[SIZES_MIB[0]], rss[SIZES_MIB[-1]]
        print(
            f"\ngranian worker peak RSS (VmHWM): {first / 1024:.1f} MiB after the 1 MiB runs, {last / 1024:.1f} MiB "
            f"after the 100 MiB runs, difference {(last - first) / 1024:.1f} MiB"
        )
    finally:
        await drop_database(server_url, name)


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_option(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--store", choices=("postgres", "s3"), default="postgres", help="the payload store the server uses"
    )
    parser.add_argument("--s3-endpoint-url", help="with --store s3: this endpoint instead of moto started on loopback")
    parser.add_argument("--s3-bucket", help="with --store s3: an existing bucket (default: a new one, deleted after)")
    parser.add_argument("--s3-region", default="us-east-1", help="with --store s3: the signing region")
    args = parser.parse_args()
    if args.store == "postgres":
        asyncio.run(run(args.database_url, args.repeats))
        return
    # Imported here: upload_s3 reuses this module's upload and restore.
    from upload_s3 import run as run_s3  # noqa: PLC0415

    asyncio.run(
        run_s3(
            args.database_url,
            args.repeats,
            endpoint_url=args.s3_endpoint_url,
            bucket=args.s3_bucket,
            region=args.s3_region,
        )
    )


if __name__ == "__main__":
    main()
