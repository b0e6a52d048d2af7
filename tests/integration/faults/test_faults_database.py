"""PostgreSQL failing under traffic: backends terminated, the server restarted, a statement timeout at commit.

Each test runs `zkeb serve` on a PostgreSQL cluster of its own (never the shared one), drives uploads (single-shot
and tus) and restores while the fault strikes, and then checks what a client relies on: every answer is a success
or a 503 problem+json (a restore already streaming may be cut off, which the client sees as an incomplete body),
nothing hangs, the same server process serves again once the database is back, every upload completes on retry,
and the backups visible are exactly the uploads, each restoring byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import asyncpg
import httpx
import pytest
from faults_support import (
    FaultTenant,
    OwnPostgres,
    ZkebServer,
    make_fault_tenant,
    own_postgres,
    server_env,
    tus_create,
    tus_patch,
    tus_upload,
    zkeb_serve,
)

from support import Envelope, make_settings

pytestmark = pytest.mark.slow

#: No request may take longer than this, whatever the database does (the pool waits 5 s, a connect 5 s).
REQUEST_BOUND_SECONDS = 20.0
TRAFFIC_SECONDS = 12.0
SINGLE_SHOT_SIZE = 200 * 1024
TUS_SIZE = 2 * 1024 * 1024 + 17
RESTORE_SIZE = 3 * 1024 * 1024
OCTETS = "application/offset+octet-stream"


@dataclass
class Traffic:
    """What the clients saw while the fault struck."""

    statuses: Counter[str] = field(default_factory=Counter)
    problems_without_json: list[str] = field(default_factory=list)
    slowest: float = 0.0
    #: Uploads not acknowledged yet: the envelope, and the tus upload's URL when it was one.
    pending: list[tuple[Envelope, str | None]] = field(default_factory=list)
    uploaded: list[Envelope] = field(default_factory=list)

    def note(self, label: str, response: httpx.Response, started: float) -> None:
        self.slowest = max(self.slowest, time.monotonic() - started)
        self.statuses[f"{label} {response.status_code}"] += 1
        if response.status_code >= 500 and not response.headers.get("content-type", "").startswith(
            "application/problem+json"
        ):
            self.problems_without_json.append(f"{label} {response.status_code} {response.text[:200]}")


@pytest.fixture
def postgres() -> Iterator[OwnPostgres]:
    with own_postgres() as server:
        yield server


@pytest.fixture
def database_url_of_own(postgres: OwnPostgres) -> str:
    asyncio.run(postgres.execute("CREATE DATABASE zkeb"))
    return postgres.url.rsplit("/", 1)[0] + "/zkeb"


async def _drive(url: str, tenant: FaultTenant, seeded: dict[str, bytes], seconds: float) -> Traffic:
    """Three uploaders (single-shot and tus in turn) and two restorers, for `seconds`."""
    traffic = Traffic()
    stop = time.monotonic() + seconds

    async def uploader(index: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_BOUND_SECONDS + 10) as client:
            turn = index
            while time.monotonic() < stop:
                turn += 1
                tus = turn % 2 == 0
                envelope = tenant.envelope(os.urandom(TUS_SIZE if tus else SINGLE_SHOT_SIZE))
                started = time.monotonic()
                if tus:
                    response = await tus_create(client, tenant, envelope)
                    location = response.headers.get("location") if response.status_code == 201 else None
                    if location is not None:
                        try:
                            response = await tus_patch(client, tenant, location, envelope.payload)
                        except httpx.TransportError:
                            # Refused before its body was read (503 and Connection: close) while the client was
                            # still sending: the client sees the connection end, and resumes after a HEAD.
                            traffic.statuses["tus cut-off"] += 1
                            traffic.pending.append((envelope, location))
                            continue
                    ok = response.status_code == 204
                else:
                    response = await client.post("/api/v1/backups", json=envelope.json(), headers=tenant.auth)
                    ok, location = response.status_code == 201, None
                traffic.note("tus" if tus else "single-shot", response, started)
                if ok:
                    traffic.uploaded.append(envelope)
                else:
                    traffic.pending.append((envelope, location))

    async def restorer() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_BOUND_SECONDS + 10) as client:
            while time.monotonic() < stop:
                backup_id, payload = next(iter(seeded.items()))
                started = time.monotonic()
                try:
                    response = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=tenant.auth)
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    traffic.statuses["restore cut off mid-body"] += 1  # 200 was sent; the client sees it incomplete
                    continue
                traffic.note("restore", response, started)
                if response.status_code == 200:
                    assert hashlib.sha256(response.content).digest() == hashlib.sha256(payload).digest()

    await asyncio.gather(*(uploader(i) for i in range(3)), restorer(), restorer())
    return traffic


async def _retry_until_stored(url: str, tenant: FaultTenant, traffic: Traffic) -> None:
    """Finish every upload the fault interrupted: resume tus uploads, resend single-shot ones."""
    tus = {"Tus-Resumable": "1.0.0", **tenant.auth}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for envelope, location in traffic.pending:
            if location is not None:
                head = await client.head(location, headers=tus)
                if head.status_code == 200:
                    offset = int(head.headers["upload-offset"])
                    resumed = await client.patch(
                        location,
                        content=envelope.payload[offset:],
                        headers={
                            **tus,
                            "Upload-Offset": str(offset),
                            "Content-Type": "application/offset+octet-stream",
                        },
                    )
                    assert resumed.status_code == 204, resumed.text
                else:  # the PATCH had committed before the fault: the session is gone and the backup there
                    assert head.status_code == 404, head.text
            elif location is None and len(envelope.payload) == TUS_SIZE:
                created = await tus_upload(client, tenant, envelope)  # the creation itself had failed
                assert created.status_code in {204, 409}, created.text
            else:
                sent = await client.post("/api/v1/backups", json=envelope.json(), headers=tenant.auth)
                assert sent.status_code in {201, 409}, sent.text  # 409: it had been stored, the nonce is spent
            traffic.uploaded.append(envelope)


async def _assert_exactly_the_uploads_are_visible(
    url: str, tenant: FaultTenant, uploads: list[Envelope], seeded: dict[str, bytes]
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for envelope in uploads:
            listed = await client.get(
                "/api/v1/backups", params={"container_id": str(envelope.container_id)}, headers=tenant.auth
            )
            assert listed.status_code == 200, listed.text
            items = listed.json()["items"]
            assert len(items) == 1, (envelope.container_id, items)
            restored = await client.get(f"/api/v1/backups/{items[0]['id']}/payload", headers=tenant.auth)
            assert restored.status_code == 200
            assert hashlib.sha256(restored.content).digest() == hashlib.sha256(envelope.payload).digest()
        total, cursor = 0, None
        while True:
            params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/api/v1/backups", params=params, headers=tenant.auth)).json()
            total += len(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                break
    assert total == len(uploads) + len(seeded)


async def _seed(url: str, tenant: FaultTenant) -> dict[str, bytes]:
    payload = os.urandom(RESTORE_SIZE)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        stored = await tus_upload(client, tenant, tenant.envelope(payload))
    assert stored.status_code == 204, stored.text
    return {stored.headers["zkeb-backup-id"]: payload}


async def _run_fault(
    base_settings_env: dict[str, str],
    database_url: str,
    fault: Callable[[ZkebServer], Awaitable[None]],
) -> Traffic:
    env = server_env(base_settings_env, database_url, DB_POOL_SIZE="4", ENABLE_RATE_LIMITING="false")
    with zkeb_serve(env) as server:
        tenant = await make_fault_tenant(server.url, make_settings(base_settings_env, DATABASE_URL=database_url))
        seeded = await _seed(server.url, tenant)
        pid = server.process.pid if server.process else None
        traffic, _ = await asyncio.gather(_drive(server.url, tenant, seeded, TRAFFIC_SECONDS), fault(server))
        # The same process serves again: the pool replaced its dead connections by itself.
        assert server.process is not None
        assert server.process.pid == pid
        assert server.process.poll() is None
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            ready_at = time.monotonic() + 30
            while (await client.get("/api/health/ready")).status_code != 200:
                assert time.monotonic() < ready_at, "not ready again within 30 s of the fault"
                await asyncio.sleep(0.5)
            for _ in range(10):
                listed = await client.get("/api/v1/backups", headers=tenant.auth)
                assert listed.status_code == 200, listed.text
        await _retry_until_stored(server.url, tenant, traffic)
        await _assert_exactly_the_uploads_are_visible(server.url, tenant, traffic.uploaded, seeded)
        log = server.output()
    print(f"\n{fault.__name__}: {dict(sorted(traffic.statuses.items()))}, slowest {traffic.slowest:.1f} s")
    assert traffic.slowest < REQUEST_BOUND_SECONDS
    allowed = {"201", "204", "200", "503", "mid-body", "cut-off"}
    wrong = [key for key in traffic.statuses if key.rsplit(" ", 1)[-1] not in allowed]
    assert not traffic.problems_without_json
    for line in log.splitlines():
        if "unhandled error" in line:
            print(line)  # its traceback, shown beside the failure
    assert not wrong, (traffic.statuses, log[-6000:])
    return traffic


async def test_terminated_backends_answer_503_and_the_pool_recovers_without_a_restart(
    postgres: OwnPostgres, database_url_of_own: str, base_settings_env: dict[str, str]
) -> None:
    async def terminate_backends(_server: ZkebServer) -> None:
        for _ in range(5):
            await asyncio.sleep(TRAFFIC_SECONDS / 6)
            await postgres.terminate_app_backends()

    traffic = await _run_fault(base_settings_env, database_url_of_own, terminate_backends)
    assert sum(count for key, count in traffic.statuses.items() if key.endswith((" 201", " 204"))) > 0


async def test_a_postgresql_restart_answers_503_while_down_then_serves_again(
    postgres: OwnPostgres, database_url_of_own: str, base_settings_env: dict[str, str]
) -> None:
    async def restart(_server: ZkebServer) -> None:
        await asyncio.sleep(TRAFFIC_SECONDS / 3)
        await asyncio.to_thread(postgres.stop, "fast")
        await asyncio.sleep(3)
        await asyncio.to_thread(postgres.start)

    traffic = await _run_fault(base_settings_env, database_url_of_own, restart)
    assert any(key.endswith(" 503") for key in traffic.statuses), traffic.statuses


async def test_a_statement_timeout_at_commit_is_503_and_leaves_nothing_half_written(
    postgres: OwnPostgres, database_url_of_own: str, base_settings_env: dict[str, str]
) -> None:
    env = server_env(base_settings_env, database_url_of_own)
    with zkeb_serve(env) as server:
        tenant = await make_fault_tenant(server.url, make_settings(base_settings_env, DATABASE_URL=database_url_of_own))
        await postgres.execute("ALTER ROLE zkeb_app SET statement_timeout = '1500ms'")
        await postgres.terminate_app_backends()  # the role's setting applies to new connections
        blocker = await _lock_backups(postgres)
        try:
            single = tenant.envelope(os.urandom(SINGLE_SHOT_SIZE))
            tus_envelope = tenant.envelope(os.urandom(TUS_SIZE))
            async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_BOUND_SECONDS) as client:
                refused = await client.post("/api/v1/backups", json=single.json(), headers=tenant.auth)
                refused_tus = await tus_upload(client, tenant, tus_envelope)
        finally:
            await blocker.close()
        for response in (refused, refused_tus):
            assert response.status_code == 503, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            listed = await client.get("/api/v1/backups", headers=tenant.auth)
            assert listed.json()["items"] == []
            stored = await client.post("/api/v1/backups", json=single.json(), headers=tenant.auth)
            assert stored.status_code == 201, stored.text
            if refused_tus.request.method == "POST":  # the creation itself timed out: no upload exists, start again
                resumed = await tus_upload(client, tenant, tus_envelope)
            else:  # the completing PATCH timed out: resume the upload from its offset
                location = str(refused_tus.request.url)
                head = await client.head(location, headers={"Tus-Resumable": "1.0.0", **tenant.auth})
                offset = int(head.headers["upload-offset"])
                resumed = await client.patch(
                    location,
                    content=tus_envelope.payload[offset:],
                    headers={
                        "Tus-Resumable": "1.0.0",
                        **tenant.auth,
                        "Upload-Offset": str(offset),
                        "Content-Type": OCTETS,
                    },
                )
            assert resumed.status_code == 204, resumed.text
        await _assert_exactly_the_uploads_are_visible(server.url, tenant, [single, tus_envelope], {})


async def test_a_query_that_outlasts_the_request_timeout_is_503_not_500(
    postgres: OwnPostgres, database_url_of_own: str, base_settings_env: dict[str, str]
) -> None:
    # asyncpg ends a statement that outlasts its command timeout (`REQUEST_TIMEOUT`), or a connection attempt that
    # gets no answer, with a bare `TimeoutError`: a database that accepts connections and then hangs answered 500,
    # an "unhandled error" with its traceback, as if ZKEB had a bug (an operator review).
    env = server_env(base_settings_env, database_url_of_own, REQUEST_TIMEOUT="5000")
    with zkeb_serve(env) as server:
        tenant = await make_fault_tenant(server.url, make_settings(base_settings_env, DATABASE_URL=database_url_of_own))
        blocker = await _lock_backups(postgres)
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_BOUND_SECONDS) as client:
                hung = await client.get("/api/v1/backups", headers=tenant.auth)
        finally:
            await blocker.close()
        assert hung.status_code == 503, hung.text
        assert hung.headers["content-type"].startswith("application/problem+json")
        assert hung.headers["retry-after"] == "1"
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            assert (await client.get("/api/v1/backups", headers=tenant.auth)).status_code == 200


async def _lock_backups(postgres: OwnPostgres) -> asyncpg.Connection:
    """A superuser transaction holding an exclusive lock on `backups`: every commit of a backup waits on it."""
    connection = await asyncpg.connect(postgres.url.rsplit("/", 1)[0] + "/zkeb")
    await connection.execute("BEGIN; LOCK TABLE backups IN ACCESS EXCLUSIVE MODE")
    return connection
