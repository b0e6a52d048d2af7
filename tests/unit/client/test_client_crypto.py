"""The client's cryptography, checked against the server's own implementation of the same contract."""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zkeb.client import IntegrityError, KeyFile
from zkeb.client.crypto import (
    BackupMetadata,
    PayloadDecryptor,
    PayloadEncryptor,
    auth_message,
    backup_signed_message,
    decrypt_metadata,
    encrypt_metadata,
    seal_payload,
    verify_signature,
)
from zkeb.client.models import ServerEnvelope
from zkeb.client.restores import check_envelope
from zkeb.lib import envelope as server


def test_signed_message_is_byte_for_byte_the_servers() -> None:
    fields: dict[str, Any] = {
        "project_id": uuid.uuid4(),
        "container_id": uuid.uuid4(),
        "device_id_hash": os.urandom(32),
        "backup_timestamp": datetime(2026, 12, 6, 4, 50, 1, 123456, tzinfo=UTC),
        "payload_nonce": os.urandom(12),
        "payload_auth_tag": os.urandom(16),
        "payload_sha256": os.urandom(32),
        "payload_size": 123_456_789,
        "metadata_nonce": os.urandom(12),
        "metadata_auth_tag": os.urandom(16),
    }
    metadata = os.urandom(300)

    ours = backup_signed_message(**fields, metadata=metadata)
    theirs = server.backup_signed_message(
        **fields, metadata_sha256=hashlib.sha256(metadata).digest(), metadata_size=len(metadata)
    )

    assert ours == theirs
    assert len(ours) == 223


def test_auth_message_is_byte_for_byte_the_servers() -> None:
    project, device, now = uuid.uuid4(), os.urandom(32), 1_796_000_000_123
    assert auth_message(project_id=project, device_id_hash=device, timestamp_ms=now) == server.auth_message(
        project_id=project, device_id_hash=device, timestamp_ms=now
    )


def test_a_signature_made_by_a_key_file_verifies_on_the_server_and_on_the_client() -> None:
    keys = KeyFile.generate()
    message = b"x" * 223
    signature = keys.signing_key.sign(message)
    assert server.verify_ed25519(keys.public_key, signature, message)
    verify_signature(keys.public_key, signature, message)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_signature(keys.public_key, signature, message[:-1] + b"y")


def test_streaming_encryption_equals_one_shot_aes_gcm_and_decrypts_back() -> None:
    key, nonce, plaintext = os.urandom(32), os.urandom(12), os.urandom(3 * 1024 * 1024 + 17)
    encryptor = PayloadEncryptor(key, nonce)
    ciphertext = b"".join(encryptor.update(plaintext[i : i + 65536]) for i in range(0, len(plaintext), 65536))
    tag = encryptor.finish()

    assert ciphertext + tag == AESGCM(key).encrypt(nonce, plaintext, None)
    assert encryptor.cipher_sha256.digest() == hashlib.sha256(ciphertext).digest()
    decryptor = PayloadDecryptor(key, nonce, tag)
    assert decryptor.update(ciphertext) == plaintext
    decryptor.finish()


def test_sealing_twice_gives_the_same_tag_and_digest_so_uploads_can_resume() -> None:
    key, nonce, plaintext = os.urandom(32), os.urandom(12), os.urandom(100_000)
    first = seal_payload(key, nonce, [plaintext[:1000], plaintext[1000:]])
    second = seal_payload(key, nonce, [plaintext])
    changed = seal_payload(key, nonce, [plaintext[:-1] + b"\x00"])
    assert first == second
    assert changed.plain_sha256 != first.plain_sha256


def test_sealing_in_many_chunks_gives_the_digests_and_tag_of_the_whole_payload() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    chunks = [os.urandom(size) for size in (1, 65536, 1024 * 1024, 3, 500_000, 1024 * 1024 + 7) * 4]
    plaintext = b"".join(chunks)
    sealed_whole = AESGCM(key).encrypt(nonce, plaintext, None)

    sealed = seal_payload(key, nonce, chunks)

    assert sealed.tag == sealed_whole[-16:]
    assert sealed.size == len(plaintext)
    assert sealed.plain_sha256 == hashlib.sha256(plaintext).digest()
    assert sealed.cipher_sha256 == hashlib.sha256(sealed_whole[:-16]).digest()


@pytest.mark.parametrize("where", ["ciphertext", "tag", "key"])
def test_altered_ciphertext_tag_or_key_fails_decryption(where: str) -> None:
    key, nonce, plaintext = os.urandom(32), os.urandom(12), os.urandom(5000)
    sealed = AESGCM(key).encrypt(nonce, plaintext, None)
    ciphertext, tag = bytearray(sealed[:-16]), bytearray(sealed[-16:])
    if where == "ciphertext":
        ciphertext[42] ^= 1
    elif where == "tag":
        tag[0] ^= 1
    else:
        key = os.urandom(32)
    decryptor = PayloadDecryptor(key, nonce, bytes(tag))
    decryptor.update(bytes(ciphertext))
    with pytest.raises(IntegrityError, match="does not decrypt"):
        decryptor.finish()


def test_metadata_round_trips_and_a_wrong_key_is_refused() -> None:
    key = os.urandom(32)
    meta = BackupMetadata("notes.txt", 10, 1.5, "ab" * 32, "file")
    blob, nonce, tag = encrypt_metadata(key, meta)
    assert decrypt_metadata(key, blob, nonce, tag) == meta
    assert b"notes.txt" not in blob
    with pytest.raises(IntegrityError, match="wrong key"):
        decrypt_metadata(os.urandom(32), blob, nonce, tag)


def _envelope(keys: KeyFile, device_id_hash: bytes) -> ServerEnvelope:
    key = keys.backup_key
    blob, nonce, tag = encrypt_metadata(key, BackupMetadata("a", 1, 0.0, "00" * 32, "file"))
    now = datetime.now(UTC)
    project, container = uuid.uuid4(), uuid.uuid4()
    fields: dict[str, Any] = {
        "payload_nonce": os.urandom(12),
        "payload_auth_tag": os.urandom(16),
        "payload_sha256": os.urandom(32),
    }
    message = backup_signed_message(
        project_id=project,
        container_id=container,
        device_id_hash=device_id_hash,
        backup_timestamp=now,
        payload_size=17,
        metadata=blob,
        metadata_nonce=nonce,
        metadata_auth_tag=tag,
        **fields,
    )
    return ServerEnvelope(
        id=uuid.uuid4(),
        project_id=project,
        container_id=container,
        device_id_hash=device_id_hash.hex(),
        payload_nonce=fields["payload_nonce"],
        payload_auth_tag=fields["payload_auth_tag"],
        metadata=blob,
        metadata_nonce=nonce,
        metadata_auth_tag=tag,
        signature=keys.signing_key.sign(message),
        backup_timestamp=now,
        encrypted_payload_size=17,
        payload_sha256=fields["payload_sha256"].hex(),
        created_at=now,
    )


def test_an_envelope_signed_by_this_device_checks_and_another_devices_is_refused() -> None:
    keys = KeyFile.generate()
    assert check_envelope(keys, _envelope(keys, keys.device_id_hash)).metadata.name == "a"
    with pytest.raises(IntegrityError, match="made by another device"):
        check_envelope(keys, _envelope(keys, os.urandom(32)))
