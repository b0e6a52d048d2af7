"""Which client addresses share a rate-limit bucket: an IPv4 address, an IPv6 /64, an IPv4-mapped address's IPv4."""

from __future__ import annotations

from typing import Any, cast

import pytest
from litestar.types import Scope

from zkeb.core.ratelimit import RateLimiter, RateLimitMiddleware, TooManyRequestsError, address_bucket

from support import make_settings


@pytest.mark.parametrize(
    ("ip", "bucket"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:a:b:c:d", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        (None, "unknown"),
        ("testclient", "testclient"),
    ],
)
def test_the_bucket_of_an_address(ip: str | None, bucket: str) -> None:
    assert address_bucket(ip) == bucket


async def _status(middleware: RateLimitMiddleware, ip: str) -> int:
    """One anonymous request from `ip` through the limiter: 200, or 429 when it refused it."""
    scope: dict[str, Any] = {"type": "http", "path": "/api/v1/backups", "method": "GET", "headers": []}
    scope["client"] = (ip, 4000)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    try:
        await middleware.handle(cast("Scope", scope), receive, send, app)  # type: ignore[arg-type]
    except TooManyRequestsError:
        return 429
    return 200


async def test_addresses_of_one_ipv6_64_share_one_budget_and_ipv4_mapped_ones_do_not(
    base_settings_env: dict[str, str],
) -> None:
    settings = make_settings(base_settings_env, RATE_LIMIT_PER_MINUTE="3")
    middleware = RateLimitMiddleware(RateLimiter(settings, None))
    # A client rotating through its /64 (privacy addresses do it by themselves) is one caller.
    rotating = [await _status(middleware, f"2001:db8:1:2::{n:x}") for n in range(1, 5)]
    assert rotating == [200, 200, 200, 429]
    assert await _status(middleware, "2001:db8:1:3::1") == 200  # the next /64 is someone else
    # A dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d: each is its own IPv4 address, not one /64 of all.
    mapped = [await _status(middleware, f"::ffff:198.51.100.{n}") for n in range(1, 5)]
    assert mapped == [200, 200, 200, 200]
