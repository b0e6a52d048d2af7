"""The Chromium the browser tests drive: `CHROMIUM` when set, else Debian's, installed with apt-get when missing.

`CHROMIUM` names any Chromium-based browser binary (e.g. `/usr/bin/google-chrome` on hosted CI runners, whose
`chromium` package is a snap that cannot run there). Without it the tests use `/usr/bin/chromium` and install
Debian's `chromium` package when it is missing; they skip, saying why, only where that cannot be done.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from worker_lock import one_worker_at_a_time

__all__ = ("chromium_executable",)

DEBIAN_CHROMIUM = Path("/usr/bin/chromium")


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    return subprocess.run(
        [*prefix, "apt-get", *args],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def chromium_executable() -> Path:
    """The browser binary to drive; skips the calling test when there is none and none can be installed."""
    with one_worker_at_a_time("chromium"):
        return _chromium_executable()


def _chromium_executable() -> Path:
    configured = os.environ.get("CHROMIUM")
    if configured:
        path = Path(configured)
        assert path.exists(), f"CHROMIUM={configured} does not exist"
        return path
    if DEBIAN_CHROMIUM.exists():
        return DEBIAN_CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip(f"{DEBIAN_CHROMIUM} is missing, CHROMIUM is unset and there is no apt-get to install chromium")
    install = _apt_get("install", "-y", "-q", "--no-install-recommends", "chromium")
    if install.returncode != 0:  # a fresh machine may have no package lists yet
        _apt_get("update", "-q")
        install = _apt_get("install", "-y", "-q", "--no-install-recommends", "chromium")
    if install.returncode != 0 or not DEBIAN_CHROMIUM.exists():
        pytest.skip(f"chromium could not be installed with apt-get: {install.stderr.strip()[-500:]}")
    return DEBIAN_CHROMIUM
