"""`/metrics` behind `METRICS_TOKEN`: refused without it, parseable with it, counters that move."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from observability_support import (
    auth,
    committed_backup,
    create_org,
    create_project_key,
    enroll_device,
    signed_envelope,
    traced,
)
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from zkeb.app import create_app
from zkeb.core.logging import JsonFormatter
from zkeb.core.runtime import get_runtime

from support import make_settings, problem

METRICS_TOKEN = "metrics-token-for-tests-0123456789"


@pytest.fixture
async def metrics_client(
    base_settings_env: dict[str, str], database_url: str
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, METRICS_TOKEN=METRICS_TOKEN)
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


async def _scrape(client: AsyncTestClient[Litestar]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_without_the_token_are_refused_and_reveal_nothing(
    metrics_client: AsyncTestClient[Litestar],
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {METRICS_TOKEN}"}):
        response = await metrics_client.get("/metrics", headers=headers)
        assert response.status_code == 401
        body = problem(response)
        assert "zkeb_" not in response.text
        assert METRICS_TOKEN not in response.text
        assert body["instance"] == "/metrics"


async def test_metrics_are_not_served_on_the_api_port_without_a_token(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 404
    problem(response)


async def test_request_counters_latency_and_pool_gauges_move_as_requests_happen(
    metrics_client: AsyncTestClient[Litestar],
) -> None:
    before = await _scrape(metrics_client)
    for _ in range(3):
        assert (await metrics_client.get("/api/health/db")).status_code == 200
    assert (await metrics_client.get("/no/such/path")).status_code == 404
    after = await _scrape(metrics_client)

    labels = {"method": "GET", "route": "/api/health/db", "status": "200"}
    assert (
        _value(after, "zkeb_http_requests_total", **labels) - _value(before, "zkeb_http_requests_total", **labels) == 3
    )
    count = "zkeb_http_request_duration_seconds_count"
    assert _value(after, count, **labels) - _value(before, count, **labels) == 3
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert (
        _value(after, "zkeb_http_requests_total", **unmatched) - _value(before, "zkeb_http_requests_total", **unmatched)
        == 1
    )
    assert _value(after, "zkeb_db_pool_size") >= 1
    assert _value(after, "zkeb_db_pool_connections_max") == _value(after, "zkeb_db_pool_size")  # a fixed pool
    assert ("zkeb_db_pool_connections_in_use", ()) in after
    assert _value(after, "zkeb_process_resident_memory_bytes") > 0
    assert _value(after, "zkeb_cpu_limit_cores") > 0  # the CPU alert's denominator
    assert ("zkeb_tus_sessions_open", ()) in after
    for name in ("zkeb_backup_bytes_uploaded_total", "zkeb_backup_bytes_restored_total"):
        assert (name, ()) in after


async def test_a_method_a_client_invents_is_counted_as_other_and_mints_no_series(
    metrics_client: AsyncTestClient[Litestar],
) -> None:
    # Any client could add series without end (16 per invented method with the histogram's buckets).
    before = await _scrape(metrics_client)
    for method in ("XYZZY-1", "XYZZY-2"):
        response = await metrics_client.request(method, "/api/v1/projects")
        assert response.status_code in {404, 405}, (method, response.status_code)
    after = await _scrape(metrics_client)

    invented = [labels for (name, labels) in after if name.startswith("zkeb_http_") and "XYZZY" in str(labels)]
    assert invented == []
    counted = sum(
        _delta(before, after, "zkeb_http_requests_total", method="_OTHER", route=route, status=status)
        for route in ("/api/v1/projects", "unmatched")
        for status in ("404", "405")
    )
    assert counted == 2


async def test_the_pool_in_use_gauge_counts_connections_actually_checked_out(
    metrics_client: AsyncTestClient[Litestar],
) -> None:
    # It read 1 on an idle server (SQLAlchemy's checkin event fires before the connection is back in the pool):
    # with DB_POOL_SIZE=1 the pool-saturation alert would never clear.
    assert isinstance(metrics_client.app, Litestar)
    engine = get_runtime(metrics_client.app.state).engine
    assert (await metrics_client.get("/api/health/db")).status_code == 200
    # Start-up's background checks (the stored-keys check) hold a connection for a moment on a loaded machine:
    # the gauge must settle at 0 once they are done, which the old gauge never did.
    assert await _settled_pool_in_use(metrics_client) == 0
    with metrics_client.blocking_portal.wrap_async_context_manager(engine.connect()):
        assert _value(await _scrape(metrics_client), "zkeb_db_pool_connections_in_use") == 1
    assert await _settled_pool_in_use(metrics_client) == 0


async def _settled_pool_in_use(client: AsyncTestClient[Litestar]) -> float:
    """The in-use gauge once it reads 0, or its last reading after 10 seconds."""
    deadline = time.monotonic() + 10.0
    while True:
        value = _value(await _scrape(client), "zkeb_db_pool_connections_in_use")
        if value == 0 or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


async def test_backup_counters_move_as_a_backup_is_uploaded_refused_and_restored(
    metrics_client: AsyncTestClient[Litestar], base_settings_env: dict[str, str], database_url: str
) -> None:
    settings = make_settings(base_settings_env, DATABASE_URL=database_url)
    _, admin_key = await create_org(settings)
    project, project_key = await create_project_key(metrics_client, admin_key)
    device_id_hash, private_key = await enroll_device(metrics_client, admin_key, project["id"])
    payload = os.urandom(5000)
    body, _ = signed_envelope(project["id"], device_id_hash, private_key, payload)
    forged, _ = signed_envelope(project["id"], device_id_hash, private_key, payload)
    forged["signature"] = body["signature"]
    before = await _scrape(metrics_client)

    created = await metrics_client.post("/api/v1/backups", json=body, headers=auth(project_key))
    assert created.status_code == 201, created.text
    refused = await metrics_client.post("/api/v1/backups", json=forged, headers=auth(project_key))
    assert refused.status_code == 422
    restored = await metrics_client.get(f"/api/v1/backups/{created.json()['id']}/payload", headers=auth(project_key))
    assert restored.content == payload
    after = await _scrape(metrics_client)

    assert _delta(before, after, "zkeb_backups_created_total", method="single") == 1
    assert _delta(before, after, "zkeb_backups_failed_total", method="single", reason="signature") == 1
    assert _delta(before, after, "zkeb_backup_bytes_uploaded_total") == len(payload)
    assert _delta(before, after, "zkeb_backup_bytes_restored_total") == len(payload)
    assert _delta(before, after, "zkeb_backup_payload_size_bytes_count") == 1
    assert _delta(before, after, "zkeb_backup_payload_size_bytes_bucket", le="16384.0") == 1


async def test_a_restore_that_fails_after_its_status_is_an_error_in_the_metrics_the_span_and_the_access_log(
    base_settings_env: dict[str, str],
    database_url: str,
    owner_connection: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its status said 200, so it counted as one more success everywhere (an operator's review): error-rate alerts
    # and error-span queries missed restores that a server fault cut short.
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, METRICS_TOKEN=METRICS_TOKEN)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    try:
        with traced() as exporter:
            async with AsyncTestClient(app=create_app(settings)) as client:
                logging.getLogger().addHandler(handler)  # after the app configured logging
                caplog.set_level(logging.INFO, logger="zkeb.access")
                _, admin_key = await create_org(settings)
                payload = os.urandom(3 * 1024 * 1024)
                project_key, backup = await committed_backup(client, admin_key, payload)
                await owner_connection.execute(  # a chunk damaged at rest: the restore stops where it starts
                    "UPDATE backup_chunks SET data = overlay(data placing '\\x00'::bytea from 40 for 1) WHERE seq = 1"
                )
                before = await _scrape(client)
                exporter.clear()
                restore = await client.get(f"/api/v1/backups/{backup['id']}/payload", headers=auth(project_key))
                spans = exporter.get_finished_spans()
                after = await _scrape(client)
    finally:
        logging.getLogger().removeHandler(handler)
    route = "/api/v1/backups/{backup_id}/payload"
    access = [
        line
        for line in map(json.loads, stream.getvalue().splitlines())
        if line.get("logger") == "zkeb.access" and line.get("route") == route
    ]
    server = next(span for span in spans if span.kind == SpanKind.SERVER and span.name == f"GET {route}")

    assert restore.status_code == 200
    assert len(restore.content) < len(payload)
    assert _delta(before, after, "zkeb_http_responses_failed_total", route=route) == 1
    assert server.status.status_code == StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "StoredPayloadCorruptError"
    assert [(line["status"], line["failed"], line["incomplete"]) for line in access] == [
        (200, "StoredPayloadCorruptError", True)
    ]


async def test_tus_session_counters_move_when_an_upload_is_created(
    metrics_client: AsyncTestClient[Litestar], base_settings_env: dict[str, str], database_url: str
) -> None:
    settings = make_settings(base_settings_env, DATABASE_URL=database_url)
    _, admin_key = await create_org(settings)
    project, project_key = await create_project_key(metrics_client, admin_key)
    device_id_hash, private_key = await enroll_device(metrics_client, admin_key, project["id"])
    payload = os.urandom(2048)
    body, _ = signed_envelope(project["id"], device_id_hash, private_key, payload)

    def text(value: str) -> str:
        return base64.b64encode(value.encode()).decode()

    metadata = {key: body[key] for key in body if key not in {"payload", "container_id", "device_id_hash"}}
    metadata["backup_timestamp"] = text(body["backup_timestamp"])
    metadata["container_id"] = text(body["container_id"])
    metadata["device_id_hash"] = base64.b64encode(device_id_hash).decode()
    before = await _scrape(metrics_client)

    created = await metrics_client.post(
        "/api/v1/uploads",
        headers={
            **auth(project_key),
            "Tus-Resumable": "1.0.0",
            "Upload-Length": str(len(payload)),
            "Upload-Metadata": ",".join(f"{k} {v}" for k, v in metadata.items()),
        },
    )
    assert created.status_code == 201, created.text
    after = await _scrape(metrics_client)

    assert _delta(before, after, "zkeb_tus_sessions_created_total") == 1
    assert _value(after, "zkeb_tus_sessions_open") >= 1
