"""The client's exceptions: one base class, and an `ApiError` carrying the server's problem+json fields.

Every message is one line meant for a person; none holds a key, token, plaintext or ciphertext.
"""

from __future__ import annotations

import uuid

__all__ = ("ApiError", "ConfigurationError", "IntegrityError", "KeyFileError", "TransferError", "ZkebClientError")


class ZkebClientError(Exception):
    """Anything the client refuses or fails to do; `str()` is one line for a person."""


class ConfigurationError(ZkebClientError):
    """A setting is missing or invalid (server URL, project, key file path, container id...)."""


class KeyFileError(ZkebClientError):
    """The key file is missing, malformed, already exists, or its passphrase is wrong."""


class IntegrityError(ZkebClientError):
    """A backup failed verification: signature, digest, authentication tag or plaintext SHA-256."""


class TransferError(ZkebClientError):
    """The server could not be reached, or kept failing after the retries."""


class ApiError(ZkebClientError):
    """The server answered with an RFC 9457 problem.

    Attributes:
        status: The HTTP status code.
        title: The problem's title.
        detail: The problem's detail, when given.
        request_id: The server's request (trace) id, for its operator's logs.
        backup_id: On a `409`, the backup this very envelope was already committed as (an earlier attempt whose
            answer was lost succeeded: protocol §6.5).
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        request_id: str | None = None,
        backup_id: uuid.UUID | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.request_id = request_id
        self.backup_id = backup_id
        text = f"server answered {status} {title}"
        if detail and detail != title:
            text += f": {detail}"
        if request_id:
            text += f" (request {request_id})"
        super().__init__(" ".join(text.split()))
