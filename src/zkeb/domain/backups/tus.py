"""A tus 1.0.0 resumable-upload server for backups (https://tus.io/protocols/resumable-upload).

Implemented: core protocol, `creation`, `creation-with-upload`, `termination`, `checksum` (`sha1`, which the
spec requires, and `sha256`) and `expiration`. Not implemented: `creation-defer-length` and `concatenation`.

ZKEB specifics:

- `Upload-Metadata` carries every envelope field but the payload, each value base64 as tus requires:
  `container_id` and `backup_timestamp` are base64 of their text (UUID, RFC 3339); `device_id_hash`,
  `payload_nonce`, `payload_auth_tag`, `metadata`, `metadata_nonce`, `metadata_auth_tag` and `signature` are base64
  of either their raw bytes or their JSON text (standard base64, `device_id_hash` hex), so that string-only clients
  can send them; `zkeb.lib.byteforms` holds the exact rule. Other keys (e.g. a client's `filename`) are ignored.
  The envelope, the device and the nonce are checked at creation (400 malformed, 422 invalid naming the field, 409
  reused nonce, 507 when `Upload-Length` does not fit under the project's storage quota), so a bad upload fails
  before any byte.
- The commit charges the quota again, atomically: a completing PATCH may answer 507 when concurrent uploads took
  the room. The upload then stays (its offset unchanged), so the client can resend the last bytes once room is made.
- The PATCH that completes the upload verifies the device signature and commits the backup atomically; its
  response carries `Zkeb-Backup-Id`. A signature mismatch answers 422 and deletes the upload and its bytes.
- Bytes of a PATCH are stored as they arrive (pipelined, see `chunk_writes`); a PATCH cut off by the network keeps what
  was received (unless it carried `Upload-Checksum`, which can then not be verified), so `HEAD` + `PATCH` resume.
- One PATCH at a time per upload, through a lease on the session row that each chunk batch checks in its own
  transaction: a PATCH holds a pooled connection only while it writes, never while its client's bytes are on the
  way. A new PATCH takes the upload over from an earlier one still open (a retry sent before the server saw the
  first attempt fail, as tusd does); the earlier one stores nothing more and answers 409 (404 when the upload ended
  meanwhile: terminated, expired, or completed by the later PATCH). Without `Upload-Checksum`
  each stored batch also records the offset it reaches, short of `Upload-Length` (only the commit completes an
  upload), so a connection that dies unseen loses at most the batch in flight.
- Sessions expire `UPLOAD_EXPIRY` after their last stored bytes (`Upload-Expires`); `UploadSweeper` purges expired
  sessions, their chunks, and payloads orphaned by a crashed process, in bounded batches, safely from any number
  of processes (the maintenance runner, `zkeb.domain.backups.jobs.maintenance`, calls it).

Where each part lives: this module reads and answers the protocol (headers, `Upload-Metadata`, the uploads URL, the
tus error responses); the endpoints are in `zkeb.domain.backups.controllers.uploads`; the rules in
`zkeb.domain.backups.services.uploads` (creation, termination) and `zkeb.domain.backups.services.upload_patch` (a
PATCH under its lease, the commit); their SQL in `zkeb.domain.backups.store.upload_leases`; the sweeper in
`zkeb.domain.backups.jobs.upload_sweeper`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

from zkeb.core.errors import ProblemError, exception_handlers
from zkeb.core.security import request_is_tls, trusted_proxies
from zkeb.db.models import UploadSession
from zkeb.domain.backups.context import BackupsContext
from zkeb.domain.backups.errors import TusVersionError
from zkeb.lib.tus import (
    TUS_VERSION,
    TusHeaderError,
    TusHeaderTooLargeError,
    format_upload_expires,
    parse_non_negative_int,
    parse_upload_checksum,
)

__all__ = (
    "BACKUP_ID_HEADER",
    "OFFSET_OCTET_STREAM",
    "TUS_EXCEPTION_HANDLERS",
    "UPLOADS_PATH",
    "base_headers",
    "header_int",
    "malformed",
    "media_type",
    "require_tus_resumable",
    "upload_checksum",
    "uploads_url",
)

UPLOADS_PATH = "/api/v1/uploads"
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
BACKUP_ID_HEADER = "Zkeb-Backup-Id"

#: A `Host` header: a DNS name or IPv4 address, or a bracketed IPv6 address, and an optional port (at most
#: `_MAX_PORT`).
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::(?P<port>[0-9]{1,5}))?"
)

_MAX_PORT = 65535

# --- error responses -----------------------------------------------------------------------------------------------


def malformed(detail: str) -> ProblemError:
    """A 400 for a malformed tus request."""
    return ProblemError(detail, status_code=400)


def _with_tus_headers(response: Response[Any], exc: Exception) -> Response[Any]:
    response.headers["Tus-Resumable"] = TUS_VERSION
    if isinstance(exc, TusVersionError):
        response.headers["Tus-Version"] = TUS_VERSION
    return response


def _tus_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _with_tus_headers(exception_handlers()[HTTPException](request, exc), exc)


def _tus_unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return _with_tus_headers(exception_handlers()[Exception](request, exc), exc)


#: The app's problem+json handlers, plus the `Tus-Resumable` (and, on a 412, `Tus-Version`) headers tus requires.
TUS_EXCEPTION_HANDLERS: ExceptionHandlersMap = {HTTPException: _tus_http_error, Exception: _tus_unexpected_error}


# --- headers ---------------------------------------------------------------------------------------------------


def require_tus_resumable(request: Request[Any, Any, Any]) -> None:
    """Every request but OPTIONS must say `Tus-Resumable: 1.0.0`.

    Raises:
        TusVersionError: missing or another version (412 with `Tus-Version`).
    """
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise TusVersionError(f"this server speaks tus {TUS_VERSION}; send 'Tus-Resumable: {TUS_VERSION}'")


def header_int(request: Request[Any, Any, Any], name: str, *, too_large: Callable[[], Exception] | None = None) -> int:
    """The required non-negative integer header `name` (e.g. `Upload-Length`).

    Raises:
        ProblemError: missing or not a non-negative integer (400).
        Exception: `too_large()` when the value is above `2**63 - 1` and `too_large` is given (a size: 413).
    """
    value = request.headers.get(name.lower())
    if value is None:
        raise malformed(f"{name} is required")
    try:
        return parse_non_negative_int(value, name=name)
    except TusHeaderTooLargeError as exc:
        raise (too_large() if too_large is not None else malformed(str(exc))) from None
    except TusHeaderError as exc:
        raise malformed(str(exc)) from None


def upload_checksum(request: Request[Any, Any, Any]) -> tuple[str, bytes] | None:
    """`Upload-Checksum` as (algorithm, digest), or None without one.

    Raises:
        ProblemError: malformed, or an algorithm this server does not support (400).
    """
    value = request.headers.get("upload-checksum")
    if value is None:
        return None
    try:
        return parse_upload_checksum(value)
    except TusHeaderError as exc:
        raise malformed(str(exc)) from None


def media_type(request: Request[Any, Any, Any]) -> str:
    """The request's media type, lower case, without parameters ('' without `Content-Type`)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def base_headers(upload: UploadSession | None = None) -> dict[str, str]:
    """The headers of every tus answer, with the upload's `Upload-Offset` and `Upload-Expires` when given one."""
    headers = {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store"}
    if upload is not None:
        headers["Upload-Offset"] = str(upload.upload_offset)
        headers["Upload-Expires"] = format_upload_expires(upload.expires_at)
    return headers


def uploads_url(request: Request[Any, Any, Any], context: BackupsContext) -> str:
    """The absolute URL of the uploads collection, which each upload's `Location` extends.

    Absolute, as some clients cannot resolve a relative `Location`: `PUBLIC_URL` when configured (what a deployment
    should do: `Host` is the client's to choose), else the request's `Host`, which must then name a host (400
    otherwise). The scheme is then https when the request came over TLS, directly or through a trusted proxy
    (`TRUSTED_PROXIES`).

    Raises:
        ProblemError: no `PUBLIC_URL` and no usable `Host` (400).
    """
    if context.settings.public_url is not None:
        return f"{context.settings.public_url}{UPLOADS_PATH}"
    host = request.headers.get("host")
    named = _HOST.fullmatch(host) if host is not None else None
    if host is None or named is None or int(named["port"] or 0) > _MAX_PORT:
        raise malformed("a Host header naming this server is required (the upload's Location is built from it)")
    tls = request_is_tls(request.scope, trusted_proxies(context.settings.trusted_proxies))
    return f"{'https' if tls else request.scope.get('scheme', 'http')}://{host}{UPLOADS_PATH}"
