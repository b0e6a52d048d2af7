"""Small single-shot backups end to end, against one raw durable INSERT of the same bytes, in the same run.

    uv run python bench/small.py            # DATABASE_URL of a PostgreSQL superuser, default the local one

Starts `granian --interface asgi --factory zkeb.app:create_app` (one worker, production settings, a fresh
database), enrolls `--clients` devices in one project, then, `--rounds` times (the order of ours and raw rotating):

- sequential: `--sequential` 1 KiB single-shot backups (`POST /api/v1/backups`, msgpack, a project key), one
  after another on one keep-alive connection; the median latency from the request's first byte to the 201, against
  the median of as many raw `INSERT`s of the same bytes as the owner on one asyncpg connection, each its own
  durable (`synchronous_commit = on`) transaction;
- concurrent: `--clients` keep-alive connections, each posting backups for its own device back to back for
  `--seconds`; backups committed per second, against as many asyncpg connections inserting back to back;
- concurrent tus: the same clients, each backup a tus creation (`POST /api/v1/uploads`) and the one PATCH that
  completes it, against the same raw rate (the streamed path's per-backup cost, commit included).

The client is a few lines of asyncio over plain sockets (requests are pre-signed just before they are sent, the
response is parsed by its `Content-Length`), so that it, not the server, is never what saturates first; the
client's own CPU time per backup is printed so that this can be checked. Prints the median of the rounds, with the
range, and the ratios.
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import msgspec
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
    worker_pid,
)
from harness import with_database as database_on

from zkeb.lib.envelope import backup_signed_message, format_rfc3339_utc

PAYLOAD_SIZE = 1024
RAW_TABLE = "bench_small"


@dataclass(frozen=True)
class Device:
    """An enrolled device of the benchmark's project, with the key it signs with."""

    key: Ed25519PrivateKey
    device_id_hash: bytes


class Project:
    """The project every backup goes to, its project key, and its devices."""

    def __init__(self, project_id: uuid.UUID, key: str, devices: list[Device]) -> None:
        self.id = project_id
        self.key = key
        self.devices = devices
        self.container = uuid.uuid4()

    def _signed(self, device: Device, payload: bytes) -> dict[str, bytes | str]:
        """The envelope fields of one signed backup of `payload` (binary fields as bytes)."""
        nonce, tag, metadata_nonce, metadata_tag = os.urandom(12), os.urandom(16), os.urandom(12), os.urandom(16)
        metadata = b"bench-metadata"
        when = datetime.now(UTC)
        message = backup_signed_message(
            project_id=self.id,
            container_id=self.container,
            device_id_hash=device.device_id_hash,
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
        return {
            "container_id": str(self.container),
            "device_id_hash": device.device_id_hash,
            "payload_nonce": nonce,
            "payload_auth_tag": tag,
            "metadata": metadata,
            "metadata_nonce": metadata_nonce,
            "metadata_auth_tag": metadata_tag,
            "signature": device.key.sign(message),
            "backup_timestamp": format_rfc3339_utc(when),
        }

    def request(self, host: str, device: Device) -> bytes:
        """A complete HTTP/1.1 request for one signed 1 KiB single-shot backup (msgpack)."""
        payload = os.urandom(PAYLOAD_SIZE)
        body = msgspec.msgpack.encode({**self._signed(device, payload), "payload": payload})
        head = (
            f"POST /api/v1/backups HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {self.key}\r\n"
            f"Content-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def tus_requests(self, host: str, device: Device) -> tuple[bytes, Callable[[str], bytes]]:
        """A tus creation of one signed 1 KiB backup, and the PATCH that sends its bytes to the created upload."""
        payload = os.urandom(PAYLOAD_SIZE)
        fields = self._signed(device, payload)
        metadata = ",".join(
            f"{name} {base64.b64encode(value if isinstance(value, bytes) else value.encode()).decode()}"
            for name, value in fields.items()
        )
        auth = f"Host: {host}\r\nAuthorization: Bearer {self.key}\r\nTus-Resumable: 1.0.0\r\n"
        creation = (
            f"POST /api/v1/uploads HTTP/1.1\r\n{auth}Upload-Length: {len(payload)}\r\nUpload-Metadata: {metadata}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

        def patch(location: str) -> bytes:
            head = (
                f"PATCH {location} HTTP/1.1\r\n{auth}Upload-Offset: 0\r\n"
                f"Content-Type: application/offset+octet-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
            )
            return head.encode() + payload

        return creation, patch


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a request and reads the response by its Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        """Connect."""
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, request: bytes, expect: int = 201) -> bytes:
        """Send `request`; the response's head (its body is read and dropped). Raises unless it is `expect`."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length) if length else b""
        if status != expect:
            raise RuntimeError(f"the server answered {status}: {body[:300]!r}")
        return head

    async def upload(self, requests: tuple[bytes, Callable[[str], bytes]]) -> None:
        """Create a tus upload and complete it with one PATCH."""
        creation, patch = requests
        head = await self.send(creation)
        location = next(line[9:].strip().decode() for line in head.split(b"\r\n") if line[:9].lower() == b"location:")
        await self.send(patch(location), expect=204)

    def close(self) -> None:
        """Close the socket."""
        self.writer.close()


async def _provision(base: str, admin_key: str, clients: int) -> Project:
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        project = (await client.post("/api/v1/projects", json={"name": "bench"}, headers=headers)).json()
        project_id = uuid.UUID(project["id"])
        key = (await client.post(f"/api/v1/projects/{project_id}/api-keys", json={"name": "b"}, headers=headers)).json()
        devices = []
        for _ in range(clients):
            private = Ed25519PrivateKey.generate()
            device_id_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
            public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            enrolled = await client.post(
                f"/api/v1/projects/{project_id}/devices",
                json={"device_id_hash": device_id_hash.hex(), "public_key": base64.b64encode(public).decode()},
                headers=headers,
            )
            enrolled.raise_for_status()
            devices.append(Device(private, device_id_hash))
    return Project(project_id, key["key"], devices)


async def _ours_sequential(host: str, port: int, project: Project, count: int) -> list[float]:
    connection = await Connection.open(host, port)
    latencies = []
    try:
        for _ in range(count):
            request = project.request(host, project.devices[0])
            started = time.perf_counter()
            await connection.send(request)
            latencies.append(time.perf_counter() - started)
    finally:
        connection.close()
    return latencies


async def _ours_concurrent(
    host: str, port: int, project: Project, seconds: float, *, tus: bool = False
) -> tuple[float, float]:
    """(backups per second, client CPU seconds per backup); with `tus`, each a tus creation and one PATCH."""
    connections = [await Connection.open(host, port) for _ in project.devices]
    done = 0
    cpu_started = time.process_time()
    deadline = time.perf_counter() + seconds

    async def client(connection: Connection, device: Device) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if tus:
                await connection.upload(project.tus_requests(host, device))
            else:
                await connection.send(project.request(host, device))
            done += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client(c, d) for c, d in zip(connections, project.devices, strict=True)))
    finally:
        for connection in connections:
            connection.close()
    elapsed = time.perf_counter() - started
    return done / elapsed, (time.process_time() - cpu_started) / max(done, 1)


async def _sample_waits(dsn: str, stop: asyncio.Event) -> dict[str, int]:
    """What the server's backends wait for, sampled from `pg_stat_activity` every 20 ms until `stop` is set."""
    connection = await asyncpg.connect(dsn)
    counts: dict[str, int] = {}
    try:
        while not stop.is_set():
            rows = await connection.fetch(
                "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                "WHERE application_name = 'zkeb' AND datname = current_database()"
            )
            for row in rows:
                if row["state"] == "active":
                    what = f"{row['wait_event_type']}:{row['wait_event']}" if row["wait_event"] else "active (CPU)"
                else:
                    what = str(row["state"])
                counts[what] = counts.get(what, 0) + 1
            await asyncio.sleep(0.02)
    finally:
        await connection.close()
    return counts


async def _raw_sequential(dsn: str, count: int) -> list[float]:
    connection = await asyncpg.connect(dsn)
    latencies = []
    try:
        for _ in range(count):
            data = os.urandom(PAYLOAD_SIZE)
            started = time.perf_counter()
            await connection.execute(f"INSERT INTO {RAW_TABLE} (id, data) VALUES ($1, $2)", uuid.uuid4(), data)
            latencies.append(time.perf_counter() - started)
    finally:
        await connection.close()
    return latencies


async def _raw_concurrent(dsn: str, connections: int, seconds: float) -> float:
    pool = [await asyncpg.connect(dsn) for _ in range(connections)]
    done = 0
    deadline = time.perf_counter() + seconds

    async def insert(connection: asyncpg.Connection) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await connection.execute(
                f"INSERT INTO {RAW_TABLE} (id, data) VALUES ($1, $2)", uuid.uuid4(), os.urandom(PAYLOAD_SIZE)
            )
            done += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(insert(c) for c in pool))
    finally:
        for connection in pool:
            await connection.close()
    return done / (time.perf_counter() - started)


def _start_profiler(path: str | None, pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
    """`py-spy record` of the granian worker for `seconds` (py-spy must be on PATH), or None without `path`."""
    if not path:
        return None
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--format",
            {".json": "speedscope", ".svg": "flamegraph"}.get(Path(path).suffix, "raw"),
            "--output",
            path,
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    low, mid, high = (value * scale for value in (min(values), statistics.median(values), max(values)))
    return f"{mid:.{digits}f} ({low:.{digits}f}..{high:.{digits}f})"


async def run(server_url: str, args: argparse.Namespace) -> None:
    """Create a database, start the server, measure, print the table, drop the database."""
    name = await create_database(server_url)
    database_url = database_on(server_url, name)
    env = production_env(database_url, ENABLE_RATE_LIMITING="false", DB_POOL_SIZE=str(args.pool_size))
    try:
        subprocess.run(  # noqa: ASYNC221 - set-up before anything is measured
            [sys.executable, "-m", "zkeb", "db", "upgrade"], env={**os.environ, **env}, check=True, cwd=ROOT,
            capture_output=True,
        )  # fmt: skip
        admin_key = create_org(env)
        owner = await asyncpg.connect(database_url)
        await owner.execute(f"CREATE TABLE {RAW_TABLE} (id uuid PRIMARY KEY, data bytea NOT NULL)")
        await owner.close()
        ours_seq, raw_seq, ours_rate, raw_rate, client_cpu, tus_rate = [], [], [], [], [], []
        wait_counts: dict[str, int] = {}
        with granian(env) as (base, server):
            url = httpx.URL(base)
            host, port = url.host, url.port or 80
            project = await _provision(base, admin_key, args.clients)
            await _ours_sequential(host, port, project, 20)  # warm-up
            for round_ in range(args.rounds):
                ours_first = round_ % 2 == 0
                for step in ("ours", "raw") if ours_first else ("raw", "ours"):
                    if step == "ours":
                        ours_seq.append(statistics.median(await _ours_sequential(host, port, project, args.sequential)))
                        diagnose = round_ == 0 and args.diagnose
                        stop = asyncio.Event()
                        waits = asyncio.create_task(_sample_waits(database_url, stop)) if diagnose else None
                        profiler = _start_profiler(args.profile, worker_pid(server), args.seconds) if diagnose else None
                        rate, cpu = await _ours_concurrent(host, port, project, args.seconds)
                        stop.set()
                        if waits is not None:
                            wait_counts = await waits
                        if profiler is not None:
                            profiler.wait(timeout=60)
                        ours_rate.append(rate)
                        client_cpu.append(cpu)
                        tus_rate.append((await _ours_concurrent(host, port, project, args.seconds, tus=True))[0])
                    else:
                        raw_seq.append(statistics.median(await _raw_sequential(database_url, args.sequential)))
                        raw_rate.append(await _raw_concurrent(database_url, args.clients, args.seconds))
        seq_ratios = [r / o for o, r in zip(ours_seq, raw_seq, strict=True)]
        rate_ratios = [o / r for o, r in zip(ours_rate, raw_rate, strict=True)]
        tus_ratios = [o / r for o, r in zip(tus_rate, raw_rate, strict=True)]
        print(f"\n1 KiB single-shot backups vs raw durable INSERTs (median of {args.rounds} rounds, range)\n")
        print("| | ZKEB | raw INSERT | ratio (ZKEB / raw speed) |")
        print("| --- | ---: | ---: | ---: |")
        print(
            f"| sequential latency, ms (median of {args.sequential}) | {_spread(ours_seq, 1000)} "
            f"| {_spread(raw_seq, 1000)} | {_spread(seq_ratios)} |"
        )
        print(
            f"| {args.clients} concurrent clients, backups/s | {_spread(ours_rate, digits=0)} "
            f"| {_spread(raw_rate, digits=0)} | {_spread(rate_ratios)} |"
        )
        print(
            f"| {args.clients} concurrent clients, tus backups/s (creation + PATCH) | {_spread(tus_rate, digits=0)} "
            f"| {_spread(raw_rate, digits=0)} | {_spread(tus_ratios, digits=3)} |"
        )
        print(f"\nclient CPU per backup (concurrent): {_spread(client_cpu, 1e6, 0)} µs")
        if wait_counts:
            total = sum(wait_counts.values())
            print("\nthe server's PostgreSQL connections during the first concurrent run (pg_stat_activity samples):")
            for what, count in sorted(wait_counts.items(), key=lambda item: -item[1]):
                print(f"  {what:40} {100 * count / total:5.1f} %")
        if args.diagnose and args.profile:
            print(f"\npy-spy profile of the granian worker during that run: {args.profile}")
    finally:
        await drop_database(server_url, name)


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_option(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=200, help="backups per sequential run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each concurrent run")
    parser.add_argument(
        "--diagnose", action="store_true", help="sample pg_stat_activity wait events during the first concurrent run"
    )
    parser.add_argument("--profile", help="with --diagnose: write a py-spy flame graph (.svg) or speedscope (.json)")
    parser.add_argument("--pool-size", type=int, default=10, help="the server's DB_POOL_SIZE")
    args = parser.parse_args()
    asyncio.run(run(args.database_url, args))


if __name__ == "__main__":
    main()
