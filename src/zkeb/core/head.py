"""`HEAD` on every route that has `GET`: the `GET` answer without its body (RFC 9110 §9.3.2).

RFC 9110 §9.1 asks every general-purpose server to support `HEAD` wherever it supports `GET`, and monitors and
load balancers probe with it. Litestar 2 registers no `HEAD` beside a `GET` handler (and refuses a `HEAD` handler
that returns a body), so `HEAD /api/health` was a 405. This middleware, just outside Litestar's router, asks the
router whether the path has a handler for `HEAD`; when it has none but has one for `GET`, the request runs as that
`GET` and its body is dropped: status and headers, `Content-Length` included, are the `GET`'s. Routes with their own
`HEAD` handler (a payload's headers, a tus upload's offset) keep it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar.enums import ScopeType
from litestar.exceptions import MethodNotAllowedException
from litestar.utils import normalize_path

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ("HeadAsGetMiddleware",)


class HeadAsGetMiddleware:
    """Answers a `HEAD` on a route with only a `GET` handler as that `GET`, without the body."""

    def __init__(self, app: ASGIApp, litestar: Litestar) -> None:
        self.app = app
        self.litestar = litestar

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["method"] != "HEAD" or not self._get_only(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        # The same scope, so that what the router and the auth middleware record in it (the route template, the
        # principal) reaches the access log and the span outside; they see `HEAD` again once the answer is sent.
        scope["method"] = "GET"
        try:
            await self.app(scope, receive, send_without_body)
        finally:
            scope["method"] = "HEAD"

    def _get_only(self, path: str) -> bool:
        """Whether the router has a `GET` handler on `path` but no `HEAD` one."""
        try:
            self.litestar.asgi_router.handle_routing(path=normalize_path(path), method="HEAD")
        except MethodNotAllowedException as exc:
            allowed = (exc.headers or {}).get("allow", "")
            return "GET" in (method.strip() for method in allowed.split(","))
        except Exception:  # noqa: BLE001 - unknown path or bad request: the router answers it as it would
            return False
        return False
