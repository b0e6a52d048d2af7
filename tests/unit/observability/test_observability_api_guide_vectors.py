"""The test vectors in docs/api-guide.md hold against the server's own message builders and verifier."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from zkeb.lib.byteforms import BytesField, TextEncoding, decode_bytes_fields
from zkeb.lib.envelope import (
    AUTH_TAG_LENGTH,
    DEVICE_ID_HASH_LENGTH,
    ED25519_SIGNATURE_LENGTH,
    NONCE_LENGTH,
    auth_message,
    backup_signed_message,
    datetime_to_epoch_microseconds,
    parse_rfc3339_utc,
    verify_ed25519,
)
from zkeb.lib.tus import parse_upload_metadata


@pytest.fixture(scope="module")
def vectors(project_root: Path) -> dict[str, Any]:
    guide = (project_root / "docs" / "api-guide.md").read_text()
    match = re.search(r"<!-- zkeb-test-vectors -->\s*```json\n(.*?)\n```", guide, re.DOTALL)
    assert match, "the machine-readable vector block is missing from docs/api-guide.md"
    loaded: dict[str, Any] = json.loads(match.group(1))
    return loaded


def _public_key(vectors: dict[str, Any]) -> bytes:
    return bytes.fromhex(vectors["ed25519_public_key_hex"])


def test_public_key_is_the_one_of_the_documented_private_key(vectors: dict[str, Any]) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vectors["ed25519_private_key_seed_hex"]))
    assert key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) == _public_key(vectors)
    assert base64.b64decode(vectors["ed25519_public_key_base64"]) == _public_key(vectors)


def test_backup_vector_message_and_signature_match_the_server_verifier(vectors: dict[str, Any]) -> None:
    backup = vectors["backup"]
    payload = base64.b64decode(backup["payload_base64"])
    metadata = base64.b64decode(backup["metadata_base64"])
    assert payload == backup["payload_utf8"].encode()
    assert hashlib.sha256(payload).hexdigest() == backup["payload_sha256_hex"]
    assert hashlib.sha256(metadata).hexdigest() == backup["metadata_sha256_hex"]
    assert hashlib.sha256(backup["device_identifier"].encode()).hexdigest() == backup["device_id_hash_hex"]
    timestamp = parse_rfc3339_utc(backup["backup_timestamp"])
    assert datetime_to_epoch_microseconds(timestamp) == backup["backup_timestamp_us"]
    message = backup_signed_message(
        project_id=uuid.UUID(vectors["project_id"]),
        container_id=uuid.UUID(backup["container_id"]),
        device_id_hash=bytes.fromhex(backup["device_id_hash_hex"]),
        backup_timestamp=timestamp,
        payload_nonce=bytes.fromhex(backup["payload_nonce_hex"]),
        payload_auth_tag=bytes.fromhex(backup["payload_auth_tag_hex"]),
        payload_sha256=hashlib.sha256(payload).digest(),
        payload_size=len(payload),
        metadata_nonce=bytes.fromhex(backup["metadata_nonce_hex"]),
        metadata_auth_tag=bytes.fromhex(backup["metadata_auth_tag_hex"]),
        metadata_sha256=hashlib.sha256(metadata).digest(),
        metadata_size=len(metadata),
    )
    assert message.hex() == backup["signed_message_hex"]
    assert len(message) == backup["signed_message_length"] == 223
    signature = bytes.fromhex(backup["signature_hex"])
    assert base64.b64decode(backup["signature_base64"]) == signature
    assert verify_ed25519(_public_key(vectors), signature, message)
    # One flipped bit anywhere in the message must not verify.
    tampered = bytearray(message)
    tampered[-1] ^= 1
    assert not verify_ed25519(_public_key(vectors), signature, bytes(tampered))


def test_auth_vector_message_and_signature_match_the_server_verifier(vectors: dict[str, Any]) -> None:
    proof = vectors["auth"]
    message = auth_message(
        project_id=uuid.UUID(vectors["project_id"]),
        device_id_hash=bytes.fromhex(vectors["backup"]["device_id_hash_hex"]),
        timestamp_ms=proof["timestamp_ms"],
    )
    assert message.hex() == proof["signed_message_hex"]
    assert len(message) == proof["signed_message_length"] == 69
    signature = base64.b64decode(proof["signature_base64"])
    assert signature.hex() == proof["signature_hex"]
    assert verify_ed25519(_public_key(vectors), signature, message)


def test_signatures_are_reproducible_from_the_documented_key(vectors: dict[str, Any]) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vectors["ed25519_private_key_seed_hex"]))
    for block in (vectors["backup"], vectors["auth"]):
        assert key.sign(bytes.fromhex(block["signed_message_hex"])).hex() == block["signature_hex"]


def test_openapi_envelope_example_is_the_guide_vector(vectors: dict[str, Any]) -> None:
    from zkeb.core.openapi import ENVELOPE_EXAMPLE  # noqa: PLC0415

    backup = vectors["backup"]
    assert ENVELOPE_EXAMPLE["signature"] == backup["signature_base64"]
    assert ENVELOPE_EXAMPLE["payload"] == backup["payload_base64"]
    assert ENVELOPE_EXAMPLE["device_id_hash"] == backup["device_id_hash_hex"]
    assert base64.b64decode(ENVELOPE_EXAMPLE["payload_nonce"]).hex() == backup["payload_nonce_hex"]
    assert base64.b64decode(ENVELOPE_EXAMPLE["metadata_auth_tag"]).hex() == backup["metadata_auth_tag_hex"]
    assert ENVELOPE_EXAMPLE["backup_timestamp"] == backup["backup_timestamp"]


def test_the_tus_text_form_metadata_vector_carries_the_vector_envelope(
    project_root: Path, vectors: dict[str, Any]
) -> None:
    guide = (project_root / "docs" / "api-guide.md").read_text()
    match = re.search(r"<!-- zkeb-tus-text-metadata-vector -->\s*```text\n(.*?)\n```", guide, re.DOTALL)
    assert match, "the tus text-form metadata vector is missing from docs/api-guide.md"
    values = parse_upload_metadata(match.group(1))
    fields = (
        BytesField("device_id_hash", DEVICE_ID_HASH_LENGTH, TextEncoding.HEX),
        BytesField("payload_nonce", NONCE_LENGTH),
        BytesField("payload_auth_tag", AUTH_TAG_LENGTH),
        BytesField("metadata", None),
        BytesField("metadata_nonce", NONCE_LENGTH),
        BytesField("metadata_auth_tag", AUTH_TAG_LENGTH),
        BytesField("signature", ED25519_SIGNATURE_LENGTH),
    )
    decoded = decode_bytes_fields(fields, {name: value or b"" for name, value in values.items()})
    backup = vectors["backup"]
    assert decoded == {
        "device_id_hash": bytes.fromhex(backup["device_id_hash_hex"]),
        "payload_nonce": bytes.fromhex(backup["payload_nonce_hex"]),
        "payload_auth_tag": bytes.fromhex(backup["payload_auth_tag_hex"]),
        "metadata": base64.b64decode(backup["metadata_base64"]),
        "metadata_nonce": bytes.fromhex(backup["metadata_nonce_hex"]),
        "metadata_auth_tag": bytes.fromhex(backup["metadata_auth_tag_hex"]),
        "signature": bytes.fromhex(backup["signature_hex"]),
    }
    assert values["container_id"] == backup["container_id"].encode()
    assert values["backup_timestamp"] == backup["backup_timestamp"].encode()
