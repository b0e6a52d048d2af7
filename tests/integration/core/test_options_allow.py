"""`OPTIONS` on any route answers `Allow` with every method routed on its path (Litestar 2 kept only the first
handlers'; see zkeb.core.allow)."""

from __future__ import annotations

import re
import uuid

from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient


def _concrete(path: str) -> str:
    """A request path for a route's path template: each parameter given a value of its type."""
    return re.sub(r"\{\w+:(\w+)\}", lambda m: str(uuid.uuid4()) if m[1] == "uuid" else "x", path)


async def test_options_on_every_route_lists_every_method_of_its_path(
    app: Litestar, client: AsyncTestClient[Litestar]
) -> None:
    checked = wrong = 0
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        response = await client.options(_concrete(route.path))
        if response.status_code != 204 or "allow" not in response.headers:
            continue  # a route with an OPTIONS handler of its own (tus discovery), or one the CORS layer answers
        checked += 1
        allowed = {method.strip() for method in response.headers["allow"].split(",")}
        expected = set(route.methods) | ({"HEAD"} if "GET" in route.methods else set())
        if allowed != expected:
            wrong += 1
            print(route.path, sorted(allowed), sorted(route.methods))
    assert checked >= 20
    assert wrong == 0


async def test_options_on_backups_says_get_and_post(client: AsyncTestClient[Litestar]) -> None:
    response = await client.options("/api/v1/backups")
    assert response.status_code == 204
    assert response.headers["allow"] == "GET, HEAD, OPTIONS, POST"
