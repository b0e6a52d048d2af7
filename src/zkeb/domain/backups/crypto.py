"""Per-payload data keys: each payload's chunks are encrypted under its own key, wrapped by a master key.

A new payload gets a fresh AES-256 data key wrapped by the keyring's active master key (`key_id` and the wrapped
key are stored with the payload); a stored payload's key is unwrapped by whichever configured master key wrapped
it, so rotating the master key rewraps keys and rewrites no payload bytes (`zkeb.domain.backups.jobs.key_rotation`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from uuid import UUID

from zkeb.core.errors import ServiceUnavailableError
from zkeb.lib.atrest import (
    ChunkCipher,
    DataKeyUnwrapError,
    MasterKeyring,
    UnknownKeyIdError,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)

__all__ = ("PayloadCrypto", "PayloadKey")

logger = logging.getLogger("zkeb.backups.crypto")


@dataclass(frozen=True, slots=True)
class PayloadKey:
    """A payload's data key as stored: wrapped by the master key `key_id`."""

    key_id: str
    wrapped_key: bytes


class PayloadCrypto:
    """Creates and opens per-payload data keys under the master keyring."""

    def __init__(self, keyring: MasterKeyring) -> None:
        """Use `keyring.active` for new payloads and any of its keys to open existing ones."""
        self._keyring = keyring

    def new_key(self, payload_id: UUID) -> tuple[PayloadKey, ChunkCipher]:
        """A fresh data key for `payload_id`, wrapped by the active master key, and its chunk cipher."""
        data_key = new_data_key()
        wrapped = wrap_data_key(self._keyring.active, data_key, payload_id=payload_id)
        return PayloadKey(self._keyring.active_id, wrapped), ChunkCipher(data_key, payload_id)

    def cipher(self, payload_id: UUID, key: PayloadKey) -> ChunkCipher:
        """The chunk cipher of a stored payload.

        Raises:
            ServiceUnavailableError: the master key that wrapped it is not configured, or does not open it.
        """
        try:
            data_key = unwrap_data_key(self._keyring.get(key.key_id), key.wrapped_key, payload_id=payload_id)
        except (UnknownKeyIdError, DataKeyUnwrapError) as exc:
            logger.error(  # noqa: TRY400 - the traceback adds nothing
                "cannot open the data key of payload %s (key id %s): %s", payload_id, key.key_id, exc
            )
            raise ServiceUnavailableError("the stored payload cannot be decrypted with the configured keys") from None
        return ChunkCipher(data_key, payload_id)
