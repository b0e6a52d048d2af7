"""Where a request's CPU goes in ZKEB's ASGI stack, layer by layer, beside a bare Litestar route, in one process.

    uv run python bench/layers.py                  # local PostgreSQL superuser and Redis db 7, as bench/load.py
    uv run python bench/layers.py --requests 20000 --runs 5 --path /api/health/live

bench/load.py measures the whole server (granian, sockets, the client); this one isolates the Python side. It builds
the app as `zkeb serve` does, with bench/load.py's production settings (tracing off, `LOG_LEVEL=WARNING` so the
access log writes nothing, rate limiting on against Redis), on a fresh migrated database (dropped at the end), and
starts it (its lifespan: pool, Redis, runtime). Then it calls a GET route directly over ASGI, with no server and no
socket, `--requests` times per measurement:

- through the whole app, as granian would;
- entering at each layer of the app's ASGI chain in turn (the outermost first, down to Litestar's router), with the
  scope Litestar's own `__call__` would have prepared;
- and `GET /bare` on bench/ceiling.py's one-route app, the ceiling of bench/load.py.

It prints CPU microseconds per request (`time.process_time`), median [min-max] over `--runs` rounds, and each
layer's own share: the cost entering there minus the cost entering at the next layer in, paired within each round.
The route must answer 200 without credentials (the health routes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ceiling import create_app as create_ceiling
from harness import ROOT, add_database_option, create_database, drop_database, rate_limited_env, with_database
from litestar import Litestar
from litestar.testing import AsyncTestClient

Asgi = Callable[..., Any]


def _scope(path: str, app: Litestar | None) -> dict[str, Any]:
    """A plain HTTP/1.1 GET as granian hands it over; with `app`, what `Litestar.__call__` adds before its chain."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench-layers"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    if app is not None:
        scope["app"] = scope["litestar_app"] = app
    return scope


async def _cpu_per_request(entry: Asgi, path: str, requests: int, app: Litestar | None) -> float:
    """CPU microseconds per request through `entry` (after a warm-up); raises unless every answer is 200."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(min(requests, 500)):
        await entry(_scope(path, app), receive, send)
    statuses.clear()
    started = time.process_time()
    for _ in range(requests):
        await entry(_scope(path, app), receive, send)
    elapsed = time.process_time() - started
    if set(statuses) != {200}:
        raise RuntimeError(f"{path} answered {sorted(set(statuses))} through {type(entry).__name__}, not only 200")
    return elapsed / requests * 1e6


def _chain(app: Litestar) -> list[Asgi]:
    """The app's ASGI handlers, outermost first, down to Litestar's router (each wraps the next as `.app`)."""
    layers: list[Asgi] = []
    handler: Any = app.asgi_handler
    while handler is not None and handler is not app:
        layers.append(handler)
        handler = getattr(handler, "app", None)
    return layers


def _spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


async def run(args: argparse.Namespace) -> None:
    """Create and migrate the database, start both apps in this process, measure, print, clean up."""
    name = await create_database(args.database_url)
    env = rate_limited_env(with_database(args.database_url, name), args.redis_url)
    try:
        subprocess.run(  # noqa: ASYNC221 - set-up before anything is measured
            [sys.executable, "-m", "zkeb", "db", "upgrade"], env={**os.environ, **env}, check=True, cwd=ROOT,
            capture_output=True,
        )  # fmt: skip
        for variable in [v for v in os.environ if v.startswith("OTEL_")]:
            del os.environ[variable]
        os.environ.update(env)
        from zkeb.app import create_app  # noqa: PLC0415 - after the environment its settings are read from
        from zkeb.core.logging import configure_logging, log_format  # noqa: PLC0415
        from zkeb.settings import get_settings  # noqa: PLC0415

        app, bare = create_app(), create_ceiling()
        async with AsyncTestClient(app), AsyncTestClient(bare):
            # The bare app's start-up applies Litestar's default logging configuration to the root logger (in
            # bench/load.py it runs in a process of its own): put back what `zkeb serve` configures.
            settings = get_settings()
            configure_logging(settings.log_level, log_format(settings.env))
            layers = _chain(app)
            names = ["app", *(type(layer).__name__ for layer in layers), "bare"]
            costs: dict[str, list[float]] = {entry: [] for entry in names}
            for _ in range(args.runs):
                costs["app"].append(await _cpu_per_request(app, args.path, args.requests, None))
                for layer in layers:
                    costs[type(layer).__name__].append(await _cpu_per_request(layer, args.path, args.requests, app))
                costs["bare"].append(await _cpu_per_request(bare, "/bare", args.requests, None))
    finally:
        await drop_database(args.database_url, name)

    chain = names[:-1]
    print(f"\nGET {args.path}: CPU µs per request over ASGI in one process, median [min-max] of {args.runs} runs\n")
    print("| entering at | µs per request | the layer's own share (µs) |")
    print("| --- | ---: | ---: |")
    for position, entry in enumerate(chain):
        if position + 1 < len(chain):
            # Paired within each run (both measured back to back), then the median: steadier than two medians' gap.
            inner = costs[chain[position + 1]]
            share = _spread([outer - nested for outer, nested in zip(costs[entry], inner, strict=True)])
        else:
            share = "(the router and the route)"
        print(f"| {entry} | {_spread(costs[entry])} | {share} |")
    print(f"| bench/ceiling.py `GET /bare` | {_spread(costs['bare'])} | |")
    around = [app_cost - router for app_cost, router in zip(costs["app"], costs[chain[-1]], strict=True)]
    ratio = [bare_cost / app_cost for bare_cost, app_cost in zip(costs["bare"], costs["app"], strict=True)]
    print(f"\nZKEB's layers around the router: {_spread(around)} µs; bare / app CPU per request: {_spread(ratio, 2)}")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_option(parser)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7"))
    parser.add_argument("--path", default="/api/health/live", help="a GET route that answers 200 without credentials")
    parser.add_argument("--requests", type=int, default=10000, help="requests per measurement")
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
