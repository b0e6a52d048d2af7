"""The ASGI application factory: `granian --interface asgi --factory zkeb.app:create_app`."""

from __future__ import annotations

from litestar import Litestar
from litestar.types import ASGIApp

from zkeb.core import CorePlugin
from zkeb.core.connection import RequestBodyMiddleware
from zkeb.core.head import HeadAsGetMiddleware
from zkeb.core.requestid import RequestIdMiddleware
from zkeb.core.security import CorsOptionsMiddleware, SecurityHeadersMiddleware
from zkeb.domain.accounts import AccountsPlugin
from zkeb.domain.audit import AuditPlugin
from zkeb.domain.backups import BackupsPlugin
from zkeb.domain.health import HealthPlugin
from zkeb.settings import Settings, get_settings

__all__ = ("create_app",)


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the ZKEB app: the core plugin and, through it, one plugin per domain."""
    settings = settings or get_settings()
    app = Litestar(
        plugins=[CorePlugin(settings, domains=[HealthPlugin(), AccountsPlugin(), AuditPlugin(), BackupsPlugin()])],
        debug=False,
    )
    handler: ASGIApp = HeadAsGetMiddleware(app.asgi_handler, app)
    if app.cors_config is not None:
        handler = CorsOptionsMiddleware(handler, app.cors_config)
    # Outermost, so routing errors (404, 405) carry the request id and the security headers too.
    app.asgi_handler = RequestBodyMiddleware(
        SecurityHeadersMiddleware(RequestIdMiddleware(handler), settings), settings
    )
    return app
