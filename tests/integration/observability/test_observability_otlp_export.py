"""A real granian server (`zkeb serve`) exports its spans to a real OTLP receiver on loopback.

The receivers decode the official `opentelemetry-proto` messages. The batch processor's delay is set far beyond
the test's length, so spans arrive only because SIGTERM's graceful shutdown flushes them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc  # type: ignore[import-untyped]
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ZKEB = [sys.executable, "-m", "zkeb"]


class Received:
    """Spans a receiver got: `(service.name, trace id hex, span name, kind)` per span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, int]] = []
        self.lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            (attributes.get("service.name", ""), span.trace_id.hex(), span.name, span.kind)
                        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            message = trace_service_pb2.ExportTraceServiceRequest()
            message.ParseFromString(body)
            received.add(message)
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
            received.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", received
    server.stop(grace=None)


def _serve(base_env: dict[str, str], database_url: str, **extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ZKEB_", "PROMETHEUS_", "METRICS_"))}
    env.update(base_env)
    env.update(DATABASE_URL=database_url, HOST="127.0.0.1", PORT=str(port), LOG_LEVEL="INFO", LOG_FORMAT="json")
    env.update(extra)
    process = subprocess.Popen([*ZKEB, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, stderr = process.communicate()
            pytest.fail(f"server exited early: {stderr.decode()[-3000:]}")
        try:
            if httpx.get(f"{base}/api/health/live", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("server did not come up")


def _stop(process: subprocess.Popen[bytes]) -> tuple[str, str]:
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()[-3000:]
    return stdout.decode(), stderr.decode()


@pytest.mark.parametrize(
    ("protocol", "receiver_fixture"), [("http/protobuf", "http_receiver"), ("grpc", "grpc_receiver")]
)
def test_spans_reach_an_otlp_receiver_with_service_name_and_trace_id_after_sigterm(
    protocol: str,
    receiver_fixture: str,
    request: pytest.FixtureRequest,
    base_settings_env: dict[str, str],
    database_url: str,
) -> None:
    endpoint, received = request.getfixturevalue(receiver_fixture)
    service_name = f"zkeb-otlp-{uuid.uuid4().hex[:6]}"
    process, base = _serve(
        base_settings_env,
        database_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_SERVICE_NAME=service_name,
        OTEL_BSP_SCHEDULE_DELAY="600000",
    )
    trace_id = uuid.uuid4().hex
    try:
        response = httpx.get(
            f"{base}/api/health/db", headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"}, timeout=10
        )
        assert response.status_code == 200
        assert response.headers["traceresponse"].startswith(f"00-{trace_id}-")
    finally:
        stdout, _ = _stop(process)

    mine = [s for s in received.spans if s[1] == trace_id]
    assert {s[0] for s in mine} == {service_name}
    names = {s[2] for s in mine}
    assert "GET /api/health/db" in names
    assert len(mine) >= 2, mine  # the server span and at least one database span
    access = [json.loads(line) for line in stdout.splitlines() if '"logger":"zkeb.access"' in line]
    assert access, stdout[-3000:]
    line = next(a for a in access if a["route"] == "/api/health/db")
    assert line["trace_id"] == trace_id
    assert line["status"] == 200
    assert {"time", "level", "event", "request_id", "span_id", "duration_ms", "bytes_out"} <= line.keys()


def test_metrics_port_serves_every_worker_and_the_api_port_does_not(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    metrics_port = _free_port()
    process, base = _serve(base_settings_env, database_url, METRICS_PORT=str(metrics_port), WEB_CONCURRENCY="2")
    try:
        for _ in range(6):
            assert httpx.get(f"{base}/api/health/live", timeout=5).status_code == 200
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 404
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    finally:
        _stop(process)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["zkeb_http_requests"]
    live = sum(
        s.value
        for s in requests.samples
        if s.name == "zkeb_http_requests_total" and s.labels["route"] == "/api/health/live"
    )
    # The readiness probe of the start-up loop adds a few more.
    assert live >= 6
    assert "zkeb_process_resident_memory_bytes" in families
