"""The Scalar bundle shipped in the package is the one scripts/scalar/package-lock.json pins, byte for byte."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from zkeb.core.apidocs import SCALAR_BUNDLE_NAME, scalar_bundle

PACKAGE = "@scalar/api-reference"


@pytest.fixture(scope="module")
def lock(project_root: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((project_root / "scripts" / "scalar" / "package-lock.json").read_text())
    return loaded


def test_package_json_pins_one_exact_version_and_the_lock_agrees(project_root: Path, lock: dict[str, Any]) -> None:
    manifest = json.loads((project_root / "scripts" / "scalar" / "package.json").read_text())
    pinned = manifest["dependencies"][PACKAGE]
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", pinned), f"{PACKAGE} must be pinned exactly, not {pinned!r}"
    assert lock["packages"][""]["dependencies"][PACKAGE] == pinned
    locked = lock["packages"][f"node_modules/{PACKAGE}"]
    assert locked["version"] == pinned
    assert locked["integrity"].startswith("sha512-")


def test_shipped_bundle_is_the_locked_versions_and_unaltered(project_root: Path, lock: dict[str, Any]) -> None:
    version = lock["packages"][f"node_modules/{PACKAGE}"]["version"]
    bundle = scalar_bundle()
    # Scalar's standalone bundle announces itself with `console.info("@scalar/api-reference@<version>")`.
    assert f"{PACKAGE}@{version}".encode() in bundle
    recorded = (project_root / "scripts" / "scalar" / "api-reference.js.sha256").read_text().split()
    assert recorded == [hashlib.sha256(bundle).hexdigest(), SCALAR_BUNDLE_NAME]


def test_shipped_bundle_is_byte_for_byte_the_locked_tarballs(project_root: Path) -> None:
    """Fetches the pinned tarball (npm registry), checks it against the lock's integrity and compares the file."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the offline checks above still hold")
    result = subprocess.run(
        ["bash", str(project_root / "scripts" / "scalar" / "vendor.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
