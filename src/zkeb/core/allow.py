"""The `Allow` header of Litestar's automatic `OPTIONS` answers, completed from the app's routes.

Litestar 2 answers `OPTIONS` on any route with `204` and `Allow`, but the answer keeps the methods of the first
handlers registered on the path (litestar-org/litestar#4169, fixed in Litestar 3): `OPTIONS /api/v1/backups` said
`OPTIONS, POST` although `GET` lists backups there. This `before_send` hook replaces that `Allow` with every method
the app routes on the request's path, and `HEAD` beside `GET` (`zkeb.core.head` answers it). A `405`'s `Allow` is
Litestar's and is left alone.
"""

from __future__ import annotations

from litestar.types import Message, Scope

__all__ = ("complete_options_allow",)


async def complete_options_allow(message: Message, scope: Scope) -> None:
    """On the start of an `OPTIONS` answer that carries `Allow`, list every method routed on its path."""
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS" or message["status"] != 204:
        return
    headers = list(message.get("headers", ()))
    if "route_handler" not in scope or not any(name.lower() == b"allow" for name, _ in headers):
        return
    routed = scope["litestar_app"].route_handler_method_map
    methods = {method for path in scope["route_handler"].paths for method in routed.get(path, ())}
    if "GET" in methods:
        methods.add("HEAD")  # answered as the GET without its body (zkeb.core.head)
    if methods:
        allow = ", ".join(sorted(methods)).encode("latin-1")
        message["headers"] = [(name, allow if name.lower() == b"allow" else value) for name, value in headers]
