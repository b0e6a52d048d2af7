"""Principals and guards shared by every domain.

The accounts domain's authentication middleware resolves `Authorization: Bearer ...` into a
`Principal` (`request.user`) and sets the tenant for the request; domains protect routes with the
guards below. Unknown or other-tenant resources answer 404 (never 403), which services ensure by
looking rows up under row-level security. Each guard names the credentials it lets through (`accepts`), and the
OpenAPI document lists those as the operation's security schemes (`CREDENTIAL_SCHEMES`, `zkeb.core.openapi`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from uuid import UUID

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.spec import SecurityScheme

from zkeb.core.errors import NotFoundError

__all__ = (
    "BEARER_CHALLENGE",
    "CREDENTIAL_SCHEMES",
    "DEVICE_TOKEN",
    "INVALID_TOKEN_CHALLENGE",
    "MAX_CREDENTIAL_LENGTH",
    "ORG_ADMIN_KEY",
    "PROJECT_KEY",
    "Principal",
    "PrincipalKind",
    "accepted_credentials",
    "accepts",
    "bearer_credential",
    "principal_of",
    "requires_backup_access",
    "requires_org_admin",
)

PrincipalKind = Literal["org_admin", "project", "device"]
#: Longer `Authorization` credentials are refused unread.
MAX_CREDENTIAL_LENGTH = 4096
#: A 401's `WWW-Authenticate` when the request presented no bearer credential: no error code (RFC 6750 §3.1).
BEARER_CHALLENGE = 'Bearer realm="zkeb"'
#: A 401's `WWW-Authenticate` when the bearer credential it presented was refused: an unknown, revoked, expired or
#: malformed API key or device token (RFC 6750 §3.1).
INVALID_TOKEN_CHALLENGE = f'{BEARER_CHALLENGE}, error="invalid_token"'


#: The OpenAPI security schemes of the three bearer credentials, by the principal kind each one authenticates.
ORG_ADMIN_KEY, PROJECT_KEY, DEVICE_TOKEN = "OrgAdminKey", "ProjectKey", "DeviceToken"
CREDENTIAL_SCHEMES: dict[str, SecurityScheme] = {
    ORG_ADMIN_KEY: SecurityScheme(
        type="http",
        scheme="bearer",
        bearer_format="zkeb_...",
        description=(
            "An organization admin API key (`zkeb_...`, from `zkeb admin create-org`): manages the organization's "
            "projects, keys, devices and trash, reads the audit trail."
        ),
    ),
    PROJECT_KEY: SecurityScheme(
        type="http",
        scheme="bearer",
        bearer_format="zkeb_...",
        description=(
            "A project API key (`zkeb_...`, from `POST /api/v1/projects/{project_id}/api-keys`): every backup of "
            "its project."
        ),
    ),
    DEVICE_TOKEN: SecurityScheme(
        type="http",
        scheme="bearer",
        bearer_format="JWT",
        description=(
            "A device token from `POST /api/v1/auth/token` (the device's signed proof): that device's own backups."
        ),
    ),
}

_Guard = TypeVar("_Guard", bound=Callable[..., Any])
_GUARD_CREDENTIALS: dict[Callable[..., Any], tuple[str, ...]] = {}


def accepts(*schemes: str) -> Callable[[_Guard], _Guard]:
    """Declare the credentials (`CREDENTIAL_SCHEMES` names) a guard lets through, for the OpenAPI document."""

    def register(guard: _Guard) -> _Guard:
        _GUARD_CREDENTIALS[guard] = schemes
        return guard

    return register


def accepted_credentials(guards: list[Callable[..., Any]]) -> tuple[str, ...]:
    """The credentials an operation with `guards` accepts: those every guard lets through (all, without one)."""
    accepted = tuple(CREDENTIAL_SCHEMES)
    for guard in guards:
        declared = _GUARD_CREDENTIALS.get(guard)
        if declared is not None:
            accepted = tuple(scheme for scheme in accepted if scheme in declared)
    return accepted


def bearer_credential(authorization: str) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` value, or None when it is not one.

    The scheme is case-insensitive (RFC 9110 §11.1) and whitespace around the credential is ignored, so every
    spelling of one header yields the same credential: authentication and the rate limiter's per-credential bucket
    both key on this.
    """
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or len(credential) > MAX_CREDENTIAL_LENGTH:
        return None
    return credential


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an org admin key, a project key, or a device token.

    `credential_id` identifies the credential (API key id or token `jti`) for audit and logs; it is
    never the secret itself.
    """

    kind: PrincipalKind
    organization_id: UUID
    credential_id: str
    project_id: UUID | None = None
    device_id: UUID | None = None
    device_id_hash: bytes | None = None

    @property
    def actor_type(self) -> str:
        """The audit log's name for this kind of principal."""
        return {"org_admin": "org_admin_key", "project": "project_key", "device": "device"}[self.kind]

    @property
    def actor_id(self) -> str:
        """The audit log's id for this principal: the API key's id, or the device's for a device token.

        Not a device token's `jti`: nothing stored names it, so an event recorded under it could not be traced to
        the device (`device_token.issued` and `auth.failed` name the device too).
        """
        if self.kind == "device" and self.device_id is not None:
            return str(self.device_id)
        return self.credential_id

    def can_act_for_device(self, device_id_hash: bytes) -> bool:
        """A project key acts for any device of its project; a device only for itself."""
        return self.kind != "device" or self.device_id_hash == device_id_hash

    def require_project(self, project_id: UUID) -> None:
        """Refuse (404) a project this principal does not belong to; org admins reach every project of theirs.

        Raises:
            NotFoundError: the project is not this principal's.
        """
        if self.kind != "org_admin" and self.project_id != project_id:
            raise NotFoundError("project not found")


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The authenticated principal of a request.

    Raises:
        NotAuthorizedException: the request carries no valid credential (401).
    """
    user = connection.scope.get("user")
    if not isinstance(user, Principal):
        raise NotAuthorizedException(
            "a valid bearer credential is required", headers={"WWW-Authenticate": BEARER_CHALLENGE}
        )
    return user


@accepts(ORG_ADMIN_KEY)
async def requires_org_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: only an organization admin key.

    Guards are coroutines: Litestar runs a plain function guard in a worker thread, a hop per request that costs
    more than the check (and, under load, waits for the GIL).

    Raises:
        NotFoundError: a project key or device on an admin route (the route's resources are not theirs).
    """
    if principal_of(connection).kind != "org_admin":
        raise NotFoundError("not found")


@accepts(PROJECT_KEY, DEVICE_TOKEN)
async def requires_backup_access(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: a project key or a device token (backups belong to a project)."""
    if principal_of(connection).kind not in ("project", "device"):
        raise NotFoundError("not found")
