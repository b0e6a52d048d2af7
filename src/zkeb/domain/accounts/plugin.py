"""Registers the accounts domain: bearer authentication and the account routes."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.config.app import AppConfig
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol

from zkeb.core.openapi import Link, add_links
from zkeb.domain.accounts.authentication import AUTH_EXCLUDED_PATHS, BearerAuthenticationMiddleware
from zkeb.domain.accounts.controllers import (
    ApiKeyController,
    AuthTokenController,
    DeviceController,
    ProjectController,
)
from zkeb.domain.accounts.deps import dependencies
from zkeb.domain.accounts.schemas import request_bodies

__all__ = ("AccountsPlugin",)

_TAGS = [
    {"name": "auth", "description": "Device tokens from a proof of possession."},
    {"name": "projects", "description": "Projects, their API keys and devices (org admin)."},
    {"name": "api keys", "description": "Revoking API keys (org admin)."},
    {"name": "devices", "description": "Revoking devices (org admin)."},
]


_PROJECTS = "/api/v1/projects"
_PROJECT = "/api/v1/projects/{project_id}"
_API_KEYS = "/api/v1/projects/{project_id}/api-keys"
_DEVICES = "/api/v1/projects/{project_id}/devices"
#: What uses a project's id: its own operations, its keys and its devices.
_PROJECT_USES = {
    "GetProject": ("get", _PROJECT),
    "UpdateProject": ("patch", _PROJECT),
    "ListApiKeys": ("get", _API_KEYS),
    "CreateApiKey": ("post", _API_KEYS),
    "ListDevices": ("get", _DEVICES),
    "EnrollDevice": ("post", _DEVICES),
}


def _accounts_links() -> list[Link]:
    """Links from each created (or listed) project, key and device to the operations that take its id."""
    links = [
        Link(name, ("post", _PROJECTS, "201"), target, {"project_id": "$response.body#/id"}, "The new project.")
        for name, target in _PROJECT_USES.items()
    ]
    links += [
        Link(name, ("get", _PROJECTS, "200"), target, {"project_id": "$response.body#/items/0/id"}, "The first one.")
        for name, target in _PROJECT_USES.items()
    ]
    for collection, item, name, parameter in (
        (_API_KEYS, "/api/v1/api-keys/{key_id}", "RevokeApiKey", "key_id"),
        (_DEVICES, "/api/v1/devices/{device_id}", "RevokeDevice", "device_id"),
    ):
        links.append(Link(name, ("post", collection, "201"), ("delete", item), {parameter: "$response.body#/id"}))
        links.append(
            Link(name, ("get", collection, "200"), ("delete", item), {parameter: "$response.body#/items/0/id"})
        )
    return links


def _add_accounts_openapi(document: dict[str, Any]) -> None:
    document["tags"].extend(dict(tag) for tag in _TAGS)
    add_links(document, _accounts_links())
    _complete_body_schemas(document["components"]["schemas"])


def _complete_body_schemas(schemas: dict[str, Any]) -> None:
    """Make each request body's schema say what the server enforces, where Litestar's generation leaves it out.

    Unknown fields are refused (`forbid_unknown_fields`): `additionalProperties: false`. Integer bounds come from
    the fields' `msgspec.Meta` exactly: Litestar drops a bound of 0 (it tests the value's truth) and writes the
    others as floats, so `2**63 - 1` read as 9223372036854775808.0, a value the server refuses.
    """
    for body in request_bodies():
        schema = schemas.get(body.__name__)
        if schema is None:
            continue
        schema["additionalProperties"] = False
        info = msgspec.inspect.type_info(body)
        for field in info.fields if isinstance(info, msgspec.inspect.StructType) else ():
            prop = schema.get("properties", {}).get(field.encode_name)
            declared = field.type.type if isinstance(field.type, msgspec.inspect.Metadata) else field.type
            types = declared.types if isinstance(declared, msgspec.inspect.UnionType) else (declared,)
            for described in types:
                kind = described.type if isinstance(described, msgspec.inspect.Metadata) else described
                if prop is not None and isinstance(kind, msgspec.inspect.IntType):
                    if kind.ge is not None:
                        prop["minimum"] = kind.ge
                    if kind.le is not None:
                        prop["maximum"] = kind.le


class AccountsPlugin(InitPluginProtocol):
    """Authentication for every domain's routes, plus organizations, projects, keys and devices."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the authentication middleware, the accounts controllers, their service providers and OpenAPI tags."""
        app_config.middleware.append(
            DefineMiddleware(
                BearerAuthenticationMiddleware,
                exclude=list(AUTH_EXCLUDED_PATHS),
                exclude_from_auth_key="exclude_from_auth",
            )
        )
        app_config.route_handlers.extend([ProjectController, ApiKeyController, DeviceController, AuthTokenController])
        app_config.dependencies.update(dependencies())
        app_config.state["runtime"].openapi_additions.append(_add_accounts_openapi)
        return app_config
