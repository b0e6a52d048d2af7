"""The core plugin: shared infrastructure, plus the list of domain plugins (and nothing of their insides)."""

from __future__ import annotations

from collections.abc import Sequence

from advanced_alchemy.extensions.litestar import SQLAlchemyPlugin
from litestar.config.app import AppConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, Server
from litestar.plugins import InitPluginProtocol

from zkeb.core.allow import complete_allow
from zkeb.core.apidocs import scalar_assets_router, scalar_render_plugin
from zkeb.core.auth import CREDENTIAL_SCHEMES
from zkeb.core.database import create_app_engine
from zkeb.core.errors import BoundedRequest, exception_handlers
from zkeb.core.logging import configure_logging, install_access_log, log_format
from zkeb.core.metrics import install_metrics, observe_request
from zkeb.core.migrations import start_embedded_postgres
from zkeb.core.openapi import ZkebOpenAPIJson
from zkeb.core.ratelimit import rate_limit_middleware
from zkeb.core.redis import create_redis
from zkeb.core.runtime import Runtime
from zkeb.core.security import cors_config
from zkeb.core.telemetry import instrument_app
from zkeb.core.tenancy import install_tenant_setter
from zkeb.settings import Settings

__all__ = ("CorePlugin",)

API_DESCRIPTION = """\
ZKEB stores client-side encrypted backups. Devices encrypt locally and upload only ciphertext, an
encrypted metadata blob and an Ed25519 signature; ZKEB verifies the signature before a backup becomes
visible and streams the ciphertext back on restore. Errors are RFC 9457 `application/problem+json`.

The normative protocol (envelope, field encodings, the signed messages with test vectors, device tokens, tus
uploads, restores, status codes and errors) is `docs/protocol.md` in the ZKEB repository.
"""


class CorePlugin(InitPluginProtocol):
    """Wires settings, database, Redis, errors, request ids and OpenAPI, then adds each domain plugin."""

    def __init__(self, settings: Settings, domains: Sequence[InitPluginProtocol]) -> None:
        self.settings = settings
        self.domains = tuple(domains)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Configure the app; domain plugins run after this one and add their own routes."""
        settings = self.settings
        configure_logging(settings.log_level, log_format(settings.env))
        app_config.logging_config = None  # Litestar's default would replace the root handler configured above
        install_tenant_setter()
        url = settings.database_url or start_embedded_postgres(settings.data_dir)
        engine = create_app_engine(settings, url)
        runtime = Runtime(settings=settings, database_url=url, engine=engine, redis=create_redis(settings))
        app_config.state["runtime"] = runtime
        app_config.on_startup.append(runtime.startup)
        # Shutdown hooks run in list order. Domain plugins come after this one and insert their hooks at the front
        # (`on_shutdown.insert(0, ...)`), so everything that still needs the database stops before this releases it.
        app_config.on_shutdown.append(runtime.shutdown)
        app_config.exception_handlers = {**exception_handlers(), **app_config.exception_handlers}
        app_config.request_class = BoundedRequest
        app_config.openapi_config = OpenAPIConfig(
            title="ZKEB API",
            version=settings.version,
            description=API_DESCRIPTION,
            path="/schema",
            render_plugins=[scalar_render_plugin(), SwaggerRenderPlugin(), ZkebOpenAPIJson()],
            servers=[Server(url="/", description="This server")],
            components=Components(security_schemes=dict(CREDENTIAL_SCHEMES)),
        )
        app_config.route_handlers.append(scalar_assets_router())
        app_config.plugins.append(SQLAlchemyPlugin(config=runtime.db_config))
        instrument_app(app_config, settings, engine, runtime.redis)
        install_metrics(app_config, runtime)
        install_access_log(app_config, on_complete=[observe_request])
        app_config.cors_config = cors_config(settings)
        app_config.before_send.append(complete_allow)
        # Before the domains' middleware, so it runs ahead of authentication (see zkeb.core.ratelimit).
        app_config.middleware.extend(rate_limit_middleware(settings, runtime.redis))
        app_config.plugins.extend(self.domains)
        return app_config
