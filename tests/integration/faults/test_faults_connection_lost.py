"""A connection whose backend was terminated while it sat idle in the pool is a lost connection: 503, not 500.

PostgreSQL sends a terminated backend's FATAL error and then closes the socket. When the close reaches the server
later than the error (a busy machine, a network between them), asyncpg has already put the idle connection's
protocol in an error state, and the next statement fails with `InternalClientError` "another operation is in
progress" although the connection still looks open. The database fault tests met it about one run in five under
load; here a loopback relay in front of the real PostgreSQL holds every close back for a moment, so it happens every
time.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import asyncpg
import httpx
import pytest
from asyncpg.exceptions import InternalClientError
from faults_support import make_fault_tenant, server_env, zkeb_serve

from zkeb.core.database import create_app_engine, pooled_connection
from zkeb.core.errors import database_connection_lost
from zkeb.domain.backups.store.connection import raw_tenant_transaction

from support import create_org, make_settings, open_server_connection, problem, url_through_loopback_port

#: How long the relay holds back PostgreSQL's close after the backend's last bytes.
CLOSE_DELAY_SECONDS = 1.5


@contextmanager
def relay_holding_closes(target: str) -> Iterator[str]:
    """A TCP relay on loopback to `target`'s server: bytes pass at once, a close only after a delay.

    Yields `target` with the relay's port in it.
    """
    loop = asyncio.new_event_loop()
    listening: list[int] = []
    ready = threading.Event()
    stop = asyncio.Event()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, hold_close: bool) -> None:
        with suppress(ConnectionError):  # the other side reset it
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        if hold_close:
            await asyncio.sleep(CLOSE_DELAY_SECONDS)
        writer.close()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await open_server_connection(target)
        await asyncio.gather(
            pump(client_reader, upstream_writer, hold_close=False),
            pump(upstream_reader, client_writer, hold_close=True),
        )

    async def serve() -> None:
        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        listening.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await stop.wait()
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the relay did not start"
    try:
        yield url_through_loopback_port(target, listening[0])
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _terminate_app_backends(owner_url: str) -> int:
    """`pg_terminate_backend` for the server's connections (application_name `zkeb`) to this test's database."""
    owner = await asyncpg.connect(_plain(owner_url))
    try:
        ended: int = await owner.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'zkeb' AND datname = current_database()"
        )
    finally:
        await owner.close()
    return ended


async def test_a_statement_on_a_connection_whose_idle_backend_was_terminated_is_a_lost_connection(
    database_url: str,
) -> None:
    # asyncpg alone, as the pool's connections are.
    with relay_holding_closes(database_url) as relayed:
        connection = await asyncpg.connect(_plain(relayed))
        try:
            pid = await connection.fetchval("SELECT pg_backend_pid()")
            owner = await asyncpg.connect(_plain(database_url))
            try:
                assert await owner.fetchval("SELECT pg_terminate_backend($1)", pid)
            finally:
                await owner.close()
            await asyncio.sleep(0.3)  # the FATAL error has arrived; the close has not
            assert not connection.is_closed()
            with pytest.raises(InternalClientError, match="another operation") as raised:
                await connection.fetchval("SELECT 1")
            assert database_connection_lost(raised.value)
        finally:
            connection.terminate()


async def test_the_driver_connection_path_reports_the_lost_connection_and_discards_it(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    # The path of the single-shot commit, tus and restores (asyncpg under SQLAlchemy's pool, no ORM): the one the
    # fault tests saw answer 500.
    organization_id, _ = await create_org(make_settings(base_settings_env, DATABASE_URL=database_url))
    with relay_holding_closes(database_url) as relayed:
        engine = create_app_engine(make_settings(base_settings_env, DB_POOL_SIZE="1"), relayed)
        try:
            async with pooled_connection(engine) as connection:
                assert await connection.fetchval("SELECT 1") == 1  # the pool's one connection is open now
            assert await _terminate_app_backends(database_url) == 1
            await asyncio.sleep(0.3)  # the FATAL error has arrived; the close has not
            with pytest.raises(InternalClientError) as raised:
                async with pooled_connection(engine) as connection, raw_tenant_transaction(connection, organization_id):
                    pytest.fail("the transaction began on a connection whose backend is gone")
            assert database_connection_lost(raised.value)
            async with pooled_connection(engine) as connection:  # a new connection, not the broken one
                assert await connection.fetchval("SELECT 1") == 1
        finally:
            await engine.dispose()


async def test_requests_on_pooled_connections_whose_backends_were_terminated_are_503_and_retries_succeed(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    with relay_holding_closes(database_url) as relayed:
        env = server_env(base_settings_env, relayed, DB_POOL_SIZE="1", ENABLE_RATE_LIMITING="false")
        with zkeb_serve(env) as server:
            tenant = await make_fault_tenant(server.url, make_settings(base_settings_env, DATABASE_URL=database_url))
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

                async def single_shot() -> httpx.Response:
                    envelope = tenant.envelope(os.urandom(1024))
                    return await client.post("/api/v1/backups", json=envelope.json(), headers=tenant.auth)

                async def listing() -> httpx.Response:
                    return await client.get("/api/v1/backups", headers=tenant.auth)

                # The one-transaction commit on the driver connection, then a listing through the ORM.
                for request, ok in ((single_shot, 201), (listing, 200)):
                    assert (await request()).status_code == ok  # the pool's one connection is open now
                    await asyncio.sleep(1)  # the audit linker has linked the commit's event (it uses the pool too)
                    assert await _terminate_app_backends(database_url) >= 1
                    await asyncio.sleep(0.3)  # the FATAL error has arrived; the close has not
                    lost = await request()
                    assert lost.status_code == 503, (request.__name__, lost.text)
                    assert lost.headers["retry-after"] == "1"
                    assert "connection was lost" in problem(lost)["detail"]
                    # The broken connection was discarded at once: the very next request succeeds.
                    retried = [(await request()).status_code for _ in range(3)]
                    assert retried == [ok] * 3, (request.__name__, retried)
            assert "unhandled error" not in server.output()
