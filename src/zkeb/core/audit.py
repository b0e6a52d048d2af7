"""The audit writer: appends one event to an organization's hash chain inside the caller's transaction.

Every domain records sensitive operations with :func:`record_event` (ORM session or Core connection). Each
organization's events form a SHA-256 chain (`zkeb.lib.hashchain.chain_hash`): event *n* stores the hash of
event *n-1* as `prev_hash` and its own hash over exactly the stored fields listed in :data:`CHAINED_FIELDS`.

Concurrent writers are serialized per organization by locking its `audit_chain_heads` row (an upsert whose
`ON CONFLICT DO UPDATE` takes the row lock and returns the head), so `seq` is contiguous and each event links
to its predecessor, whatever the number of processes. The lock is held until the caller's transaction ends;
keep audited transactions short. The event's time is the database clock read under that lock, so `seq` and
`occurred_at` agree in order across replicas.

Events never carry secrets: sensitive `details` keys (see `_SENSITIVE_WORDS`) are dropped with a warning
naming only the key, and every text field has its control characters escaped before it is hashed and stored.
An event whose organization is unknown (e.g. a bad credential that resolves to no tenant) goes to the
application log only. `ENABLE_AUDIT_LOGS=false` makes writing a no-op.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal, cast
from uuid import UUID

import msgspec
from litestar.connection import ASGIConnection
from sqlalchemy import Table, insert, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from uuid_utils.compat import uuid7

from zkeb.core.errors import request_id_var, trace_id_var
from zkeb.core.security import client_ip, trusted_proxies
from zkeb.db.models.audit import AuditChainHead, AuditEvent
from zkeb.lib.hashchain import GENESIS_HASH, canonical_event_bytes, chain_hash, escape_control_chars
from zkeb.lib.redaction import redact
from zkeb.settings import Settings

__all__ = (
    "CHAINED_FIELDS",
    "AuditOutcome",
    "audit_enabled",
    "audited_text",
    "chained_fields",
    "record_event",
    "record_event_on_connection",
    "request_fields",
    "sanitize_details",
)

logger = logging.getLogger("zkeb.audit")

AuditOutcome = Literal["success", "failure", "denied"]

#: The stored columns covered by an event's hash (bookkeeping columns `created_at`/`updated_at` are not).
CHAINED_FIELDS = (
    "id",
    "organization_id",
    "seq",
    "occurred_at",
    "actor_type",
    "actor_id",
    "action",
    "target_type",
    "target_id",
    "outcome",
    "client_ip",
    "user_agent",
    "request_id",
    "trace_id",
    "details",
)

_MAX_LENGTHS = {
    "actor_type": 32,
    "actor_id": 80,
    "action": 64,
    "target_type": 32,
    "target_id": 80,
    "client_ip": 64,
    "user_agent": 512,
    "request_id": 128,
    "trace_id": 32,
}
_MAX_DETAIL_DEPTH = 4
_SENSITIVE_WORDS = frozenset(
    {
        "authorization",
        "ciphertext",
        "credential",
        "credentials",
        "jwt",
        "key",
        "passphrase",
        "password",
        "payload",
        "secret",
        "signature",
        "token",
    }
)
# `key_id`, `token_id`, `key_prefix` name a credential without revealing it.
_HARMLESS_SUFFIXES = frozenset({"id", "ids", "name", "kind", "type", "prefix", "count", "size", "generation", "valid"})
_WORD = re.compile(r"[a-z0-9]+")

_EVENTS = cast("Table", AuditEvent.__table__)
_HEADS = cast("Table", AuditChainHead.__table__)
_LOCK_HEAD = text(
    """
    INSERT INTO audit_chain_heads (id, organization_id, seq, hash, created_at, updated_at)
    VALUES (:id, :organization_id, 0, :genesis, now(), now())
    ON CONFLICT (organization_id) DO UPDATE SET seq = audit_chain_heads.seq
    RETURNING seq, hash, clock_timestamp() AS now
    """
)
_SWITCH_TENANT = text(
    "SELECT current_setting('zkeb.org_id', true) AS previous, set_config('zkeb.org_id', :organization_id, true)"
)
_RESTORE_TENANT = text("SELECT set_config('zkeb.org_id', :previous, true)")


def _is_sensitive(name: str) -> bool:
    # camelCase → snake words, then look for a sensitive word not followed by a harmless suffix.
    words = _WORD.findall(re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower())
    if not words:
        return False
    if len(words) > 1 and words[-1] in _HARMLESS_SUFFIXES:
        return False
    return any(word in _SENSITIVE_WORDS for word in words)


def _clean(value: object, depth: int, dropped: list[str]) -> object:
    if isinstance(value, str):
        return escape_control_chars(value)
    if isinstance(value, Mapping):
        if depth >= _MAX_DETAIL_DEPTH:
            return "[nested too deep]"
        cleaned: dict[str, object] = {}
        for key, item in value.items():
            name = escape_control_chars(str(key))
            if _is_sensitive(name):
                dropped.append(name)
                continue
            cleaned[name] = _clean(item, depth + 1, dropped)
        return cleaned
    if isinstance(value, list | tuple):
        return [_clean(item, depth + 1, dropped) for item in value]
    if isinstance(value, bytes | bytearray | memoryview):
        # Raw bytes are too often key material or ciphertext to keep.
        return f"[{len(bytes(value))} bytes]"
    return value


def sanitize_details(details: Mapping[str, object] | None) -> dict[str, Any]:
    """Details as JSON types, with secret-looking keys dropped and control characters escaped.

    The result round-trips through JSONB unchanged, so the hash computed now verifies later.

    Raises:
        TypeError: a value has no JSON form.
        ValueError: a float is not finite.
    """
    if not details:
        return {}
    dropped: list[str] = []
    cleaned = _clean(dict(details), 0, dropped)
    if dropped:
        logger.warning("audit details keys dropped as possibly secret: %s", ", ".join(sorted(set(dropped))))
    decoded: dict[str, Any] = msgspec.json.decode(canonical_event_bytes({"d": cleaned}))["d"]
    return decoded


def audited_text(field: str, value: str | None) -> str | None:
    """A text field as stored: control characters escaped, cut to the column's length."""
    if value is None:
        return None
    return escape_control_chars(value)[: _MAX_LENGTHS[field]]


def chained_fields(row: Mapping[str, Any]) -> dict[str, object]:
    """The fields of a stored event that its hash covers, from a row mapping (writer and verifier share it)."""
    return {name: row[name] for name in CHAINED_FIELDS}


def audit_enabled(settings: Settings | None, request: ASGIConnection[Any, Any, Any, Any] | None) -> bool:
    """Whether events are written (`ENABLE_AUDIT_LOGS`), from explicit settings or the request's app."""
    if settings is None and request is not None:
        runtime = getattr(request.app.state, "runtime", None)
        settings = getattr(runtime, "settings", None)
    return settings.enable_audit_logs if settings is not None else True


def request_fields(
    request: ASGIConnection[Any, Any, Any, Any] | None, settings: Settings | None
) -> dict[str, str | None]:
    """The request's fields of an event (client IP through trusted proxies only, user agent, request and trace ids)."""
    fields: dict[str, str | None] = {
        "client_ip": None,
        "user_agent": None,
        "request_id": request_id_var.get(),
        "trace_id": trace_id_var.get(),
    }
    if request is not None:
        if settings is None:
            runtime = getattr(request.app.state, "runtime", None)
            settings = getattr(runtime, "settings", None)
        proxies = trusted_proxies(settings.trusted_proxies if settings is not None else ())
        fields["client_ip"] = client_ip(request.scope, proxies)
        user_agent = request.headers.get("user-agent")
        fields["user_agent"] = redact(user_agent) if user_agent is not None else None  # the client's to choose
    return {name: audited_text(name, value) for name, value in fields.items()}


async def record_event(
    session: AsyncSession | AsyncConnection,
    *,
    organization_id: UUID | None,
    action: str,
    actor_type: str,
    actor_id: str | None,
    outcome: AuditOutcome = "success",
    target_type: str | None = None,
    target_id: str | None = None,
    details: Mapping[str, object] | None = None,
    request: ASGIConnection[Any, Any, Any, Any] | None = None,
    settings: Settings | None = None,
) -> None:
    """Append one event to `organization_id`'s audit chain, in the transaction of `session`.

    Works with an ORM `AsyncSession` or a Core `AsyncConnection`; the event commits or rolls back with the
    caller's work. The tenant is switched to `organization_id` for the two audit statements and restored
    after, so an auth failure can be recorded for a known organization from any transaction.

    Args:
        session: The caller's session or connection.
        organization_id: The organization whose chain gets the event; None logs the event to the application
            log only (nothing in the database can be attributed to an unknown tenant).
        action: What happened, dotted (`api_key.created`, `auth.failed`, `rate_limit.exceeded`).
        actor_type: Who acted (`org_admin_key`, `project_key`, `device`, `cli`, `anonymous`).
        actor_id: The actor's id (credential id, never the credential), if known.
        outcome: `success`, `failure` or `denied`.
        target_type: The kind of resource acted on.
        target_id: Its id.
        details: Small, caller-chosen JSON context; secret-looking keys are dropped.
        request: The request, for client IP (trusted proxies only), user agent and app settings.
        settings: Explicit settings (CLI, tasks); otherwise taken from the request's app.

    Raises:
        TypeError: `details` has a value without a JSON form.
    """
    if not audit_enabled(settings, request):
        return
    fields_of_request = request_fields(request, settings)
    clean_details = sanitize_details(details)
    if organization_id is None:
        logger.warning(
            "audit event without organization: action=%s outcome=%s actor_type=%s actor_id=%s client_ip=%s "
            "request_id=%s details=%s",
            audited_text("action", action),
            outcome,
            audited_text("actor_type", actor_type),
            audited_text("actor_id", actor_id),
            fields_of_request["client_ip"],
            fields_of_request["request_id"],
            msgspec.json.encode(clean_details).decode(),
        )
        return
    switched = (await session.execute(_SWITCH_TENANT, {"organization_id": str(organization_id)})).one()
    previous_tenant: str | None = switched.previous
    head = (
        await session.execute(_LOCK_HEAD, {"id": uuid7(), "organization_id": organization_id, "genesis": GENESIS_HASH})
    ).one()
    occurred_at: datetime.datetime = head.now.astimezone(datetime.UTC)
    event: dict[str, Any] = {
        "id": uuid7(),
        "organization_id": organization_id,
        "seq": int(head.seq) + 1,
        "occurred_at": occurred_at,
        "actor_type": audited_text("actor_type", actor_type),
        "actor_id": audited_text("actor_id", actor_id),
        "action": audited_text("action", action),
        "target_type": audited_text("target_type", target_type),
        "target_id": audited_text("target_id", target_id),
        "outcome": outcome,
        **fields_of_request,
        "details": clean_details,
    }
    prev_hash = bytes(head.hash)
    event_hash = chain_hash(prev_hash, chained_fields(event))
    await session.execute(
        insert(_EVENTS).values(
            **event, prev_hash=prev_hash, hash=event_hash, created_at=occurred_at, updated_at=occurred_at
        )
    )
    await session.execute(
        update(_HEADS)
        .where(_HEADS.c.organization_id == organization_id)
        .values(seq=event["seq"], hash=event_hash, event_id=event["id"], updated_at=occurred_at)
    )
    if previous_tenant != str(organization_id):
        await session.execute(_RESTORE_TENANT, {"previous": previous_tenant or ""})


async def record_event_on_connection(
    connection: AsyncConnection,
    *,
    organization_id: UUID | None,
    action: str,
    actor_type: str,
    actor_id: str | None,
    outcome: AuditOutcome = "success",
    target_type: str | None = None,
    target_id: str | None = None,
    details: Mapping[str, object] | None = None,
    request: ASGIConnection[Any, Any, Any, Any] | None = None,
    settings: Settings | None = None,
) -> None:
    """:func:`record_event` on a Core connection (e.g. `runtime.engine.begin()` for an auth failure).

    The connection must be inside a transaction the caller commits.
    """
    await record_event(
        connection,
        organization_id=organization_id,
        action=action,
        actor_type=actor_type,
        actor_id=actor_id,
        outcome=outcome,
        target_type=target_type,
        target_id=target_id,
        details=details,
        request=request,
        settings=settings,
    )
