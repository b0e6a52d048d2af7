"""The tus 1.0.0 endpoints (`/api/v1/uploads`): discovery, creation, offset, append and termination.

HTTP only: each handler reads the request with `zkeb.domain.backups.tus` (the protocol, and where its rules are
documented), calls `zkeb.domain.backups.services.uploads`, and shapes the tus answer.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from litestar import Controller, MediaType, Request, Response, delete, head, patch, post, route
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.enums import HttpMethod
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from zkeb.core.auth import principal_of, requires_backup_access
from zkeb.core.errors import (
    ProblemError,
    RequestBodyTimeoutError,
    ServiceUnavailableError,
    database_out_of_space,
    storage_full,
)
from zkeb.domain.backups.context import backups_context
from zkeb.domain.backups.envelope import envelope_from_metadata, invalid_field
from zkeb.domain.backups.errors import UnsupportedUploadMediaTypeError, UploadTooLargeError
from zkeb.domain.backups.services.upload_patch import PatchReceiver
from zkeb.domain.backups.services.uploads import (
    IN_MEMORY_UPLOAD_MAX,
    commit_whole_upload,
    create_upload_session,
    discard_upload,
    load_upload,
    terminate_upload,
)
from zkeb.domain.backups.tus import (
    BACKUP_ID_HEADER,
    OFFSET_OCTET_STREAM,
    TUS_EXCEPTION_HANDLERS,
    UPLOADS_PATH,
    base_headers,
    header_int,
    malformed,
    media_type,
    require_tus_resumable,
    upload_checksum,
    uploads_url,
)
from zkeb.lib.tus import TUS_CHECKSUM_ALGORITHMS, TUS_EXTENSIONS, TUS_VERSION, format_upload_expires

__all__ = ("UploadController",)

logger = logging.getLogger("zkeb.backups.tus")

#: The 408 of a PATCH (or creation-with-upload) whose body stalled; its headers carry the offset to resume from.
_STALLED = "the body made no progress for too long; what arrived is kept: resume from Upload-Offset"


class UploadController(Controller):
    """tus 1.0.0 endpoints (creation at the collection, the rest at each upload's URL)."""

    path = UPLOADS_PATH
    tags = ["uploads (tus)"]  # noqa: RUF012 - Litestar's declared attribute
    exception_handlers = TUS_EXCEPTION_HANDLERS

    @route(
        "/",
        http_method=HttpMethod.OPTIONS,
        status_code=204,
        opt={"exclude_from_auth": True},
        security=[],
        summary="tus discovery",
        description="`Tus-Version`, `Tus-Extension`, `Tus-Max-Size`, `Tus-Checksum-Algorithm`; no credential needed.",
    )
    # Litestar registers a controller's handlers sorted by name and adds its own OPTIONS handler to a path whose
    # first handler lacks one; this handler's name must sort first so that it, not Litestar's, answers OPTIONS.
    async def advertise(self, state: State) -> Response[None]:
        """Advertise the protocol version, extensions, size limit and checksum algorithms."""
        return Response(
            None,
            status_code=204,
            headers={
                "Tus-Resumable": TUS_VERSION,
                "Tus-Version": TUS_VERSION,
                "Tus-Extension": ",".join(TUS_EXTENSIONS),
                "Tus-Max-Size": str(backups_context(state).settings.max_upload_size),
                "Tus-Checksum-Algorithm": ",".join(TUS_CHECKSUM_ALGORITHMS),
            },
        )

    @post(
        "/",
        status_code=201,
        guards=[requires_backup_access],
        request_max_body_size=None,
        summary="Create an upload (tus creation, creation-with-upload)",
        description=(
            "`Upload-Length` (1..`MAX_UPLOAD_SIZE`, else 413) and `Upload-Metadata` with every envelope field but the "
            "payload, validated now: 400 malformed, 422 naming an invalid field, 409 for a reused `payload_nonce` "
            "(naming `backup_id` when this very envelope was committed), "
            "the same `Location` again for a creation (without a body) identical to an open upload that has "
            "received no byte yet (a retry after a lost answer), "
            "507 when `Upload-Length` does not fit under the project's storage quota, which open uploads reserve "
            "their `Upload-Length` from; 429 when the project already has `MAX_OPEN_UPLOADS` uploads open; 400 "
            "without `PUBLIC_URL` configured and without a `Host` header. "
            "With `Content-Type: application/offset+octet-stream` the body is the upload's first bytes."
        ),
    )
    async def create_upload(
        self, request: Request[Any, Any, Any], db_session: NamedDependency[AsyncSession], state: State
    ) -> Response[bytes]:
        """Create an upload session for one backup."""
        require_tus_resumable(request)
        principal = principal_of(request)
        context = backups_context(state)
        if "upload-defer-length" in request.headers:
            raise malformed("Upload-Defer-Length is not supported (the creation-defer-length extension)")
        max_size = context.settings.max_upload_size

        def too_large() -> UploadTooLargeError:
            return UploadTooLargeError(f"Upload-Length exceeds MAX_UPLOAD_SIZE ({max_size} bytes)")

        length = header_int(request, "Upload-Length", too_large=too_large)
        if length > max_size:
            raise too_large()
        if length < 1:
            raise invalid_field("payload", "must not be empty (Upload-Length 0)")
        envelope = envelope_from_metadata(request.headers.get("upload-metadata", ""))
        with_upload = media_type(request) == OFFSET_OCTET_STREAM
        checksum = upload_checksum(request) if with_upload else None
        if with_upload and (request.content_length or 0) > length:
            raise UploadTooLargeError(f"the body ({request.content_length} bytes) exceeds Upload-Length ({length})")
        collection_url = uploads_url(request, context)
        if with_upload and request.content_length == length <= IN_MEMORY_UPLOAD_MAX:
            # Nothing is stored before the commit, so a refusal leaves nothing behind; the `Location` answered names
            # an upload that is already complete (its `HEAD` is 404, as after any completed upload).
            whole = await commit_whole_upload(request, context, principal, envelope, checksum=checksum)
            headers = base_headers()
            headers["Location"] = f"{collection_url}/{uuid7()}"
            headers["Upload-Offset"] = str(whole.length)
            headers[BACKUP_ID_HEADER] = str(whole.backup_id)
            return Response(b"", status_code=201, headers=headers, media_type=MediaType.TEXT)
        upload = await create_upload_session(
            db_session, context, principal, envelope, length, reuse_unsent=not with_upload
        )
        headers = base_headers(upload)
        headers["Location"] = f"{collection_url}/{upload.id}"
        if with_upload and request.content_length != 0:
            receiver = PatchReceiver(request, context, db_session, principal, upload, checksum)
            await _receive_first_bytes(receiver, headers)
        return Response(b"", status_code=201, headers=headers, media_type=MediaType.TEXT)  # no body, not `null`

    @head(
        "/{upload_id:uuid}",
        guards=[requires_backup_access],
        summary="An upload's offset (tus core)",
        description="`Upload-Offset`, `Upload-Length`, `Upload-Expires`; 404 unknown, 410 expired.",
    )
    async def upload_offset(
        self, request: Request[Any, Any, Any], db_session: NamedDependency[AsyncSession], upload_id: FromPath[UUID]
    ) -> Response[None]:
        """Where to resume."""
        require_tus_resumable(request)
        upload = await load_upload(db_session, principal_of(request), upload_id)
        headers = base_headers(upload)
        headers["Upload-Length"] = str(upload.upload_length)
        return Response(None, status_code=200, headers=headers, media_type=MediaType.TEXT)  # no body: not JSON

    @patch(
        "/{upload_id:uuid}",
        status_code=204,
        guards=[requires_backup_access],
        request_max_body_size=None,
        summary="Append bytes (tus core, checksum)",
        description=(
            "`Content-Type: application/offset+octet-stream`; `Upload-Offset` must equal the upload's offset (409). "
            "The offset grows as each MiB is stored (not with `Upload-Checksum`, which counts only once verified), "
            "short of `Upload-Length` until the commit. A new PATCH takes the upload over from one still open, "
            "which then answers 409; a PATCH whose upload ends meanwhile (terminated, expired) answers 404. "
            "`Upload-Checksum` (`sha1` or `sha256`) covers this PATCH's body: 460 on mismatch, offset unchanged. "
            "The PATCH that completes the upload verifies the signature and commits: `Zkeb-Backup-Id`; 507 when the "
            "project's quota cannot take it any more (the upload stays, resend its last bytes after making room)."
        ),
    )
    async def append(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        state: State,
        upload_id: FromPath[UUID],
    ) -> Response[None]:
        """Receive the next bytes of an upload."""
        require_tus_resumable(request)
        if media_type(request) != OFFSET_OCTET_STREAM:
            raise UnsupportedUploadMediaTypeError(f"a PATCH body must be {OFFSET_OCTET_STREAM}")
        offset = header_int(request, "Upload-Offset")
        checksum = upload_checksum(request)
        principal = principal_of(request)
        upload = await load_upload(db_session, principal, upload_id)
        if offset != upload.upload_offset:
            raise ProblemError(
                f"Upload-Offset {offset} does not match the upload's offset {upload.upload_offset}",
                status_code=409,
                headers={"Upload-Offset": str(upload.upload_offset)},
            )
        context = backups_context(state)
        outcome = await PatchReceiver(request, context, db_session, principal, upload, checksum).receive()
        headers = base_headers()
        headers["Upload-Offset"] = str(outcome.offset)
        if outcome.backup_id is not None:
            headers[BACKUP_ID_HEADER] = str(outcome.backup_id)
        else:
            headers["Upload-Expires"] = format_upload_expires(outcome.expires_at)
        if outcome.timed_out:
            raise RequestBodyTimeoutError(_STALLED, headers=headers)
        return Response(None, status_code=204, headers=headers)

    @delete(
        "/{upload_id:uuid}",
        guards=[requires_backup_access],
        summary="Abandon an upload (tus termination)",
        description=(
            "204; the upload and its bytes are deleted (`upload.terminated` in the audit trail). A PATCH still open "
            "on it stops and answers 404."
        ),
    )
    async def terminate(
        self, request: Request[Any, Any, Any], db_session: NamedDependency[AsyncSession], upload_id: FromPath[UUID]
    ) -> Response[None]:
        """Delete an upload and what it received."""
        require_tus_resumable(request)
        await terminate_upload(db_session, principal_of(request), upload_id, request=request)
        return Response(None, status_code=204, headers={"Tus-Resumable": TUS_VERSION})


async def _receive_first_bytes(receiver: PatchReceiver, headers: dict[str, str]) -> None:
    """Store a creation-with-upload's body into the new upload; its offset (and backup, if complete) into `headers`.

    Raises:
        HTTPException: the body was refused (the creation is undone), or the upload stays and `Location` in the
            error's headers says where to resume it (503, 507, and 408 when the body stalled).
    """
    session, upload = receiver.session, receiver.upload
    # Read now: a rollback on the way (a refused commit) expires the ORM object.
    upload_id, payload_id = upload.id, upload.payload_id
    location = {"Location": headers["Location"]}
    try:
        outcome = await receiver.receive()
    except HTTPException as exc:
        if exc.status_code < 500:  # refused for its body (460, 422, a 409 nonce...): the creation is undone
            await discard_upload(session, upload_id, payload_id)
        else:  # the upload stays (e.g. 507 at the commit): say where to resume it
            exc.headers = {**(exc.headers or {}), **location}
        raise
    except PoolTimeoutError:  # the upload stays: say where to resume it, as the pool-timeout 503 would
        raise ServiceUnavailableError(
            "the server is busy (no database connection free); resume the upload at its Location shortly",
            headers={"Retry-After": "1", **location},
        ) from None
    except Exception as exc:  # e.g. the database failed over mid-body: what was stored stays, resumable
        if database_out_of_space(exc):
            raise storage_full(location) from None
        logger.exception("creation-with-upload failed after its upload was created")
        raise ServiceUnavailableError(
            "the upload could not be finished; resume it at its Location", headers={"Retry-After": "1", **location}
        ) from None
    headers["Upload-Offset"] = str(outcome.offset)
    headers["Upload-Expires"] = format_upload_expires(outcome.expires_at)
    if outcome.timed_out:
        raise RequestBodyTimeoutError(_STALLED, headers=headers)
    if outcome.backup_id is not None:
        headers[BACKUP_ID_HEADER] = str(outcome.backup_id)
