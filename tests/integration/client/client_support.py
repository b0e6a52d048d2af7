"""Helpers for the client's end-to-end tests: a project on a live server, the CLI as a subprocess, a stalling proxy.

The proxy sits between the CLI and granian so a test can stop an upload at a known point (it stops forwarding after
a byte budget), observe the server's offset, and kill the CLI there: a deterministic "connection lost mid-upload".
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from zkeb.settings import Settings

from support import create_org

CLI = str(Path(sys.executable).with_name("zkeb-client"))
MIB = 1024 * 1024


@dataclass(frozen=True)
class Project:
    """An organization's admin key and one project with its project key."""

    server: str
    admin_key: str
    project_id: uuid.UUID
    project_key: str


async def make_project(server: str, settings: Settings) -> Project:
    """A new organization and project on the live server."""
    _, admin_key = await create_org(settings)
    async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {admin_key}"}) as http:
        project = (await http.post("/api/v1/projects", json={"name": "client-e2e-project"})).json()
        key = (await http.post(f"/api/v1/projects/{project['id']}/api-keys", json={"name": "ci"})).json()
    return Project(server, admin_key, uuid.UUID(project["id"]), key["key"])


@dataclass
class Cli:
    """Runs `zkeb-client` with a fixed environment (server, key file, project, state directory)."""

    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        """The argv for a CLI call."""
        return [CLI, *args]

    def environ(self, **extra: str) -> dict[str, str]:
        """The subprocess environment: ours without inherited ZKEB_* settings, then the test's."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("ZKEB_")}
        return {**base, **self.env, **extra}

    def run(self, *args: str, input_text: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run to completion, capturing output."""
        return subprocess.run(
            self.command(*args),
            env=self.environ(**extra),
            capture_output=True,
            text=True,
            input=input_text,
            timeout=240,
            check=False,
        )

    def ok(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run and assert success."""
        result = self.run(*args, **extra)
        assert result.returncode == 0, (result.returncode, result.stderr)
        return result

    def json(self, *args: str, **extra: str) -> dict[str, Any]:
        """Run with `--json` and return the last stdout line's object."""
        result = self.ok(*args, "--json", **extra)
        value: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return value


def assert_one_line_failure(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    """A failed command: the documented exit status and one stderr line saying why."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("zkeb-client: error: "), lines
    assert fragment in lines[0], lines


async def database_bytes(connection: asyncpg.Connection) -> bytes:
    """Every value of every user table, concatenated (bytea raw, other values as text): what the server stores."""
    tables = await connection.fetch(
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
    )
    parts: list[bytes] = []
    for table in tables:
        for row in await connection.fetch(f'SELECT * FROM "{table["schemaname"]}"."{table["tablename"]}"'):
            parts.extend(value if isinstance(value, bytes) else str(value).encode() for value in row.values())
    return b"\x00".join(parts)


class StallingProxy:
    """A TCP proxy that stops forwarding client bytes once `budget` of them have passed (None: no limit).

    It can also answer the next `busy_answers` connections itself with a 503 and `Retry-After: 1`, drop the
    first connection whose answer passes `cut_response_after` bytes (a download cut mid-way), flip one bit of
    the byte at `flip_response_byte` of the next answer that long (ciphertext altered on the way), and lose the
    server's answer to the next `lose_answers` requests starting with `lose_answer_to` (e.g. ``b"PATCH "``): the
    request reaches the server, which acts on it, and the connection drops as its answer arrives. With
    `hold_answer_after`, the first answer to pass that many bytes stops there, its connection kept open
    (`answer_held` is set): a download in progress, for as long as the test wants. `cut_answers` answers are cut
    that way (one unless set), and `cut_requests` requests are cut once they pass `cut_request_after` bytes (a
    connection lost mid-upload, the server keeping what arrived). The first request to pass `stall_request_after`
    bytes stalls there: its further bytes are read and dropped, so the server sees its body stop. The next
    `refusals` requests starting with `refuse` are answered by the proxy with `refusal` (a whole response), their
    bytes dropped: a refusal before the body is read, as a rate limiter gives, without a race against the upload.
    The answers to the next `rewrites` requests starting with `rewrite_answer_to` pass through `rewrite` (their
    first piece, which holds the status line and headers): e.g. an `Upload-Offset` the server had not yet moved.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.budget: int | None = None
        self.busy_answers = 0  # this many connections get a 503 with Retry-After instead of being forwarded
        self.cut_response_after: int | None = None  # drop the next connection whose answer passes this many bytes
        self.cut_answers = 1
        self.cut_request_after: int | None = None  # drop the connection of a request that passes this many bytes
        self.cut_requests = 0
        self.request_cuts = 0
        self.stall_request_after: int | None = None
        self.refuse: bytes | None = None
        self.refusals = 0
        self.refusal = b""
        self.refused = 0
        self.answers: list[bytes] = []  # the status lines of the server's answers
        self.flip_response_byte: int | None = None  # flip a bit of this byte (counted from the answer's start)
        self.flips = 0
        self.lose_answer_to: bytes | None = None
        self.lose_answers = 0
        self.lost = 0  # answers lost so far
        self.rewrite_answer_to: bytes | None = None
        self.rewrites = 0
        self.rewrite: Callable[[bytes], bytes] = lambda answer: answer
        self.rewritten = 0
        self.forwarded = 0
        self.answered = 0  # bytes forwarded from the server to the client
        self.cuts = 0
        self.hold_answer_after: int | None = None  # stop forwarding the first answer that passes this many bytes
        self.answer_held = threading.Event()
        self.requests: list[bytes] = []  # client bytes that start a request line, for tests to inspect
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting connections."""
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                busy, self.busy_answers = self.busy_answers > 0, max(self.busy_answers - 1, 0)
            if busy:
                threading.Thread(target=self._answer_busy, args=(downstream,), daemon=True).start()
                continue
            upstream = socket.create_connection(self.upstream)
            losing = threading.Event()  # set once this connection carries a request whose answer is to be lost
            rewriting = threading.Event()  # set while this connection's next answer is to be rewritten
            for pump in ((downstream, upstream, True), (upstream, downstream, False)):
                threading.Thread(target=self._pump, args=(*pump, losing, rewriting), daemon=True).start()

    @staticmethod
    def _answer_busy(downstream: socket.socket) -> None:
        """Read one request head and answer 503 with `Retry-After: 1`, as an overloaded server or balancer would."""
        with downstream:
            head = b""
            while b"\r\n\r\n" not in head and (data := downstream.recv(65536)):
                head += data
            body = b'{"status": 503, "title": "Service Unavailable", "detail": "try again shortly"}'
            downstream.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
                b"Content-Type: application/problem+json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        counted: bool,
        losing: threading.Event,
        rewriting: threading.Event,
    ) -> None:
        dropping = False  # once over budget, this connection's further bytes are read and thrown away
        answered = 0
        request_bytes = 0  # of the request being sent on this connection, from its request line
        try:
            while data := source.recv(256 * 1024):
                if counted and not dropping:
                    cut = False
                    with self._lock:
                        if data[:8].split(b" ")[0] in {b"GET", b"HEAD", b"POST", b"PATCH", b"DELETE", b"OPTIONS"}:
                            self.requests.append(data[:2048])
                            request_bytes = 0
                            if self.lose_answer_to and self.lose_answers > 0 and data.startswith(self.lose_answer_to):
                                self.lose_answers -= 1
                                losing.set()
                            if self.rewrite_answer_to and self.rewrites > 0 and data.startswith(self.rewrite_answer_to):
                                self.rewrites -= 1
                                rewriting.set()
                            if self.refuse and self.refusals > 0 and data.startswith(self.refuse):
                                self.refusals -= 1
                                self.refused += 1
                                source.sendall(self.refusal)
                                dropping = True
                                continue
                        request_bytes += len(data)
                        limit = self.cut_request_after
                        if limit is not None and self.cut_requests > 0 and request_bytes > limit:
                            data = data[: len(data) - (request_bytes - limit)]
                            self.cut_requests -= 1
                            self.request_cuts += 1
                            cut = True
                        stall = self.stall_request_after
                        if stall is not None and request_bytes > stall:
                            data = data[: len(data) - (request_bytes - stall)]
                            self.stall_request_after = None
                            dropping = True
                            self.stalled.set()
                        if self.budget is not None and self.forwarded + len(data) > self.budget:
                            data = data[: max(self.budget - self.forwarded, 0)]
                            dropping = True
                            self.stalled.set()
                        self.forwarded += len(data)
                    sink.sendall(data)
                    if cut:
                        return  # the connection drops mid-request (closed below)
                elif not counted:
                    if losing.is_set():
                        with self._lock:
                            self.lost += 1
                        return  # the server answered (so it acted on the request); the client never hears it
                    with self._lock:
                        flip = self.flip_response_byte
                        if flip is not None and answered <= flip < answered + len(data):
                            altered = bytearray(data)
                            altered[flip - answered] ^= 0x01
                            data = bytes(altered)
                            self.flip_response_byte = None
                            self.flips += 1
                        if data.startswith(b"HTTP/1.1 "):
                            self.answers.append(data.split(b"\r\n", 1)[0])
                            if rewriting.is_set():
                                rewriting.clear()
                                data = self.rewrite(data)
                                self.rewritten += 1
                        answered += len(data)
                        cut = self.cut_response_after is not None and answered > self.cut_response_after
                        if cut:
                            self.cut_answers -= 1
                            if self.cut_answers <= 0:
                                self.cut_response_after = None
                            self.cuts += 1
                        held = self.hold_answer_after is not None and answered > self.hold_answer_after
                        if held:
                            self.hold_answer_after = None
                        self.answered += len(data)
                    if cut:
                        return  # the connection drops mid-answer (closed below)
                    sink.sendall(data)
                    if held:
                        self.answer_held.set()
                        self._closed.wait()  # the answer goes no further until the proxy closes
                        return
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
