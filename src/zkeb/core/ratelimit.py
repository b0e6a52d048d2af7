"""Rate limiting: GCRA buckets in Redis (atomic Lua script) or, without `REDIS_URL`, in this process's memory.

Buckets and keys:

- a request with `Authorization` is charged to its credential: the key is a SHA-256 of the header value, never
  the credential itself. `RATE_LIMIT_PER_MINUTE` (default 600).
- a request without one is charged to its client IP (`TRUSTED_PROXIES` decide whether `X-Forwarded-For` counts);
  an IPv6 client's buckets are its /64's (`address_bucket`).
- `POST /api/v1/auth/token` is always charged to the client IP, at `TOKEN_RATE_LIMIT_PER_MINUTE` (default 30).
- every 401 is also charged to an "authentication failures" bucket of the client IP (the token quota); while it
  is exhausted, credentialed requests from that IP answer 429. This is what stops credential guessing, because
  each guessed credential would otherwise get a fresh bucket of its own. A credentialed request that never
  authenticated (a route that checks no credential, such as `OPTIONS`, or an unknown path) is charged there too:
  otherwise a made-up `Authorization` on each such request would buy it a fresh, full bucket.

Why before authentication: the middleware is registered by the core plugin, so it runs outside the accounts
domain's authentication middleware. Keying on the credential's hash identifies the same caller as keying on
the principal would (one API key is one header value), costs no database lookup for a request that will be
refused anyway, and lets the failure bucket throttle guessing. The trade-offs: each device token (a new JWT
every few minutes) gets its own budget, and token issuance itself is throttled per IP instead; and clients
behind one NAT address share the failure bucket.

Headers follow draft-ietf-httpapi-ratelimit-headers-07: every limited response carries
`RateLimit-Policy: 600;w=60` and `RateLimit: limit=600, remaining=599, reset=1` (seconds until the bucket is
full again); a 429 adds `Retry-After` (seconds) and is RFC 9457 problem+json. Routes with the opt
`exclude_from_rate_limit=True` and the health, version, schema and metrics paths are exempt.

When Redis fails the limiter fails open: the request proceeds without rate-limit headers, a warning is logged
at most once a minute, `REDIS_FAILURES` (`zkeb_ratelimit_redis_failures_total`) counts each check that failed
open, and Redis is not tried again for a few seconds, so an outage adds no latency to every request.

A limited request of a known principal (this process has seen the credential authenticate) is recorded in
the organization's audit log as `rate_limit.exceeded`, at most once per bucket per window and process;
others (unknown credential, anonymous IP) go to the application log, equally throttled.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from uuid import UUID

from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from zkeb.core.audit import record_event_on_connection
from zkeb.core.auth import Principal, bearer_credential
from zkeb.core.errors import ProblemError
from zkeb.core.security import client_ip, trusted_proxies
from zkeb.lib.redaction import redact

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

    from zkeb.settings import Settings

__all__ = (
    "RATE_LIMIT_EXEMPT_PATHS",
    "REDIS_FAILURES",
    "Decision",
    "Quota",
    "RateLimitMiddleware",
    "RateLimiter",
    "TooManyRequestsError",
    "address_bucket",
    "rate_limit_middleware",
)

logger = logging.getLogger("zkeb.ratelimit")

#: Redis failures of the rate limiter (each one let a request through unchecked).
REDIS_FAILURES: Final = Counter(
    "zkeb_ratelimit_redis_failures_total", "Rate-limit checks that failed open because Redis did not answer"
)
#: Requests refused with 429, by bucket kind.
RATE_LIMITED: Final = Counter("zkeb_ratelimit_rejected_total", "Requests refused with 429", ["bucket"])

RATE_LIMIT_EXEMPT_PATHS = ("/api/health", "/api/version", "/schema", "/metrics")
TOKEN_PATH = "/api/v1/auth/token"  # noqa: S105 - a route, not a secret
WINDOW_SECONDS = 60
_REDIS_RETRY_AFTER_SECONDS = 5.0
_WARNING_INTERVAL_SECONDS = 60.0
_KEY_PREFIX = "zkeb:rl:"
_REMEMBERED_PRINCIPALS = 10_000

# KEYS[1] bucket; ARGV: limit, period (ms), commit (1 charges one request, 0 only asks whether one would pass).
# With KEYS[2] (a gate: the client IP's authentication-failures bucket) and ARGV[4], ARGV[5] its limit and period,
# the gate is probed first (never charged) and, when it is exhausted, KEYS[1] is left alone: one round trip for
# both. Returns {allowed, remaining, reset_ms, retry_after_ms, refused_by_gate}. Redis's own clock, so every
# process agrees on "now".
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function gcra(key, limit, period, commit)
  local interval = period / limit
  local tat = tonumber(redis.call('GET', key))
  if not tat or tat < now then tat = now end
  local new_tat = tat + interval
  local diff = now - (new_tat - period)
  if diff < 0 then
    return {0, 0, math.ceil(tat - now), math.ceil(-diff)}
  end
  if commit == 1 then
    redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
  end
  return {1, math.floor(diff / interval), math.ceil(new_tat - now), 0}
end
if #KEYS == 2 then
  local gate = gcra(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), 0)
  if gate[1] == 0 then return {gate[1], gate[2], gate[3], gate[4], 1} end
end
local r = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
return {r[1], r[2], r[3], r[4], 0}
"""


class TooManyRequestsError(ProblemError):
    """The caller exhausted its rate limit; `Retry-After` says when to try again."""

    status_code: int = 429


@dataclass(frozen=True, slots=True)
class Quota:
    """`limit` requests per `window` seconds, with bursts up to `limit`."""

    limit: int
    window: int = WINDOW_SECONDS

    @property
    def policy_header(self) -> str:
        """`RateLimit-Policy` (draft 07)."""
        return f"{self.limit};w={self.window}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of charging (or probing) a bucket."""

    allowed: bool
    quota: Quota
    remaining: int
    reset_seconds: int
    retry_after_seconds: int

    def headers(self) -> dict[str, str]:
        """`RateLimit` and `RateLimit-Policy` (draft 07), plus `Retry-After` when refused."""
        headers = {
            "RateLimit-Policy": self.quota.policy_header,
            "RateLimit": f"limit={self.quota.limit}, remaining={self.remaining}, reset={self.reset_seconds}",
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(self.retry_after_seconds, 1))
        return headers


def _decision(quota: Quota, allowed: int, remaining: int, reset_ms: float, retry_ms: float) -> Decision:
    return Decision(
        allowed=bool(allowed),
        quota=quota,
        remaining=max(int(remaining), 0),
        reset_seconds=max(math.ceil(reset_ms / 1000), 0),
        retry_after_seconds=max(math.ceil(retry_ms / 1000), 0),
    )


class MemoryBuckets:
    """GCRA buckets in this process's memory (no `REDIS_URL`): the same arithmetic as the Lua script."""

    def __init__(self) -> None:
        self._tats: dict[str, float] = {}
        self._calls = 0

    def charge(self, key: str, quota: Quota, *, commit: bool = True) -> Decision:
        """Charge one request to `key` (or, with `commit=False`, only ask whether it would pass)."""
        now = time.monotonic() * 1000
        self._calls += 1
        if self._calls % 1024 == 0:
            self._tats = {k: v for k, v in self._tats.items() if v > now}
        period = quota.window * 1000
        interval = period / quota.limit
        tat = max(self._tats.get(key, now), now)
        new_tat = tat + interval
        diff = now - (new_tat - period)
        if diff < 0:
            return _decision(quota, 0, 0, tat - now, -diff)
        if commit:
            self._tats[key] = new_tat
        return _decision(quota, 1, math.floor(diff / interval), new_tat - now, 0)


class RateLimiter:
    """Buckets in Redis when configured (shared by every process), else in memory; Redis failures fail open."""

    def __init__(self, settings: Settings, redis: Redis | None) -> None:
        self.settings = settings
        self.default_quota = Quota(settings.rate_limit_per_minute)
        self.token_quota = Quota(settings.token_rate_limit_per_minute)
        self.proxies = trusted_proxies(settings.trusted_proxies)
        self._redis = redis
        self._script = redis.register_script(_GCRA_LUA) if redis is not None else None
        self._memory = MemoryBuckets()
        self._redis_retry_at = 0.0
        self._last_warning = -math.inf
        self._principals: OrderedDict[str, Principal] = OrderedDict()
        self._reported: dict[str, float] = {}

    async def charge(self, key: str, quota: Quota, *, commit: bool = True) -> Decision | None:
        """Charge `key`; None when Redis is failing (the request goes through unchecked)."""
        charged = await self.charge_gated(key, quota, commit=commit)
        return charged[1] if charged is not None else None

    async def charge_gated(
        self, key: str, quota: Quota, *, commit: bool = True, gate: tuple[str, Quota] | None = None
    ) -> tuple[bool, Decision] | None:
        """Charge `key` unless the `gate` bucket (probed, never charged) is exhausted, in one Redis round trip.

        Returns whether the gate refused and the refusing (or charging) decision; None when Redis is failing.
        """
        if self._script is None:
            if gate is not None and not (probe := self._memory.charge(*gate, commit=False)).allowed:
                return True, probe
            return False, self._memory.charge(key, quota, commit=commit)
        if time.monotonic() < self._redis_retry_at:
            REDIS_FAILURES.inc()  # a check that fails open while Redis is given a rest is counted too
            return None
        keys = [_KEY_PREFIX + key]
        args = [quota.limit, quota.window * 1000, int(commit)]
        if gate is not None:
            keys.append(_KEY_PREFIX + gate[0])
            args += [gate[1].limit, gate[1].window * 1000]
        try:
            result = await self._script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)
            return None
        allowed, remaining, reset_ms, retry_ms, by_gate = (int(v) for v in result)
        refused_by_gate = bool(by_gate) and gate is not None
        decided_quota = gate[1] if refused_by_gate and gate is not None else quota
        return refused_by_gate, _decision(decided_quota, allowed, remaining, reset_ms, retry_ms)

    def _redis_failed(self, exc: BaseException) -> None:
        REDIS_FAILURES.inc()
        now = time.monotonic()
        self._redis_retry_at = now + _REDIS_RETRY_AFTER_SECONDS
        if now - self._last_warning >= _WARNING_INTERVAL_SECONDS:
            self._last_warning = now
            logger.warning(
                "rate limiting is failing open: Redis did not answer (%s); requests are not rate limited until it does",
                type(exc).__name__,
            )

    def remember(self, key: str, principal: Principal) -> None:
        """Note which principal a credential bucket belongs to, to attribute its rate-limit events."""
        self._principals[key] = principal
        self._principals.move_to_end(key)
        while len(self._principals) > _REMEMBERED_PRINCIPALS:
            self._principals.popitem(last=False)

    def principal_for(self, key: str) -> Principal | None:
        """The principal last seen authenticating with this bucket's credential, if any."""
        return self._principals.get(key)

    def should_report(self, key: str) -> bool:
        """Whether this bucket's rate-limit hit is the first in its window (in this process)."""
        now = time.monotonic()
        if len(self._reported) > _REMEMBERED_PRINCIPALS:
            self._reported = {k: v for k, v in self._reported.items() if v > now}
        if self._reported.get(key, 0.0) > now:
            return False
        self._reported[key] = now + WINDOW_SECONDS
        return True


def _credential_key(authorization: bytes) -> str:
    # Keyed on the credential itself, not the header's spelling (`bearer`, `BEARER`, extra spaces all authenticate
    # alike); a header that is no bearer credential at all is keyed as sent (it gets a 401).
    value = authorization.decode("latin-1")
    credential = bearer_credential(value) or value
    return "cred:" + hashlib.sha256(b"zkeb-ratelimit-v1\x00" + credential.encode("latin-1")).hexdigest()[:32]


def _authorization(scope: Scope) -> bytes | None:
    return next((value for key, value in scope.get("headers", ()) if key.lower() == b"authorization"), None)


def address_bucket(ip: str | None) -> str:
    """What a client address's buckets are keyed on: an IPv4 address, or the /64 network of an IPv6 one.

    One IPv6 subscriber usually holds a whole /64 and may use any address in it (privacy addresses rotate on their
    own), so keying on the full address would give one client as many budgets as it likes. An IPv4-mapped address
    (`::ffff:192.0.2.1`, from a dual-stack socket) is its IPv4 address, never the /64 of every IPv4 client.
    """
    if ip is None:
        return "unknown"
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return f"{ipaddress.IPv6Network((address, 64), strict=False).network_address}/64"


def _encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


def _exempt(scope: Scope) -> bool:
    return any(scope["path"].startswith(prefix) for prefix in RATE_LIMIT_EXEMPT_PATHS)


class RateLimitMiddleware(ASGIMiddleware):
    """Charges each request to its bucket, adds the `RateLimit` headers, refuses with 429 when exhausted."""

    scopes = (ScopeType.HTTP,)
    exclude_opt_key = "exclude_from_rate_limit"
    should_bypass_for_scope = staticmethod(_exempt)

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Charge the request's bucket, then run the rest of the stack with the `RateLimit` headers added."""
        limiter = self.limiter
        ip = address_bucket(client_ip(scope, limiter.proxies))
        authorization = _authorization(scope)
        failures_key = f"authfail:{ip}"
        gate: tuple[str, Quota] | None = None
        if scope["path"] == TOKEN_PATH:
            key, quota, bucket = f"token:{ip}", limiter.token_quota, "token"
        elif authorization:
            key, quota, bucket = _credential_key(authorization), limiter.default_quota, "credential"
            gate = (failures_key, limiter.token_quota)  # while the IP's failures are exhausted, no credential passes
        else:
            key, quota, bucket = f"ip:{ip}", limiter.default_quota, "ip"
        charged = await limiter.charge_gated(key, quota, gate=gate)
        decision = None
        if charged is not None:
            refused_by_gate, decision = charged
            if refused_by_gate:
                await self._refuse(scope, failures_key, "auth_failures", decision)
            if not decision.allowed:
                await self._refuse(scope, key, bucket, decision)
        extra = _encode_headers(decision.headers()) if decision is not None else []
        status: int | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        try:
            await next_app(scope, receive, send_with_headers)
        except HTTPException as exc:
            status = exc.status_code
            if decision is not None:
                exc.headers = {**(exc.headers or {}), **decision.headers()}
            raise
        finally:
            user = scope.get("user")
            authenticated = isinstance(user, Principal)
            if bucket == "credential" and authenticated:
                limiter.remember(key, user)
            if status == 401 or (bucket == "credential" and not authenticated):
                await limiter.charge(failures_key, limiter.token_quota)

    async def _refuse(self, scope: Scope, key: str, bucket: str, decision: Decision) -> None:
        RATE_LIMITED.labels(bucket=bucket).inc()
        if self.limiter.should_report(key):
            await self._report(scope, key, bucket)
        raise TooManyRequestsError(
            "rate limit exceeded; retry after the number of seconds in Retry-After",
            headers=decision.headers(),
            extra={"retry_after": max(decision.retry_after_seconds, 1), "limit": decision.quota.limit},
        )

    async def _report(self, scope: Scope, key: str, bucket: str) -> None:
        principal = self.limiter.principal_for(key) if bucket == "credential" else None
        ip = client_ip(scope, self.limiter.proxies)
        if principal is None:
            logger.warning("rate limit exceeded: bucket=%s client_ip=%s path=%s", bucket, ip, scope["path"])
            return
        await _audit_rate_limit_hit(scope, principal, bucket)


async def _audit_rate_limit_hit(scope: Scope, principal: Principal, bucket: str) -> None:
    from litestar import Request  # noqa: PLC0415 - only on the (rare, throttled) audit path

    request: Request[Any, Any, Any] = Request(scope)
    runtime = request.app.state.runtime
    organization_id: UUID = principal.organization_id
    try:
        async with runtime.engine.begin() as connection:
            await record_event_on_connection(
                connection,
                organization_id=organization_id,
                action="rate_limit.exceeded",
                actor_type=principal.actor_type,
                actor_id=principal.actor_id,
                outcome="denied",
                details={"bucket": bucket, "path": redact(scope["path"])},
                request=request,
                settings=runtime.settings,
            )
    except Exception:  # the 429 must be answered even if the audit write fails
        logger.warning("could not record a rate-limit audit event", exc_info=True)


def rate_limit_middleware(settings: Settings, redis: Redis | None) -> list[RateLimitMiddleware]:
    """The rate-limit middleware for an app (none when `ENABLE_RATE_LIMITING=false`), to extend the app's list."""
    if not settings.enable_rate_limiting:
        return []
    return [RateLimitMiddleware(RateLimiter(settings, redis))]
