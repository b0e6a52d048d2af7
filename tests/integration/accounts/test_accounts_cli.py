"""`zkeb admin create-org` and `create-key` as an operator runs them: a subprocess against a migrated database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import asyncpg
import pytest
from accounts_support import auth
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.lib.apikeys import hash_api_key

ZKEB = [sys.executable, "-m", "zkeb"]
Client = AsyncTestClient[Litestar]


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZKEB, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def cli_env(base_settings_env: dict[str, str], database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZKEB_", "DATABASE_", "REDIS_", "JWT_", "API_KEY"))}
    env.update(base_settings_env)
    env["DATABASE_URL"] = database_url
    return env


async def test_create_org_json_prints_exactly_one_object_and_stores_only_the_hmac(
    cli_env: dict[str, str], owner_connection: asyncpg.Connection, client: Client
) -> None:
    result = _run(cli_env, "admin", "create-org", "acme", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert set(body) == {"organization_id", "api_key"}
    assert result.stdout.strip().count("\n") == 0
    assert body["api_key"].startswith("zkeb_")
    organization_id = uuid.UUID(body["organization_id"])
    assert await owner_connection.fetchval("SELECT name FROM organizations WHERE id = $1", organization_id) == "acme"
    row = await owner_connection.fetchrow("SELECT * FROM api_keys WHERE organization_id = $1", organization_id)
    assert row is not None
    assert row["kind"] == "org_admin"
    assert bytes(row["key_hash"]) == hash_api_key(cli_env["API_KEY_SALT"], body["api_key"])
    assert all(body["api_key"] not in str(value) for value in row.values())
    assert body["api_key"] not in result.stderr
    actions = await owner_connection.fetch(
        "SELECT action, actor_type, details::text AS details FROM audit_events WHERE organization_id = $1 ORDER BY seq",
        organization_id,
    )
    assert [(a["action"], a["actor_type"]) for a in actions] == [
        ("organization.created", "cli"),
        ("api_key.created", "cli"),
    ]
    assert all(body["api_key"] not in a["details"] for a in actions)
    # The printed key is an org admin key of that organization.
    response = await client.post("/api/v1/projects", json={"name": "mobile"}, headers=auth(body["api_key"]))
    assert response.status_code == 201
    assert response.json()["organization_id"] == body["organization_id"]


def test_create_org_without_json_prints_the_key_once_for_a_human(cli_env: dict[str, str]) -> None:
    result = _run(cli_env, "admin", "create-org", "acme")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("Organization 'acme' created: ")
    assert "shown once" in lines[1]
    assert lines[1].split()[-1].startswith("zkeb_")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("  ", "must not be empty"),
        ("a" * 201, "at most 200"),
        ("bad\x1bname", "control characters"),
    ],
)
async def test_create_org_refuses_bad_names_and_creates_nothing(
    cli_env: dict[str, str], owner_connection: asyncpg.Connection, name: str, message: str
) -> None:
    result = _run(cli_env, "admin", "create-org", name, "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr
    assert await owner_connection.fetchval("SELECT count(*) FROM organizations") == 0


async def test_create_org_on_an_unmigrated_database_says_so(
    base_settings_env: dict[str, str], empty_database_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZKEB_", "DATABASE_", "REDIS_", "JWT_", "API_KEY"))}
    env.update(base_settings_env)
    env["DATABASE_URL"] = empty_database_url
    result = _run(env, "admin", "create-org", "acme", "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "zkeb db upgrade" in result.stderr
    assert "Traceback" not in result.stderr


def test_create_org_with_an_unreachable_database_says_so(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}
    result = _run(env, "admin", "create-org", "acme")
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr
    assert "Traceback" not in result.stderr


async def test_create_key_issues_admin_and_project_keys_for_an_existing_organization(
    cli_env: dict[str, str], owner_connection: asyncpg.Connection, client: Client
) -> None:
    org = json.loads(_run(cli_env, "admin", "create-org", "acme", "--json").stdout)
    project = (await client.post("/api/v1/projects", json={"name": "mobile"}, headers=auth(org["api_key"]))).json()
    admin = _run(cli_env, "admin", "create-key", "--org", org["organization_id"], "second admin", "--json")
    assert admin.returncode == 0, admin.stderr
    admin_body = json.loads(admin.stdout)
    assert (admin_body["kind"], admin_body["project_id"]) == ("org_admin", None)
    assert (await client.get("/api/v1/projects", headers=auth(admin_body["api_key"]))).status_code == 200
    scoped = _run(
        cli_env, "admin", "create-key", "--org", org["organization_id"], "--project", project["id"], "ci", "--json"
    )
    assert scoped.returncode == 0, scoped.stderr
    scoped_body = json.loads(scoped.stdout)
    assert (scoped_body["kind"], scoped_body["project_id"]) == ("project", project["id"])
    assert (
        await client.get(f"/api/v1/projects/{project['id']}", headers=auth(scoped_body["api_key"]))
    ).status_code == 200
    assert (await client.get("/api/v1/projects", headers=auth(scoped_body["api_key"]))).status_code == 404
    stored = await owner_connection.fetchval(
        "SELECT key_hash FROM api_keys WHERE id = $1", uuid.UUID(scoped_body["id"])
    )
    assert bytes(stored) == hash_api_key(cli_env["API_KEY_SALT"], scoped_body["api_key"])


async def test_create_key_for_an_unknown_organization_or_foreign_project_fails_cleanly(
    cli_env: dict[str, str], owner_connection: asyncpg.Connection, client: Client
) -> None:
    org_a = json.loads(_run(cli_env, "admin", "create-org", "a", "--json").stdout)
    org_b = json.loads(_run(cli_env, "admin", "create-org", "b", "--json").stdout)
    project_b = (await client.post("/api/v1/projects", json={"name": "p"}, headers=auth(org_b["api_key"]))).json()
    keys_before = await owner_connection.fetchval("SELECT count(*) FROM api_keys")
    unknown = _run(cli_env, "admin", "create-key", "--org", str(uuid.uuid4()), "k")
    assert unknown.returncode == 1
    assert "organization not found" in unknown.stderr
    foreign = _run(cli_env, "admin", "create-key", "--org", org_a["organization_id"], "--project", project_b["id"], "k")
    assert foreign.returncode == 1
    assert "project not found" in foreign.stderr
    bad_uuid = _run(cli_env, "admin", "create-key", "--org", "not-a-uuid", "k")
    assert bad_uuid.returncode == 2
    assert await owner_connection.fetchval("SELECT count(*) FROM api_keys") == keys_before
