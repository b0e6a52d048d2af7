"""What tracing costs: small-request throughput with OpenTelemetry off vs on (OTLP/HTTP to a local sink).

    uv run python bench/tracing.py            # DATABASE_URL of a PostgreSQL superuser, default the local one

Same harness as bench/upload.py: `granian --interface asgi --factory zkeb.app:create_app`, one worker, production
settings (ZKEB_ENV=production, secrets generated for this run, a fresh database, rate limiting off so the load is
not refused). Two endpoints:

- `GET /api/health/live` (no credential, no database),
- `GET /api/v1/projects` with an org admin key (API-key lookup and a listing: three database round trips).

Each is driven for `--seconds` by `--concurrency` aiohttp connections in three server modes, in turn, `--rounds`
times: tracing off; tracing on with every request sampled (`parentbased_always_on`, the SDK default); tracing on
with `OTEL_TRACES_SAMPLER=parentbased_traceidratio` and `OTEL_TRACES_SAMPLER_ARG=--sampler-ratio` (default 0.1).
Both traced modes export over OTLP/HTTP (`OTEL_EXPORTER_OTLP_ENDPOINT`) to a sink process that accepts and
discards it. The median of each is reported with its cost relative to off. The load generator shares the machine
with the server, so absolute numbers understate a real deployment; the ratios are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import aiohttp
from harness import (
    ROOT,
    add_database_option,
    create_database,
    create_org,
    drop_database,
    free_port,
    granian,
    production_env,
    with_database,
)

WARM_UP_SECONDS = 1.5

SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


async def _drive(url: str, headers: dict[str, str], seconds: float, concurrency: int) -> float:
    """Requests per second answered 200 by `url` under `concurrency` keep-alive connections."""
    done = 0
    failures = 0
    stop = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal done, failures
            while time.monotonic() < stop:
                async with session.get(url) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1
                    else:
                        failures += 1

        # Warm-up at full concurrency: every keep-alive and pool connection open, caches filled.
        stop = time.monotonic() + WARM_UP_SECONDS
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        done = 0
        started = time.monotonic()
        stop = started + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    if failures:
        raise RuntimeError(f"{failures} requests to {url} did not answer 200")
    return done / elapsed


async def run(server_url: str, seconds: float, rounds: int, concurrency: int, ratio: float) -> None:
    """Create a database, measure each mode in alternation, print the table, drop the database."""
    name = await create_database(server_url)
    sink_port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_port)])  # noqa: ASYNC220 - a benchmark's setup
    env = production_env(
        with_database(server_url, name), ENABLE_RATE_LIMITING="false", ENABLE_AUDIT_LOGS="true", DB_POOL_SIZE="10"
    )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    os.environ.clear()
    os.environ.update(base_env)
    traced = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "zkeb-bench",
    }
    sampled = {**traced, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
    modes = {"off": {}, "every request": traced, f"{ratio:.0%} sampled": sampled}
    try:
        subprocess.run(  # noqa: ASYNC221 - a benchmark's setup
            [sys.executable, "-m", "zkeb", "db", "upgrade"], env={**os.environ, **env}, check=True, cwd=ROOT,
            capture_output=True,
        )  # fmt: skip
        admin_key = create_org(env)
        endpoints = {
            "GET /api/health/live": ("/api/health/live", {}),
            "GET /api/v1/projects (API key)": ("/api/v1/projects", {"Authorization": f"Bearer {admin_key}"}),
        }
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for mode, extra in modes.items():
                with granian({**env, **extra}) as (base, _):
                    for label, (path, headers) in endpoints.items():
                        rate = await _drive(base + path, headers, seconds, concurrency)
                        results.setdefault((label, mode), []).append(rate)
        print(f"\nSmall-request throughput, tracing off vs on (OTLP/HTTP to a local sink); median of {rounds} runs")
        print(f"of {seconds:.0f} s, {concurrency} connections, 1 granian worker, {os.cpu_count()} CPUs\n")
        traced_modes = [m for m in modes if m != "off"]
        print("| request | off (req/s) | " + " | ".join(f"{m} (req/s) | cost" for m in traced_modes) + " |")
        print("| --- | ---: | " + " | ".join("---: | ---:" for _ in traced_modes) + " |")
        for label in endpoints:
            off = statistics.median(results[(label, "off")])
            cells = []
            for mode in traced_modes:
                on = statistics.median(results[(label, mode)])
                cells.append(f"{on:.0f} | {(off - on) / off * 100:.1f} %")
            print(f"| {label} | {off:.0f} | " + " | ".join(cells) + " |")
        print("\nall runs (req/s):", {f"{label} {mode}": [round(r) for r in v] for (label, mode), v in results.items()})
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        await drop_database(server_url, name)


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_option(parser)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--sampler-ratio",
        type=float,
        default=0.1,
        help="the fraction of traces the sampled mode keeps (parentbased_traceidratio); default 0.1",
    )
    args = parser.parse_args()
    asyncio.run(run(args.database_url, args.seconds, args.rounds, args.concurrency, args.sampler_ratio))


if __name__ == "__main__":
    main()
