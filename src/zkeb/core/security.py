"""Transport security: client address and scheme behind trusted proxies, security headers, CORS.

`X-Forwarded-For` and `X-Forwarded-Proto` are believed only when the socket peer is one of `TRUSTED_PROXIES`
(IPs or CIDR networks; none by default). Anyone can send those headers, so trusting them from an untrusted
peer would let a client pick the address its rate limit and audit events are attributed to.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, cast

from litestar import Request
from litestar.config.cors import CORSConfig
from litestar.enums import ScopeType
from litestar.status_codes import HTTP_400_BAD_REQUEST
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from zkeb.core.apidocs import SCALAR_PAGE_PATH
from zkeb.core.errors import problem_response
from zkeb.settings import Settings

__all__ = (
    "CorsOptionsMiddleware",
    "SecurityHeadersMiddleware",
    "TrustedProxies",
    "client_ip",
    "cors_config",
    "request_is_tls",
    "trusted_proxies",
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """A set of networks whose forwarding headers are believed."""

    __slots__ = ("_networks",)

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if not self._networks or not isinstance(address, str):
            return False
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self._networks)


@lru_cache(maxsize=16)
def trusted_proxies(networks: tuple[str, ...]) -> TrustedProxies:
    """A cached `TrustedProxies` for a settings tuple (settings are immutable)."""
    return TrustedProxies(networks)


def _header(scope: Scope, name: bytes) -> str | None:
    values = [value for key, value in scope.get("headers", ()) if key.lower() == name]
    if not values:
        return None
    return ",".join(value.decode("latin-1") for value in values)


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def client_ip(scope: Scope, proxies: TrustedProxies) -> str | None:
    """The client's IP address.

    The socket peer, unless it is a trusted proxy: then `X-Forwarded-For` is walked from the right, skipping
    trusted proxies, and the first address that is not one is the client (the left-most if all are trusted).
    A malformed entry stops the walk at the last trustworthy hop.
    """
    peer = _peer(scope)
    if peer is None or peer not in proxies:
        return peer
    forwarded = _header(scope, b"x-forwarded-for")
    if not forwarded:
        return peer
    hop = peer
    for entry in reversed([item.strip() for item in forwarded.split(",") if item.strip()]):
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            return hop
        hop = entry
        if entry not in proxies:
            return entry
    return hop


def request_is_tls(scope: Scope, proxies: TrustedProxies) -> bool:
    """Whether the client reached us over TLS: the ASGI scheme, or a trusted proxy's `X-Forwarded-Proto`."""
    if scope.get("scheme") in {"https", "wss"}:
        return True
    if _peer(scope) not in proxies:
        return False
    proto = _header(scope, b"x-forwarded-proto")
    # The left-most value is what the first proxy saw from the client.
    return proto is not None and proto.split(",")[0].strip().lower() == "https"


#: Request and response headers a browser client may use across origins (bearer auth, tus, resumable downloads,
#: rate limits).
CORS_ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "X-Request-Id",
    "Range",
    "If-Range",
    "If-None-Match",
    "Tus-Resumable",
    "Upload-Length",
    "Upload-Defer-Length",
    "Upload-Offset",
    "Upload-Metadata",
    "Upload-Checksum",
    "Upload-Concat",
)
CORS_EXPOSE_HEADERS = (
    "Location",
    "X-Request-Id",
    "RateLimit",
    "RateLimit-Policy",
    "Retry-After",
    "Content-Range",
    "Content-Length",
    "Accept-Ranges",
    "ETag",
    "Repr-Digest",
    "Content-Disposition",
    "Tus-Resumable",
    "Tus-Version",
    "Tus-Extension",
    "Tus-Max-Size",
    "Tus-Checksum-Algorithm",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Expires",
    "Upload-Metadata",
    "Zkeb-Backup-Id",
)
HSTS_VALUE = b"max-age=63072000; includeSubDomains"
# The API answers JSON only: nothing in a response may load, run or be framed.
API_CSP_VALUE = b"default-src 'none'; frame-ancestors 'none'"
# The Scalar page runs only what this server serves: its bundle, Litestar's inline bootstrap (the configuration) and
# the styles the bundle injects; it fetches only this server's OpenAPI document (and the API, for "try it").
DOCS_CSP_VALUE = (
    b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline' data:; "
    b"img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SERVER_BANNER = b"zkeb"


def cors_config(settings: Settings) -> CORSConfig | None:
    """Litestar's CORS for the `CORS_ORIGINS` allow-list; None (no CORS headers at all) when the list is empty.

    Credentials travel in `Authorization`, not cookies, so `allow_credentials` stays off. Litestar adds its expose,
    allow-headers and allow-methods headers to a response for any `Origin`; `SecurityHeadersMiddleware` drops them
    when the origin is not allowed (no `Access-Control-Allow-Origin`), so an origin outside the list gets none.
    """
    if not settings.cors_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=list(CORS_ALLOW_HEADERS),
        expose_headers=list(CORS_EXPOSE_HEADERS),
        allow_credentials=False,
        max_age=600,
    )


class CorsOptionsMiddleware:
    """`OPTIONS` with an `Origin`: a browser's actual request reaches its handler, and a refused preflight is
    problem+json. Litestar's CORS answers every `OPTIONS` with an `Origin` as a preflight (Fetch: a preflight also
    carries `Access-Control-Request-Method`), and refuses one as `400 text/plain`.

    A browser sends an `OPTIONS` of its own (tus discovery: `Tus-Version`, `Tus-Max-Size`) after that request's
    preflight. It goes in without its `Origin`, so Litestar's CORS leaves it alone, and its response gets the headers
    Litestar's CORS gives any other actual request: `Access-Control-Allow-Origin` and `Vary` for an allowed origin,
    with the configuration's `simple_headers` (`Access-Control-Expose-Headers`); nothing for another origin.
    """

    def __init__(self, app: ASGIApp, config: CORSConfig) -> None:
        self.app = app
        self.config = config
        self.simple_headers = [(k.lower().encode(), v.encode("latin-1")) for k, v in config.simple_headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["method"] != "OPTIONS":
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        if _header(scope, b"access-control-request-method") is not None:
            await self.app(scope, receive, _refusals_as_problems(scope, receive, send))  # Litestar's CORS answers it
            return
        without_origin = cast(
            "Scope", {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"origin"]}
        )
        if not self.config.is_origin_allowed(origin):
            await self.app(without_origin, receive, send)
            return
        cors = [*self.simple_headers, (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *cors]
            await send(message)

        await self.app(without_origin, receive, send_with_cors)


def _refusals_as_problems(scope: Scope, receive: Receive, send: Send) -> Send:
    """`send`, with Litestar's refusal of a preflight (400, "Disallowed CORS origin", text/plain) as problem+json."""
    refused = False

    async def send_refusal_as_problem(message: Message) -> None:
        nonlocal refused
        if message["type"] == "http.response.start" and message["status"] == HTTP_400_BAD_REQUEST:
            refused = True  # its body says what was refused; the answer is sent with it
            return
        if not refused or message["type"] != "http.response.body":
            await send(message)
            return
        what = bytes(message.get("body", b"")).decode("latin-1").removeprefix("Disallowed CORS ").lower()
        request: Request[Any, Any, Any] = scope["litestar_app"].request_class(scope=scope, receive=receive, send=send)
        detail = f"the CORS preflight was refused: this {what} is not allowed (CORS_ORIGINS and the API's methods)"
        answer = problem_response(request, HTTP_400_BAD_REQUEST, detail).to_asgi_response(app=None, request=request)
        await answer(scope, receive, send)

    return send_refusal_as_problem


def _routed_path(path: str) -> str:
    """`path` as Litestar routes it: empty segments dropped (`//api//v1/` reaches `/api/v1`'s handlers)."""
    if "//" not in path and not (path.endswith("/") and path != "/"):
        return path
    return "/" + "/".join(segment for segment in path.split("/") if segment)


class SecurityHeadersMiddleware:
    """Adds the security headers to every response, routing errors included (wrap the app's outermost handler).

    - `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer` everywhere;
    - `Strict-Transport-Security` only when the request came over TLS (the ASGI scheme, or `X-Forwarded-Proto:
      https` from a trusted proxy): HSTS over plain HTTP is ignored by browsers and wrong behind a TLS-less hop;
    - on `/api/` paths `Content-Security-Policy: default-src 'none'; frame-ancestors 'none'` and `Cache-Control:
      no-store` unless the handler set one; on the Scalar page (`/schema/scalar`) a policy that lets it run only
      what this server serves (Swagger UI, at `/schema/swagger`, still comes from Litestar's CDN and gets none);
    - `Server: zkeb`, replacing any banner. Granian adds `server: granian` only when the application sent no
      `server` header, so setting ours hides the server's name and version;
    - no `Access-Control-*` header on a response without `Access-Control-Allow-Origin`: an origin outside
      `CORS_ORIGINS` learns nothing of the CORS configuration.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.proxies = trusted_proxies(settings.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        tls = request_is_tls(scope, self.proxies)
        path = _routed_path(scope["path"])
        api = path.startswith("/api/")
        docs = path == SCALAR_PAGE_PATH

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"server"]
                names = {k.lower() for k, _ in headers}
                if b"access-control-allow-origin" not in names:
                    headers = [(k, v) for k, v in headers if not k.lower().startswith(b"access-control-")]
                defaults = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"server", SERVER_BANNER),
                ]
                if tls:
                    defaults.append((b"strict-transport-security", HSTS_VALUE))
                if api:
                    defaults += [(b"content-security-policy", API_CSP_VALUE), (b"cache-control", b"no-store")]
                elif docs:
                    defaults.append((b"content-security-policy", DOCS_CSP_VALUE))
                # A handler's own value wins; the defaults never duplicate a header.
                headers += [(name, value) for name, value in defaults if name not in names]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
