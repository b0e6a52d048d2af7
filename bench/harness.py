"""What the benchmarks share: a fresh database URL, a granian server with the app, an organization to act for, and
moto's S3 server for the object-store runs."""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import psutil

__all__ = (
    "ROOT",
    "add_database_option",
    "create_database",
    "create_org",
    "drop_database",
    "free_port",
    "granian",
    "moto_server",
    "production_env",
    "rate_limited_env",
    "with_database",
    "worker_pid",
)

ROOT = Path(__file__).resolve().parent.parent


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` instead."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


def add_database_option(parser: argparse.ArgumentParser) -> None:
    """`--database-url`: the PostgreSQL server (a superuser) every benchmark creates its own database on."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL superuser URL; the benchmark creates and drops its own database",
    )


async def create_database(server_url: str) -> str:
    """A new, empty database on `server_url`; returns its name."""
    name = f"zkeb_bench_{os.urandom(4).hex()}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name


async def drop_database(server_url: str, name: str) -> None:
    """Drop database `name`, disconnecting whoever is still on it."""
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def production_env(database_url: str, **extra: str) -> dict[str, str]:
    """The server's environment for a run: production mode, secrets generated for it, quiet logs, auto-migrate."""
    return {
        "ZKEB_ENV": "production",
        "DATABASE_URL": database_url,
        "ZKEB_MASTER_ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "JWT_SECRET": secrets.token_urlsafe(48),
        "API_KEY_SALT": secrets.token_urlsafe(48),
        "LOG_LEVEL": "WARNING",
        "ZKEB_AUTO_MIGRATE": "true",
        **extra,
    }


#: Budgets no bench run reaches: the limiter still runs (one Redis round trip per request) but never refuses.
UNREACHABLE_BUDGET = "100000000"


def rate_limited_env(database_url: str, redis_url: str) -> dict[str, str]:
    """`production_env` with rate limiting on against `redis_url`, at budgets no run reaches (bench/load.py's)."""
    return production_env(
        database_url,
        REDIS_URL=redis_url,
        RATE_LIMIT_PER_MINUTE=UNREACHABLE_BUDGET,
        TOKEN_RATE_LIMIT_PER_MINUTE=UNREACHABLE_BUDGET,
    )


def free_port() -> int:
    """A TCP port free right now on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def granian(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The app under granian (one worker), ready; yields its base URL and the server process."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="zkeb-bench-", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable, "-m", "granian", "--interface", "asgi", "--factory", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1", "--no-access-log", "zkeb.app:create_app",
        ],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"granian exited; see {log.name}")
            try:
                if httpx.get(f"{base}/api/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"granian not ready; see {log.name}")
            time.sleep(0.2)
        yield base, server
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@contextmanager
def moto_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """moto's standalone S3 server (the tests' one) on a free loopback port, ready; yields its URL and process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=30)


def worker_pid(server: subprocess.Popen[bytes]) -> int:
    """The pid of granian's (single) worker process under `server`, the one that runs the app."""
    children = psutil.Process(server.pid).children(recursive=True)
    return children[0].pid if children else server.pid


def create_org(env: dict[str, str]) -> str:
    """A new organization's admin key, made by `zkeb admin create-org --json`."""
    out = subprocess.run(
        [sys.executable, "-m", "zkeb", "admin", "create-org", "bench", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        check=True,
        cwd=ROOT,
    )
    key: str = json.loads(out.stdout)["api_key"]
    return key
