"""`bench/upload.py --store s3`: ZKEB's upload and restore with `PAYLOAD_STORE=s3`, against raw S3 put and get.

    uv run python bench/upload.py --store s3                        # moto's S3 server on loopback, started here
    uv run python bench/upload.py --store s3 --s3-endpoint-url https://s3.example --s3-bucket NAME --s3-region R

Same server set-up as the PostgreSQL run (granian, one worker, production settings, a fresh database), with the
payload store on the endpoint. For 10 and 100 MiB payloads, each repeat measures back to back, alternating which
side goes first:

- ZKEB upload: upload.py's tus PATCH (httpx from a generator), first byte to the 204 that commits; the server
  encrypts each chunk (`S3PayloadStore.chunk_size`, 4 MiB) and PUTs it as its own object (2 at a time);
- ZKEB restore: upload.py's plain-socket GET of the payload, decryption on;
- raw put / raw get: aiobotocore (the client the server writes with, configured as the server configures it) with
  the same bytes as one object, and as objects of the server's chunk size 8 and 2 at a time (the server's layout
  without the server, at the client's limit and at what a tus PATCH keeps in flight): the store's own ceilings in
  this run. The one object is also read with obstore (the client the server reads with), and a restore's ratio is
  taken against the faster of the two one-object GETs in each repeat.

Credentials come from the standard AWS chain (moto accepts any; `testing` is set when none is). With moto, the
objects vanish with the server; on a real endpoint everything is written under a fresh `zkeb-bench-*/` prefix,
deleted at the end (and the bucket too when this run created it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import obstore
import psutil
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from harness import (
    ROOT,
    create_database,
    create_org,
    drop_database,
    granian,
    moto_server,
    production_env,
    with_database,
    worker_pid,
)
from obstore.store import S3Store
from upload import MIB, _restore_raw, _upload, provision

from zkeb.domain.backups.store.s3 import S3PayloadStore

SIZES_MIB = (10, 100)
#: The size of the raw chunk objects: the server's.
OBJECT = S3PayloadStore.chunk_size
#: Objects in flight at once for the raw chunk-object runs: the S3 client's limit (`store.s3.CONCURRENCY`) ...
CONCURRENCY = 8
#: ... and what a tus PATCH keeps in flight (`chunk_writes.WRITE_BATCH` chunks per batch, one batch at a time; a
#: restore keeps `store.s3.READ_AHEAD` = 4).
SERVER_BATCH = 2


@dataclass(frozen=True)
class Endpoint:
    """Where the bytes go: an S3 endpoint, its bucket and region, and this run's key prefix."""

    url: str
    bucket: str
    region: str
    prefix: str


@dataclass(frozen=True)
class Timed:
    """One transfer: its seconds, and the share of one core the store's server (moto; 0 elsewhere), the app's worker
    and this process (the client side: httpx, the socket reader or aiobotocore) used meanwhile."""

    seconds: float
    store_cpu: float
    app_cpu: float
    client_cpu: float


class CpuMeter:
    """CPU seconds of the local processes that do the work: moto's server (if local), the granian worker, this one."""

    def __init__(self, store_pid: int | None, app_pid: int) -> None:
        """Watch `store_pid` (None for a remote store) and `app_pid`."""
        self._store = psutil.Process(store_pid) if store_pid is not None else None
        self._app = psutil.Process(app_pid)

    def _sample(self) -> tuple[float, float, float]:
        store = sum(self._store.cpu_times()[:2]) if self._store is not None else 0.0
        return store, sum(self._app.cpu_times()[:2]), time.process_time()

    async def time(self, transfer: Callable[[], Awaitable[Any]]) -> Timed:
        """Run `transfer`, timing it and the CPU share the watched processes used meanwhile."""
        before = self._sample()
        started = time.perf_counter()
        result = await transfer()
        wall = time.perf_counter() - started
        store, app, client = (after - first for after, first in zip(self._sample(), before, strict=True))
        # A transfer that times itself (ZKEB's upload leaves out the tus creation) returns its own seconds.
        seconds = result if isinstance(result, float) else wall
        return Timed(seconds, store / wall, app / wall, client / wall)


@asynccontextmanager
async def s3_client(endpoint: Endpoint) -> AsyncIterator[Any]:
    """The raw client: aiobotocore as the server configures it (standard retries, a pool of 32, body checksums only
    where the S3 API requires them)."""
    config = AioConfig(
        retries={"mode": "standard", "max_attempts": 3},
        max_pool_connections=32,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    async with get_session().create_client(
        "s3", region_name=endpoint.region, endpoint_url=endpoint.url, config=config
    ) as client:
        yield client


def obstore_reader(endpoint: Endpoint) -> S3Store:
    """The raw obstore client, as the server's reader (credentials from the `AWS_*` variables here)."""
    return S3Store(
        endpoint.bucket,
        region=endpoint.region,
        endpoint=endpoint.url,
        client_options={"allow_http": endpoint.url.lower().startswith("http://")},
    )


async def _raw_get_obstore(reader: S3Store, key: str) -> int:
    found = await obstore.get_async(reader, key)
    received = 0
    async for piece in found:  # the body as it arrives, without joining it
        received += len(piece)
    return received


async def _raw_put(client: Any, endpoint: Endpoint, key: str, payload: bytes) -> None:
    await client.put_object(Bucket=endpoint.bucket, Key=key, Body=payload)


async def _raw_get(client: Any, endpoint: Endpoint, key: str) -> int:
    response = await client.get_object(Bucket=endpoint.bucket, Key=key)
    received = 0
    async with response["Body"] as body:
        while piece := await body.read(4 * MIB):
            received += len(piece)
    return received


async def _gather_limited(coroutines: Sequence[Awaitable[Any]], limit: int = CONCURRENCY) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def limited(coroutine: Awaitable[Any]) -> Any:
        async with gate:
            return await coroutine

    return await asyncio.gather(*(limited(c) for c in coroutines))


async def _raw_put_chunks(client: Any, endpoint: Endpoint, prefix: str, payload: bytes, limit: int) -> None:
    view = memoryview(payload)
    puts = [
        _raw_put(client, endpoint, f"{prefix}{seq:08d}", bytes(view[start : start + OBJECT]))
        for seq, start in enumerate(range(0, len(payload), OBJECT))
    ]
    await _gather_limited(puts, limit)


async def _raw_get_chunks(client: Any, endpoint: Endpoint, prefix: str, size: int, limit: int) -> int:
    gets = [_raw_get(client, endpoint, f"{prefix}{seq:08d}") for seq in range(-(-size // OBJECT))]
    return sum(await _gather_limited(gets, limit))


async def _delete_prefix(client: Any, endpoint: Endpoint, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=endpoint.bucket, Prefix=prefix):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            await client.delete_objects(Bucket=endpoint.bucket, Delete={"Objects": keys, "Quiet": True})


@contextlib.contextmanager
def _local_or_given(endpoint_url: str | None) -> Iterator[tuple[str, int | None]]:
    """The endpoint URL and, when it is moto started here, its pid (to meter its CPU)."""
    if endpoint_url:
        yield endpoint_url, None
        return
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "testing")
    with moto_server() as (url, process):
        yield url, process.pid


@dataclass(frozen=True)
class Row:
    """One repeat's timings for one payload size."""

    ours_up: Timed
    raw_put: Timed
    raw_put_chunks: Timed
    raw_put_chunks_2: Timed
    ours_down: Timed
    raw_get: Timed
    raw_get_obstore: Timed
    raw_get_chunks: Timed
    raw_get_chunks_2: Timed


@dataclass(frozen=True)
class Bench:
    """What one run measures with: the server and its credentials, the raw client, the endpoint, the CPU meter."""

    http: httpx.AsyncClient
    base: str
    project: Any  # (project id, project key, device) from upload.provision
    raw: Any
    reader: S3Store
    endpoint: Endpoint
    meter: CpuMeter

    async def repeat(self, payload: bytes, number: int) -> Row:
        """Both sides of upload, then of restore, back to back; odd repeats put the raw side first."""
        project_id, key, device = self.project
        one, chunks = f"{self.endpoint.prefix}raw/{number}", f"{self.endpoint.prefix}raw-chunks/{number}/"
        chunks_2 = f"{self.endpoint.prefix}raw-chunks-2/{number}/"
        backup: list[str] = []

        async def ours_up() -> float:
            seconds, backup_id = await _upload(self.http, key, project_id, device, payload)
            backup.append(backup_id)
            return seconds

        async def ours_down() -> float:
            return await _restore_raw(self.base, key, backup[0], len(payload))

        async def raw_get() -> None:
            if await _raw_get(self.raw, self.endpoint, one) != len(payload):
                raise RuntimeError("raw get returned the wrong size")

        async def raw_get_obstore() -> None:
            if await _raw_get_obstore(self.reader, one) != len(payload):
                raise RuntimeError("raw obstore get returned the wrong size")

        async def raw_get_chunks(limit: int) -> None:
            if await _raw_get_chunks(self.raw, self.endpoint, chunks, len(payload), limit) != len(payload):
                raise RuntimeError("raw chunk gets returned the wrong size")

        uploads: list[Callable[[], Awaitable[Any]]] = [
            ours_up,
            lambda: _raw_put(self.raw, self.endpoint, one, payload),
            lambda: _raw_put_chunks(self.raw, self.endpoint, chunks, payload, CONCURRENCY),
            lambda: _raw_put_chunks(self.raw, self.endpoint, chunks_2, payload, SERVER_BATCH),
        ]
        restores: list[Callable[[], Awaitable[Any]]] = [
            ours_down,
            raw_get,
            raw_get_obstore,
            lambda: raw_get_chunks(CONCURRENCY),
            lambda: raw_get_chunks(SERVER_BATCH),
        ]
        up = {i: await self.meter.time(uploads[i]) for i in ([0, 1, 2, 3] if number % 2 == 0 else [1, 2, 3, 0])}
        down = {
            i: await self.meter.time(restores[i]) for i in ([0, 1, 2, 3, 4] if number % 2 == 0 else [1, 2, 3, 4, 0])
        }
        await _delete_prefix(self.raw, self.endpoint, f"{self.endpoint.prefix}raw")
        return Row(up[0], up[1], up[2], up[3], down[0], down[1], down[2], down[3], down[4])


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def _rate(size: int, timings: list[Timed]) -> str:
    rates = [size / MIB / t.seconds for t in timings]
    return f"{statistics.median(rates):.0f} [{min(rates):.0f}-{max(rates):.0f}]"


def _cpu(timings: list[Timed], attribute: str) -> str:
    return f"{statistics.median(getattr(t, attribute) for t in timings):.0%}"


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def _report(results: dict[int, list[Row]], repeats: int, *, local_store: bool) -> None:
    print(
        f"\nZKEB with PAYLOAD_STORE=s3 vs raw aiobotocore and obstore put/get to the same endpoint ({repeats} repeats)"
    )
    print(
        "MiB/s median [min-max]; CPU: median share of one core used during the transfer by moto, by the granian "
        f"worker and by this client process; {os.cpu_count()} cores, load average {_load()} at the end\n"
    )
    print("| payload | transfer | MiB/s | moto CPU | app CPU | client CPU |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    labels = (
        ("ours_up", "ZKEB upload (tus PATCH)"),
        ("raw_put", "raw put, one object"),
        ("raw_put_chunks", f"raw put, {OBJECT // MIB} MiB objects x{CONCURRENCY}"),
        ("raw_put_chunks_2", f"raw put, {OBJECT // MIB} MiB objects x{SERVER_BATCH}"),
        ("ours_down", "ZKEB restore (socket)"),
        ("raw_get", "raw get, one object"),
        ("raw_get_obstore", "raw get, one object (obstore)"),
        ("raw_get_chunks", f"raw get, {OBJECT // MIB} MiB objects x{CONCURRENCY}"),
        ("raw_get_chunks_2", f"raw get, {OBJECT // MIB} MiB objects x{SERVER_BATCH}"),
    )
    for size_mib, rows in results.items():
        for attribute, label in labels:
            timings = [getattr(row, attribute) for row in rows]
            store_cpu = _cpu(timings, "store_cpu") if local_store else "-"
            print(f"| {size_mib} MiB | {label} | {_rate(size_mib * MIB, timings)} | {store_cpu} "
                  f"| {_cpu(timings, 'app_cpu')} | {_cpu(timings, 'client_cpu')} |")  # fmt: skip
    print(
        "\nratios per repeat (same bytes, back to back), median [min-max]; target >= 0.7 against the raw put/get "
        "(a restore against the faster of the two clients' one-object GETs)"
    )
    for size_mib, rows in results.items():
        up = [r.raw_put.seconds / r.ours_up.seconds for r in rows]
        up_chunks = [r.raw_put_chunks.seconds / r.ours_up.seconds for r in rows]
        up_2 = [r.raw_put_chunks_2.seconds / r.ours_up.seconds for r in rows]
        down = [min(r.raw_get.seconds, r.raw_get_obstore.seconds) / r.ours_down.seconds for r in rows]
        down_chunks = [r.raw_get_chunks.seconds / r.ours_down.seconds for r in rows]
        down_2 = [r.raw_get_chunks_2.seconds / r.ours_down.seconds for r in rows]
        print(
            f"  {size_mib:>3} MiB upload / raw put:  {_spread(up)}   "
            f"(/ raw {OBJECT // MIB} MiB puts x{CONCURRENCY}: {_spread(up_chunks)}, x{SERVER_BATCH}: {_spread(up_2)})"
        )
        print(
            f"  {size_mib:>3} MiB restore / raw get: {_spread(down)}   (/ raw {OBJECT // MIB} MiB gets x{CONCURRENCY}: "
            f"{_spread(down_chunks)}, x{SERVER_BATCH}: {_spread(down_2)})"
        )


async def run(server_url: str, repeats: int, *, endpoint_url: str | None, bucket: str | None, region: str) -> None:
    """Start (or use) the store, create a database, start the server with `PAYLOAD_STORE=s3`, measure, clean up."""
    run_id = os.urandom(4).hex()
    print(f"load average at the start: {_load()} ({os.cpu_count()} cores)")
    with _local_or_given(endpoint_url) as (url, store_pid):
        endpoint = Endpoint(url, bucket or f"zkeb-bench-{run_id}", region, f"zkeb-bench-{run_id}/")
        async with s3_client(endpoint) as raw:
            if bucket is None:
                where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
                await raw.create_bucket(Bucket=endpoint.bucket, **where)
            name = await create_database(server_url)
            try:
                results = await _run_server(with_database(server_url, name), raw, endpoint, store_pid, repeats)
            finally:
                await drop_database(server_url, name)
                await _delete_prefix(raw, endpoint, endpoint.prefix)
                if bucket is None:
                    await raw.delete_bucket(Bucket=endpoint.bucket)
    _report(results, repeats, local_store=store_pid is not None)


async def _run_server(
    database_url: str, raw: Any, endpoint: Endpoint, store_pid: int | None, repeats: int
) -> dict[int, list[Row]]:
    env = production_env(
        database_url,
        MAX_UPLOAD_SIZE="128MiB",
        ENABLE_RATE_LIMITING="false",
        DB_POOL_SIZE="10",
        PAYLOAD_STORE="s3",
        S3_BUCKET=endpoint.bucket,
        S3_PREFIX=f"{endpoint.prefix}zkeb/",
        S3_ENDPOINT_URL=endpoint.url,
        S3_REGION=endpoint.region,
    )
    subprocess.run(  # noqa: ASYNC221 - set-up before anything is measured
        [sys.executable, "-m", "zkeb", "db", "upgrade"], env={**os.environ, **env}, check=True, cwd=ROOT,
        capture_output=True,
    )  # fmt: skip
    admin_key = create_org(env)
    results: dict[int, list[Row]] = {}
    with granian(env) as (base, server):
        async with httpx.AsyncClient(base_url=base, timeout=300) as http:
            meter = CpuMeter(store_pid, worker_pid(server))
            bench = Bench(http, base, await provision(http, admin_key), raw, obstore_reader(endpoint), endpoint, meter)
            await bench.repeat(os.urandom(SIZES_MIB[0] * MIB), -1)  # warm-up: connections, code paths; not reported
            for size_mib in SIZES_MIB:
                payload = os.urandom(size_mib * MIB)
                results[size_mib] = [await bench.repeat(payload, number) for number in range(repeats)]
    return results
