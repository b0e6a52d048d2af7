"""Registers the health domain's routes."""

from __future__ import annotations

from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from zkeb.domain.health.controllers import HealthController

__all__ = ("HealthPlugin",)


class HealthPlugin(InitPluginProtocol):
    """Health and version endpoints; they need no credential and are exempt from rate limits."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the health controller."""
        app_config.route_handlers.append(HealthController)
        return app_config
