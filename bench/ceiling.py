"""The load benchmark's ceiling: a bare Litestar JSON route, served by granian exactly as `zkeb serve` serves ZKEB.

python bench/ceiling.py PORT        # environment: the same settings as the app under test
"""

from __future__ import annotations

import sys

from litestar import Litestar, get

from zkeb.server import production_server
from zkeb.settings import Settings


@get("/bare")
async def bare() -> dict[str, str]:
    """What a health check answers, with none of ZKEB's middleware around it."""
    return {"status": "ok"}


def create_app() -> Litestar:
    """The one-route app (granian's factory)."""
    return Litestar(route_handlers=[bare], debug=False)


if __name__ == "__main__":
    production_server(
        "ceiling:create_app", Settings.from_env(), host="127.0.0.1", port=int(sys.argv[1]), workers=1
    ).serve()
