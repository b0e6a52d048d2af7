"""Projects: creation with storage policy, keyset listing, reading and patching; bad input changes nothing."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from accounts_support import auth, create_org, create_project, table_snapshot
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.app import create_app
from zkeb.settings import Settings

from support import make_settings, problem

Client = AsyncTestClient[Litestar]

PROJECT_FIELDS = {
    "id",
    "name",
    "organization_id",
    "created_at",
    "updated_at",
    "storage_quota_bytes",
    "used_bytes",
    "retention_keep_last",
    "retention_days",
    "append_only",
    "append_only_min_age_days",
}


async def test_an_org_admin_creates_a_project_with_the_design_shape(client: Client, settings: Settings) -> None:
    org_id, admin_key = await create_org(settings, "acme")
    response = await client.post("/api/v1/projects", json={"name": "mobile"}, headers=auth(admin_key))
    assert response.status_code == 201
    body = response.json()
    assert set(body) == PROJECT_FIELDS
    assert body["name"] == "mobile"
    assert body["organization_id"] == str(org_id)
    assert body["storage_quota_bytes"] is None
    assert body["retention_keep_last"] is None
    assert body["append_only"] is False
    assert body["used_bytes"] == 0
    assert body["created_at"].endswith("Z")
    fetched = await client.get(f"/api/v1/projects/{body['id']}", headers=auth(admin_key))
    assert fetched.status_code == 200
    assert fetched.json() == body


async def test_new_projects_take_the_default_quota_unless_given_one(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, DEFAULT_PROJECT_QUOTA="1MiB")
    async with AsyncTestClient(app=create_app(settings)) as client:
        _, admin_key = await create_org(settings, "acme")
        defaulted = await create_project(client, admin_key, "defaulted")
        explicit = await create_project(client, admin_key, "explicit", storage_quota_bytes=5000)
        unlimited = await create_project(client, admin_key, "unlimited", storage_quota_bytes=None)
    assert defaulted["storage_quota_bytes"] == 1024 * 1024
    assert explicit["storage_quota_bytes"] == 5000
    assert unlimited["storage_quota_bytes"] is None


async def test_a_project_can_be_created_with_its_whole_policy(client: Client, settings: Settings) -> None:
    _, admin_key = await create_org(settings, "acme")
    body = await create_project(
        client,
        admin_key,
        "policy",
        storage_quota_bytes=10_000,
        retention_keep_last=3,
        retention_days=30,
        append_only=True,
        append_only_min_age_days=7,
    )
    assert (body["storage_quota_bytes"], body["retention_keep_last"], body["retention_days"]) == (10_000, 3, 30)
    assert (body["append_only"], body["append_only_min_age_days"]) == (True, 7)


async def test_a_duplicate_project_name_is_a_conflict_and_creates_nothing(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    _, admin_key = await create_org(settings, "acme")
    await create_project(client, admin_key, "mobile")
    before = await table_snapshot(owner_connection)
    response = await client.post("/api/v1/projects", json={"name": "mobile"}, headers=auth(admin_key))
    assert response.status_code == 409
    assert "already exists" in problem(response)["detail"]
    assert await table_snapshot(owner_connection) == before


async def test_the_same_project_name_in_two_organizations_is_fine(client: Client, settings: Settings) -> None:
    _, key_a = await create_org(settings, "a")
    _, key_b = await create_org(settings, "b")
    await create_project(client, key_a, "mobile")
    await create_project(client, key_b, "mobile")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"name": 5}, "name"),
        ({"name": "ok", "storage_quota_bytes": -1}, "storage_quota_bytes"),
        ({"name": "ok", "retention_keep_last": 0}, "retention_keep_last"),
        ({"name": "ok", "retention_days": 0}, "retention_days"),
        ({"name": "ok", "append_only_min_age_days": -1}, "append_only_min_age_days"),
        ({"name": "ok", "used_bytes": 0}, "used_bytes"),
        ({"name": "ok", "organization_id": "01a21cac-7925-759a-8b7f-df20e0f00dc0"}, "organization_id"),
    ],
)
async def test_invalid_project_bodies_are_422_naming_the_field_and_change_nothing(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    _, admin_key = await create_org(settings, "acme")
    before = await table_snapshot(owner_connection)
    response = await client.post("/api/v1/projects", json=body, headers=auth(admin_key))
    assert response.status_code == 422, response.text
    details = problem(response)
    assert field in details["detail"]
    assert [e["key"] for e in details["errors"]] == [field]
    assert await table_snapshot(owner_connection) == before


async def test_malformed_json_is_400(client: Client, settings: Settings, owner_connection: asyncpg.Connection) -> None:
    _, admin_key = await create_org(settings, "acme")
    before = await table_snapshot(owner_connection)
    response = await client.post(
        "/api/v1/projects", content=b'{"name": ', headers={**auth(admin_key), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    problem(response)
    assert await table_snapshot(owner_connection) == before


@pytest.mark.parametrize("depth", [1_000, 100_000])
async def test_json_nested_past_the_decoders_depth_is_400_everywhere(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection, depth: int
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "p")
    before = await table_snapshot(owner_connection)
    body = b"[" * depth + b"]" * depth
    json_headers = {**auth(admin_key), "Content-Type": "application/json"}
    requests = [
        ("POST", "/api/v1/auth/token", {"Content-Type": "application/json"}),  # no credential needed
        ("POST", "/api/v1/projects", json_headers),
        ("PATCH", f"/api/v1/projects/{project['id']}", json_headers),
        ("POST", f"/api/v1/projects/{project['id']}/devices", json_headers),
        ("POST", f"/api/v1/projects/{project['id']}/api-keys", json_headers),
    ]
    for method, path, headers in requests:
        response = await client.request(method, path, content=body, headers=headers)
        assert response.status_code == 400, (method, path, response.text)
        assert "nested too deeply" in problem(response)["detail"]
    assert await table_snapshot(owner_connection) == before


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/msgpack"])
async def test_a_json_body_declared_as_another_content_type_is_415_everywhere(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection, content_type: str
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "p")
    before = await table_snapshot(owner_connection)
    body = b'{"name": "x"}'
    requests = [
        ("POST", "/api/v1/auth/token", {}),  # no credential needed
        ("POST", "/api/v1/projects", auth(admin_key)),
        ("PATCH", f"/api/v1/projects/{project['id']}", auth(admin_key)),
        ("POST", f"/api/v1/projects/{project['id']}/devices", auth(admin_key)),
        ("POST", f"/api/v1/projects/{project['id']}/api-keys", auth(admin_key)),
    ]
    for method, path, headers in requests:
        response = await client.request(method, path, content=body, headers={**headers, "Content-Type": content_type})
        assert response.status_code == 415, (method, path, response.text)
        assert "application/json" in problem(response)["detail"]
    assert await table_snapshot(owner_connection) == before
    # JSON under a structured-syntax suffix, or with no Content-Type at all, is read as JSON.
    for name, headers in (("suffixed", {"Content-Type": "application/vnd.zkeb+json"}), ("undeclared", {})):
        created = await client.post(
            "/api/v1/projects", content=f'{{"name": "{name}"}}'.encode(), headers={**auth(admin_key), **headers}
        )
        assert created.status_code == 201, created.text


async def test_projects_are_listed_oldest_first_by_keyset_cursor(client: Client, settings: Settings) -> None:
    _, admin_key = await create_org(settings, "acme")
    _, other_key = await create_org(settings, "other")
    created = [(await create_project(client, admin_key, f"p{n}"))["id"] for n in range(5)]
    await create_project(client, other_key, "foreign")
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        response = await client.get("/api/v1/projects", params=params, headers=auth(admin_key))
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"items", "next_cursor"}
        assert len(body["items"]) <= 2
        seen.extend(item["id"] for item in body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == created
    assert pages == 3
    everything = (await client.get("/api/v1/projects", headers=auth(admin_key))).json()
    assert [p["id"] for p in everything["items"]] == created
    assert everything["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "field"), [({"limit": 101}, "limit"), ({"limit": 0}, "limit"), ({"cursor": "nope"}, "cursor")]
)
async def test_bad_list_parameters_are_400_naming_the_parameter(
    client: Client, settings: Settings, params: dict[str, Any], field: str
) -> None:
    _, admin_key = await create_org(settings, "acme")
    response = await client.get("/api/v1/projects", params=params, headers=auth(admin_key))
    assert response.status_code == 400
    assert field in problem(response)["detail"]


async def test_patch_changes_only_the_fields_given_and_null_clears_a_limit(client: Client, settings: Settings) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile", storage_quota_bytes=1000, retention_keep_last=5)
    url = f"/api/v1/projects/{project['id']}"
    response = await client.patch(url, json={"append_only": True}, headers=auth(admin_key))
    assert response.status_code == 200
    body = response.json()
    assert body["append_only"] is True
    assert (body["storage_quota_bytes"], body["retention_keep_last"]) == (1000, 5)
    response = await client.patch(
        url,
        json={
            "storage_quota_bytes": None,
            "retention_keep_last": None,
            "retention_days": 14,
            "append_only_min_age_days": 3,
        },
        headers=auth(admin_key),
    )
    assert response.status_code == 200
    body = response.json()
    assert body["storage_quota_bytes"] is None
    assert body["retention_keep_last"] is None
    assert (body["retention_days"], body["append_only_min_age_days"], body["append_only"]) == (14, 3, True)
    assert (await client.get(url, headers=auth(admin_key))).json() == body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"storage_quota_bytes": -5}, "storage_quota_bytes"),
        ({"storage_quota_bytes": 2**63}, "storage_quota_bytes"),
        ({"retention_keep_last": 0}, "retention_keep_last"),
        ({"retention_days": -1}, "retention_days"),
        ({"append_only": "maybe"}, "append_only"),
        ({"append_only_min_age_days": 40_000}, "append_only_min_age_days"),
        ({"name": ""}, "name"),
        ({"used_bytes": 0}, "used_bytes"),
    ],
)
async def test_invalid_patches_are_422_naming_the_field_and_change_nothing(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile", storage_quota_bytes=1000)
    before = await table_snapshot(owner_connection)
    response = await client.patch(f"/api/v1/projects/{project['id']}", json=body, headers=auth(admin_key))
    assert response.status_code == 422, response.text
    assert field in problem(response)["detail"]
    assert await table_snapshot(owner_connection) == before


async def test_renaming_onto_an_existing_name_is_a_conflict(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    _, admin_key = await create_org(settings, "acme")
    await create_project(client, admin_key, "one")
    two = await create_project(client, admin_key, "two")
    before = await table_snapshot(owner_connection)
    response = await client.patch(f"/api/v1/projects/{two['id']}", json={"name": "one"}, headers=auth(admin_key))
    assert response.status_code == 409
    problem(response)
    assert await table_snapshot(owner_connection) == before


async def test_project_routes_need_a_credential(client: Client, settings: Settings) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    for method, url in (("GET", "/api/v1/projects"), ("GET", f"/api/v1/projects/{project['id']}")):
        response = await client.request(method, url)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        problem(response)
    bad = await client.get("/api/v1/projects", headers=auth("zkeb_" + "A" * 43))
    assert bad.status_code == 401
    problem(bad)


async def test_a_project_key_and_a_device_may_read_their_own_project_but_not_manage_projects(
    client: Client, settings: Settings
) -> None:
    from accounts_support import enroll_device, request_token  # noqa: PLC0415

    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    key = (
        await client.post(f"/api/v1/projects/{project['id']}/api-keys", json={"name": "ci"}, headers=auth(admin_key))
    ).json()["key"]
    token = await request_token(client, await enroll_device(client, admin_key, project["id"]))
    for credential in (key, token):
        own = await client.get(f"/api/v1/projects/{project['id']}", headers=auth(credential))
        assert own.status_code == 200
        assert own.json()["id"] == project["id"]
        assert (await client.get("/api/v1/projects", headers=auth(credential))).status_code == 404
        created = await client.post("/api/v1/projects", json={"name": "sneaky"}, headers=auth(credential))
        assert created.status_code == 404
        patched = await client.patch(
            f"/api/v1/projects/{project['id']}", json={"append_only": True}, headers=auth(credential)
        )
        assert patched.status_code == 404
        problem(patched)


@pytest.mark.parametrize(
    "bad_utf8",
    [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80"],  # an invalid start byte, an overlong '/', an encoded surrogate
    ids=["invalid-byte", "overlong", "surrogate"],
)
async def test_invalid_utf8_inside_a_json_string_is_400_everywhere(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection, bad_utf8: bytes
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "p")
    before = await table_snapshot(owner_connection)
    body = b'{"name": "x' + bad_utf8 + b'"}'
    json_headers = {**auth(admin_key), "Content-Type": "application/json"}
    requests = [
        ("POST", "/api/v1/auth/token", {"Content-Type": "application/json"}),  # no credential needed
        ("POST", "/api/v1/projects", json_headers),
        ("PATCH", f"/api/v1/projects/{project['id']}", json_headers),
        ("POST", f"/api/v1/projects/{project['id']}/devices", json_headers),
        ("POST", f"/api/v1/projects/{project['id']}/api-keys", json_headers),
    ]
    for method, path, headers in requests:
        response = await client.request(method, path, content=body, headers=headers)
        assert response.status_code == 400, (method, path, response.text)
        assert "not valid UTF-8" in problem(response)["detail"]
    assert await table_snapshot(owner_connection) == before
