"""A request body cut off for stalling (408) leaves no reference cycle: the request is freed at once.

granian closes a connection whose request body went unread only once the request's objects are freed (see
`zkeb.core.connection`); a cycle holding them waits for the garbage collector. This runs with the collector off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import weakref
from typing import Any

from litestar.types import Message, ReceiveMessage, Scope

from zkeb.core.connection import RequestBodyMiddleware
from zkeb.core.errors import RequestBodyTimeoutError
from zkeb.settings import Settings

from support import collector_off, make_settings


class _Request:
    """Stands for the request the app's frames hold."""


async def test_a_body_cut_off_for_stalling_frees_the_request_without_the_garbage_collector(
    base_settings_env: dict[str, str],
) -> None:
    settings: Settings = dataclasses.replace(make_settings(base_settings_env), body_idle_timeout_seconds=0.05)
    answers: list[int] = []

    async def stalled_client() -> ReceiveMessage:
        await asyncio.Event().wait()  # the body never comes
        raise AssertionError("unreachable")

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        request = scope["state"]["request"]

        async def read_body() -> BaseException | None:  # as a tus PATCH's receiver does: the cut-off is returned
            try:
                await receive()
            except RequestBodyTimeoutError as exc:
                assert request is not None
                return exc
            return None

        cut_off = await asyncio.ensure_future(read_body())
        answers.append(408 if isinstance(cut_off, RequestBodyTimeoutError) else 500)

    async def send(message: Message) -> None:
        pass

    request = _Request()
    freed = weakref.ref(request)
    scope: Any = {"type": "http", "http_version": "1.1", "headers": [(b"content-length", b"10")]}
    scope["state"] = {"request": request}
    del request
    with collector_off():
        await RequestBodyMiddleware(app, settings)(scope, stalled_client, send)
        scope.clear()
        for _ in range(3):  # the loop's last wake-ups of the request's task
            await asyncio.sleep(0)
        assert answers == [408]
        assert freed() is None, f"kept by {[type(r).__name__ for r in gc.get_referrers(freed())]}"
