"""Helpers for the delivery-script tests: a local HTTP server, a stand-in `railway` CLI, a runner.

Nothing here needs a database: the scripts under test talk HTTP and run the Railway CLI.
(A module, not a conftest.py: a second conftest module would clash with tests/conftest.py under mypy.)
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = REPO_ROOT / "scripts"

# A route answers (status, JSON body); a list of them is served in turn, the last one repeating.
Response = tuple[int, object]
Routes = Mapping[str, Response | Sequence[Response]]
RailwayResponses = Mapping[str, Mapping[str, object]]


class _RouteHandler(BaseHTTPRequestHandler):
    routes: dict[str, list[Response]]
    lock: threading.Lock

    def do_GET(self) -> None:
        with self.lock:
            queue = self.routes.get(self.path.split("?", 1)[0])
            answer: Response = (404, {"status": "not found"})
            if queue is not None:
                answer = queue[0] if len(queue) == 1 else queue.pop(0)
        status, body = answer
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


@contextmanager
def serve_routes(routes: Routes) -> Iterator[str]:
    """Serve fixed JSON routes on 127.0.0.1 (ephemeral port) in a thread; yields the base URL."""
    table: dict[str, list[Response]] = {}
    for path, answer in routes.items():
        table[path] = [answer] if isinstance(answer, tuple) else list(answer)
    handler = type("Handler", (_RouteHandler,), {"routes": table, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class RailwayStandIn:
    """A fake `railway` executable on PATH that logs each call and prints canned answers."""

    def __init__(self, directory: Path, responses: RailwayResponses) -> None:
        self.bin_dir = directory / "bin"
        self.bin_dir.mkdir()
        self.log = directory / "railway-calls.jsonl"
        config = directory / "railway-responses.json"
        config.write_text(json.dumps(responses))
        script = self.bin_dir / "railway"
        script.write_text(
            f"#!{sys.executable}\n"
            "import json, sys\n"
            f"responses = json.load(open({str(config)!r}))\n"
            "args = sys.argv[1:]\n"
            "stdin = '' if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()\n"
            f"with open({str(self.log)!r}, 'a') as log:\n"
            "    log.write(json.dumps({'args': args, 'stdin': stdin}) + '\\n')\n"
            "joined = ' '.join(args)\n"
            "match = max((k for k in responses if joined.startswith(k)), key=len, default=None)\n"
            "answer = responses.get(match, {}) if match is not None else {}\n"
            "out = answer.get('stdout', '')\n"
            "sys.stdout.write(out if isinstance(out, str) else json.dumps(out))\n"
            "sys.exit(int(answer.get('rc', 0)))\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment with the stand-in first on PATH."""
        env = dict(os.environ)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env.update(extra)
        return env

    def calls(self) -> list[dict[str, object]]:
        """Every recorded call: {"args": [...], "stdin": "..."}."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def run_script(
    name: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run scripts/NAME with bash and capture its output."""
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
