"""Helpers for the observability tests: an in-memory span exporter installed for one test, accounts over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import async_sessionmaker

from zkeb.core.database import create_app_engine
from zkeb.core.telemetry import install_tracer_provider, uninstall_tracer_provider
from zkeb.core.tenancy import install_tenant_setter
from zkeb.domain.accounts.services import OrganizationService
from zkeb.settings import Settings

__all__ = ("auth", "create_org", "create_project_key", "spans_by_id", "traced")

Client = AsyncTestClient[Litestar]

_exporter = InMemorySpanExporter()
_provider = TracerProvider(resource=Resource.create({"service.name": "zkeb-test"}))
_provider.add_span_processor(SimpleSpanProcessor(_exporter))


@contextmanager
def traced() -> Iterator[InMemorySpanExporter]:
    """Apps created inside the block trace into the returned in-memory exporter (emptied first)."""
    _exporter.clear()
    install_tracer_provider(_provider)
    try:
        yield _exporter
    finally:
        uninstall_tracer_provider()
        _exporter.clear()


def spans_by_id(spans: tuple[ReadableSpan, ...]) -> dict[int, ReadableSpan]:
    """Spans keyed by span id."""
    return {span.context.span_id: span for span in spans if span.context is not None}


def auth(credential: str) -> dict[str, str]:
    """The Authorization header for a bearer credential."""
    return {"Authorization": f"Bearer {credential}"}


async def create_org(settings: Settings, name: str | None = None) -> tuple[uuid.UUID, str]:
    """A new organization and its org admin key, as `zkeb admin create-org` makes them."""
    assert settings.database_url is not None
    install_tenant_setter()
    engine = create_app_engine(settings, settings.database_url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            organization, admin_key = await OrganizationService(session=session).create_with_admin_key(
                name or f"org-{uuid.uuid4().hex[:8]}", salt=settings.secrets.api_key_salt, settings=settings
            )
    finally:
        await engine.dispose()
    return organization.id, admin_key.key


async def create_project_key(client: Client, admin_key: str) -> tuple[dict[str, Any], str]:
    """A project and one project API key for it, over HTTP."""
    project = await client.post("/api/v1/projects", json={"name": "telemetry"}, headers=auth(admin_key))
    assert project.status_code == 201, project.text
    body: dict[str, Any] = project.json()
    key = await client.post(f"/api/v1/projects/{body['id']}/api-keys", json={"name": "ci"}, headers=auth(admin_key))
    assert key.status_code == 201, key.text
    secret: str = key.json()["key"]
    return body, secret
