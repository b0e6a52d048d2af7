"""Traces of real requests, captured with the SDK's in-memory exporter: span tree, propagation, no secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
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
    spans_by_id,
    traced,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode

from zkeb.app import create_app
from zkeb.core.audit_linker import AuditLinker
from zkeb.core.database import RUNTIME_ROLE
from zkeb.core.logging import JsonFormatter
from zkeb.core.runtime import get_runtime
from zkeb.core.telemetry import active_tracer_provider, install_tracer_provider, uninstall_tracer_provider
from zkeb.settings import Settings

from support import audit_linked, make_settings, problem

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def traced_client(settings: Settings) -> AsyncIterator[tuple[Client, InMemorySpanExporter]]:
    with traced() as exporter:
        async with AsyncTestClient(app=create_app(settings)) as client:
            yield client, exporter


async def test_authenticated_request_is_a_server_span_with_database_client_spans_beneath(
    traced_client: tuple[Client, InMemorySpanExporter], settings: Settings
) -> None:
    client, exporter = traced_client
    _, admin_key = await create_org(settings)
    exporter.clear()

    response = await client.get("/api/v1/projects", headers=auth(admin_key))

    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 1
    server = servers[0]
    assert server.name == "GET /api/v1/projects"
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/api/v1/projects"
    assert server.attributes.get("http.status_code", server.attributes.get("http.response.status_code")) == 200
    assert server.context is not None
    database = [s for s in spans if s.kind == SpanKind.CLIENT and (s.attributes or {}).get("db.system") == "postgresql"]
    assert database, [s.name for s in spans]
    by_id = spans_by_id(spans)
    for span in database:
        assert span.context is not None
        assert span.context.trace_id == server.context.trace_id
        # Walk up: every database span descends from the server span.
        parent = span.parent
        while parent is not None and parent.span_id != server.context.span_id:
            parent = by_id[parent.span_id].parent
        assert parent is not None, f"{span.name} is not under the server span"
    assert response.headers["traceresponse"].split("-")[1] == format(server.context.trace_id, "032x")


async def test_incoming_traceparent_is_continued_and_the_trace_id_is_in_problem_bodies(
    traced_client: tuple[Client, InMemorySpanExporter], settings: Settings
) -> None:
    client, exporter = traced_client
    _, admin_key = await create_org(settings)
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    exporter.clear()

    response = await client.get(
        f"/api/v1/projects/{uuid.uuid4()}",
        headers={**auth(admin_key), "traceparent": f"00-{trace_id}-{parent_id}-01"},
    )

    assert response.status_code == 404
    body = problem(response)
    assert body["trace_id"] == trace_id
    assert response.headers["traceresponse"].startswith(f"00-{trace_id}-")
    server = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    assert server.name == "GET /api/v1/projects/{project_id}"
    assert server.context is not None
    assert server.parent is not None
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == parent_id


async def test_with_tracing_off_every_request_still_carries_a_trace_context(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    _, admin_key = await create_org(settings)
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("zkeb.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        async with AsyncTestClient(app=create_app(settings)) as client:
            assert active_tracer_provider() is None
            continued = await client.get(
                f"/api/v1/projects/{uuid.uuid4()}",
                headers={**auth(admin_key), "traceparent": f"00-{trace_id}-{parent_id}-01"},
            )
            fresh = [await client.get(f"/api/v1/projects/{uuid.uuid4()}", headers=auth(admin_key)) for _ in range(2)]
            malformed = await client.get("/api/health/live", headers={"traceparent": f"00-{trace_id}-nothex-01"})
    finally:
        access.setLevel(level)
        access.removeHandler(handler)

    # An incoming trace is continued: its id in the problem body, a span id of this server's, nothing recorded.
    assert continued.status_code == 404
    assert problem(continued)["trace_id"] == trace_id
    version, response_trace_id, span_id, flags = continued.headers["traceresponse"].split("-")
    assert (version, response_trace_id, flags) == ("00", trace_id, "00")
    assert re.fullmatch("[0-9a-f]{16}", span_id)
    assert span_id != parent_id
    # Without one, each request starts a trace of its own.
    fresh_ids = [problem(response)["trace_id"] for response in fresh]
    assert all(re.fullmatch("[0-9a-f]{32}", value) for value in fresh_ids)
    assert fresh_ids[0] != fresh_ids[1]
    assert [response.headers["traceresponse"].split("-")[1] for response in fresh] == fresh_ids
    assert malformed.headers["traceresponse"].split("-")[1] not in {trace_id, *fresh_ids}
    # The access log line names the same trace and span.
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    line = next(line for line in lines if line.get("status") == 404 and line.get("trace_id") == trace_id)
    assert line["span_id"] == span_id


class _KeepAllButServerSpans(Sampler):
    """Drops SERVER spans and keeps every other span, whatever its parent says."""

    def should_sample(
        self, parent_context: Any, trace_id: int, name: str, kind: Any = None, *args: Any, **kwargs: Any
    ) -> SamplingResult:
        decision = Decision.DROP if kind == SpanKind.SERVER else Decision.RECORD_AND_SAMPLE
        return SamplingResult(decision)

    def get_description(self) -> str:
        return "KeepAllButServerSpans"


async def test_a_request_that_is_not_sampled_records_no_client_spans(settings: Settings) -> None:
    # Under the standard samplers a child of an unsampled span is dropped anyway; this sampler would keep the
    # database spans, so it shows that the instrumentations skip their work for a request that is not sampled.
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=_KeepAllButServerSpans())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _, admin_key = await create_org(settings)
    install_tracer_provider(provider)
    try:
        async with AsyncTestClient(app=create_app(settings)) as client:
            response = await client.get("/api/v1/projects", headers=auth(admin_key))
    finally:
        uninstall_tracer_provider()
    assert response.status_code == 200
    _, trace_id, _, flags = response.headers["traceresponse"].split("-")
    assert int(flags, 16) & 0x01 == 0  # the request's span is not sampled
    spans = exporter.get_finished_spans()
    assert spans, "the sampler keeps the app's other spans (start-up checks, sweepers)"
    assert [s.name for s in spans if s.context is not None and format(s.context.trace_id, "032x") == trace_id] == []


@pytest.mark.parametrize("variable", ["OTEL_PYTHON_EXCLUDED_URLS", "OTEL_PYTHON_LITESTAR_EXCLUDED_URLS"])
async def test_excluded_urls_make_no_spans_at_all_and_other_requests_stay_traced(
    base_settings_env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "/api/health/, unused-pattern")
    # No background maintenance pass, whose spans would land in the exporter at any moment.
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, MAINTENANCE_INTERVAL="0")
    _, admin_key = await create_org(settings)
    with traced() as exporter:
        async with AsyncTestClient(app=create_app(settings)) as client:
            exporter.clear()
            ready = await client.get("/api/health/ready")  # runs a SQL statement
            excluded_spans = exporter.get_finished_spans()
            listing = await client.get("/api/v1/projects", headers=auth(admin_key))
            spans = exporter.get_finished_spans()

    assert ready.status_code == 200
    assert "traceresponse" not in ready.headers
    assert [(s.kind, s.name) for s in excluded_spans] == []
    assert listing.status_code == 200
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    assert server.name == "GET /api/v1/projects"
    assert [s for s in spans if (s.attributes or {}).get("db.system") == "postgresql"]


async def test_a_method_a_client_invents_names_no_span(traced_client: tuple[Client, InMemorySpanExporter]) -> None:
    # Span names are low-cardinality: an invented method is `_OTHER` (HTTP conventions), kept as its original.
    client, exporter = traced_client
    exporter.clear()
    response = await client.request("XYZZY-42", "/api/v1/projects")
    servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]

    assert response.status_code in {404, 405}
    assert len(servers) == 1
    assert "XYZZY" not in servers[0].name
    assert servers[0].name.startswith("HTTP")
    attributes = servers[0].attributes or {}
    assert attributes["http.request.method"] == "_OTHER"
    assert attributes["http.request.method_original"] == "XYZZY-42"


async def test_background_work_starts_no_trace_of_a_single_statement(
    base_settings_env: dict[str, str], database_url: str, owner_connection: asyncpg.Connection
) -> None:
    # An operator's review counted 285 of 452 traces that were one statement each: the audit linker's poll, a
    # linking pass split into a trace per statement, the start-up check, the metrics sampler.
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, MAINTENANCE_INTERVAL="0")
    organization_id, admin_key = await create_org(settings)
    with traced() as exporter:
        async with AsyncTestClient(app=create_app(settings)) as client:
            await committed_backup(client, admin_key, b"a backup, audited")
            await audit_linked(owner_connection, organization_id)  # a linking pass ran

            async def sweep_a_while() -> None:  # in the app's event loop, through its (traced) engine
                # A linker sweeping every 50 ms for waiting events, as each process's does every few seconds.
                linker = AuditLinker(get_runtime(client.app.state).engine, sweep_interval=0.05)
                linker.start()
                await asyncio.sleep(0.3)
                await linker.stop()

            await asyncio.to_thread(client.blocking_portal.call, sweep_a_while)
        spans = exporter.get_finished_spans()

    roots = [span for span in spans if span.parent is None]
    assert {span.name for span in roots if span.kind != SpanKind.SERVER} <= {"audit.link"}, [
        (span.kind, span.name, (span.attributes or {}).get("db.statement"))
        for span in roots
        if span.kind != SpanKind.SERVER
    ]
    links = [span for span in roots if span.name == "audit.link"]
    assert links, "no linking pass was traced"
    assert any(span.parent is not None and span.parent.span_id == links[0].context.span_id for span in spans)


async def test_a_server_error_names_its_cause_on_the_server_span(
    traced_client: tuple[Client, InMemorySpanExporter], settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    # An operator's review: a handled 500 or 503 left the server span with only `error.type` = the status code; the
    # cause was in the log line alone.
    client, exporter = traced_client
    _, admin_key = await create_org(settings)
    await owner_connection.execute(f"REVOKE SELECT ON projects FROM {RUNTIME_ROLE}")
    try:
        exporter.clear()
        response = await client.get("/api/v1/projects", headers=auth(admin_key))
    finally:
        await owner_connection.execute(f"GRANT SELECT ON projects TO {RUNTIME_ROLE}")
    server = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)

    assert response.status_code == 500
    assert server.status.status_code == StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "InsufficientPrivilegeError"
    assert [event.name for event in server.events] == ["exception"]


async def test_backup_reads_on_the_driver_connection_show_their_database_time(
    traced_client: tuple[Client, InMemorySpanExporter], settings: Settings
) -> None:
    # An operator's review: a listing and an envelope read (raw asyncpg, no SQLAlchemy) had no database span, so
    # their database time was invisible in a trace.
    client, exporter = traced_client
    _, admin_key = await create_org(settings)
    project_key, backup = await committed_backup(client, admin_key, b"a backup to read")
    for url in ("/api/v1/backups", f"/api/v1/backups/{backup['id']}"):
        exporter.clear()
        response = await client.get(url, headers=auth(project_key))
        assert response.status_code == 200
        spans = exporter.get_finished_spans()
        server = next(s for s in spans if s.kind == SpanKind.SERVER)
        database = [
            s
            for s in spans
            if s.kind == SpanKind.CLIENT
            and (s.attributes or {}).get("db.system") == "postgresql"
            and s.parent is not None
            and server.context is not None
            and s.parent.span_id == server.context.span_id
        ]
        assert [s.name for s in database] == ["postgresql.transaction"], (url, [(s.kind, s.name) for s in spans])


async def test_redis_commands_are_client_spans_of_the_request(
    base_settings_env: dict[str, str], database_url: str, redis_url: str
) -> None:
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, REDIS_URL=redis_url)
    with traced() as exporter:
        async with AsyncTestClient(app=create_app(settings)) as client:
            exporter.clear()
            response = await client.get("/api/health/redis")
        spans = exporter.get_finished_spans()
    assert response.status_code == 200
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 1, [(s.kind, s.name) for s in spans]
    server = servers[0]
    redis_spans = [s for s in spans if (s.attributes or {}).get("db.system") == "redis"]
    assert redis_spans
    assert server.context is not None
    assert all(s.parent is not None and s.parent.span_id == server.context.span_id for s in redis_spans)


async def test_no_span_or_log_line_carries_an_api_key_token_or_signature(
    traced_client: tuple[Client, InMemorySpanExporter], settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    from zkeb.lib.envelope import auth_message  # noqa: PLC0415

    client, exporter = traced_client
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        _, admin_key = await create_org(settings)
        project, project_key = await create_project_key(client, admin_key)
        private_key = Ed25519PrivateKey.generate()
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: PLC0415

        public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        device_id_hash = uuid.uuid4().bytes * 2
        import base64  # noqa: PLC0415
        import time  # noqa: PLC0415

        enrolled = await client.post(
            f"/api/v1/projects/{project['id']}/devices",
            json={
                "device_id_hash": device_id_hash.hex(),
                "public_key": base64.b64encode(public_key).decode(),
                "label": "x",
            },
            headers=auth(admin_key),
        )
        assert enrolled.status_code == 201, enrolled.text
        timestamp_ms = int(time.time() * 1000)
        signature = private_key.sign(
            auth_message(project_id=uuid.UUID(project["id"]), device_id_hash=device_id_hash, timestamp_ms=timestamp_ms)
        )
        signature_b64 = base64.b64encode(signature).decode()
        issued = await client.post(
            "/api/v1/auth/token",
            json={
                "project_id": project["id"],
                "device_id_hash": device_id_hash.hex(),
                "timestamp_ms": timestamp_ms,
                "signature": signature_b64,
            },
        )
        assert issued.status_code == 200, issued.text
        token = issued.json()["access_token"]
        assert (await client.get("/api/v1/projects", headers=auth(project_key))).status_code in {200, 404}
        assert (await client.get(f"/api/v1/backups/{uuid.uuid4()}", headers=auth(token))).status_code in {404, 405}
        # A wrong key is refused; it must not be echoed anywhere either.
        wrong_key = project_key[:-6] + "AAAAAA"
        assert (await client.get("/api/v1/projects", headers=auth(wrong_key))).status_code == 401
    finally:
        logging.getLogger().removeHandler(handler)

    secrets = {
        "admin key": admin_key,
        "project key": project_key,
        "wrong key": wrong_key,
        "device token": token,
        "signature (base64)": signature_b64,
        "signature (hex)": signature.hex(),
        "token signature part": token.rsplit(".", 1)[1],
    }
    spans = exporter.get_finished_spans()
    assert any(s.kind == SpanKind.SERVER for s in spans)
    span_text = json.dumps(
        [
            {
                "name": s.name,
                "attributes": dict(s.attributes or {}),
                "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in s.events],
                "resource": dict(s.resource.attributes),
            }
            for s in spans
        ],
        default=str,
    )
    log_text = stream.getvalue() + "\n".join(r.getMessage() + json.dumps(vars(r), default=str) for r in caplog.records)
    assert "zkeb.access" in log_text  # the access log did run
    for label, secret in secrets.items():
        assert secret not in span_text, f"{label} found in a span"
        assert secret not in log_text, f"{label} found in a log line"


async def test_a_credential_a_client_puts_in_the_path_a_header_or_a_field_name_reaches_no_span_audit_event_or_error(
    traced_client: tuple[Client, InMemorySpanExporter], settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    client, exporter = traced_client
    _, admin_key = await create_org(settings)
    project, project_key = await create_project_key(client, admin_key)

    in_path = await client.get(
        f"/api/v1/backups/{project_key}", headers={**auth(project_key), "X-Request-Id": admin_key}
    )
    created = await client.post(
        f"/api/v1/projects/{project['id']}/api-keys",
        json={"name": "second"},
        headers={**auth(admin_key), "User-Agent": f"agent/1 {project_key}", "X-Request-Id": project_key},
    )
    as_field_name = await client.post(
        "/api/v1/backups",
        content=msgspec.msgpack.encode({project_key: 1}),
        headers={**auth(project_key), "Content-Type": "application/msgpack"},
    )

    assert (in_path.status_code, created.status_code, as_field_name.status_code) == (404, 201, 422)
    assert in_path.headers["x-request-id"] != admin_key
    assert created.headers["x-request-id"] != project_key
    assert "unknown field `[REDACTED]`" in problem(as_field_name)["detail"]
    events = await owner_connection.fetch("SELECT request_id, user_agent, details::text FROM audit_events")
    assert any(row["user_agent"] == "agent/1 [REDACTED]" for row in events)
    spans = json.dumps([dict(span.attributes or {}) for span in exporter.get_finished_spans()])
    assert "/api/v1/backups/[REDACTED]" in spans
    for text in (in_path.text, as_field_name.text, spans, json.dumps([dict(row) for row in events])):
        assert project_key not in text
        assert admin_key not in text


async def test_upload_and_restore_are_server_spans_over_phase_spans_over_database_spans_with_no_payload_or_signature(
    traced_client: tuple[Client, InMemorySpanExporter], settings: Settings
) -> None:
    client, exporter = traced_client
    _, admin_key = await create_org(settings)
    project, project_key = await create_project_key(client, admin_key)
    device_id_hash, private_key = await enroll_device(client, admin_key, project["id"])
    payload = os.urandom(3000)
    body, signature = signed_envelope(project["id"], device_id_hash, private_key, payload)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        exporter.clear()
        created = await client.post("/api/v1/backups", json=body, headers=auth(project_key))
        assert created.status_code == 201, created.text
        upload_spans = exporter.get_finished_spans()
        exporter.clear()
        restored = await client.get(f"/api/v1/backups/{created.json()['id']}/payload", headers=auth(project_key))
        assert restored.status_code == 200
        assert restored.content == payload
        restore_spans = exporter.get_finished_spans()
    finally:
        logging.getLogger().removeHandler(handler)

    by_id = spans_by_id(upload_spans)
    server = next(s for s in upload_spans if s.kind == SpanKind.SERVER)
    assert server.name == "POST /api/v1/backups"
    assert server.context is not None
    phases = {s.name: s for s in upload_spans if s.name.startswith("backups.")}
    assert {"backups.receive", "backups.verify_signature", "backups.commit"} <= phases.keys()
    for phase in ("backups.receive", "backups.commit"):
        parent = phases[phase].parent
        assert parent is not None
        assert parent.span_id == server.context.span_id, phase
    commit = phases["backups.commit"]
    assert commit.context is not None
    # A backup in memory is admitted, verified and stored in the commit's one transaction (docs/backups-commit.md):
    # the commit's one `postgresql.transaction` span (a raw asyncpg connection), and the phases beneath it.
    [transaction] = [s for s in upload_spans if s.parent is not None and s.parent.span_id == commit.context.span_id]
    assert transaction.name == "postgresql.transaction"
    assert transaction.context is not None
    assert (commit.attributes or {})["zkeb.backup_id"] == created.json()["id"]
    under_transaction = {
        s.name for s in upload_spans if s.parent is not None and s.parent.span_id == transaction.context.span_id
    }
    assert {"backups.verify_signature", "backups.store"} <= under_transaction, under_transaction
    assert all(s.context is not None and s.context.trace_id == server.context.trace_id for s in by_id.values())

    restore_server = next(s for s in restore_spans if s.kind == SpanKind.SERVER)
    assert restore_server.name == "GET /api/v1/backups/{backup_id}/payload"
    assert any(s.name == "backups.send" for s in restore_spans)

    span_text = json.dumps(
        [{"name": s.name, "attributes": dict(s.attributes or {})} for s in (*upload_spans, *restore_spans)],
        default=str,
    )
    log_text = stream.getvalue()
    for secret in (body["payload"], payload[:32].hex(), body["signature"], signature.hex(), project_key):
        assert secret not in span_text
        assert secret not in log_text


async def test_a_malformed_baggage_header_writes_no_log_line(
    client: AsyncTestClient[Litestar], caplog: pytest.LogCaptureFixture
) -> None:
    # OpenTelemetry's propagator warns about each bad entry and echoes the header: a few KiB of log per request that
    # any client could send. The request itself is answered as usual.
    hostile = "=;" * 2000
    with caplog.at_level(logging.DEBUG, logger="zkeb"):
        response = await client.get("/api/v1/no-such-route", headers={"baggage": hostile})
    assert response.status_code == 404
    assert not [record for record in caplog.records if record.name.startswith("opentelemetry")]
    assert not [record for record in caplog.records if hostile[:40] in record.getMessage()]


async def test_a_server_span_names_its_query_host_peer_and_agent_and_a_5xx_its_error_type(
    traced_client: tuple[Client, InMemorySpanExporter], settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    # An operator review: server spans had no `url.query`, `server.address`, peer or `user_agent.original`, and a
    # 5xx span no `error.type` (conditionally required by the HTTP semantic conventions).
    client, exporter = traced_client
    _, admin_key = await create_org(settings)
    project, project_key = await create_project_key(client, admin_key)
    device_id_hash, private_key = await enroll_device(client, admin_key, project["id"])
    body, _ = signed_envelope(project["id"], device_id_hash, private_key, os.urandom(3000))
    created = await client.post("/api/v1/backups", json=body, headers=auth(project_key))
    payload_id = await owner_connection.fetchval(
        "SELECT payload_id FROM backups WHERE id = $1", uuid.UUID(created.json()["id"])
    )
    await owner_connection.execute("DELETE FROM backup_chunks WHERE payload_id = $1", payload_id)  # damaged at rest
    exporter.clear()

    listed = await client.get(
        f"/api/v1/backups?limit=5&note={project_key}", headers={**auth(project_key), "User-Agent": "zkeb-client/1.0"}
    )
    damaged = await client.get(f"/api/v1/backups/{created.json()['id']}/payload", headers=auth(project_key))

    assert (listed.status_code, damaged.status_code) == (200, 500)
    by_route = {
        span.name: dict(span.attributes or {}) for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER
    }
    listing = by_route["GET /api/v1/backups"]
    assert listing["url.query"] == "limit=5&note=[REDACTED]"
    assert listing["user_agent.original"] == "zkeb-client/1.0"
    assert listing["server.address"] == client.base_url.host
    assert isinstance(listing["network.peer.address"], str)
    assert "error.type" not in listing
    assert by_route["GET /api/v1/backups/{backup_id}/payload"]["error.type"] == "500"
