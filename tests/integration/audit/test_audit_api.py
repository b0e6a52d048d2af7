"""The audit endpoints: listing with filters and cursors, verification, tamper detection, append-only grants."""

from __future__ import annotations

import base64
import datetime
import uuid

import asyncpg
import httpx
import pytest
from audit_support import create_org, write_events
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.settings import Settings

from support import granian_server, problem


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _count(owner_connection: asyncpg.Connection, org_id: uuid.UUID) -> int:
    count: int = await owner_connection.fetchval("SELECT count(*) FROM audit_events WHERE organization_id = $1", org_id)
    return count


async def test_listing_pages_newest_first_with_a_cursor_and_filters(
    client: AsyncTestClient[Litestar], engine: AsyncEngine, settings: Settings
) -> None:
    org_id, key = await create_org(engine, settings)
    await write_events(engine, settings, org_id, 5, action="test.one")
    await write_events(engine, settings, org_id, 3, action="test.two")

    first = await client.get("/api/v1/audit-events", params={"limit": 4}, headers=_auth(key))
    assert first.status_code == 200, first.text
    body = first.json()
    seqs = [item["seq"] for item in body["items"]]
    assert seqs == sorted(seqs, reverse=True)
    assert len(seqs) == 4
    assert body["next_cursor"]
    rest = await client.get(
        "/api/v1/audit-events", params={"limit": 100, "cursor": body["next_cursor"]}, headers=_auth(key)
    )
    assert rest.status_code == 200
    all_seqs = seqs + [item["seq"] for item in rest.json()["items"]]
    assert rest.json()["next_cursor"] is None
    assert sorted(all_seqs) == list(range(1, max(all_seqs) + 1))

    for other in ({"action": "test.one"}, {"since": "2000-01-01T00:00:00Z"}):  # the cursor of an unfiltered listing
        reused = await client.get(
            "/api/v1/audit-events", params={**other, "cursor": body["next_cursor"]}, headers=_auth(key)
        )
        assert reused.status_code == 400, other
        assert [e["key"] for e in reused.json()["errors"]] == ["cursor"]

    two = await client.get("/api/v1/audit-events", params={"action": "test.two"}, headers=_auth(key))
    assert [item["action"] for item in two.json()["items"]] == ["test.two"] * 3
    item = two.json()["items"][0]
    assert len(item["hash"]) == 64
    assert len(item["prev_hash"]) == 64

    future = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat()
    none = await client.get("/api/v1/audit-events", params={"since": future}, headers=_auth(key))
    assert none.json() == {"items": [], "next_cursor": None}
    everything = await client.get("/api/v1/audit-events", params={"until": future, "limit": 100}, headers=_auth(key))
    assert len(everything.json()["items"]) == len(all_seqs)


async def test_bad_query_parameters_are_refused_with_problem_details(
    client: AsyncTestClient[Litestar], engine: AsyncEngine, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    org_id, key = await create_org(engine, settings)
    before = await _count(owner_connection, org_id)
    no_offset = {"since": "2026-01-01T00:00:00"}, {"until": "2026-01-01T00:00:00"}  # not RFC 3339: no UTC offset
    # Valid as written, out of range once in UTC, and a sequence number past bigint (all 409 from the database before).
    out_of_range = (
        {"since": "0001-01-01T00:00:00+14:00"},
        {"until": "0001-01-01T00:00:00+00:01"},
        {"cursor": base64.urlsafe_b64encode(b"seq:9223372036854775808").decode().rstrip("=")},
    )
    for params in (
        {"cursor": "not-a-cursor"},
        {"limit": "101"},
        {"limit": "0"},
        {"since": "yesterday"},
        *no_offset,
        *out_of_range,
    ):
        response = await client.get("/api/v1/audit-events", params=params, headers=_auth(key))
        assert response.status_code == 400, (params, response.text)
        problem(response)
    assert await _count(owner_connection, org_id) == before


async def test_audit_routes_need_an_org_admin_key(client: AsyncTestClient[Litestar]) -> None:
    for path in ("/api/v1/audit-events", "/api/v1/audit-events/verify"):
        anonymous = await client.get(path)
        assert anonymous.status_code == 401
        problem(anonymous)
        bad = await client.get(path, headers=_auth("zkeb_" + "A" * 43))
        assert bad.status_code == 401
        problem(bad)


async def test_an_organization_sees_only_its_own_events(
    client: AsyncTestClient[Litestar], engine: AsyncEngine, settings: Settings
) -> None:
    org_a, key_a = await create_org(engine, settings, "a")
    org_b, _key_b = await create_org(engine, settings, "b")
    await write_events(engine, settings, org_b, 3, action="test.b-only")
    listing = await client.get("/api/v1/audit-events", params={"action": "test.b-only"}, headers=_auth(key_a))
    assert listing.json()["items"] == []
    verify = await client.get("/api/v1/audit-events/verify", headers=_auth(key_a))
    assert verify.json()["valid"] is True
    assert org_a != org_b


async def test_an_untouched_chain_verifies(
    client: AsyncTestClient[Litestar], engine: AsyncEngine, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    org_id, key = await create_org(engine, settings)
    await write_events(engine, settings, org_id, 7)
    response = await client.get("/api/v1/audit-events/verify", headers=_auth(key))
    assert response.status_code == 200
    body = response.json()
    last_hash = await owner_connection.fetchval(
        "SELECT hash FROM audit_events WHERE organization_id = $1 ORDER BY seq DESC LIMIT 1", org_id
    )
    assert body == {
        "valid": True,
        "events": await _count(owner_connection, org_id),
        "head": last_hash.hex(),
        "first_broken": None,
    }


async def _event_at(owner_connection: asyncpg.Connection, org_id: uuid.UUID, seq: int) -> asyncpg.Record:
    row = await owner_connection.fetchrow(
        "SELECT * FROM audit_events WHERE organization_id = $1 AND seq = $2", org_id, seq
    )
    assert row is not None
    return row


async def _verify(client: AsyncTestClient[Litestar], key: str) -> dict[str, object]:
    response = await client.get("/api/v1/audit-events/verify", headers=_auth(key))
    assert response.status_code == 200
    body: dict[str, object] = response.json()
    return body


@pytest.fixture
async def chain(engine: AsyncEngine, settings: Settings) -> tuple[uuid.UUID, str]:
    org_id, key = await create_org(engine, settings)
    await write_events(engine, settings, org_id, 10)
    return org_id, key


async def test_an_updated_row_is_reported_as_the_first_broken_link(
    client: AsyncTestClient[Litestar], chain: tuple[uuid.UUID, str], owner_connection: asyncpg.Connection
) -> None:
    org_id, key = chain
    target = await _event_at(owner_connection, org_id, 4)
    await owner_connection.execute("UPDATE audit_events SET actor_id = 'someone-else' WHERE id = $1", target["id"])
    body = await _verify(client, key)
    assert body["valid"] is False
    assert body["first_broken"] == {"seq": 4, "id": str(target["id"]), "reason": "hash mismatch"}


async def test_a_deleted_middle_row_is_reported_at_the_gap(
    client: AsyncTestClient[Litestar], chain: tuple[uuid.UUID, str], owner_connection: asyncpg.Connection
) -> None:
    org_id, key = chain
    deleted = await _event_at(owner_connection, org_id, 5)
    following = await _event_at(owner_connection, org_id, 6)
    total = await _count(owner_connection, org_id)
    await owner_connection.execute("DELETE FROM audit_events WHERE id = $1", deleted["id"])
    body = await _verify(client, key)
    assert body["valid"] is False
    assert body["events"] == total - 1
    broken = body["first_broken"]
    assert isinstance(broken, dict)
    assert (broken["seq"], broken["id"]) == (6, str(following["id"]))
    assert "gap" in broken["reason"]


async def test_a_deleted_middle_row_with_renumbering_is_reported(
    client: AsyncTestClient[Litestar], chain: tuple[uuid.UUID, str], owner_connection: asyncpg.Connection
) -> None:
    org_id, key = chain
    following = await _event_at(owner_connection, org_id, 6)
    async with owner_connection.transaction():
        await owner_connection.execute("DELETE FROM audit_events WHERE organization_id = $1 AND seq = 5", org_id)
        await owner_connection.execute(
            "UPDATE audit_events SET seq = -seq WHERE organization_id = $1 AND seq > 5", org_id
        )
        await owner_connection.execute(
            "UPDATE audit_events SET seq = -seq - 1 WHERE organization_id = $1 AND seq < 0", org_id
        )
    body = await _verify(client, key)
    assert body["first_broken"] == {"seq": 5, "id": str(following["id"]), "reason": "prev_hash mismatch"}


async def test_swapped_rows_are_reported_at_the_first_of_them(
    client: AsyncTestClient[Litestar], chain: tuple[uuid.UUID, str], owner_connection: asyncpg.Connection
) -> None:
    org_id, key = chain
    third = await _event_at(owner_connection, org_id, 3)
    seventh = await _event_at(owner_connection, org_id, 7)
    columns = ("occurred_at", "actor_id", "action", "details", "prev_hash", "hash")
    async with owner_connection.transaction():
        for row, other in ((third, seventh), (seventh, third)):
            assignments = ", ".join(f"{column} = ${i + 2}" for i, column in enumerate(columns))
            await owner_connection.execute(
                f"UPDATE audit_events SET {assignments} WHERE id = $1",
                row["id"],
                *(other[column] for column in columns),
            )
    body = await _verify(client, key)
    assert body["valid"] is False
    assert body["first_broken"] == {"seq": 3, "id": str(third["id"]), "reason": "prev_hash mismatch"}


async def test_a_truncated_tail_is_reported_against_the_chain_head(
    client: AsyncTestClient[Litestar], chain: tuple[uuid.UUID, str], owner_connection: asyncpg.Connection
) -> None:
    org_id, key = chain
    await owner_connection.execute("DELETE FROM audit_events WHERE organization_id = $1 AND seq > 8", org_id)
    body = await _verify(client, key)
    assert body["valid"] is False
    broken = body["first_broken"]
    assert isinstance(broken, dict)
    assert broken["seq"] == 9
    assert "tail" in broken["reason"]


async def test_the_runtime_role_cannot_update_or_delete_audit_rows(
    chain: tuple[uuid.UUID, str], owner_connection: asyncpg.Connection
) -> None:
    org_id, _key = chain
    before = await owner_connection.fetch("SELECT id, hash FROM audit_events ORDER BY seq")
    for statement in (
        "UPDATE audit_events SET action = 'rewritten'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ):
        async with owner_connection.transaction():
            await owner_connection.execute("SET LOCAL ROLE zkeb_app")
            await owner_connection.execute("SELECT set_config('zkeb.org_id', $1, true)", str(org_id))
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await owner_connection.execute(statement)
    assert await owner_connection.fetch("SELECT id, hash FROM audit_events ORDER BY seq") == before


@pytest.mark.parametrize("character", ["\x00", "\x01", "\t", "\n", "\x1f", "\x7f", "\x85"])
@pytest.mark.parametrize("name", ["action", "cursor", "since", "until", "limit"])
async def test_a_control_character_in_a_filter_is_a_400_naming_the_parameter(
    client: AsyncTestClient[Litestar],
    engine: AsyncEngine,
    settings: Settings,
    owner_connection: asyncpg.Connection,
    name: str,
    character: str,
) -> None:
    org_id, key = await create_org(engine, settings)
    await write_events(engine, settings, org_id, 2, action="test.one")
    first = await client.get("/api/v1/audit-events", params={"limit": 1}, headers=_auth(key))
    valid = {
        "action": "test.one",
        "cursor": first.json()["next_cursor"],
        "since": "2026-01-01T00:00:00Z",
        "until": "2026-01-01T00:00:00Z",
        "limit": "10",
    }
    before = await _count(owner_connection, org_id)
    for value in (character, valid[name] + character, character + valid[name]):
        response = await client.get("/api/v1/audit-events", params={name: value}, headers=_auth(key))
        assert response.status_code == 400, (name, value, response.text)
        body = problem(response)
        assert name in body["detail"], body
    assert await _count(owner_connection, org_id) == before


async def test_a_nul_in_the_action_filter_is_a_400_on_the_live_server(
    base_settings_env: dict[str, str], database_url: str, settings: Settings, engine: AsyncEngine
) -> None:
    _, key = await create_org(engine, settings)
    with granian_server({**base_settings_env, "DATABASE_URL": database_url}) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for query in ("action=%00", "action=api_key.created%00", "action=%0A", "cursor=%00", "since=%00"):
                response = await http.get(f"/api/v1/audit-events?{query}", headers=_auth(key))
                assert response.status_code == 400, (query, response.text)
                assert query.split("=")[0] in problem(response)["detail"]
