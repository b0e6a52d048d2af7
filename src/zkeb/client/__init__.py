"""The ZKEB reference client: an SDK (`Client`, `AsyncClient`) and the `zkeb-client` command line.

It encrypts and signs on the device and imports nothing from the server's modules (an import-linter contract in
pyproject.toml keeps it so); install it with ``pip install 'zkeb[client]'``.
"""

from __future__ import annotations

from zkeb.client.crypto import BackupMetadata
from zkeb.client.errors import (
    ApiError,
    ConfigurationError,
    IntegrityError,
    KeyFileError,
    TransferError,
    ZkebClientError,
)
from zkeb.client.keys import KeyFile, ScryptParameters
from zkeb.client.models import BackupRecord, BackupResult, Enrollment, RestoreResult, ServerEnvelope, VerifyResult
from zkeb.client.sdk import AsyncClient, Client
from zkeb.client.transport import RetryPolicy

__all__ = (
    "ApiError",
    "AsyncClient",
    "BackupMetadata",
    "BackupRecord",
    "BackupResult",
    "Client",
    "ConfigurationError",
    "Enrollment",
    "IntegrityError",
    "KeyFile",
    "KeyFileError",
    "RestoreResult",
    "RetryPolicy",
    "ScryptParameters",
    "ServerEnvelope",
    "TransferError",
    "VerifyResult",
    "ZkebClientError",
)
