"""Request and response bodies of the accounts domain (msgspec structs, shapes fixed by DESIGN.md)."""

from __future__ import annotations

import datetime
from typing import Annotated, Literal
from uuid import UUID

import msgspec

__all__ = (
    "ApiKeyCreate",
    "ApiKeyCreated",
    "ApiKeyPage",
    "ApiKeyRead",
    "DeviceEnroll",
    "DevicePage",
    "DeviceRead",
    "ProblemDetails",
    "ProjectCreate",
    "ProjectPage",
    "ProjectRead",
    "ProjectUpdate",
    "TokenRequest",
    "TokenResponse",
    "request_bodies",
)

MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 50

# Bounds: a PostgreSQL BIGINT for bytes; a century for day counts; a million kept versions per device and container.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, description="1 to 200 characters")]
QuotaBytes = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1, description="bytes; null means unlimited")]
KeepLast = Annotated[
    int, msgspec.Meta(ge=1, le=1_000_000, description="newest N backups kept per device in each container")
]
Days = Annotated[int, msgspec.Meta(ge=1, le=36_500)]
MinAgeDays = Annotated[int, msgspec.Meta(ge=0, le=36_500)]
DeviceIdHashHex = Annotated[
    str,
    msgspec.Meta(
        pattern="^[0-9a-fA-F]{64}$",
        description="SHA-256 of the device identifier, 64 hex digits",
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],  # pragma: allowlist secret
    ),
]


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body: unknown fields are refused (422 naming the field) rather than silently ignored."""


def request_bodies() -> list[type[msgspec.Struct]]:
    """Every request body of the accounts API (their OpenAPI schemas are completed from them)."""
    return list(_Body.__subclasses__())


class ProjectCreate(_Body):
    """`POST /api/v1/projects`. An absent `storage_quota_bytes` takes `DEFAULT_PROJECT_QUOTA`."""

    name: Name
    storage_quota_bytes: QuotaBytes | msgspec.UnsetType | None = msgspec.UNSET
    retention_keep_last: KeepLast | None = None
    retention_days: Days | None = None
    append_only: bool = False
    append_only_min_age_days: MinAgeDays = 0


class ProjectUpdate(_Body):
    """`PATCH /api/v1/projects/{id}`: only the fields present change; null clears a limit."""

    name: Name | msgspec.UnsetType = msgspec.UNSET
    storage_quota_bytes: QuotaBytes | msgspec.UnsetType | None = msgspec.UNSET
    retention_keep_last: KeepLast | msgspec.UnsetType | None = msgspec.UNSET
    retention_days: Days | msgspec.UnsetType | None = msgspec.UNSET
    append_only: bool | msgspec.UnsetType = msgspec.UNSET
    append_only_min_age_days: MinAgeDays | msgspec.UnsetType = msgspec.UNSET


class ProjectRead(msgspec.Struct, kw_only=True):
    """A project and its storage policy."""

    id: UUID
    name: str
    organization_id: UUID
    created_at: datetime.datetime
    updated_at: datetime.datetime
    storage_quota_bytes: int | None
    used_bytes: int
    retention_keep_last: int | None
    retention_days: int | None
    append_only: bool
    append_only_min_age_days: int


class ProjectPage(msgspec.Struct, kw_only=True):
    """One page of projects, oldest first; pass `next_cursor` as `cursor` for the next page."""

    items: list[ProjectRead]
    next_cursor: str | None


class ApiKeyCreate(_Body):
    """`POST /api/v1/projects/{id}/api-keys`."""

    name: Name


class ApiKeyCreated(msgspec.Struct, kw_only=True):
    """A new key. `key` is shown this once; the server keeps only its HMAC."""

    id: UUID
    key: str
    name: str
    prefix: str
    project_id: UUID | None
    created_at: datetime.datetime


class ApiKeyRead(msgspec.Struct, kw_only=True):
    """A key as listed: never the key nor its hash."""

    id: UUID
    name: str
    prefix: str
    project_id: UUID | None
    created_at: datetime.datetime
    last_used_at: datetime.datetime | None
    revoked_at: datetime.datetime | None


class ApiKeyPage(msgspec.Struct, kw_only=True):
    """One page of a project's API keys, oldest first."""

    items: list[ApiKeyRead]
    next_cursor: str | None


class DeviceEnroll(_Body):
    """`POST /api/v1/projects/{id}/devices`."""

    device_id_hash: DeviceIdHashHex
    public_key: Annotated[str, msgspec.Meta(max_length=64, description="base64 of the 32-byte Ed25519 public key")]
    label: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class DeviceRead(msgspec.Struct, kw_only=True):
    """An enrolled device."""

    id: UUID
    device_id_hash: str
    public_key: str
    label: str | None
    project_id: UUID
    created_at: datetime.datetime
    revoked_at: datetime.datetime | None


class DevicePage(msgspec.Struct, kw_only=True):
    """One page of a project's devices, oldest first."""

    items: list[DeviceRead]
    next_cursor: str | None


class TokenRequest(_Body):
    """`POST /api/v1/auth/token`: an Ed25519 signature over the proof message (docs/protocol.md §5.2)."""

    project_id: UUID
    device_id_hash: DeviceIdHashHex
    timestamp_ms: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1, description="the device clock, Unix ms")]
    signature: Annotated[
        str,
        msgspec.Meta(
            # Standard base64 of exactly 64 bytes: its shape is the client's own, so a wrong one is a 422 naming the
            # field, not the uniform 401 that says nothing of which check failed.
            pattern="^[A-Za-z0-9+/]{85}[AQgw]==$",
            description="standard base64 (with padding) of the 64-byte Ed25519 signature",
        ),
    ]


class TokenResponse(msgspec.Struct, kw_only=True):
    """A device token (HS256 JWT) for `Authorization: Bearer ...`."""

    access_token: str
    expires_in: int
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - the token type's name, not a secret


class ProblemDetails(msgspec.Struct, kw_only=True):
    """An RFC 9457 error body (`application/problem+json`); `errors` names invalid fields."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    errors: list[dict[str, str]] | None = None
