"""One test process at a time: a lock for set-up that several pytest-xdist workers may start together.

Installing shared tools (`npm ci` into `tests/js/node_modules`, Chromium with apt-get) is done by whichever worker
needs them first; the others wait on an exclusive `flock` of a file in the system's temporary directory, then find
the work done.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ("one_worker_at_a_time",)


@contextmanager
def one_worker_at_a_time(name: str) -> Iterator[None]:
    """Hold the machine-wide lock `name` (released when the block ends, or when the process dies)."""
    path = Path(tempfile.gettempdir()) / f"zkeb-tests-{name}.lock"
    with path.open("a") as handle:  # closing the file releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
