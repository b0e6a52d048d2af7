"""The backups domain's problems: each error a request can meet here, with its HTTP status (problem+json).

The tus statuses follow https://tus.io/protocols/resumable-upload (412, 460, 410, 413, 415); the lease errors say why
a PATCH stopped owning its upload; the lifecycle errors are the quota (507), open-upload (429) and append-only (403)
refusals.
"""

from __future__ import annotations

from zkeb.core.errors import ProblemError

__all__ = (
    "UPLOAD_ENDED",
    "UPLOAD_LEASE_LOST",
    "AppendOnlyError",
    "ChecksumMismatchError",
    "InsufficientStorageError",
    "PayloadRangeError",
    "TooManyOpenUploadsError",
    "TusVersionError",
    "UnsupportedUploadMediaTypeError",
    "UploadEndedError",
    "UploadGoneError",
    "UploadLeaseLostError",
    "UploadTooLargeError",
)

UPLOAD_LEASE_LOST = "this PATCH no longer owns the upload: a later PATCH took it over; HEAD the upload for its offset"
UPLOAD_ENDED = "the upload no longer exists: it was terminated, it expired, or a later PATCH completed it"


# --- tus -------------------------------------------------------------------------------------------------------


class TusVersionError(ProblemError):
    """`Tus-Resumable` is missing or names a version this server does not speak (tus §Tus-Resumable)."""

    status_code: int = 412


class ChecksumMismatchError(ProblemError):
    """The PATCH body does not match its `Upload-Checksum` (checksum extension); nothing of it is kept."""

    status_code: int = 460
    title = "Checksum Mismatch"  # tus's name for 460, which HTTP does not define


class UploadGoneError(ProblemError):
    """The upload expired (expiration extension)."""

    status_code: int = 410


class UploadTooLargeError(ProblemError):
    """`Upload-Length` (or a PATCH body) exceeds what this server accepts."""

    status_code: int = 413


class UnsupportedUploadMediaTypeError(ProblemError):
    """A PATCH must be `application/offset+octet-stream`."""

    status_code: int = 415


class UploadLeaseLostError(ProblemError):
    """A PATCH lost its upload to a later PATCH (409); it stores nothing more."""

    status_code: int = 409


class UploadEndedError(UploadLeaseLostError):
    """A PATCH lost its upload because the upload itself ended meanwhile (404): terminated, expired, or completed."""

    status_code: int = 404


# --- lifecycle and reads ---------------------------------------------------------------------------------------


class InsufficientStorageError(ProblemError):
    """The project's storage quota cannot take the upload (507); the body says `used`, `quota`, `requested`."""

    status_code: int = 507


class TooManyOpenUploadsError(ProblemError):
    """The project already has `MAX_OPEN_UPLOADS` tus uploads open (429)."""

    status_code: int = 429


class AppendOnlyError(ProblemError):
    """The project is append-only: this credential may not delete, or the backup is not old enough yet (403)."""

    status_code: int = 403


class PayloadRangeError(ProblemError):
    """The requested byte range selects nothing of the payload."""

    status_code: int = 416


class PayloadPreconditionError(ProblemError):
    """`If-Match` names no entity tag of this payload: the client meant another one (412)."""

    status_code: int = 412
