"""What tracing costs: small-request throughput and server CPU with OpenTelemetry off vs on (OTLP/HTTP export).

    uv run python bench/tracing.py            # DATABASE_URL of a PostgreSQL superuser, default the local one

Same harness as bench/upload.py: `granian --interface asgi --factory zkeb.app:create_app`, one worker, production
settings (ZKEB_ENV=production, secrets generated for this run, a fresh database, rate limiting off so the load is
not refused). Three servers run side by side for the whole run, one per mode: tracing off; tracing on with every
request sampled (`parentbased_always_on`, the SDK default); tracing on with `OTEL_TRACES_SAMPLER=
parentbased_traceidratio` and `OTEL_TRACES_SAMPLER_ARG=--sampler-ratio` (default 0.1). Both traced servers export
over OTLP/HTTP (`OTEL_EXPORTER_OTLP_ENDPOINT`) to a sink process that accepts and discards it. Two requests:

- `GET /api/health/live` (no credential, no database),
- `GET /api/v1/projects` with an org admin key (API-key lookup and a listing: three SQL statements).

For each request, every server is warmed up, then driven in turn for `--seconds` by `--concurrency` aiohttp
connections, `--rounds` times, the order rotating each round. Each round's traced throughput is compared with the
same round's untraced one, so the machine getting faster or slower between rounds cancels out; the table shows the
median of those paired costs. It does the same with the granian worker's CPU time per request (all its threads,
the span exporter's included, read from the kernel after the run and a settling second in which the last batch is
exported): on a server whose CPU is the limit, throughput falls by that `1 - cpu_off / cpu_on`, whatever share of
the machine the load generator takes. The batch processor's schedule delay is 500 ms (`OTEL_BSP_SCHEDULE_DELAY`)
instead of 5 s so that a run's spans are exported within its settling second, not during the next server's run;
that makes batches smaller, not cheaper.

It ends with one SQL statement's span timed step by step in this process (`_span_costs`): what the request path pays
to start, fill and end it, and what the exporter thread pays to encode and send it.
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
from contextlib import ExitStack
from dataclasses import dataclass

import aiohttp
import psutil
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
    worker_pid,
)

WARM_UP_SECONDS = 1.5
SETTLE_SECONDS = 1.0

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


async def _drive(url: str, headers: dict[str, str], seconds: float, concurrency: int) -> tuple[int, float]:
    """Drive `url` for `seconds` over `concurrency` keep-alive connections; (requests answered 200, elapsed s)."""
    done = 0
    failures = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        started = time.monotonic()
        stop = started + seconds

        async def worker() -> None:
            nonlocal done, failures
            while time.monotonic() < stop:
                async with session.get(url) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1
                    else:
                        failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    if failures:
        raise RuntimeError(f"{failures} requests to {url} did not answer 200")
    return done, elapsed


@dataclass
class Sample:
    """One run of one server: requests per second and the worker's CPU seconds per request."""

    rate: float
    cpu_per_request: float


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _measure(url: str, headers: dict[str, str], pid: int, seconds: float, concurrency: int) -> Sample:
    before = _cpu_seconds(pid)
    requests, elapsed = await _drive(url, headers, seconds, concurrency)
    await asyncio.sleep(SETTLE_SECONDS)
    return Sample(requests / elapsed, (_cpu_seconds(pid) - before) / requests)


async def run(server_url: str, seconds: float, rounds: int, concurrency: int, ratio: float) -> None:
    """Create a database, start one server per mode, measure them in rotation, print the table, clean up."""
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
        "OTEL_BSP_SCHEDULE_DELAY": "500",
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
        samples: dict[tuple[str, str], list[Sample]] = {}
        with ExitStack() as stack:
            servers = {mode: stack.enter_context(granian({**env, **extra})) for mode, extra in modes.items()}
            workers = {mode: worker_pid(server) for mode, (_, server) in servers.items()}
            for label, (path, headers) in endpoints.items():
                for base, _ in servers.values():
                    await _drive(base + path, headers, WARM_UP_SECONDS, concurrency)
                order = list(modes)
                for round_ in range(rounds):
                    for mode in order[round_ % len(order) :] + order[: round_ % len(order)]:
                        sample = await _measure(servers[mode][0] + path, headers, workers[mode], seconds, concurrency)
                        samples.setdefault((label, mode), []).append(sample)
        _report(samples, list(endpoints), list(modes), seconds, rounds, concurrency)
        _report_span_costs(sink_port)
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        await drop_database(server_url, name)


def _report(
    samples: dict[tuple[str, str], list[Sample]],
    labels: list[str],
    modes: list[str],
    seconds: float,
    rounds: int,
    concurrency: int,
) -> None:
    print(f"\nSmall-request cost of tracing (OTLP/HTTP to a sink): {rounds} rounds of {seconds:.0f} s per server,")
    print(f"{concurrency} connections, 1 granian worker per server, {os.cpu_count()} CPUs; medians\n")
    print("| request | mode | req/s | throughput cost | worker CPU per request | CPU cost |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for label in labels:
        off = samples[(label, "off")]
        for mode in modes:
            runs = samples[(label, mode)]
            rate = statistics.median(s.rate for s in runs)
            cpu = statistics.median(s.cpu_per_request for s in runs)
            if mode == "off":
                print(f"| {label} | {mode} | {rate:.0f} | | {cpu * 1e6:.0f} µs | |")
                continue
            pairs = list(zip(runs, off, strict=True))
            throughput_cost = statistics.median(1 - s.rate / o.rate for s, o in pairs)
            cpu_cost = statistics.median(1 - o.cpu_per_request / s.cpu_per_request for s, o in pairs)
            print(f"| {label} | {mode} | {rate:.0f} | {throughput_cost:.1%} | {cpu * 1e6:.0f} µs | {cpu_cost:.1%} |")
    print("\nall runs (req/s, µs of CPU per request):")
    for (label, mode), runs in samples.items():
        print(f"  {label}, {mode}:", ", ".join(f"{s.rate:.0f} ({s.cpu_per_request * 1e6:.0f})" for s in runs))


def _span_costs(sink_port: int, batch: int = 512, repeats: int = 7) -> dict[str, float]:
    """CPU µs per span, best of `repeats` over `batch` spans, for each step of one traced SQL statement's span.

    The span carries the attributes the SQLAlchemy instrumentation sets, on a resource like the server's, and goes
    through the same SDK classes as in the server (an SDK tracer without processors: what starting, filling and ending
    a span costs on the request path; the OTLP encoder and exporter: what the batch processor's thread adds).
    """
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: PLC0415
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: PLC0415
    from opentelemetry.trace import SpanKind  # noqa: PLC0415

    resource = Resource.create(
        {"service.name": "zkeb-bench", "service.version": "0.1.0", "deployment.environment.name": "production"}
    )
    tracer = TracerProvider(resource=resource).get_tracer("opentelemetry.instrumentation.sqlalchemy")
    statement = (
        "SELECT projects.id, projects.organization_id, projects.name, projects.created_at, projects.updated_at"
        " FROM projects WHERE projects.organization_id = $1::UUID ORDER BY projects.created_at DESC LIMIT $2::INTEGER"
    )
    spans: list[ReadableSpan] = []

    def start_fill_end() -> None:
        spans.clear()
        for _ in range(batch):
            span = tracer.start_span("SELECT zkeb", kind=SpanKind.CLIENT)
            for key, value in (
                ("db.statement", statement), ("db.system", "postgresql"), ("db.name", "zkeb"),
                ("db.user", "zkeb_app"), ("net.peer.name", "127.0.0.1"), ("net.peer.port", 5432),
                ("db.operation", "SELECT zkeb"),
            ):  # fmt: skip
                span.set_attribute(key, value)
            span.end()
            spans.append(span)  # type: ignore[arg-type] # an SDK span is a ReadableSpan

    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{sink_port}/v1/traces")
    steps: dict[str, Callable[[], object]] = {
        "start, fill, end (request path)": start_fill_end,
        "OTLP encode (exporter thread)": lambda: encode_spans(spans),
        "of which hashing the resource": lambda: [hash(s.resource) for s in spans],
        "OTLP export over HTTP, encode included": lambda: exporter.export(spans),
    }
    costs = {}
    for label, step in steps.items():
        step()
        times = []
        for _ in range(repeats):
            started = time.process_time()
            step()
            times.append(time.process_time() - started)
        costs[label] = min(times) / batch * 1e6
    exporter.shutdown()  # type: ignore[no-untyped-call]
    return costs


def _report_span_costs(sink_port: int) -> None:
    print("\nOne SQL statement's client span, in this process (CPU µs per span, best of 7 batches of 512):")
    for label, micros in _span_costs(sink_port).items():
        print(f"  {label}: {micros:.1f} µs")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_option(parser)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=7)
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
