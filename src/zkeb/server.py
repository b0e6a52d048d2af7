"""The granian server `zkeb serve` runs: its production settings in one place.

`bench/load.py` serves its bare ceiling app through the same function, so the two differ only in the app.
"""

from __future__ import annotations

from typing import Any

from granian import Granian
from granian.constants import Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server.common import AbstractServer

from zkeb.core.logging import log_format, logging_dictconfig
from zkeb.settings import Settings

__all__ = ("production_server",)


def production_server(target: str, settings: Settings, *, host: str, port: int, workers: int) -> AbstractServer[Any]:
    """A granian server for the ASGI app factory `target` ("module:function"), as production runs it."""
    return Granian(
        target,
        factory=True,
        interface=Interfaces.ASGI,
        address=host,
        port=port,
        workers=workers,
        # Slow heads (slowloris) are granian's to cut off; slow bodies are ours (zkeb.core.connection).
        http1_settings=HTTP1Settings(header_read_timeout=round(settings.header_read_timeout_seconds * 1000)),
        workers_kill_timeout=max(int(settings.shutdown_grace_seconds), 1),
        respawn_failed_workers=True,
        log_access=False,
        log_level=LogLevels(settings.log_level.lower()),
        log_dictconfig=logging_dictconfig(settings.log_level, log_format(settings.env)),
    )
