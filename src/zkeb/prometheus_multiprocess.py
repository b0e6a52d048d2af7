"""Prometheus multiprocess mode for `zkeb serve`, set up before anything imports `prometheus_client`.

granian forks its workers on Linux, so they inherit the parent's imported modules: `prometheus_client` decides
at import whether values live in memory or in `PROMETHEUS_MULTIPROC_DIR`, so the directory must be chosen first.
This module lives outside `zkeb.core` because importing anything there imports the metrics (and so
`prometheus_client`) through the package's `__init__`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ("MULTIPROC_ENV", "multiprocess_dir", "prepare_multiprocess_dir")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The multiprocess directory in use, if any."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir(*, needed: bool) -> str | None:
    """Use `PROMETHEUS_MULTIPROC_DIR`, or create a temporary one (removed at exit) when `needed`.

    The directory is emptied of metric files: a previous run's would be summed into this one's.
    """
    directory = multiprocess_dir()
    if directory is None and not needed:
        return None
    if directory is None:
        directory = tempfile.mkdtemp(prefix="zkeb-prometheus-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.glob("*.db"):
        entry.unlink()
    os.environ[MULTIPROC_ENV] = directory
    return directory
