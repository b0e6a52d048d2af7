"""Devices: enrolment with a validated Ed25519 key, listing, revocation that stops tokens at once."""

from __future__ import annotations

import base64
import hashlib
import uuid
from typing import Any

import asyncpg
import pytest
from accounts_support import (
    auth,
    create_org,
    create_project,
    enroll_device,
    proof,
    public_key_b64,
    request_token,
    table_snapshot,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.settings import Settings

from support import problem

Client = AsyncTestClient[Litestar]

SMALL_ORDER_KEY = base64.b64encode(bytes([1]) + bytes(31)).decode()


def _enrolment(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id_hash": hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        "public_key": public_key_b64(Ed25519PrivateKey.generate()),
        "label": "phone",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


async def test_enrolling_a_device_answers_the_design_shape(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    body = _enrolment(device_id_hash=hashlib.sha256(b"device").hexdigest().upper())
    response = await client.post(f"/api/v1/projects/{project['id']}/devices", json=body, headers=auth(admin_key))
    assert response.status_code == 201
    device = response.json()
    assert set(device) == {"id", "device_id_hash", "public_key", "label", "project_id", "created_at", "revoked_at"}
    assert device["device_id_hash"] == hashlib.sha256(b"device").hexdigest()
    assert device["public_key"] == body["public_key"]
    assert (device["label"], device["project_id"], device["revoked_at"]) == ("phone", project["id"], None)
    row = await owner_connection.fetchrow("SELECT * FROM devices WHERE id = $1", uuid.UUID(device["id"]))
    assert row is not None
    assert bytes(row["public_key"]) == base64.b64decode(body["public_key"])
    assert bytes(row["device_id_hash"]) == hashlib.sha256(b"device").digest()


async def test_a_label_is_optional(client: Client, settings: Settings) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    body = _enrolment(label=...)
    response = await client.post(f"/api/v1/projects/{project['id']}/devices", json=body, headers=auth(admin_key))
    assert response.status_code == 201
    assert response.json()["label"] is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"public_key": "not base64!"}, "public_key"),
        ({"public_key": base64.b64encode(bytes(31)).decode()}, "public_key"),
        ({"public_key": base64.b64encode(bytes(33)).decode()}, "public_key"),
        ({"public_key": SMALL_ORDER_KEY}, "public_key"),
        ({"public_key": base64.b64encode(b"\xff" * 32).decode()}, "public_key"),
        ({"public_key": ...}, "public_key"),
        ({"device_id_hash": "abc"}, "device_id_hash"),
        ({"device_id_hash": "g" * 64}, "device_id_hash"),
        ({"device_id_hash": "a" * 66}, "device_id_hash"),
        ({"device_id_hash": ...}, "device_id_hash"),
        ({"label": "x" * 201}, "label"),
        ({"label": "bell\x07"}, "label"),
        ({"revoked_at": None}, "revoked_at"),
    ],
)
async def test_invalid_enrolments_are_422_naming_the_field_and_enroll_nothing(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection, overrides: dict[str, Any], field: str
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    before = await table_snapshot(owner_connection)
    response = await client.post(
        f"/api/v1/projects/{project['id']}/devices", json=_enrolment(**overrides), headers=auth(admin_key)
    )
    assert response.status_code == 422, response.text
    assert field in problem(response)["detail"]
    assert await table_snapshot(owner_connection) == before


async def test_enrolling_the_same_device_twice_is_a_conflict(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    other = await create_project(client, admin_key, "other")
    body = _enrolment()
    url = f"/api/v1/projects/{project['id']}/devices"
    assert (await client.post(url, json=body, headers=auth(admin_key))).status_code == 201
    before = await table_snapshot(owner_connection)
    again = await client.post(url, json=_enrolment(device_id_hash=body["device_id_hash"]), headers=auth(admin_key))
    assert again.status_code == 409
    problem(again)
    assert await table_snapshot(owner_connection) == before
    # The same device may belong to another project.
    elsewhere = await client.post(f"/api/v1/projects/{other['id']}/devices", json=body, headers=auth(admin_key))
    assert elsewhere.status_code == 201


async def test_devices_are_listed_by_keyset_cursor(client: Client, settings: Settings) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    other = await create_project(client, admin_key, "other")
    enrolled = [(await enroll_device(client, admin_key, project["id"])).id for _ in range(3)]
    await enroll_device(client, admin_key, other["id"])
    url = f"/api/v1/projects/{project['id']}/devices"
    first = (await client.get(url, params={"limit": 2}, headers=auth(admin_key))).json()
    assert [d["id"] for d in first["items"]] == enrolled[:2]
    assert first["next_cursor"]
    second = (
        await client.get(url, params={"limit": 2, "cursor": first["next_cursor"]}, headers=auth(admin_key))
    ).json()
    assert [d["id"] for d in second["items"]] == enrolled[2:]
    assert second["next_cursor"] is None
    # Another project's listing refuses the cursor (it went on from its position there).
    elsewhere = await client.get(
        f"/api/v1/projects/{other['id']}/devices", params={"cursor": first["next_cursor"]}, headers=auth(admin_key)
    )
    assert elsewhere.status_code == 400
    assert [e["key"] for e in elsewhere.json()["errors"]] == ["cursor"]


async def test_a_revoked_device_loses_its_live_token_and_gets_no_new_one(client: Client, settings: Settings) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    device = await enroll_device(client, admin_key, project["id"])
    token = await request_token(client, device)
    url = f"/api/v1/projects/{project['id']}"
    assert (await client.get(url, headers=auth(token))).status_code == 200
    revoked = await client.delete(f"/api/v1/devices/{device.id}", headers=auth(admin_key))
    assert revoked.status_code == 204
    refused = await client.get(url, headers=auth(token))
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'Bearer realm="zkeb", error="invalid_token"'
    problem(refused)
    no_token = await client.post("/api/v1/auth/token", json=proof(device))
    assert no_token.status_code == 401
    problem(no_token)
    listed = (await client.get(f"/api/v1/projects/{project['id']}/devices", headers=auth(admin_key))).json()
    assert listed["items"][0]["revoked_at"] is not None
    assert (await client.delete(f"/api/v1/devices/{device.id}", headers=auth(admin_key))).status_code == 204
