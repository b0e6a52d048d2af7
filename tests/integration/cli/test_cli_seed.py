"""`zkeb db seed`: demo data through the services, idempotent, usable at once, never in production."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from zkeb.app import create_app
from zkeb.domain.accounts.seed import DEMO_PROJECT_ID, demo_device_private_key

from support import make_settings


def _seed(env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "zkeb", "db", "seed", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
        check=False,
    )


async def test_seed_creates_demo_data_once_and_its_keys_work(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    env = {**base_settings_env, "DATABASE_URL": database_url}
    first = _seed(env)
    assert first.returncode == 0, first.stderr.decode()
    made: dict[str, Any] = json.loads(first.stdout)
    assert made["created"] == ["organization", "project", "device"]
    assert made["admin_key"].startswith("zkeb_")
    assert made["project_key"].startswith("zkeb_")
    again = _seed(env)
    assert again.returncode == 0, again.stderr.decode()
    found: dict[str, Any] = json.loads(again.stdout)
    assert found["created"] == []
    assert found["admin_key"] is None
    assert found["project_key"] is None
    assert found["device_id"] == made["device_id"]

    settings = make_settings(base_settings_env, DATABASE_URL=database_url)
    async with AsyncTestClient(app=create_app(settings)) as client:
        projects = await client.get("/api/v1/projects", headers={"Authorization": f"Bearer {made['admin_key']}"})
        devices = await client.get(
            f"/api/v1/projects/{DEMO_PROJECT_ID}/devices", headers={"Authorization": f"Bearer {made['admin_key']}"}
        )
        backups = await client.get("/api/v1/backups", headers={"Authorization": f"Bearer {made['project_key']}"})
    assert [p["name"] for p in projects.json()["items"]] == ["Demo Project"]
    device = devices.json()["items"][0]
    private_seed = bytes.fromhex(made["device_private_key_seed"])
    assert device["device_id_hash"] == made["device_id_hash"]
    assert private_seed == demo_device_private_key().private_bytes_raw()
    assert backups.status_code == 200


def test_seed_refuses_production(tmp_path: Path) -> None:
    env = {
        "ZKEB_ENV": "production",
        "ZKEB_DATA_DIR": str(tmp_path),
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
        "ZKEB_MASTER_ENCRYPTION_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",  # pragma: allowlist secret
        "JWT_SECRET": "a-jwt-secret-for-production-settings-tests",  # pragma: allowlist secret
        "API_KEY_SALT": "an-api-key-salt-for-production-tests",  # pragma: allowlist secret
    }
    result = _seed(env)
    assert result.returncode != 0
    assert b"refusing to seed" in result.stderr


def test_seed_against_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    env = {"ZKEB_ENV": "test", "ZKEB_DATA_DIR": str(tmp_path), "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"}
    result = _seed(env)
    assert result.returncode == 1
    assert b"Error: cannot reach the database" in result.stderr
    assert b"Traceback" not in result.stderr
