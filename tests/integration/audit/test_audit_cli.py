"""`zkeb audit verify`: exit 0 on intact chains, 1 and the first broken event when one was tampered with."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest
from audit_support import create_org, write_events
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.cli import main
from zkeb.core.database import create_app_engine
from zkeb.settings import Settings


@pytest.fixture
async def orgs(settings: Settings, database_url: str) -> tuple[uuid.UUID, uuid.UUID]:
    engine: AsyncEngine = create_app_engine(settings, database_url)
    try:
        org_a, _ = await create_org(engine, settings, "a")
        org_b, _ = await create_org(engine, settings, "b")
        await write_events(engine, settings, org_a, 4)
        await write_events(engine, settings, org_b, 3)
    finally:
        await engine.dispose()
    return org_a, org_b


@pytest.fixture
def cli_env(base_settings_env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**base_settings_env, "DATABASE_URL": database_url}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("cli_env")
def test_intact_chains_verify_with_exit_status_zero(orgs: tuple[uuid.UUID, uuid.UUID]) -> None:
    result = CliRunner().invoke(main, ["audit", "verify", "--json"])
    assert result.exit_code == 0, result.output
    reports = {line["organization_id"]: line for line in map(json.loads, result.stdout.splitlines())}
    assert set(reports) == {str(org) for org in orgs}
    assert all(report["valid"] and report["first_broken"] is None for report in reports.values())
    only_a = CliRunner().invoke(main, ["audit", "verify", "--org", str(orgs[0])])
    assert only_a.exit_code == 0
    assert only_a.stdout.startswith(f"{orgs[0]}: valid")


async def _tamper(owner_connection: asyncpg.Connection, org_id: uuid.UUID) -> uuid.UUID:
    event_id: uuid.UUID = await owner_connection.fetchval(
        "UPDATE audit_events SET outcome = 'failure' WHERE organization_id = $1 AND seq = 2 RETURNING id", org_id
    )
    return event_id


@pytest.fixture
async def tampered(orgs: tuple[uuid.UUID, uuid.UUID], owner_connection: asyncpg.Connection) -> uuid.UUID:
    return await _tamper(owner_connection, orgs[1])


@pytest.mark.usefixtures("cli_env")
def test_a_tampered_chain_exits_one_and_names_the_event(orgs: tuple[uuid.UUID, uuid.UUID], tampered: uuid.UUID) -> None:
    result = CliRunner().invoke(main, ["audit", "verify", "--json"])
    assert result.exit_code == 1
    reports = {line["organization_id"]: line for line in map(json.loads, result.stdout.splitlines())}
    assert reports[str(orgs[0])]["valid"] is True
    assert reports[str(orgs[1])]["first_broken"] == {"seq": 2, "id": str(tampered), "reason": "hash mismatch"}
    text = CliRunner().invoke(main, ["audit", "verify", "--org", str(orgs[1])])
    assert text.exit_code == 1
    assert "BROKEN at seq 2" in text.stdout
