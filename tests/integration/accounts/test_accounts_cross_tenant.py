"""The cross-tenant matrix: each principal kind, every accounts route, another tenant's or project's or device's ids.

Every such request answers 404 (never 403, which would confirm the id exists) and changes nothing, checked on
the rows as the table owner sees them.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from accounts_support import (
    EnrolledDevice,
    auth,
    create_org,
    create_project,
    enroll_device,
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


@dataclass(frozen=True)
class World:
    """Org A (projects p1, p2) and org B, with keys and devices in each."""

    admin_a: str
    admin_a_key_id: str
    p1: str
    p2: str
    key_p1: str
    key_p1_id: str
    key_p2_id: str
    d1: EnrolledDevice
    d2: EnrolledDevice
    d_p2: EnrolledDevice
    token_d1: str
    admin_b: str
    admin_b_key_id: str
    p_b: str
    key_b_id: str
    d_b: EnrolledDevice


async def _key(client: Client, admin_key: str, project_id: str) -> dict[str, Any]:
    response = await client.post(f"/api/v1/projects/{project_id}/api-keys", json={"name": "k"}, headers=auth(admin_key))
    assert response.status_code == 201
    body: dict[str, Any] = response.json()
    return body


async def _build_world(client: Client, settings: Settings, owner: asyncpg.Connection) -> World:
    org_a, admin_a = await create_org(settings, "org-a")
    org_b, admin_b = await create_org(settings, "org-b")
    p1 = (await create_project(client, admin_a, "p1"))["id"]
    p2 = (await create_project(client, admin_a, "p2"))["id"]
    p_b = (await create_project(client, admin_b, "p1"))["id"]
    key_p1 = await _key(client, admin_a, p1)
    key_p2 = await _key(client, admin_a, p2)
    key_b = await _key(client, admin_b, p_b)
    d1 = await enroll_device(client, admin_a, p1)
    d2 = await enroll_device(client, admin_a, p1)
    d_p2 = await enroll_device(client, admin_a, p2)
    d_b = await enroll_device(client, admin_b, p_b)
    admin_key_ids = {
        org: str(await owner.fetchval("SELECT id FROM api_keys WHERE organization_id = $1 AND kind = 'org_admin'", org))
        for org in (org_a, org_b)
    }
    return World(
        admin_a=admin_a,
        admin_a_key_id=admin_key_ids[org_a],
        p1=p1,
        p2=p2,
        key_p1=key_p1["key"],
        key_p1_id=key_p1["id"],
        key_p2_id=key_p2["id"],
        d1=d1,
        d2=d2,
        d_p2=d_p2,
        token_d1=await request_token(client, d1),
        admin_b=admin_b,
        admin_b_key_id=admin_key_ids[org_b],
        p_b=p_b,
        key_b_id=key_b["id"],
        d_b=d_b,
    )


def _enrolment() -> dict[str, Any]:
    return {
        "device_id_hash": hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        "public_key": public_key_b64(Ed25519PrivateKey.generate()),
        "label": "intruder",
    }


def _project_requests(project_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    base = f"/api/v1/projects/{project_id}"
    return [
        ("GET", base, None),
        ("PATCH", base, {"append_only": True, "storage_quota_bytes": 1}),
        ("POST", f"{base}/api-keys", {"name": "intruder"}),
        ("GET", f"{base}/api-keys", None),
        ("POST", f"{base}/devices", _enrolment()),
        ("GET", f"{base}/devices", None),
    ]


def _matrix(world: World, principal: str) -> tuple[str, list[tuple[str, str, dict[str, Any] | None]]]:
    """The credential and the requests that must all answer 404 for it."""
    unknown = str(uuid.uuid4())
    foreign_projects = [world.p_b, unknown]
    foreign_keys = [world.key_b_id, world.admin_b_key_id, unknown]
    foreign_devices = [world.d_b.id, unknown]
    if principal == "org admin of A":
        credential = world.admin_a
    else:
        credential = world.key_p1 if principal == "project key of A/p1" else world.token_d1
        # Not an org admin: no management route at all, for the other project of its org, nor for its own.
        foreign_projects += [world.p2, world.p1]
        foreign_keys += [world.key_p2_id, world.key_p1_id, world.admin_a_key_id]
        foreign_devices += [world.d_p2.id, world.d2.id, world.d1.id]
    requests = [request for project in foreign_projects for request in _project_requests(project)]
    requests += [("DELETE", f"/api/v1/api-keys/{key}", None) for key in foreign_keys]
    requests += [("DELETE", f"/api/v1/devices/{device}", None) for device in foreign_devices]
    if principal != "org admin of A":
        requests += [("GET", "/api/v1/projects", None), ("POST", "/api/v1/projects", {"name": "intruder"})]
        # Reading its own project is allowed; that is the one request not expected to be 404.
        requests.remove(("GET", f"/api/v1/projects/{world.p1}", None))
    return credential, requests


@pytest.mark.parametrize("principal", ["org admin of A", "project key of A/p1", "device A/p1/d1"])
async def test_other_tenants_projects_keys_and_devices_answer_404_and_change_nothing(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection, principal: str
) -> None:
    world = await _build_world(client, settings, owner_connection)
    credential, requests = _matrix(world, principal)
    before = await table_snapshot(owner_connection)
    for method, url, body in requests:
        response = await client.request(method, url, json=body, headers=auth(credential))
        assert response.status_code == 404, (principal, method, url, response.text)
        problem(response)
    assert await table_snapshot(owner_connection) == before
    # The credential itself still works: the refusals were about the targets, not the caller.
    assert (await client.get(f"/api/v1/projects/{world.p1}", headers=auth(credential))).status_code == 200


async def test_an_org_admin_lists_only_its_own_organizations_rows(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    world = await _build_world(client, settings, owner_connection)
    projects = (await client.get("/api/v1/projects", headers=auth(world.admin_b))).json()["items"]
    assert [p["id"] for p in projects] == [world.p_b]
    devices = (await client.get(f"/api/v1/projects/{world.p_b}/devices", headers=auth(world.admin_b))).json()["items"]
    assert [d["id"] for d in devices] == [world.d_b.id]
    keys = (await client.get(f"/api/v1/projects/{world.p_b}/api-keys", headers=auth(world.admin_b))).json()["items"]
    assert [k["id"] for k in keys] == [world.key_b_id]


async def test_a_proof_for_another_tenants_project_gets_no_token(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    from accounts_support import proof  # noqa: PLC0415

    world = await _build_world(client, settings, owner_connection)
    before = await table_snapshot(owner_connection)
    # Device d1 of org A signs a proof naming org B's project: no device of that project has its hash.
    response = await client.post("/api/v1/auth/token", json=proof(world.d1, project_id=world.p_b))
    assert response.status_code == 401
    problem(response)
    assert await table_snapshot(owner_connection) == before
