"""Backups HTTP API: single-shot upload, metadata, listing, streamed restore, delete (to the trash) and restore."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import msgspec
from litestar import Controller, Request, Response, delete, get, head, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, Parameter
from litestar.response import Stream
from opentelemetry import trace

from zkeb.core.auth import (
    Principal,
    principal_of,
    requires_backup_access,
    requires_org_admin,
)
from zkeb.core.errors import ProblemError, UnsupportedMediaTypeError, record_failed_response
from zkeb.core.runtime import get_runtime
from zkeb.db.models import Backup
from zkeb.domain.backups.chunk_reads import plan_read, stream_plaintext
from zkeb.domain.backups.context import backups_context
from zkeb.domain.backups.envelope import (
    BackupEnvelope,
    envelope_from_json,
    envelope_from_msgpack,
    invalid_field,
)
from zkeb.domain.backups.errors import PayloadPreconditionError, PayloadRangeError
from zkeb.domain.backups.guards import requires_backup_or_org_admin
from zkeb.domain.backups.schemas import (
    MSGPACK,
    MSGPACK_MEDIA_TYPES,
    AppendOnlyProblem,
    BackupList,
    BackupRead,
    EnvelopeJson,
    EnvelopeMsgpack,
    QuotaProblem,
    field_of_validation_error,
)
from zkeb.domain.backups.services.backups import (
    backup_read,
    backup_read_msgpack,
    first_piece,
    get_latest_backup,
    get_restore_source,
    get_visible_backup,
    list_visible_backups,
)
from zkeb.domain.backups.services.finalize import InMemoryPayload, commit_in_memory
from zkeb.domain.backups.services.lifecycle import LifecycleService
from zkeb.lib.negotiation import negotiate
from zkeb.lib.ranges import RangeNotSatisfiableError, etag_matches, if_match_holds, parse_range

__all__ = (
    "BackupController",
    "ContainerController",
)

tracer = trace.get_tracer("zkeb.backups")

#: Largest single-shot body (the envelope with its payload); larger payloads go through tus.
SINGLE_SHOT_MAX_BODY = 16 * 1024 * 1024
_JSON = "application/json"


def _payload_headers(request: Request[Any, Any, Any], backup: Backup) -> tuple[str, dict[str, str]]:
    """A payload's strong ETag and the headers a download (GET or HEAD) carries.

    Raises:
        PayloadPreconditionError: `If-Match` names no entity tag of this payload (RFC 9110 §13.1.1, evaluated
            before any other condition).
    """
    etag = f'"{backup.payload_sha256.hex()}"'
    if not if_match_holds(request.headers.get("if-match"), etag):
        raise PayloadPreconditionError(
            "If-Match names another payload: this one's ETag is in the answer", headers={"ETag": etag}
        )
    # `X-Content-Type-Options: nosniff` comes from the core security-headers middleware, on every response.
    return etag, {
        "ETag": etag,
        "Repr-Digest": f"sha-256=:{base64.b64encode(backup.payload_sha256).decode()}:",
        "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="{backup.id}.bin"',
        "Accept-Ranges": "bytes",
    }


async def _starting_with(
    request: Request[Any, Any, Any], first: bytes | None, rest: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """`first` (None: nothing), then the rest of the stream it was taken from.

    A failure once the headers are out ends the body short of its `Content-Length`: the server then closes the
    connection and the client sees a cut response, as it would if this raised, but without the traceback Litestar
    and granian log for a raise, on top of the one line `stream_plaintext` logs. The request is recorded as failed
    (access log, metrics, server span), since its status says 200.
    """
    if first is not None:
        yield first
    try:
        async for piece in rest:
            yield piece
    except Exception as exc:  # noqa: BLE001 - logged by `stream_plaintext`; the answer can only be cut short
        record_failed_response(request.scope, exc)


QUOTA_RESPONSE = {
    507: ResponseSpec(
        data_container=QuotaProblem,
        description="Over the project's storage quota: `used`, `quota` and `requested` in bytes",
        media_type="application/problem+json",
        generate_examples=False,
    )
}
APPEND_ONLY_RESPONSE = {
    403: ResponseSpec(
        data_container=AppendOnlyProblem,
        description=(
            "Refused: `reason` is `append_only` (a project key or device in an append-only project), "
            "`append_only_min_age` (an org admin, before the backup reached the minimum age; see `deletable_after`) "
            "or `purge_requires_org_admin`"
        ),
        media_type="application/problem+json",
        generate_examples=False,
    )
}


def _media_type(request: Request[Any, Any, Any]) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


#: A backup's representations, the default first (`Accept` missing, or naming none of them).
_BACKUP_REPRESENTATIONS = (_JSON, MSGPACK, *sorted(MSGPACK_MEDIA_TYPES - {MSGPACK}))


def _representation(request: Request[Any, Any, Any]) -> str:
    """The media type `Accept` prefers, `q` values honoured (docs/api-guide.md, "Content negotiation").

    Nothing acceptable: the header is disregarded for the first representation it does not refuse with `q=0`
    (JSON, then msgpack); 406 when it refuses them all.
    """
    negotiation = negotiate(request.headers.get("accept"), _BACKUP_REPRESENTATIONS)
    if negotiation.chosen is not None:
        return negotiation.chosen
    for media_type in (_JSON, MSGPACK):  # the other msgpack names are aliases, not representations to fall back to
        if media_type not in negotiation.refused:
            return media_type
    raise ProblemError(
        "no representation is acceptable: a backup is application/json or application/msgpack", status_code=406
    )


def _backup_response(media_type: str, backup: Any, status_code: int = 200) -> Response[Any]:
    """A backup as `media_type` (from `_representation`, decided before anything changes)."""
    headers = {"Cache-Control": "no-store", "Vary": "Accept"}
    if status_code == 201:
        headers["Location"] = f"/api/v1/backups/{backup.id}"
    if media_type in MSGPACK_MEDIA_TYPES:
        return Response(
            msgspec.msgpack.encode(backup_read_msgpack(backup)),
            media_type=media_type,
            status_code=status_code,
            headers=headers,
        )
    return Response(backup_read(backup), status_code=status_code, headers=headers)


def _decode_envelope(media_type: str, body: bytes) -> tuple[BackupEnvelope, memoryview | bytes]:
    """Decode and validate a single-shot body; the msgpack payload stays a view into `body`."""
    try:
        if media_type in MSGPACK_MEDIA_TYPES:
            source: EnvelopeMsgpack | EnvelopeJson = msgspec.msgpack.decode(body, type=EnvelopeMsgpack)
        else:
            source = msgspec.json.decode(body, type=EnvelopeJson)
    except msgspec.ValidationError as exc:
        field = field_of_validation_error(exc)
        if field is None:
            raise ProblemError(f"the body is not an envelope: {exc}", status_code=422) from None
        raise invalid_field(field, str(exc)) from None
    except UnicodeDecodeError:  # msgspec raises it for invalid UTF-8 inside a string (JSON, or a msgpack str)
        raise ClientException("the body holds a string that is not valid UTF-8") from None
    except msgspec.DecodeError:
        raise ClientException(
            "the body is not valid " + ("msgpack" if media_type in MSGPACK_MEDIA_TYPES else "JSON")
        ) from None
    if isinstance(source, EnvelopeMsgpack):
        return envelope_from_msgpack(source), source.payload
    return envelope_from_json(source), source.payload


def _require_project(principal: Principal) -> UUID:
    assert principal.project_id is not None  # requires_backup_access admits project keys and devices only
    return principal.project_id


class BackupController(Controller):
    """Backups of the caller's project (a project key) or of the caller's own device (a device token)."""

    path = "/api/v1/backups"
    tags = ["backups"]  # noqa: RUF012 - Litestar's declared attribute

    @post(
        "/",
        status_code=201,
        guards=[requires_backup_access],
        request_max_body_size=SINGLE_SHOT_MAX_BODY,
        opt={"too_large_hint": "upload larger payloads with tus (POST /api/v1/uploads)"},
        responses=QUOTA_RESPONSE,
        summary="Upload a backup in one request",
        description=(
            "The whole envelope in one body of at most 16 MiB: `application/msgpack` (bytes as `bin`) or "
            "`application/json` (bytes as standard base64, `device_id_hash` as hex in either case). The device's "
            "signature is verified before anything is stored. 201 with the backup (no payload); 409 when the "
            "device already used `payload_nonce` in this project (naming `backup_id` when this very envelope was "
            "committed: a retry after a lost response); 413 over 16 MiB (before the body is read when "
            "`Content-Length` tells); 415 for another content type; 422 naming an invalid field or a bad signature; "
            "507 over the project's storage quota. Larger payloads: tus at `/api/v1/uploads`."
        ),
    )
    async def create_backup(self, request: Request[Any, Any, Any], state: State) -> Response[BackupRead]:
        """Verify and store a single-shot upload."""
        principal = principal_of(request)
        project_id = _require_project(principal)
        context = backups_context(state)
        media_type = _media_type(request)
        if media_type not in MSGPACK_MEDIA_TYPES and media_type != _JSON:
            raise UnsupportedMediaTypeError("send the envelope as application/msgpack or application/json")
        representation = _representation(request)
        with tracer.start_as_current_span("backups.receive", attributes={"zkeb.project_id": str(project_id)}) as span:
            body = await request.body()
            span.set_attribute("zkeb.bytes", len(body))
        envelope, payload = _decode_envelope(media_type, body)
        size = len(payload)
        if size < 1:
            raise invalid_field("payload", "must not be empty")
        if size > context.settings.max_upload_size:
            raise ProblemError(
                f"payload exceeds MAX_UPLOAD_SIZE ({context.settings.max_upload_size} bytes)", status_code=413
            )
        backup = await commit_in_memory(
            context,
            principal,
            envelope,
            InMemoryPayload.of(payload),
            method="single",
            request=request,
            audit_committed=get_runtime(state).audit_linker.notify,
        )
        return _backup_response(representation, backup, status_code=201)

    @get(
        "/",
        guards=[requires_backup_access],
        summary="List backups",
        description="Newest first. Pass `next_cursor` back as `cursor` for the next page; `limit` is 1..100.",
    )
    async def list_backups(
        self,
        request: Request[Any, Any, Any],
        state: State,
        *,
        container_id: FromQuery[UUID | None] = None,
        device_id_hash: str | None = Parameter(
            default=None,
            pattern="^[0-9a-fA-F]{64}$",
            description="SHA-256 of the device id, 64 hex digits (written lowercase; either case is read)",
        ),
        cursor: str | None = Parameter(default=None, max_length=200),
        limit: int = Parameter(default=50, ge=1, le=100),
    ) -> BackupList:
        """A page of backups."""
        principal = principal_of(request)
        device_hash = bytes.fromhex(device_id_hash) if device_id_hash is not None else None  # 400 unless hex
        backups, next_cursor = await list_visible_backups(
            backups_context(state).engine,
            principal,
            container_id=container_id,
            device_id_hash=device_hash,
            cursor=cursor,
            limit=limit,
        )
        return BackupList(items=[backup_read(b) for b in backups], next_cursor=next_cursor)

    @get(
        "/{backup_id:uuid}",
        guards=[requires_backup_access],
        summary="A backup's envelope (without payload)",
        description="JSON, or msgpack with `Accept: application/msgpack`.",
    )
    async def get_backup(
        self, request: Request[Any, Any, Any], state: State, backup_id: FromPath[UUID]
    ) -> Response[BackupRead]:
        """One backup's envelope (read without an ORM session: one raw read-only transaction)."""
        backup = await get_visible_backup(backups_context(state).engine, principal_of(request), backup_id)
        return _backup_response(_representation(request), backup)

    @get(
        "/{backup_id:uuid}/payload",
        guards=[requires_backup_access],
        summary="Download a backup's payload",
        description=(
            "Streams the ciphertext as `application/octet-stream`. `ETag` is the payload's SHA-256 (hex); "
            "`If-None-Match` answers 304; one `Range` answers 206 (only the chunks it needs are decrypted), an "
            "unsatisfiable one 416 with `Content-Range: bytes */size`; with `If-Range` naming another ETag (or a "
            "date) the whole payload comes back, 200. Several ranges are served whole. `If-Match` naming another "
            "ETag answers 412."
        ),
        media_type="application/octet-stream",
    )
    async def download_payload(
        self,
        request: Request[Any, Any, Any],
        state: State,
        backup_id: FromPath[UUID],
    ) -> Response[Any]:
        """Stream a payload, whole or one byte range."""
        principal = principal_of(request)
        context = backups_context(state)
        source = await get_restore_source(context.engine, principal, backup_id)
        backup = source.backup
        size = backup.encrypted_payload_size
        etag, headers = _payload_headers(request, backup)
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(b"", status_code=304, headers=headers)
        range_header = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if range_header is not None and if_range is not None and if_range.strip() != etag:
            # RFC 9110 §13.1.5: the client's partial copy is of another payload (or dated: ours has no date to
            # match), so it gets the whole payload rather than a slice to append.
            range_header = None
        try:
            byte_range = parse_range(range_header, size)
        except RangeNotSatisfiableError as exc:
            raise PayloadRangeError(
                "the range selects no byte of the payload", headers={"Content-Range": exc.content_range}
            ) from None
        cipher = context.crypto.cipher(backup.payload_id, source.key)
        steps = plan_read(source.spans, byte_range, payload_id=backup.payload_id, payload_size=size)
        length = size if byte_range is None else byte_range.length
        headers["Content-Length"] = str(length)
        if byte_range is not None:
            headers["Content-Range"] = byte_range.content_range(size)
        content = stream_plaintext(
            context.engine,
            stores=context.stores,
            store_kind=source.store,
            organization_id=principal.organization_id,
            payload_id=backup.payload_id,
            cipher=cipher,
            steps=steps,
            attributes={
                "zkeb.backup_id": str(backup.id),
                "zkeb.project_id": str(backup.project_id),
                "zkeb.bytes_requested": length,
                "zkeb.chunk_count": len(steps),
            },
        )
        # The first piece before the answer: a failure to read it (a lost database connection, say) is then this
        # handler's error, a 503 problem, rather than a broken response whose headers granian has not sent yet.
        first = await first_piece(context.engine, principal, backup_id, content)
        return Stream(
            _starting_with(request, first, content),
            status_code=206 if byte_range is not None else 200,
            media_type="application/octet-stream",
            headers=headers,
        )

    @head(
        "/{backup_id:uuid}/payload",
        guards=[requires_backup_access],
        summary="A backup's payload headers",
        description=(
            "What `GET` would answer, without the body: `Content-Length` (the payload's size), `ETag`, "
            "`Repr-Digest`, `Accept-Ranges`; 304 when `If-None-Match` matches, 412 when `If-Match` names another "
            "ETag."
        ),
    )
    async def payload_headers(
        self, request: Request[Any, Any, Any], state: State, backup_id: FromPath[UUID]
    ) -> Response[None]:
        """The payload's size and validators, for a client planning ranged reads."""
        backup = await get_visible_backup(backups_context(state).engine, principal_of(request), backup_id)
        etag, headers = _payload_headers(request, backup)
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(None, status_code=304, headers=headers)
        # Set as headers: Litestar sends a HEAD response's headers as given (no body to measure or type).
        headers["Content-Length"] = str(backup.encrypted_payload_size)
        headers["Content-Type"] = "application/octet-stream"
        return Response(None, status_code=200, headers=headers)

    @delete(
        "/{backup_id:uuid}",
        guards=[requires_backup_or_org_admin],
        summary="Delete a backup (to the trash), or purge it",
        description=(
            "204. Moves the backup to the trash: it disappears from listings, reads and `latest`, still counts "
            "against the quota, and is purged after `TRASH_RETENTION_DAYS`; org admins can restore it until then. "
            "`purge=true` (org admin keys only, also for a backup already in the trash) deletes it and its payload at "
            "once and frees its bytes. In an append-only project project keys and devices get 403, and org admins "
            "only after the backup is `append_only_min_age_days` old."
        ),
        responses=APPEND_ONLY_RESPONSE,
    )
    async def delete_backup(
        self,
        request: Request[Any, Any, Any],
        lifecycle_service: NamedDependency[LifecycleService],
        backup_id: FromPath[UUID],
        purge: bool = Parameter(default=False, description="org admin only: delete for good instead of the trash"),
    ) -> None:
        """Move one backup to the trash, or purge it."""
        await lifecycle_service.delete_backup(principal_of(request), backup_id, purge=purge, request=request)

    @post(
        "/{backup_id:uuid}/restore",
        status_code=200,
        guards=[requires_org_admin],
        summary="Restore a backup from the trash (org admin)",
        description=(
            "200 with the backup, visible again. 404 when it is not in the trash. Retention leaves a restored backup "
            "alone from then on: delete it explicitly when it is no longer needed."
        ),
    )
    async def restore_backup(
        self,
        request: Request[Any, Any, Any],
        lifecycle_service: NamedDependency[LifecycleService],
        backup_id: FromPath[UUID],
    ) -> Response[BackupRead]:
        """Bring one backup back from the trash."""
        representation = _representation(request)
        backup = await lifecycle_service.restore(principal_of(request), backup_id, request=request)
        return _backup_response(representation, backup)


class ContainerController(Controller):
    """Per-container views of backups."""

    path = "/api/v1/containers"
    tags = ["backups"]  # noqa: RUF012

    @get(
        "/{container_id:uuid}/backups/latest",
        guards=[requires_backup_access],
        summary="The newest backup of a container",
        description="404 when the container has no backup visible to the caller. JSON or msgpack by `Accept`.",
    )
    async def latest_backup(
        self, request: Request[Any, Any, Any], state: State, container_id: FromPath[UUID]
    ) -> Response[BackupRead]:
        """The latest backup of one container."""
        backup = await get_latest_backup(backups_context(state).engine, principal_of(request), container_id)
        return _backup_response(_representation(request), backup)
