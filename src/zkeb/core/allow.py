"""The `Allow` header of Litestar's automatic `OPTIONS` answers and of its `405`s, completed with what the app serves.

Litestar 2 answers `OPTIONS` on any route with `204` and `Allow`, but the answer keeps the methods of the first
handlers registered on the path (litestar-org/litestar#4169, fixed in Litestar 3): `OPTIONS /api/v1/backups` said
`OPTIONS, POST` although `GET` lists backups there. This `before_send` hook replaces that `Allow` with every method
the app routes on the request's path, and `HEAD` beside `GET` (`zkeb.core.head` answers it).

A `405`'s `Allow` is the router's, which names every method routed on the path but not `HEAD`, since Litestar
registers none beside a `GET`, and in no particular order: it gets `HEAD` beside `GET` too, and the same order.
"""

from __future__ import annotations

from litestar.types import Message, Scope

__all__ = ("complete_allow",)


async def complete_allow(message: Message, scope: Scope) -> None:
    """On the start of an automatic `OPTIONS` answer or of a `405`, list in `Allow` every method the path takes."""
    if message["type"] != "http.response.start" or message["status"] not in (204, 405):
        return
    headers = list(message.get("headers", ()))
    allow = next((value for name, value in headers if name.lower() == b"allow"), None)
    if allow is None:
        return
    if message["status"] == 405:
        methods = {method.strip() for method in allow.decode("latin-1").split(",") if method.strip()}
    elif scope.get("method") == "OPTIONS" and "route_handler" in scope:
        routed = scope["litestar_app"].route_handler_method_map
        methods = {method for path in scope["route_handler"].paths for method in routed.get(path, ())}
    else:
        return
    if "GET" in methods:
        methods.add("HEAD")  # answered as the GET without its body (zkeb.core.head)
    if methods:
        listed = ", ".join(sorted(methods)).encode("latin-1")
        message["headers"] = [(name, listed if name.lower() == b"allow" else value) for name, value in headers]
