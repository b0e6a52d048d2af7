"""The alerting rules pass `promtool check rules` and their unit tests (`promtool test rules`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROMTOOL = shutil.which("promtool")
requires_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: apt-get install prometheus")


@requires_promtool
def test_alert_rules_are_valid(project_root: Path) -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", "deploy/prometheus/alerts.yml"],
        cwd=project_root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


@requires_promtool
def test_alert_rules_fire_and_stay_quiet_as_their_unit_tests_expect(project_root: Path) -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts.test.yml"],
        cwd=project_root / "deploy" / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_of_the_reference_table_is_defined(project_root: Path) -> None:
    rules = (project_root / "deploy" / "prometheus" / "alerts.yml").read_text()
    for alert in (
        "ZkebHighErrorRate",
        "ZkebSlowRequests",
        "ZkebDatabasePoolSaturated",
        "ZkebBackupSuccessLow",
        "ZkebRedisErrors",
        "ZkebHighMemory",
        "ZkebHighCpu",
    ):
        assert f"alert: {alert}" in rules
