"""scripts/auto-rollback.sh against a local HTTP server: roll back once after N consecutive failures."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from delivery_support import RailwayStandIn, Response, run_script, serve_routes

READY = "/api/health/ready"


def _watch_env(tmp_path: Path, health_url: str, **extra: str) -> tuple[dict[str, str], Path]:
    marker = tmp_path / "rollbacks.log"
    env = dict(os.environ)
    env.update(
        {
            "HEALTH_URL": health_url,
            "INTERVAL": "0",
            "MAX_CHECKS": "10",
            "FAILURE_THRESHOLD": "3",
            "PROBE_TIMEOUT": "2",
            "ROLLBACK_CMD": f"echo rolled-back >> '{marker}'",
        }
    )
    env.update(extra)
    return env, marker


def test_failing_health_checks_trigger_exactly_one_rollback_and_a_failed_watch(tmp_path: Path) -> None:
    with serve_routes({READY: (503, {"status": "unhealthy"})}) as base_url:
        env, marker = _watch_env(tmp_path, base_url + READY)
        result = run_script("auto-rollback.sh", env=env)

    assert result.returncode == 1, result.stdout + result.stderr
    assert marker.read_text().splitlines() == ["rolled-back"]
    assert "check 3/10 FAILED (3/3 consecutive)" in result.stderr
    assert "check 4/10" not in result.stdout + result.stderr
    assert "rollback triggered" in result.stderr


def test_healthy_deployment_is_not_rolled_back(tmp_path: Path) -> None:
    with serve_routes({READY: (200, {"status": "ready"})}) as base_url:
        env, marker = _watch_env(tmp_path, base_url + READY, MAX_CHECKS="4")
        result = run_script("auto-rollback.sh", env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists()
    assert "check 4/4 healthy" in result.stdout
    assert "deployment healthy" in result.stdout


def test_failures_that_are_not_consecutive_do_not_roll_back(tmp_path: Path) -> None:
    flapping: list[Response] = [(503, {}), (503, {}), (200, {}), (503, {}), (503, {}), (200, {})]
    with serve_routes({READY: flapping}) as base_url:
        env, marker = _watch_env(tmp_path, base_url + READY, MAX_CHECKS="6")
        result = run_script("auto-rollback.sh", env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists()


def test_unreachable_service_counts_as_failing(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env, marker = _watch_env(tmp_path, f"http://127.0.0.1:{closed_port}{READY}", FAILURE_THRESHOLD="2")
    result = run_script("auto-rollback.sh", env=env)

    assert result.returncode == 1
    assert marker.read_text().splitlines() == ["rolled-back"]


def test_a_failing_rollback_command_is_reported_and_the_watch_still_fails(tmp_path: Path) -> None:
    with serve_routes({READY: (503, {})}) as base_url:
        env, _ = _watch_env(tmp_path, base_url + READY, ROLLBACK_CMD="exit 7")
        result = run_script("auto-rollback.sh", env=env)

    assert result.returncode == 1
    assert "the rollback command FAILED (exit 7)" in result.stderr


def test_default_rollback_restores_the_given_deployment_through_the_railway_api(tmp_path: Path) -> None:
    railway = RailwayStandIn(tmp_path, {"api": {"stdout": {"data": {"deploymentRollback": True}}}})
    with serve_routes({READY: (503, {})}) as base_url:
        env = railway.env(
            HEALTH_URL=base_url + READY,
            INTERVAL="0",
            MAX_CHECKS="5",
            FAILURE_THRESHOLD="2",
            ROLLBACK_DEPLOYMENT_ID="dep-previous",
        )
        env.pop("ROLLBACK_CMD", None)
        result = run_script("auto-rollback.sh", env=env)

    assert result.returncode == 1, result.stdout + result.stderr
    calls = railway.calls()
    assert len(calls) == 1
    args = calls[0]["args"]
    assert isinstance(args, list)
    assert args[0] == "api"
    assert "deploymentRollback(id: $id)" in args[1]
    assert args[2:] == ["--raw-var", "id=dep-previous"]


def test_bad_settings_are_refused_before_polling(tmp_path: Path) -> None:
    env, marker = _watch_env(tmp_path, "http://127.0.0.1:9/", MAX_CHECKS="zero")
    result = run_script("auto-rollback.sh", env=env)

    assert result.returncode == 2
    assert "MAX_CHECKS must be a non-negative integer" in result.stderr
    assert not marker.exists()
