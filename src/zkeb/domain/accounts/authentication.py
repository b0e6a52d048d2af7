"""Bearer authentication: API keys (`zkeb_...`) and device tokens (JWT) become a `Principal`.

Keys are looked up by their public prefix through a SECURITY DEFINER function (the tenant is not known
yet), then compared in constant time as HMACs under `API_KEY_SALT` and, during rotation,
`API_KEY_SALT_NEW`; a key still hashed under the old salt is re-hashed under the new one on use.
Nothing is cached, so a revocation takes effect at once on every replica.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from sqlalchemy import text

from zkeb.core.auth import Principal
from zkeb.core.runtime import Runtime, get_runtime
from zkeb.core.tenancy import set_tenant, tenant_transaction
from zkeb.lib.apikeys import API_KEY_PREFIX, hash_api_key, public_prefix
from zkeb.lib.devicetokens import InvalidDeviceTokenError, verify_device_token

__all__ = ("AUTH_EXCLUDED_PATHS", "BearerAuthenticationMiddleware", "authenticate_bearer")

logger = logging.getLogger("zkeb.auth")

AUTH_EXCLUDED_PATHS = ("^/api/health", "^/api/version", "^/schema", "^/api/v1/auth/token", "^/metrics")
_FIND_KEYS = text("SELECT id, organization_id, project_id, kind, key_hash, revoked_at FROM zkeb_find_api_keys(:prefix)")
_REHASH = text("UPDATE api_keys SET key_hash = :key_hash WHERE id = :id")
_DEVICE_STATE = text("SELECT revoked_at FROM devices WHERE id = :id AND project_id = :project_id")


def _unauthorized(detail: str) -> NotAuthorizedException:
    return NotAuthorizedException(detail, headers={"WWW-Authenticate": 'Bearer realm="zkeb"'})


async def _authenticate_api_key(runtime: Runtime, key: str) -> Principal:
    prefix = public_prefix(key)
    if prefix is None:
        raise _unauthorized("invalid API key")
    secrets = runtime.settings.secrets
    candidates = [s for s in (secrets.api_key_salt_new, secrets.api_key_salt) if s]
    async with runtime.engine.connect() as connection:
        rows = (await connection.execute(_FIND_KEYS, {"prefix": prefix})).all()
    for row in rows:
        for salt in candidates:
            if not hmac.compare_digest(row.key_hash, hash_api_key(salt, key)):
                continue
            if row.revoked_at is not None:
                raise _unauthorized("API key revoked")
            if salt != candidates[0]:
                async with tenant_transaction(runtime.engine, row.organization_id) as connection:
                    await connection.execute(_REHASH, {"key_hash": hash_api_key(candidates[0], key), "id": row.id})
            return Principal(
                kind="org_admin" if row.kind == "org_admin" else "project",
                organization_id=row.organization_id,
                project_id=row.project_id,
                credential_id=str(row.id),
            )
    raise _unauthorized("invalid API key")


async def _authenticate_device_token(runtime: Runtime, token: str) -> Principal:
    secrets = runtime.settings.secrets
    try:
        claims = verify_device_token(token, tuple(s for s in (secrets.jwt_secret_new, secrets.jwt_secret) if s))
    except InvalidDeviceTokenError as exc:
        raise _unauthorized("invalid device token") from exc
    async with tenant_transaction(runtime.engine, claims.organization_id) as connection:
        state = (
            await connection.execute(_DEVICE_STATE, {"id": claims.device_id, "project_id": claims.project_id})
        ).one_or_none()
    if state is None or state.revoked_at is not None:
        raise _unauthorized("device revoked")
    return Principal(
        kind="device",
        organization_id=claims.organization_id,
        project_id=claims.project_id,
        device_id=claims.device_id,
        device_id_hash=claims.device_id_hash,
        credential_id=claims.token_id,
    )


async def authenticate_bearer(runtime: Runtime, authorization: str | None) -> Principal:
    """Resolve an `Authorization` header value into a principal.

    Raises:
        NotAuthorizedException: missing, malformed, unknown, revoked or expired credential (401).
    """
    if not authorization:
        raise _unauthorized("a bearer credential is required")
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or len(credential) > 4096:
        raise _unauthorized("use 'Authorization: Bearer <API key or device token>'")
    if credential.startswith(API_KEY_PREFIX):
        return await _authenticate_api_key(runtime, credential)
    return await _authenticate_device_token(runtime, credential)


class BearerAuthenticationMiddleware(AbstractAuthenticationMiddleware):
    """Authenticates every route but health, version, schema, metrics and token issuance."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        """Resolve the principal and act for its organization for the rest of the request."""
        principal = await authenticate_bearer(
            get_runtime(connection.app.state), connection.headers.get("authorization")
        )
        set_tenant(principal.organization_id)
        return AuthenticationResult(user=principal, auth=None)
