"""Registers the accounts domain: bearer authentication and the account routes."""

from __future__ import annotations

from typing import Any

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

_TAGS = [
    {"name": "auth", "description": "Device tokens from a proof of possession."},
    {"name": "projects", "description": "Projects, their API keys and devices (org admin)."},
    {"name": "api keys", "description": "Revoking API keys (org admin)."},
    {"name": "devices", "description": "Revoking devices (org admin)."},
]


def _add_accounts_openapi(document: dict[str, Any]) -> None:
    document["tags"].extend(dict(tag) for tag in _TAGS)


class AccountsPlugin(InitPluginProtocol):
    """Authentication for every domain's routes, plus organizations, projects, keys and devices."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the authentication middleware, the accounts controllers and their OpenAPI tags."""
        app_config.middleware.append(
            DefineMiddleware(
                BearerAuthenticationMiddleware,
                exclude=list(AUTH_EXCLUDED_PATHS),
                exclude_from_auth_key="exclude_from_auth",
            )
        )
        app_config.route_handlers.extend([ProjectController, ApiKeyController, DeviceController, AuthTokenController])
        app_config.state["runtime"].openapi_additions.append(_add_accounts_openapi)
        return app_config
