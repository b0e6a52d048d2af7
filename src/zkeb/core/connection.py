"""A request body on its connection: how long the server waits for it, and ending a connection it leaves unread.

granian bounds how long a request's head may take (`http1_settings.header_read_timeout`, 30 s: trickled headers are
cut off there), but not its body (emmett-framework/granian#728, closed as won't-fix): a client that sends its headers
and then a byte now and then would hold its request open for as long as it likes. The middleware here is the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

from zkeb.core.errors import RequestBodyTimeoutError
from zkeb.settings import Settings

__all__ = ("RequestBodyMiddleware",)

_CLOSE = (b"connection", b"close")
#: How much of a body the app answered without reading is still read, and dropped, before the connection ends, so
#: that a client still sending it can read the answer. Bounded: a refusal costs at most this (about 0.7 ms of CPU a
#: MiB) and a client sending more, or more slowly, gets the reset it got before.
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 5.0


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in {b"", b"0"}
        if name == b"transfer-encoding":
            return True
    return False


class RequestBodyMiddleware:
    """Cut off a request body that stops making progress, and close a connection whose request body went unread.

    Progress: while the app waits for the body, at least `BODY_MIN_RATE` * `BODY_IDLE_TIMEOUT` bytes (1 byte when
    the rate is 0) must arrive within each `BODY_IDLE_TIMEOUT` seconds of waiting, or the body must end. Only time
    spent waiting on the client counts: a handler busy storing what it received (a tus PATCH's chunk writes) is not
    the client's delay. A body that stalls makes the app's `receive()` raise `RequestBodyTimeoutError`, which
    answers 408 problem+json (a tus PATCH keeps what it stored, see `zkeb.domain.backups.tus`; every handler here
    reads its body before it starts its response). Once the body has ended, `receive()` is passed through untouched
    (a streaming response listens on it for the client's disconnect).

    `Connection: close` goes on an HTTP/1.1 response sent before its request's body was read to its end. A handler
    may refuse a request from its headers alone: a tus PATCH at the wrong offset (409), a body announced past the
    limit (413), a bad credential (401), or a body cut off here (408). The unread rest of the body is still on the
    connection, and granian then resets the connection, so a client that sends its next request over it (as
    connection pools do) fails with "connection reset". With `Connection: close` the client opens a new connection
    instead; Go's net/http does the same when it cannot drain a body. HTTP/2 (which forbids the header) needs none
    of this. granian ends such a connection only once the request is freed (its protocol object holds the unread
    body), so nothing on the path of a request that may answer before its body ends (an upload) may keep it in a
    reference cycle: an exception kept by a frame of its own traceback waits for the garbage collector, and the
    client, which already has its answer, for the end of the connection (see
    `zkeb.domain.backups.chunk_writes._writer_failure`).

    Before it ends such a connection, the rest of the body is read and dropped (up to `DRAIN_BYTES`, within
    `DRAIN_SECONDS`, unless the body was cut off for stalling), as nginx's lingering close does. Reset while still
    sending, a client never reads the answer waiting for it: httpx's async client reports `ReadError` for a 429
    (and so never sees its `Retry-After`), a 401 or a tus 409 (and its `Upload-Offset`) answered to a PATCH of a
    few MiB from its headers alone.

    Requests without a body pass straight through: the cost is the header scan, on the hot path of every request.
    A request with a body arms one timer (not one per `receive()`), looked at only when it fires.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.idle_timeout = settings.body_idle_timeout_seconds
        self.progress_bytes = max(1, int(settings.body_min_rate * settings.body_idle_timeout_seconds))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        watch = _BodyWatch(receive, self.idle_timeout, self.progress_bytes)
        try:
            if scope.get("http_version") == "2":
                await self.app(scope, watch.receive, send)
                return

            async def send_with_close(message: Message) -> None:
                if message["type"] == "http.response.start" and not watch.ended:
                    message["headers"] = [*message.get("headers", ()), _CLOSE]
                await send(message)

            await self.app(scope, watch.receive, send_with_close)
            await watch.drain(DRAIN_BYTES, DRAIN_SECONDS)
        finally:
            watch.stop()


class _BodyWatch:
    """One request body's progress, and the one timer that cuts it off when it stalls.

    The budget: `idle_timeout` seconds of waiting in `receive()`, renewed whenever `progress_bytes` have arrived
    since the last renewal. The timer is armed when a `receive()` starts and none is pending; when it fires it
    cancels the `receive()` waiting then if that one has used up the budget, and otherwise fires again when it
    would have. The budget only shrinks while a `receive()` waits, so the timer never fires too late.
    """

    __slots__ = (
        "_budget",
        "_due",
        "_expired",
        "_idle_timeout",
        "_progress_bytes",
        "_receive",
        "_since",
        "_timer",
        "_waiting",
        "ended",
    )

    def __init__(self, receive: Receive, idle_timeout: float, progress_bytes: int) -> None:
        self._receive = receive
        self._idle_timeout = idle_timeout
        self._progress_bytes = progress_bytes
        #: Seconds of waiting left in the current stretch, and the bytes still due in it.
        self._budget = idle_timeout
        self._due = progress_bytes
        #: The task waiting in `receive()` now, and since when (the loop's clock).
        self._waiting: asyncio.Task[Any] | None = None
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        #: The whole body arrived, or the client is gone.
        self.ended = False

    async def receive(self) -> ReceiveMessage:
        """The app's `receive()`: the next message, or `RequestBodyTimeoutError` when the body stalled."""
        if self.ended:
            return await self._receive()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # an ASGI app runs in a task
        self._since = started = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(started + self._budget, self._look)
        self._waiting = task
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if self._expired and task.uncancel() == 0:  # cancelled by `_look` alone
                self._budget = 0.0  # spent: a later `receive()` is cut off at once
                raise RequestBodyTimeoutError(
                    f"the request body made no progress for {self._idle_timeout:g} s; send it faster, or resume it"
                ) from None
            raise
        finally:
            self._waiting = None
            # A task that keeps what is raised here (a PATCH's receiver returns the 408 it got) would keep this frame
            # with it, and the request: a cycle only the garbage collector frees (see the module docstring).
            del task
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.ended = True
            self.stop()
            return message
        self._due -= len(message["body"])
        if self._due <= 0:
            self._budget, self._due = self._idle_timeout, self._progress_bytes
        else:
            self._budget -= loop.time() - started
        return message

    async def drain(self, limit: int, seconds: float) -> None:
        """Read and drop what is left of the body, up to `limit` bytes and for `seconds` at most.

        Nothing when the body ended or was cut off for stalling; a body that stalls now ends the drain the same way.
        """
        if self.ended or self._expired:
            return
        with contextlib.suppress(TimeoutError, RequestBodyTimeoutError):
            async with asyncio.timeout(seconds):
                while not self.ended and limit > 0:
                    message = await self.receive()
                    if message["type"] == "http.request":
                        limit -= len(message["body"])

    def stop(self) -> None:
        """Disarm the timer (the body ended, the request is over, or the body was cut off)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _look(self) -> None:
        """The timer fired: cut the body off if the waiting `receive()` used up the budget, else look again later."""
        self._timer = None
        task = self._waiting
        if task is None:
            return  # not waiting on the client: the next `receive()` arms the timer again
        loop = asyncio.get_running_loop()
        left = self._budget - (loop.time() - self._since)
        if left > 0:
            self._timer = loop.call_at(loop.time() + left, self._look)
            return
        self._expired = True
        task.cancel()
