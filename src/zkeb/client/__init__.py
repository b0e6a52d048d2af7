"""The ZKEB reference client: an SDK (`Client`, `AsyncClient`) and the `zkeb-client` command line.

It encrypts and signs on the device and imports nothing from the server's modules (an import-linter contract in
pyproject.toml keeps it so); install it with ``pip install 'zkeb[client]'``.

The names below are loaded on first use (PEP 562), so that importing `zkeb.client.cli` does not import the SDK's
HTTP stack before the command line has set up its process (see `zkeb.client.cli`), and `keygen` or ``--help`` never
import it at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from zkeb.client.models import (
        BackupRecord,
        BackupResult,
        Enrollment,
        LeftOut,
        RestoreResult,
        ServerEnvelope,
        VerifyResult,
    )
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
    "LeftOut",
    "RestoreResult",
    "RetryPolicy",
    "ScryptParameters",
    "ServerEnvelope",
    "TransferError",
    "VerifyResult",
    "ZkebClientError",
)

_HOMES = {
    "BackupMetadata": "crypto",
    "ApiError": "errors",
    "ConfigurationError": "errors",
    "IntegrityError": "errors",
    "KeyFileError": "errors",
    "TransferError": "errors",
    "ZkebClientError": "errors",
    "KeyFile": "keys",
    "ScryptParameters": "keys",
    "BackupRecord": "models",
    "BackupResult": "models",
    "Enrollment": "models",
    "LeftOut": "models",
    "RestoreResult": "models",
    "ServerEnvelope": "models",
    "VerifyResult": "models",
    "AsyncClient": "sdk",
    "Client": "sdk",
    "RetryPolicy": "transport",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"zkeb.client.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
