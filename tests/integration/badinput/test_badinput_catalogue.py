"""docs/bad-inputs.md and the tests agree: every test it names exists, and every bad-input test is in it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATALOGUE = HERE.parents[2] / "docs" / "bad-inputs.md"
# The test-name column: `test_function[parameter-id]` (or a bare `test_function` for an unparametrized row).
NAMED = re.compile(r"`(test_[a-z0-9_]+(?:\[[^\]`]+\])?)`")


def _collected() -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(HERE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=HERE.parents[2],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {line.split("::", 1)[1] for line in result.stdout.splitlines() if "::" in line}


def test_catalogue_names_exactly_the_bad_input_tests() -> None:
    named = set(NAMED.findall(CATALOGUE.read_text()))
    collected = _collected()
    assert named, "the catalogue names no test"
    assert sorted(named - collected) == [], "the catalogue names tests that do not exist"
    assert sorted(collected - named) == [], "bad-input tests missing from the catalogue"
