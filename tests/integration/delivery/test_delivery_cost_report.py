"""scripts/cost-report.sh with a stand-in `railway` CLI on PATH."""

from __future__ import annotations

import json
from pathlib import Path

from delivery_support import RailwayStandIn, run_script

USAGE = {
    "workspace": {"id": "ws_1", "name": "Ogel"},
    "customer": {"id": "cus_1"},
    "billingPeriod": {"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"},
    "period": "current",
    "isCurrentPeriod": True,
    "currentUsageDollars": 21.5,
    "currentBillDollars": 21.5,
    "estimatedBillDollars": 38.25,
    "usageLimit": {"softLimit": 75, "hardLimit": 150, "isOverLimit": False},
    "lineItems": [
        {"label": "CPU", "currentUsageDollars": 9.0},
        {"label": "Memory", "currentUsageDollars": 11.0},
        {"label": "Egress", "currentUsageDollars": 1.5},
    ],
}
PROJECT = {
    "workspace": {"id": "ws_1", "name": "Ogel"},
    "project": {"id": "prj_1", "name": "zkeb-production"},
    "currentUsageDollars": 21.5,
    "services": [
        {"id": "s1", "name": "postgres", "totalDollars": 6.5},
        {"id": "s2", "name": "api-server", "totalDollars": 14.0},
        {"id": "s3", "name": "redis", "totalDollars": 1.0},
    ],
}


def _railway(tmp_path: Path, usage: object = USAGE) -> RailwayStandIn:
    return RailwayStandIn(
        tmp_path,
        {
            "usage --period current --json": {"stdout": usage},
            "usage projects --project zkeb-production": {"stdout": PROJECT},
        },
    )


def test_report_lists_resources_services_and_the_estimate(tmp_path: Path) -> None:
    railway = _railway(tmp_path)
    result = run_script("cost-report.sh", "--project", "zkeb-production", env=railway.env())

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Workspace:        Ogel" in out
    assert "CPU        $      9.00" in out
    assert "Memory     $     11.00" in out
    assert "Volume     $      0.00" in out
    assert out.index("api-server") < out.index("postgres") < out.index("redis")
    assert "Estimated bill:   $38.25" in out
    assert "WARNING" not in out
    called = [call["args"] for call in railway.calls()]
    assert called == [
        ["usage", "--period", "current", "--json"],
        ["usage", "projects", "--project", "zkeb-production", "--period", "current", "--json"],
    ]


def test_estimate_over_the_threshold_warns_and_fails_only_with_fail_over(tmp_path: Path) -> None:
    railway = _railway(tmp_path)
    env = railway.env(COST_ALERT_DOLLARS="30")
    warned = run_script("cost-report.sh", env=env)
    failed = run_script("cost-report.sh", "--fail-over", env=env)

    assert warned.returncode == 0
    assert "WARNING: estimated bill $38.25 exceeds the alert threshold $30.00" in warned.stdout
    assert failed.returncode == 3


def test_json_output_summarises_the_usage(tmp_path: Path) -> None:
    railway = _railway(tmp_path)
    result = run_script("cost-report.sh", "--json", "--project", "zkeb-production", env=railway.env())

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["estimatedBillDollars"] == 38.25
    assert report["lineItems"] == {"CPU": 9.0, "Memory": 11.0, "Egress": 1.5}
    assert report["services"]["api-server"] == 14.0
    assert report["overThreshold"] is False


def test_a_failing_railway_cli_fails_the_report(tmp_path: Path) -> None:
    railway = RailwayStandIn(tmp_path, {"usage": {"stdout": "Unauthorized. Please login", "rc": 1}})
    result = run_script("cost-report.sh", env=railway.env())

    assert result.returncode == 1
    assert "'railway usage --json' failed" in result.stderr


def test_non_json_output_is_reported_not_crashed_on(tmp_path: Path) -> None:
    railway = _railway(tmp_path, usage="not json")
    result = run_script("cost-report.sh", env=railway.env())

    assert result.returncode == 1
    assert "did not print JSON" in result.stderr
