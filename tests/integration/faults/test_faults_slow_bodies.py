"""Slow-body clients against `zkeb serve`: request bodies that stall or trickle are cut off, and starve no one.

granian bounds a request's head (the slowloris test in `test_faults_processes` covers trickled headers) but not its
body; `zkeb.core.connection.RequestBodyMiddleware` does (`BODY_IDLE_TIMEOUT`, `BODY_MIN_RATE`). Each client here
speaks HTTP/1.1 on a raw socket, so it can send a request's head at once and then its body as slowly as it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from faults_support import FaultTenant, make_fault_tenant, server_env, tus_create, zkeb_serve

from support import make_settings

pytestmark = pytest.mark.slow

OCTETS = "application/offset+octet-stream"
MIB = 1024 * 1024
#: How much later than the timeout a cut-off may come: the server's own reaction, on a busy shared machine.
SLACK_SECONDS = 3.0


@dataclass(frozen=True)
class Answer:
    """What a slow client got: the status (0 when the connection ended without one), headers, body, and when."""

    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def problem(self) -> dict[str, object]:
        """The problem+json body (asserting it is one)."""
        assert self.headers.get("content-type", "").startswith("application/problem+json"), self.headers
        body: dict[str, object] = json.loads(self.body)
        return body


def _parse(raw: bytes, seconds: float) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head:
        return Answer(0, {}, b"", seconds)
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    length = int(headers.get("content-length", len(body)))
    return Answer(int(lines[0].split()[1]), headers, body[:length], seconds)


async def slow_request(
    port: int, head: str, body: bytes, *, first: int = 0, step: int = 1, interval: float = 1.0
) -> Answer:
    """Send `head`, then `body[:first]` at once, then `step` bytes every `interval` s until the server answers.

    The answer's `seconds` count from the end of the fast part. The server closes the connection after its answer.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body[:first])
    await writer.drain()
    started = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for offset in range(first, len(body), step):
                await asyncio.sleep(interval)
                writer.write(body[offset : offset + step])
                await writer.drain()

    trickling = asyncio.create_task(trickle())
    try:
        raw = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), timeout=120):
                raw += chunk
        return _parse(raw, time.monotonic() - started)
    finally:
        trickling.cancel()
        writer.close()


def _head(method: str, path: str, length: int, **headers: str) -> str:
    # `Connection: close`: the answer ends when the server closes, not when its keep-alive timeout does.
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {length}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def _patch_head(tenant: FaultTenant, location: str, length: int, offset: int = 0) -> str:
    path = "/" + location.split("/", 3)[3]
    return _head(
        "PATCH", path, length, Authorization=f"Bearer {tenant.project_key}", Tus_Resumable="1.0.0",
        Content_Type=OCTETS, Upload_Offset=str(offset),
    )  # fmt: skip


async def _latencies(url: str, tenant: FaultTenant, count: int) -> list[float]:
    """`count` authenticated listings one after another (each a database round trip): their latencies in s."""
    seconds = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(count):
            started = time.monotonic()
            response = await client.get("/api/v1/backups", headers=tenant.auth)
            seconds.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
    return seconds


async def test_twenty_trickling_bodies_are_cut_off_with_408_while_other_clients_keep_their_latency(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    timeout = 8.0
    env = server_env(
        base_settings_env, database_url, ZKEB_AUTO_MIGRATE="false", ENABLE_RATE_LIMITING="false",
        BODY_IDLE_TIMEOUT=str(timeout),
    )  # fmt: skip
    with zkeb_serve(env) as server:
        tenant = await make_fault_tenant(server.url, make_settings(base_settings_env, DATABASE_URL=database_url))
        payload = os.urandom(2 * MIB)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            locations = [
                (await tus_create(client, tenant, tenant.envelope(payload))).headers["location"] for _ in range(7)
            ]
        single_shot = json.dumps(tenant.envelope(os.urandom(1000)).json()).encode()
        token = json.dumps({"project_id": str(tenant.project_id), "device_id_hash": "00" * 32}).encode()
        auth = {"Authorization": f"Bearer {tenant.project_key}"}
        json_type = {"Content_Type": "application/json"}
        before = await _latencies(server.url, tenant, 40)

        # Three kinds of slow body, on three routes: a byte a second (never idle for long, far below
        # BODY_MIN_RATE), silence after the head, and silence after a first fast part.
        clients = [
            slow_request(server.port, _patch_head(tenant, location, len(payload)), payload, first=i * 100_000)
            for i, location in enumerate(locations)
        ]
        clients += [
            slow_request(
                server.port, _head("POST", "/api/v1/backups", len(single_shot), **auth, **json_type), single_shot,
                first=i * 100, interval=1.0 if i % 2 else 3600,
            )
            for i in range(7)
        ]  # fmt: skip
        clients += [
            slow_request(server.port, _head("POST", "/api/v1/auth/token", len(token), **json_type), token, first=i)
            for i in range(6)
        ]
        slow = [asyncio.create_task(client) for client in clients]
        await asyncio.sleep(1)
        during = await _latencies(server.url, tenant, 40)
        assert not any(task.done() for task in slow), "a slow client was answered before its timeout"
        answers = await asyncio.wait_for(asyncio.gather(*slow), timeout=timeout + 60)

    for answer in answers:
        assert answer.status == 408, answer
        assert answer.headers["connection"] == "close"
        assert "no progress" in str(answer.problem()["detail"])
        assert timeout - 1 <= answer.seconds < timeout + SLACK_SECONDS, answer.seconds
    for i, answer in enumerate(answers[:7]):  # the tus PATCHes kept what arrived, and say how much
        assert answer.headers["tus-resumable"] == "1.0.0"
        assert i * 100_000 < int(answer.headers["upload-offset"]) <= i * 100_000 + timeout + SLACK_SECONDS
    median_before, median_during = statistics.median(before), statistics.median(during)
    print(
        f"\n20 slow bodies cut off after {min(a.seconds for a in answers):.1f}-{max(a.seconds for a in answers):.1f} s"
        f" (BODY_IDLE_TIMEOUT {timeout:g} s); listing latency median {median_before * 1000:.1f} ms before,"
        f" {median_during * 1000:.1f} ms with them connected (max {max(before) * 1000:.1f} / {max(during) * 1000:.1f})"
    )
    assert median_during < 3 * median_before + 0.02, (before, during)
    assert max(during) < 1.0, during


async def test_a_stalled_tus_patch_keeps_what_arrived_and_the_upload_resumes(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    timeout = 2.0
    env = server_env(base_settings_env, database_url, ZKEB_AUTO_MIGRATE="false", BODY_IDLE_TIMEOUT=str(timeout))
    with zkeb_serve(env) as server:
        tenant = await make_fault_tenant(server.url, make_settings(base_settings_env, DATABASE_URL=database_url))
        payload = os.urandom(3 * MIB + 5)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            location = (await tus_create(client, tenant, tenant.envelope(payload))).headers["location"]
            sent = MIB + MIB // 2 + 7  # a whole chunk and a part of the next: the part is kept too
            stalled = await slow_request(
                server.port, _patch_head(tenant, location, len(payload)), payload, first=sent, interval=3600
            )
            assert stalled.status == 408, stalled
            assert stalled.headers["upload-offset"] == str(sent)
            assert timeout - 1 <= stalled.seconds < timeout + SLACK_SECONDS
            tus = {"Tus-Resumable": "1.0.0", **tenant.auth}
            head = await client.head(location, headers=tus)
            assert head.headers["upload-offset"] == str(sent)
            resumed = await client.patch(
                location,
                content=payload[sent:],
                headers={**tus, "Upload-Offset": str(sent), "Content-Type": OCTETS},
            )
            assert resumed.status_code == 204, resumed.text
            restored = await client.get(
                f"/api/v1/backups/{resumed.headers['zkeb-backup-id']}/payload", headers=tenant.auth
            )
            assert hashlib.sha256(restored.content).digest() == hashlib.sha256(payload).digest()


async def test_a_slow_but_steady_body_is_not_cut_off(
    base_settings_env: dict[str, str], database_url: str, owner_connection: asyncpg.Connection
) -> None:
    # 2 KiB every half second (4 KiB/s) for longer than the timeout: above BODY_MIN_RATE (1 KiB/s here), so it
    # completes although it takes several timeouts' time.
    env = server_env(
        base_settings_env, database_url, ZKEB_AUTO_MIGRATE="false", BODY_IDLE_TIMEOUT="2", BODY_MIN_RATE="1KiB"
    )
    with zkeb_serve(env) as server:
        tenant = await make_fault_tenant(server.url, make_settings(base_settings_env, DATABASE_URL=database_url))
        payload = os.urandom(40 * 1024)
        envelope = tenant.envelope(payload)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            location = (await tus_create(client, tenant, envelope)).headers["location"]
        answer = await slow_request(
            server.port, _patch_head(tenant, location, len(payload)), payload, step=2048, interval=0.5
        )
        assert answer.status == 204, answer
        assert answer.seconds > 3 * 2.0
        assert "zkeb-backup-id" in answer.headers
        assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 1
