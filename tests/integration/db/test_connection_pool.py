"""The request pool is fixed: more concurrent requests than connections wait, and an exhausted pool answers 503."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from zkeb.app import create_app
from zkeb.core import database
from zkeb.core.runtime import get_runtime

from support import create_org, granian_server, make_settings, problem

_METRICS_TOKEN = "metrics-token-for-the-pool-test-0123456789"


def _connections_opened(metrics_text: str) -> float:
    samples = [
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "zkeb_db_connections_opened_total"
    ]
    assert samples, "zkeb_db_connections_opened_total is missing from /metrics"
    return samples[0]


async def test_more_concurrent_requests_than_connections_open_no_further_connection(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    # A real server (granian), so the requests really are concurrent: twelve at a time on a pool of two.
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, DB_POOL_SIZE="2")
    _, key = await create_org(settings)
    env = {**base_settings_env, "DATABASE_URL": database_url, "DB_POOL_SIZE": "2", "METRICS_TOKEN": _METRICS_TOKEN}
    with granian_server(env) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def burst() -> None:
                responses = await asyncio.gather(
                    *(http.get("/api/v1/projects", headers={"Authorization": f"Bearer {key}"}) for _ in range(12))
                )
                assert [r.status_code for r in responses] == [200] * 12

            async def opened() -> float:
                response = await http.get("/metrics", headers={"Authorization": f"Bearer {_METRICS_TOKEN}"})
                assert response.status_code == 200
                return _connections_opened(response.text)

            await burst()  # the pool is full from here on
            before = await opened()
            for _ in range(10):
                await burst()
            after = await opened()
    assert before <= 2
    assert after == before, "connections were opened again after the pool was full"


async def test_a_request_that_finds_no_free_connection_is_answered_503_with_retry_after(
    base_settings_env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "POOL_TIMEOUT_SECONDS", 0.5)
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, DB_POOL_SIZE="1")
    _, key = await create_org(settings)
    app = create_app(settings)
    engine = get_runtime(app.state).engine
    async with AsyncTestClient(app=app) as client:
        # The pool's only connection, checked out on the app's own event loop and held.
        with client.blocking_portal.wrap_async_context_manager(engine.connect()):
            response = await client.get("/api/v1/projects", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "busy" in problem(response)["detail"]
        again = await client.get("/api/v1/projects", headers={"Authorization": f"Bearer {key}"})
        assert again.status_code == 200
