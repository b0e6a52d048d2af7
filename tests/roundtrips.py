"""Round-trip counting proxies for PostgreSQL and Redis, for tests that pin how many trips a request costs.

Each proxy listens on loopback, forwards bytes both ways unchanged to the real server, and reads the client's side
of the wire protocol: a PostgreSQL round trip is a simple `Query` or an extended-protocol `Sync` (the client waits
for `ReadyForQuery` after each), a Redis one is each RESP command (the app sends no pipelines on the request path).
Timing on a shared machine is noise; these counts are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from support import open_server_connection, url_through_loopback_port

__all__ = ("WireCounts", "counting_proxy")

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


@dataclass
class WireCounts:
    """What clients sent through a proxy: round trips, and the statements or commands they carried."""

    round_trips: int = 0
    statements: list[str] = field(default_factory=list)

    def reset(self) -> None:
        """Forget everything counted so far (e.g. after warming the connection pool and statement caches)."""
        self.round_trips = 0
        self.statements.clear()


def _cstring(data: bytes, start: int) -> str:
    end = data.index(b"\0", start)
    return data[start:end].decode(errors="replace")


async def _postgres_client_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: WireCounts) -> None:
    # Startup phase: untyped messages (SSLRequest/GSSENCRequest, answered with one byte, then the StartupMessage).
    while True:
        header = await reader.readexactly(4)
        (length,) = struct.unpack("!I", header)
        body = await reader.readexactly(length - 4)
        writer.write(header + body)
        await writer.drain()
        code = struct.unpack("!I", body[:4])[0] if len(body) >= 4 else 0
        if code not in (_SSL_REQUEST, _GSSENC_REQUEST):
            break
    while True:
        header = await reader.readexactly(5)
        kind = header[:1]
        (length,) = struct.unpack("!I", header[1:])
        body = await reader.readexactly(length - 4)
        if kind == b"Q":
            counts.round_trips += 1
            counts.statements.append(_cstring(body, 0))
        elif kind == b"P":
            counts.statements.append("parse: " + _cstring(body, body.index(b"\0") + 1))
        elif kind == b"S":
            counts.round_trips += 1
        writer.write(header + body)
        await writer.drain()


async def _redis_client_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: WireCounts) -> None:
    while True:
        line = await reader.readuntil(b"\r\n")
        raw = [line]
        if not line.startswith(b"*"):  # an inline command
            counts.round_trips += 1
            counts.statements.append(line.decode(errors="replace").split(" ", 1)[0].strip().upper())
        else:
            parts: list[bytes] = []
            for _ in range(int(line[1:-2])):
                size_line = await reader.readuntil(b"\r\n")
                item = await reader.readexactly(int(size_line[1:-2]) + 2)
                raw += [size_line, item]
                parts.append(item[:-2])
            counts.round_trips += 1
            counts.statements.append(parts[0].decode(errors="replace").upper() if parts else "")
        writer.write(b"".join(raw))
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@contextlib.contextmanager
def counting_proxy(url: str, *, protocol: str) -> Iterator[tuple[str, WireCounts]]:
    """A counting proxy in front of the server `url` names; yields the URL to use instead and the live counts.

    The proxy runs its own event loop in a thread: the app under test may run on another loop (Litestar's test
    client drives it through a portal) or block the test's loop while it waits for the database.

    Args:
        url: a `postgresql...://` or `redis://` URL of the real server.
        protocol: `"postgres"` or `"redis"`.
    """
    counts = WireCounts()
    client_side = _postgres_client_side if protocol == "postgres" else _redis_client_side

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await open_server_connection(url)
        directions = [
            asyncio.ensure_future(client_side(client_reader, server_writer, counts)),
            asyncio.ensure_future(_pipe(server_reader, client_writer)),
        ]
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for direction in directions:
                direction.cancel()
            client_writer.close()
            server_writer.close()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="counting-proxy", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(handle, "127.0.0.1", 0), loop).result(5)
    port = server.sockets[0].getsockname()[1]
    try:
        yield url_through_loopback_port(url, port), counts
    finally:
        try:
            asyncio.run_coroutine_threadsafe(_stop(server), loop).result(5)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            if not thread.is_alive():
                loop.close()


async def _stop(server: asyncio.Server) -> None:
    """Close the listener and end every connection's tasks on this loop, so none is left suspended.

    A connection task left suspended when the loop stops is closed by the garbage collector later, inside whatever
    test runs then, where its clean-up fails on the stopped loop ("Event loop is closed") and fails that test.
    """
    server.close()
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
