"""`Connection: close` on an HTTP/1.1 response sent before the request's body was read to its end."""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

__all__ = ("CloseUnreadBodyMiddleware",)

_CLOSE = (b"connection", b"close")


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in {b"", b"0"}
        if name == b"transfer-encoding":
            return True
    return False


class CloseUnreadBodyMiddleware:
    """Tell the client not to reuse a connection whose request body the app answered without reading.

    A handler may refuse a request from its headers alone: a tus PATCH at the wrong offset (409), a body announced
    past the limit (413), a bad credential (401). The unread rest of the body is still on the connection, and
    granian then resets the connection, so a client that sends its next request over it (as connection pools do)
    fails with "connection reset". With `Connection: close` the client opens a new connection instead; Go's
    net/http does the same when it cannot drain a body. HTTP/2 (which forbids the header) needs none of this.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope.get("http_version") == "2" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        body_read = False

        async def tracking_receive() -> ReceiveMessage:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True  # the whole body arrived, or the client is gone
            return message

        async def send_with_close(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                message["headers"] = [*message.get("headers", ()), _CLOSE]
            await send(message)

        await self.app(scope, tracking_receive, send_with_close)
