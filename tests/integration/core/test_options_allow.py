"""`OPTIONS` on any route answers `Allow` with every method routed on its path (Litestar 2 kept only the first
handlers'; see zkeb.core.allow), and a `405`'s `Allow` lists `HEAD` wherever it lists `GET`."""

from __future__ import annotations

import re
import uuid

import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from support import problem


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


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/api/health/live", "GET, HEAD, OPTIONS"),
        ("PUT", "/api/v1/backups", "GET, HEAD, OPTIONS, POST"),
        ("GET", "/api/v1/auth/token", "OPTIONS, POST"),
    ],
)
async def test_a_405_lists_head_wherever_it_lists_get(
    client: AsyncTestClient[Litestar], method: str, path: str, allow: str
) -> None:
    # RFC 9110 §15.5.6: `Allow` names the methods the resource supports, and every GET route answers HEAD
    # (zkeb.core.head); Litestar's 405 left it out.
    response = await client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    problem(response)


async def test_a_405_on_every_route_lists_every_method_of_its_path(
    app: Litestar, client: AsyncTestClient[Litestar]
) -> None:
    checked = wrong = 0
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        refused = next((m for m in ("PUT", "PATCH", "DELETE", "POST") if m not in route.methods), None)
        if refused is None:
            continue
        response = await client.request(refused, _concrete(route.path))
        if response.status_code != 405:
            continue
        checked += 1
        allowed = [method.strip() for method in response.headers["allow"].split(",")]
        expected = sorted(set(route.methods) | ({"HEAD"} if "GET" in route.methods else set()))
        if allowed != expected:
            wrong += 1
            print(refused, route.path, allowed, expected)
    assert checked >= 20
    assert wrong == 0
