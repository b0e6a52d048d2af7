"""tus-js-client in headless Chromium: a web app on an allowed origin uploads, resumes, terminates and restores.

The page (tests/js/browser) is served from its own origin, `http://127.0.0.1:<page port>`, which `CORS_ORIGINS`
lists; the API is granian on another port, on real PostgreSQL. The same page from `http://localhost:<page port>`,
an origin outside the list, is refused by the browser itself.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from backups_support import MIB, NOTHING_STORED, Tenant, device_token, make_tenant, row_counts, sign_envelope
from tus_js_support import JS_DIR, ensure_node_modules, fresh_profile, run_node, static_site

from chromium_support import chromium_executable

from support import Envelope, free_port, granian_server, make_settings


@dataclass(frozen=True)
class Site:
    """The test page's port and the API's base URL (whose CORS_ORIGINS lists only http://127.0.0.1:<port>)."""

    page_port: int
    api: str


@pytest.fixture
def site(base_settings_env: dict[str, str], database_url: str) -> Iterator[Site]:
    ensure_node_modules()
    chromium_executable()
    page_port = free_port()
    env = {**base_settings_env, "DATABASE_URL": database_url, "CORS_ORIGINS": f"http://127.0.0.1:{page_port}"}
    with granian_server(env) as api:
        yield Site(page_port, api)


@pytest.fixture
async def http(site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=site.api, timeout=60) as client:
        yield client


@pytest.fixture
async def tenant(http: httpx.AsyncClient, base_settings_env: dict[str, str], database_url: str) -> Tenant:
    return await make_tenant(http, make_settings(base_settings_env, DATABASE_URL=database_url))


def page_files(payloads: dict[str, bytes]) -> dict[str, tuple[str, bytes]]:
    browser = JS_DIR / "browser"
    files = {
        "/": ("text/html; charset=utf-8", (browser / "index.html").read_bytes()),
        "/scenario.js": ("text/javascript", (browser / "scenario.js").read_bytes()),
        "/tus.min.js": ("text/javascript", (JS_DIR / "node_modules/tus-js-client/dist/tus.min.js").read_bytes()),
    }
    files.update({f"/payload/{name}.bin": ("application/octet-stream", body) for name, body in payloads.items()})
    return files


def upload_job(name: str, envelope: Envelope) -> dict[str, Any]:
    return {"payloadPath": f"/payload/{name}.bin", "metadata": envelope.tus_text_metadata()}


async def run_page(site: Site, page_host: str, envelopes: dict[str, Envelope], scenario: dict[str, Any]) -> Any:
    files = page_files({name: envelope.payload for name, envelope in envelopes.items()})
    with static_site(files, site.page_port), fresh_profile() as profile:
        outcome = await run_node(
            "tus_browser_run.mjs",
            {
                "chromium": str(chromium_executable()),
                "userDataDir": profile,
                "pageUrl": f"http://{page_host}:{site.page_port}/",
                "scenario": {"api": site.api, "chunkSize": MIB, **scenario},
            },
        )
    assert outcome["ok"], outcome
    return outcome["result"]


async def test_a_page_on_an_allowed_origin_uploads_resumes_terminates_and_restores_a_blob(
    site: Site, http: httpx.AsyncClient, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    token = await device_token(http, tenant, tenant.device)
    main = sign_envelope(tenant, os.urandom(3 * MIB + 321))
    terminated = sign_envelope(tenant, os.urandom(2 * MIB + 5))
    result = await run_page(
        site,
        "127.0.0.1",
        {"main": main, "terminated": terminated},
        {"token": token, "main": upload_job("main", main), "terminated": upload_job("terminated", terminated)},
    )
    # The page's own OPTIONS reached the tus handler (not Litestar's CORS preflight answer) and could read its headers.
    discovery = result["discovery"]
    assert (discovery["status"], discovery["tusVersion"]) == (204, "1.0.0"), discovery
    assert int(discovery["tusMaxSize"]) > 0
    made = [(r["method"], r["offset"]) for r in result["requests"]]
    # Paused after the first chunk, resumed from the offset HEAD gave, completed; the other upload terminated.
    assert made[:4] == [("POST", None), ("PATCH", "0"), ("HEAD", None), ("PATCH", str(MIB))]
    assert ("DELETE", None) in made
    assert result["backupId"]
    assert result["terminatedStatus"] == 404
    sha256 = hashlib.sha256(main.payload).hexdigest()
    assert result["restore"] == {
        "status": 200,
        "sha256": sha256,
        "etag": f'"{sha256}"',
        "contentLength": str(len(main.payload)),
        "acceptRanges": "bytes",
    }
    half = len(main.payload) // 2
    assert result["resumedDownload"] == {
        "statuses": [206, 206],
        "contentRange": f"bytes {half}-{len(main.payload) - 1}/{len(main.payload)}",
        "sha256": sha256,
    }
    counts = await row_counts(owner_connection)
    assert (counts["backups"], counts["upload_sessions"]) == (1, 0)


async def test_the_same_page_on_an_origin_outside_the_list_is_refused_by_the_browser(
    site: Site, http: httpx.AsyncClient, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    token = await device_token(http, tenant, tenant.device)
    main = sign_envelope(tenant, os.urandom(MIB + 1))
    result = await run_page(
        site, "localhost", {"main": main}, {"token": token, "main": upload_job("main", main), "expectRefusal": True}
    )
    assert result["uploadOutcome"].startswith("tus: failed to create upload"), result
    assert result["fetchOutcome"] == "TypeError: Failed to fetch", result
    assert await row_counts(owner_connection) == NOTHING_STORED
