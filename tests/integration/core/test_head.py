"""`HEAD` on every route that has `GET` answers as the `GET` would, without the body (zkeb.core.head)."""

from __future__ import annotations

import logging
import re
import uuid

import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

#: Headers that differ between any two answers (a health probe's body carries its time and latency, so its length).
_PER_RESPONSE = {"date", "x-request-id", "traceresponse", "ratelimit", "ratelimit-policy", "content-length"}


def _concrete(path: str) -> str:
    """A request path for a route's path template: each parameter given a value of its type."""
    return re.sub(r"\{\w+:(\w+)\}", lambda m: str(uuid.uuid4()) if m[1] == "uuid" else "x", path)


async def test_head_on_every_get_route_is_its_get_without_the_body(
    app: Litestar, client: AsyncTestClient[Litestar]
) -> None:
    # An API-integrator review: `HEAD /api/health` (what monitors and load balancers probe with) and every other GET
    # route answered 405, though RFC 9110 §9.1 asks a general-purpose server to support HEAD wherever it has GET.
    checked = 0
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or "GET" not in route.methods or "HEAD" in route.methods:
            continue
        path = _concrete(route.path)
        get, head = await client.get(path), await client.head(path)
        checked += 1
        assert head.status_code == get.status_code, path
        assert head.content == b"", path
        same = {k: v for k, v in get.headers.items() if k not in _PER_RESPONSE}
        assert {k: v for k, v in head.headers.items() if k not in _PER_RESPONSE} == same, path
        assert ("content-length" in head.headers) == ("content-length" in get.headers), path
    assert checked >= 15


async def test_head_on_health_is_200_with_the_length_of_the_get_body(
    client: AsyncTestClient[Litestar], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="zkeb.access"):
        get, head = await client.get("/api/health/live"), await client.head("/api/health/live")
    # The access line (and the metrics fed from it) names the method sent and the route it took.
    [line] = [r for r in caplog.records if r.name == "zkeb.access" and getattr(r, "method", "") == "HEAD"]
    assert getattr(line, "route", "") == "/api/health/live"
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["content-type"] == get.headers["content-type"]


async def test_a_method_a_route_does_not_take_is_still_405(client: AsyncTestClient[Litestar]) -> None:
    response = await client.delete("/api/health/live")
    assert response.status_code == 405
