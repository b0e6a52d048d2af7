"""The API reference pages: Scalar at `/schema/scalar`, loaded from this package, never from a CDN.

`static/scalar/api-reference.js.gz` is Scalar's standalone bundle at the version `scripts/scalar/package-lock.json`
pins, copied and gzipped by `scripts/scalar/vendor.sh` (which checks the tarball against the lock's integrity).
Serving it ourselves keeps a third-party script that the lock does not pin off this page, and the page working where
no CDN is reachable. The bundle carries its own styles; the page asks for no web fonts, telemetry or hosted services,
so it loads nothing from elsewhere.

The package holds the bundle gzipped only (1.4 MB instead of 4.9 MB in the image): a client that accepts gzip, as every
browser does, gets those bytes as they are (`Content-Encoding: gzip`); any other gets them decompressed.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path
from typing import Annotated

from litestar import HttpMethod, Response, Router, route
from litestar.datastructures import CacheControlHeader
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.params import HeaderParameter

from zkeb.lib.negotiation import accepts_gzip

__all__ = (
    "SCALAR_ASSETS_PATH",
    "SCALAR_BUNDLE",
    "SCALAR_BUNDLE_NAME",
    "SCALAR_PAGE_PATH",
    "scalar_assets_router",
    "scalar_bundle",
    "scalar_render_plugin",
)

SCALAR_ASSETS_PATH = "/schema/assets/scalar"
#: Where the page is served (the OpenAPI config's `/schema` and the plugin's path).
SCALAR_PAGE_PATH = "/schema/scalar"
#: The bundle's name in its URL, and the file that holds it gzipped.
SCALAR_BUNDLE_NAME = "api-reference.js"
SCALAR_BUNDLE = Path(__file__).parent / "static" / "scalar" / f"{SCALAR_BUNDLE_NAME}.gz"
_JAVASCRIPT = "text/javascript; charset=utf-8"
#: An empty stylesheet: Litestar's page links one (by default its theme, from a CDN); the bundle styles itself.
_NO_STYLESHEET = "data:text/css,"
#: Scalar's options: no web fonts, no telemetry (on by default), none of its hosted services' buttons (developer
#: tools, the AI agent, MCP), which would call scalar.com; the page's Content-Security-Policy would block them anyway.
SCALAR_OPTIONS = {
    "withDefaultFonts": False,
    "telemetry": False,
    "showDeveloperTools": "never",
    "agent": {"disabled": True},
    "mcp": {"disabled": True},
}


def scalar_render_plugin() -> ScalarRenderPlugin:
    """Litestar's Scalar page, pointed at the packaged bundle, with no CDN stylesheet, favicon or fonts."""
    return ScalarRenderPlugin(
        path=SCALAR_PAGE_PATH.removeprefix("/schema"),
        js_url=f"{SCALAR_ASSETS_PATH}/{SCALAR_BUNDLE_NAME}",
        css_url=_NO_STYLESHEET,
        favicon="",
        options=SCALAR_OPTIONS,
    )


@cache
def _gzipped_bundle() -> bytes:
    return SCALAR_BUNDLE.read_bytes()


@cache
def scalar_bundle() -> bytes:
    """Scalar's bundle as its tarball ships it (decompressed once a process, for the first client that needs it)."""
    return gzip.decompress(_gzipped_bundle())


# Sync, in a worker thread: the first request of a process reads the file (and may decompress it). HEAD as the static
# files router answered it: the same headers, no body.
@route(
    f"/{SCALAR_BUNDLE_NAME}",
    http_method=[HttpMethod.GET, HttpMethod.HEAD],
    sync_to_thread=True,
    include_in_schema=False,
    name="scalar-bundle",
)
def _bundle(
    accept_encoding: Annotated[str | None, HeaderParameter(name="accept-encoding", required=False)] = None,
) -> Response[bytes]:
    if accepts_gzip(accept_encoding):
        return Response(
            _gzipped_bundle(), media_type=_JAVASCRIPT, headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        )
    return Response(scalar_bundle(), media_type=_JAVASCRIPT, headers={"Vary": "Accept-Encoding"})


def scalar_assets_router() -> Router:
    """Serves the packaged bundle (outside the OpenAPI document, with no credential, as the page is)."""
    return Router(
        path=SCALAR_ASSETS_PATH,
        route_handlers=[_bundle],
        cache_control=CacheControlHeader(public=True, max_age=3600),
        opt={"exclude_from_auth": True, "exclude_from_rate_limit": True},
    )
