"""Registers the accounts domain: bearer authentication and the account routes."""

from __future__ import annotations

from litestar.config.app import AppConfig
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol

from zkeb.domain.accounts.authentication import AUTH_EXCLUDED_PATHS, BearerAuthenticationMiddleware
from zkeb.domain.accounts.controllers import (
    ApiKeyController,
    AuthTokenController,
    DeviceController,
    ProjectController,
)

__all__ = ("AccountsPlugin",)


class AccountsPlugin(InitPluginProtocol):
    """Authentication for every domain's routes, plus organizations, projects, keys and devices."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the authentication middleware and the accounts controllers."""
        app_config.middleware.append(
            DefineMiddleware(
                BearerAuthenticationMiddleware,
                exclude=list(AUTH_EXCLUDED_PATHS),
                exclude_from_auth_key="exclude_from_auth",
            )
        )
        app_config.route_handlers.extend([ProjectController, ApiKeyController, DeviceController, AuthTokenController])
        return app_config
