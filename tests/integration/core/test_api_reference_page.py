"""The Scalar API reference loads the bundle shipped in the package and renders with no network at all."""

from __future__ import annotations

import re
import subprocess
import tempfile

from litestar import Litestar
from litestar.testing import AsyncTestClient

from chromium_support import chromium_executable
from zkeb.core.apidocs import SCALAR_ASSETS_PATH, SCALAR_BUNDLE, scalar_bundle

from support import granian_server

_URL_ATTRIBUTE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""")


async def test_scalar_page_loads_only_the_packaged_bundle(client: AsyncTestClient[Litestar]) -> None:
    page = await client.get("/schema/scalar")
    assert page.status_code == 200
    urls = _URL_ATTRIBUTE.findall(page.text)
    assert f"{SCALAR_ASSETS_PATH}/api-reference.js" in urls
    assert not [url for url in urls if "//" in url], urls  # nothing from another host: no CDN script, style or icon
    assert '"telemetry":false' in page.text  # Scalar's telemetry is on unless turned off
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self' 'unsafe-inline';" in policy  # this server's scripts only
    assert "connect-src 'self';" in policy
    assert "http" not in policy  # no other origin anywhere in the policy

    bundle = await client.get(f"{SCALAR_ASSETS_PATH}/api-reference.js")
    assert bundle.status_code == 200
    assert bundle.headers["content-type"].split(";")[0] in {"text/javascript", "application/javascript"}
    assert bundle.headers["x-content-type-options"] == "nosniff"
    assert bundle.content == scalar_bundle()
    assert (await client.get(f"{SCALAR_ASSETS_PATH}/../../../settings.py")).status_code == 404


async def test_scalar_bundle_is_sent_gzipped_as_stored_or_decompressed_for_a_client_without_gzip(
    client: AsyncTestClient[Litestar],
) -> None:
    stored = SCALAR_BUNDLE.read_bytes()
    gzipped = await client.get(f"{SCALAR_ASSETS_PATH}/api-reference.js", headers={"Accept-Encoding": "gzip, br"})
    assert gzipped.status_code == 200
    assert gzipped.headers["content-encoding"] == "gzip"
    assert gzipped.headers["vary"] == "Accept-Encoding"
    assert gzipped.headers["cache-control"] == "max-age=3600, public"
    assert int(gzipped.headers["content-length"]) == len(stored)  # the stored bytes, not compressed again
    assert gzipped.content == scalar_bundle()  # as the client decodes them
    head = await client.head(f"{SCALAR_ASSETS_PATH}/api-reference.js", headers={"Accept-Encoding": "gzip"})
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == len(stored)
    assert head.content == b""

    for refusing in ("identity", "gzip;q=0, br"):
        plain = await client.get(f"{SCALAR_ASSETS_PATH}/api-reference.js", headers={"Accept-Encoding": refusing})
        assert plain.status_code == 200
        assert "content-encoding" not in plain.headers
        assert plain.headers["vary"] == "Accept-Encoding"
        assert int(plain.headers["content-length"]) == len(scalar_bundle())
        assert plain.content == scalar_bundle()


def _render_offline(chromium: str, url: str) -> tuple[str, str]:
    """The DOM Chromium builds for `url` when every host but 127.0.0.1 fails to resolve, and Chromium's log."""
    with tempfile.TemporaryDirectory(prefix="zkeb-chromium-") as profile:
        result = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--virtual-time-budget=15000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def test_scalar_page_renders_the_api_in_headless_chromium_without_network(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    chromium = str(chromium_executable())
    with granian_server({**base_settings_env, "DATABASE_URL": database_url}) as url:
        dom, log = _render_offline(chromium, f"{url}/schema/scalar")
    # Scalar rendered the reference from /schema/openapi.json: the API's title as a heading (not only the page's
    # <title>), and the first operations by their summaries (it renders the rest as they scroll into view).
    assert re.search(r"<h1[^>]*>\s*ZKEB API", dom), dom[-2000:]
    assert "Overall health" in dom
    assert "Database probe" in dom
    # The page's Content-Security-Policy blocked nothing it needs (Chromium logs each violation to the console).
    assert "Content Security Policy" not in log, [line for line in log.splitlines() if "Content Security" in line]
