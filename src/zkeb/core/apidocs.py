"""The API reference pages: Scalar at `/schema/scalar`, loaded from this package, never from a CDN.

`static/scalar/api-reference.js` is Scalar's standalone bundle at the version `scripts/scalar/package-lock.json`
pins, copied by `scripts/scalar/vendor.sh` (which checks the tarball against the lock's integrity). Serving it
ourselves keeps a third-party script that the lock does not pin off this page, and the page working where no CDN is
reachable. The bundle carries its own styles; the page asks for no web fonts, telemetry or hosted services, so it loads
nothing from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from litestar.datastructures import CacheControlHeader
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.router import Router
from litestar.static_files import create_static_files_router

__all__ = ("SCALAR_ASSETS_PATH", "SCALAR_BUNDLE", "SCALAR_PAGE_PATH", "scalar_assets_router", "scalar_render_plugin")

SCALAR_ASSETS_PATH = "/schema/assets/scalar"
#: Where the page is served (the OpenAPI config's `/schema` and the plugin's path).
SCALAR_PAGE_PATH = "/schema/scalar"
SCALAR_BUNDLE = Path(__file__).parent / "static" / "scalar" / "api-reference.js"
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
        js_url=f"{SCALAR_ASSETS_PATH}/{SCALAR_BUNDLE.name}",
        css_url=_NO_STYLESHEET,
        favicon="",
        options=SCALAR_OPTIONS,
    )


def scalar_assets_router() -> Router:
    """Serves the packaged bundle (outside the OpenAPI document, with no credential, as the page is)."""
    return create_static_files_router(
        path=SCALAR_ASSETS_PATH,
        directories=[SCALAR_BUNDLE.parent],
        name="scalar-assets",
        cache_control=CacheControlHeader(public=True, max_age=3600),
        opt={"exclude_from_auth": True, "exclude_from_rate_limit": True},
    )
