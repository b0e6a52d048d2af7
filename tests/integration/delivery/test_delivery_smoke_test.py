"""scripts/smoke-test.sh against fake ZKEB servers: all four endpoints must answer as documented."""

from __future__ import annotations

import os

from delivery_support import Response, Routes, run_script, serve_routes

HEALTHY: dict[str, Response] = {
    "/api/health/ready": (200, {"status": "ready"}),
    "/api/health": (200, {"status": "healthy", "checks": {"database": "healthy"}}),
    "/api/version": (200, {"version": "0.1.0", "commit": "abc123", "build_date": "2026-11-27", "schema_revision": "1"}),
    "/api/health/db": (200, {"status": "healthy", "database": "postgresql"}),
    "/api/health/redis": (200, {"status": "healthy", "cache": "redis"}),
}


def _env(base_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"BASE_URL": base_url, "READY_WAIT_SECONDS": "2", "RETRIES": "2", "RETRY_DELAY": "0"})
    env.update(extra)
    return env


def test_healthy_server_passes_every_check() -> None:
    with serve_routes(HEALTHY) as base_url:
        result = run_script("smoke-test.sh", env=_env(base_url, EXPECT_COMMIT="abc123", REQUIRE_REDIS="1"))

    assert result.returncode == 0, result.stdout + result.stderr
    for path in ("/api/health/ready", "/api/health)", "/api/version", "/api/health/db", "/api/health/redis"):
        assert path in result.stdout
    assert "all checks passed" in result.stdout


def test_unhealthy_database_fails_the_smoke_test() -> None:
    routes = {**HEALTHY, "/api/health/db": (503, {"status": "unhealthy", "database": "postgresql"})}
    with serve_routes(routes) as base_url:
        result = run_script("smoke-test.sh", env=_env(base_url))

    assert result.returncode == 1
    assert "FAIL  database (/api/health/db): HTTP 503" in result.stderr
    assert "1 check(s) failed" in result.stderr


def test_a_check_that_recovers_within_its_retries_passes() -> None:
    recovering: list[Response] = [(503, {"status": "unhealthy"}), (200, {"status": "healthy"})]
    routes: Routes = {**HEALTHY, "/api/health": recovering}
    with serve_routes(routes) as base_url:
        result = run_script("smoke-test.sh", env=_env(base_url))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "retry health (/api/health): HTTP 503" in result.stderr


def test_wrong_commit_fails_when_a_commit_is_expected() -> None:
    with serve_routes(HEALTHY) as base_url:
        result = run_script("smoke-test.sh", env=_env(base_url, EXPECT_COMMIT="def456"))

    assert result.returncode == 1
    assert "commit is 'abc123', expected 'def456'" in result.stderr


def test_disabled_redis_passes_unless_redis_is_required() -> None:
    routes = {**HEALTHY, "/api/health/redis": (200, {"status": "disabled"})}
    with serve_routes(routes) as base_url:
        relaxed = run_script("smoke-test.sh", env=_env(base_url))
        strict = run_script("smoke-test.sh", env=_env(base_url, REQUIRE_REDIS="1"))

    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert strict.returncode == 1
    assert "FAIL  redis" in strict.stderr


def test_server_that_never_gets_ready_fails() -> None:
    routes = {**HEALTHY, "/api/health/ready": (503, {"status": "draining"})}
    with serve_routes(routes) as base_url:
        result = run_script("smoke-test.sh", env=_env(base_url, READY_WAIT_SECONDS="1"))

    assert result.returncode == 1
    assert "FAIL  readiness (/api/health/ready): HTTP 503" in result.stderr


def test_missing_base_url_is_a_usage_error() -> None:
    env = dict(os.environ)
    env.pop("BASE_URL", None)
    result = run_script("smoke-test.sh", env=env)

    assert result.returncode == 2
    assert "BASE_URL is required" in result.stderr
