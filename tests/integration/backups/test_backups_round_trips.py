"""How many PostgreSQL and Redis round trips the hot read paths cost, counted on the wire by loopback proxies.

Latency on a shared machine is noise; these counts are exact, so a change that adds a trip to every authenticated
request fails here rather than only showing up as a slower benchmark.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from backups_support import Tenant, auth, device_token, make_tenant, sign_envelope, tus_headers
from litestar import Litestar
from litestar.testing import AsyncTestClient

from roundtrips import WireCounts, counting_proxy
from zkeb.app import create_app
from zkeb.settings import Settings

from support import audit_linked, make_settings, problem


@dataclass
class Counted:
    """An app whose PostgreSQL and Redis traffic goes through counting proxies."""

    client: AsyncTestClient[Litestar]
    settings: Settings
    postgres: WireCounts
    redis: WireCounts
    owner: asyncpg.Connection

    def reset(self) -> None:
        self.postgres.reset()
        self.redis.reset()


@pytest.fixture
async def counted(
    request: pytest.FixtureRequest,
    base_settings_env: dict[str, str],
    database_url: str,
    redis_url: str,
    owner_connection: asyncpg.Connection,
) -> AsyncIterator[Counted]:
    pool_size = getattr(request, "param", 2)
    with (
        counting_proxy(database_url, protocol="postgres") as (pg_url, pg_counts),
        counting_proxy(redis_url, protocol="redis") as (redis_proxy_url, redis_counts),
    ):
        settings = make_settings(
            base_settings_env,
            DATABASE_URL=pg_url,
            REDIS_URL=redis_proxy_url,
            DB_POOL_SIZE=str(pool_size),
            MAINTENANCE_INTERVAL="0",
        )
        async with AsyncTestClient(app=create_app(settings)) as client:
            yield Counted(client, settings, pg_counts, redis_counts, owner_connection)


async def _warm(counted: Counted, tenant: Tenant, method: str, url: str, headers: dict[str, str]) -> None:
    """Let the app's background work settle, fill the statement caches of every pooled connection, zero the counters.

    The audit linker chains the set-up requests' events on a pooled connection of its own choosing; on a busy machine
    it ran through every counted attempt, and a request then took a connection it had opened meanwhile, whose
    statements were not prepared yet (one more trip each: red in a CI run). So: wait until the linker is done, then
    repeat the request until one prepares nothing.
    """
    await audit_linked(counted.owner, tenant.organization_id)
    for _ in range(10):
        counted.reset()
        response = await counted.client.request(method, url, headers=headers)
        assert response.status_code == 200, response.text
        if not any(statement.startswith("parse: ") for statement in counted.postgres.statements):
            break
    counted.reset()


async def _backup_of(counted: Counted, tenant: Tenant) -> str:
    response = await counted.client.post(
        "/api/v1/backups", json=sign_envelope(tenant, b"payload").json(), headers=auth(tenant.project_key)
    )
    assert response.status_code == 201, response.text
    backup_id: str = response.json()["id"]
    return backup_id


async def _trips(counted: Counted, tenant: Tenant, url: str, headers: dict[str, str]) -> tuple[int, int, list[str]]:
    """PostgreSQL and Redis round trips of one warm GET, and the simple-protocol statements it sent (first words).

    The app's background work (the audit linker chaining the events of the set-up requests) shares the proxies, so
    this is the fewest of a few attempts: background trips only ever add to a request's own.
    """
    await _warm(counted, tenant, "GET", url, headers)
    attempts = []
    for _ in range(5):
        counted.reset()
        response = await counted.client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        # The first word: BEGIN names an isolation level or not, by how the pooled connection was last used.
        simple = [s.split()[0].rstrip(";") for s in counted.postgres.statements if not s.startswith("parse: ")]
        attempts.append((counted.postgres.round_trips, counted.redis.round_trips, simple))
    return min(attempts, key=lambda attempt: attempt[0] + attempt[1])


async def test_a_device_reads_an_envelope_a_page_or_the_latest_in_four_round_trips(counted: Counted) -> None:
    # The device's state (one autocommit statement), then one raw read-only transaction whose BEGIN carries the
    # tenant, the read, COMMIT; no ORM session. Plus the limiter's EVALSHA.
    tenant = await make_tenant(counted.client, counted.settings)
    backup_id = await _backup_of(counted, tenant)
    token = await device_token(counted.client, tenant, tenant.device)
    one_transaction = ["BEGIN", "COMMIT"]
    assert await _trips(counted, tenant, f"/api/v1/backups/{backup_id}", auth(token)) == (4, 1, one_transaction)
    assert await _trips(counted, tenant, "/api/v1/backups", auth(token)) == (4, 1, one_transaction)
    assert counted.redis.statements == ["EVALSHA"]
    container = (await counted.client.get(f"/api/v1/backups/{backup_id}", headers=auth(token))).json()["container_id"]
    latest = f"/api/v1/containers/{container}/backups/latest"
    assert await _trips(counted, tenant, latest, auth(token)) == (4, 1, one_transaction)


async def test_a_project_key_reads_with_one_key_lookup_and_one_transaction(counted: Counted) -> None:
    # The key lookup (autocommit, no BEGIN), then BEGIN with the tenant, the read, COMMIT.
    tenant = await make_tenant(counted.client, counted.settings)
    backup_id = await _backup_of(counted, tenant)
    one_transaction = ["BEGIN", "COMMIT"]
    assert await _trips(counted, tenant, f"/api/v1/backups/{backup_id}", auth(tenant.project_key)) == (
        4,
        1,
        one_transaction,
    )
    assert await _trips(counted, tenant, "/api/v1/backups", auth(tenant.project_key)) == (4, 1, one_transaction)


async def test_a_device_revoked_between_reads_is_refused_at_once_and_audited_on_a_pool_of_one(
    counted: Counted, owner_connection: asyncpg.Connection
) -> None:
    tenant = await make_tenant(counted.client, counted.settings)
    backup_id = await _backup_of(counted, tenant)
    token = await device_token(counted.client, tenant, tenant.device)
    url = f"/api/v1/backups/{backup_id}"
    assert (await counted.client.get(url, headers=auth(token))).status_code == 200
    revoked = await counted.client.delete(f"/api/v1/devices/{tenant.device.id}", headers=auth(tenant.admin_key))
    assert revoked.status_code == 204
    # The refusal holds no connection while it records the failure: with one pooled connection, holding one would
    # leave the audit write waiting for the pool until it gave up.
    for target in (url, "/api/v1/backups") * 3:
        refused = await counted.client.get(target, headers=auth(token))
        assert refused.status_code == 401
        assert problem(refused)["detail"] == "device revoked"
    recorded = await owner_connection.fetchval(
        "SELECT count(*) FROM audit_events WHERE action = 'auth.failed' AND actor_id = $1", tenant.device.id
    )
    assert 1 <= recorded <= 2  # the first refusal of each minute (two if the six straddled a minute's end)
    other = await device_token(counted.client, tenant, tenant.devices[1])
    assert (await counted.client.get("/api/v1/backups", headers=auth(other))).status_code == 200


async def test_a_device_reads_only_its_own_backups(counted: Counted) -> None:
    tenant = await make_tenant(counted.client, counted.settings)
    backup_id = await _backup_of(counted, tenant)
    other = await make_tenant(counted.client, counted.settings, name="other")
    other_token = await device_token(counted.client, other, other.device)
    sibling_token = await device_token(counted.client, tenant, tenant.devices[1])
    for token in (other_token, sibling_token):
        response = await counted.client.get(f"/api/v1/backups/{backup_id}", headers=auth(token))
        assert response.status_code == 404
        listed = await counted.client.get("/api/v1/backups", headers=auth(token))
        assert listed.json()["items"] == []


async def test_a_device_downloads_a_small_payload_in_seven_round_trips(counted: Counted) -> None:
    # The device's state: one autocommit statement (zkeb_device_state; was a tenant transaction of four). The
    # envelope with its payload's key and its chunk spans, one statement in a raw read-only transaction (BEGIN with
    # the tenant, the read, COMMIT; was two reads, and an ORM session transaction of seven before). The chunks' bytes
    # in another (BEGIN with the tenant, the read, COMMIT). 7 in all, was 8, and 15 before that.
    tenant = await make_tenant(counted.client, counted.settings)
    backup_id = await _backup_of(counted, tenant)
    token = await device_token(counted.client, tenant, tenant.device)
    trips = await _trips(counted, tenant, f"/api/v1/backups/{backup_id}/payload", auth(token))
    assert trips == (7, 1, ["BEGIN", "COMMIT", "BEGIN", "COMMIT"])


async def test_a_patch_that_completes_an_upload_costs_twenty_one_round_trips_and_one_durable_commit(
    counted: Counted, owner_connection: asyncpg.Connection
) -> None:
    # The key lookup (1). The upload and its payload, read in the request's ORM session (BEGIN, the tenant, two
    # reads, COMMIT: 5). The claim: BEGIN with the tenant, the claim, the chunks past the offset deleted, COMMIT (4;
    # the deletion used to open a transaction of its own inside the claim's, two more). The chunk with the lease
    # check, not flushed (BEGIN, two statements, COMMIT: 4). The commit, the one durable transaction: BEGIN with the
    # tenant, the admission, the project row's key share, the session's end under the lease, the backup's rows, the
    # audit event, COMMIT (7). 21 in all; was 28, through an ORM commit that locked the project row for each backup.
    tenant = await make_tenant(counted.client, counted.settings)
    attempts: list[tuple[int, list[str]]] = []
    for attempt in range(6):
        payload = f"payload {attempt}".encode()
        created = await counted.client.post(
            "/api/v1/uploads",
            headers=tus_headers(
                tenant.project_key,
                **{
                    "Upload-Length": str(len(payload)),
                    "Upload-Metadata": sign_envelope(tenant, payload).tus_metadata(),
                },
            ),
        )
        assert created.status_code == 201, created.text
        # The linker chains the last commit's audit event about 0.1 s after it (LINK_GATHER_SECONDS): on a busy
        # machine that fell inside the next PATCH every time. Counted from here, only this PATCH's own can.
        await audit_linked(owner_connection, tenant.organization_id)
        counted.reset()
        completed = await counted.client.patch(
            created.headers["location"],
            content=payload,
            headers=tus_headers(
                tenant.project_key, **{"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
            ),
        )
        assert completed.status_code == 204, completed.text
        simple = [s.split()[0].rstrip(";") for s in counted.postgres.statements if not s.startswith("parse: ")]
        attempts.append((counted.postgres.round_trips, simple))
    # The first PATCH fills the statement caches; background work (the audit linker) only ever adds trips.
    trips, simple = min(attempts[1:])
    assert trips == 21, attempts
    assert simple == ["BEGIN", "COMMIT", "BEGIN", "COMMIT", "BEGIN", "COMMIT", "BEGIN", "COMMIT"], attempts
