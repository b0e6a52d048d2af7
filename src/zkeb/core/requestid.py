"""`X-Request-Id`: echoed when the client sends a sane one (short, plain, no credential), generated otherwise."""

from __future__ import annotations

import os
import re

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from zkeb.core.errors import request_id_var
from zkeb.lib.redaction import holds_credential

__all__ = ("REQUEST_ID_HEADER", "RequestIdMiddleware")

REQUEST_ID_HEADER = "x-request-id"
_VALID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Plain ASGI middleware: cheap, and it leaves streaming bodies untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = incoming.decode() if incoming and _VALID.match(incoming) else ""
        if not request_id or holds_credential(request_id):  # it goes into logs, audit events and error bodies
            request_id = os.urandom(16).hex()
        header_value = request_id.encode()
        token = request_id_var.set(request_id)

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", header_value))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            request_id_var.reset(token)
