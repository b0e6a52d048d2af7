"""`Accept` on a backup's envelope: `q` values honoured, `q=0` refuses; nothing acceptable is a fallback or 406.

The granian test runs the same requests against a real server on PostgreSQL (the live probe's finding).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from backups_support import Tenant, auth, make_tenant, row_counts, sign_envelope
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.settings import Settings

from support import granian_server, make_settings, problem

Client = AsyncTestClient[Litestar] | httpx.AsyncClient
JSON = "application/json"
MSGPACK = "application/msgpack"

#: Accept value -> the representation answered (None: 406).
CASES: dict[str, str | None] = {
    f"{MSGPACK};q=0": JSON,  # names msgpack only to refuse it: JSON, the one representation not refused
    f"{MSGPACK};q=0, {JSON}": JSON,
    f"{MSGPACK};q=0.0, */*": JSON,
    f"{MSGPACK};q=0.2, {JSON};q=0.9": JSON,
    f"{JSON};q=0.2, {MSGPACK}": MSGPACK,
    f"{MSGPACK}, {JSON}": MSGPACK,
    f"*/*, {MSGPACK}": MSGPACK,
    "text/html": JSON,  # nothing we produce is listed: the header is disregarded (RFC 9110 §12.5.1)
    f"{JSON};q=0": MSGPACK,
    f"{JSON};q=0, {MSGPACK};q=0": None,
    "*/*;q=0": None,
    f"{JSON};q=0, text/html": MSGPACK,  # disregarded, but JSON stays refused
}


def _assert_documented(document: dict[str, Any], method: str, path: str, response: httpx.Response) -> None:
    """The OpenAPI document lists the response's status and media type for that operation."""
    documented = document["paths"][path][method]["responses"]
    assert str(response.status_code) in documented, (method, path, response.status_code)
    media_type = response.headers["content-type"].split(";")[0]
    assert media_type in documented[str(response.status_code)]["content"], (method, path, media_type)


async def _check_negotiation(http: Client, tenant: Tenant, connection: asyncpg.Connection) -> None:
    document = (await http.get("/schema/openapi.json")).json()
    envelope = sign_envelope(tenant, os.urandom(100))
    created = await http.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
    assert created.status_code == 201, created.text
    backup_id = created.json()["id"]
    for accept, expected in CASES.items():
        response = await http.get(
            f"/api/v1/backups/{backup_id}", headers={**auth(tenant.project_key), "Accept": accept}
        )
        _assert_documented(document, "get", "/api/v1/backups/{backup_id}", response)
        if expected is None:
            assert response.status_code == 406, (accept, response.text)
            assert "application/msgpack" in problem(response)["detail"]
            continue
        assert response.status_code == 200, (accept, response.text)
        assert response.headers["content-type"].split(";")[0] == expected, accept
        assert response.headers["vary"] == "Accept"
        body = response.json() if expected == JSON else msgspec.msgpack.decode(response.content)
        assert str(body["id"]) == backup_id
    # An upload whose answer nobody accepts is refused before anything is stored.
    before = await row_counts(connection)
    refused = await http.post(
        "/api/v1/backups",
        json=sign_envelope(tenant, os.urandom(100)).json(),
        headers={**auth(tenant.project_key), "Accept": f"{JSON};q=0, {MSGPACK};q=0"},
    )
    assert refused.status_code == 406, refused.text
    problem(refused)
    _assert_documented(document, "post", "/api/v1/backups", refused)
    assert await row_counts(connection) == before


async def test_accept_q_values_are_honoured(
    client: AsyncTestClient[Litestar], settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    await _check_negotiation(client, await make_tenant(client, settings), owner_connection)


@pytest.fixture
def live_url(base_settings_env: dict[str, str], database_url: str) -> Iterator[str]:
    with granian_server({**base_settings_env, "DATABASE_URL": database_url}) as url:
        yield url


async def test_accept_q_values_are_honoured_by_the_live_server(
    live_url: str, base_settings_env: dict[str, str], database_url: str, owner_connection: asyncpg.Connection
) -> None:
    async with httpx.AsyncClient(base_url=live_url, timeout=60) as http:
        tenant = await make_tenant(http, make_settings(base_settings_env, DATABASE_URL=database_url))
        await _check_negotiation(http, tenant, owner_connection)
