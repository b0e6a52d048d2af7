"""The test vectors of docs/protocol.md hold against the server's own implementation, so the doc cannot drift.

Each vector is read out of the Markdown and run through the code the server itself uses: the signed-message builders
and verifier (`zkeb.lib.envelope`), the single-shot body structs and validation (`zkeb.domain.backups.schemas`), the
tus `Upload-Metadata` reader (`zkeb.domain.backups.tus`), the signature check before commit
(`zkeb.domain.backups.services.backups`) and the token request body (`zkeb.domain.accounts.schemas`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from zkeb.core.errors import UnprocessableError
from zkeb.domain.accounts.schemas import TokenRequest
from zkeb.domain.backups.envelope import (
    BackupEnvelope,
    envelope_from_json,
    envelope_from_metadata,
    envelope_from_msgpack,
)
from zkeb.domain.backups.openapi import ENVELOPE_EXAMPLE
from zkeb.domain.backups.schemas import EnvelopeJson, EnvelopeMsgpack
from zkeb.domain.backups.services.backups import verify_backup_signature
from zkeb.lib.envelope import (
    auth_message,
    backup_signed_message,
    datetime_to_epoch_microseconds,
    parse_rfc3339_utc,
    verify_ed25519,
)
from zkeb.lib.tus import parse_upload_metadata

_TABLE_ROW = re.compile(r"^\| (\d+) \| (\d+) \| [^|]+ \| `([0-9a-f]+)` \|$", re.MULTILINE)


@pytest.fixture(scope="module")
def protocol(project_root: Path) -> str:
    return (project_root / "docs" / "protocol.md").read_text()


@pytest.fixture(scope="module")
def vectors(protocol: str) -> dict[str, Any]:
    match = re.search(r"<!-- zkeb-test-vectors -->\s*```json\n(.*?)\n```", protocol, re.DOTALL)
    assert match, "the machine-readable vector block is missing from docs/protocol.md"
    loaded: dict[str, Any] = json.loads(match.group(1))
    return loaded


def _public_key(vectors: dict[str, Any]) -> bytes:
    return bytes.fromhex(vectors["ed25519_public_key_hex"])


def _table(protocol: str, marker: str) -> list[tuple[int, int, bytes]]:
    """The (offset, length, bytes) rows of the table after `<!-- marker -->`."""
    start = protocol.index(f"<!-- {marker} -->")
    end = protocol.find("\n\n", start)
    return [(int(o), int(n), bytes.fromhex(h)) for o, n, h in _TABLE_ROW.findall(protocol[start:end])]


def _envelope_from_json(body: bytes) -> tuple[BackupEnvelope, bytes]:
    """A single-shot JSON body decoded and validated as `POST /api/v1/backups` does."""
    source = msgspec.json.decode(body, type=EnvelopeJson)
    return envelope_from_json(source), source.payload


def _envelope_from_msgpack(body: bytes) -> tuple[BackupEnvelope, bytes]:
    """A single-shot msgpack body decoded and validated as `POST /api/v1/backups` does."""
    source = msgspec.msgpack.decode(body, type=EnvelopeMsgpack)
    return envelope_from_msgpack(source), bytes(source.payload)


def _verify(vectors: dict[str, Any], envelope: BackupEnvelope, payload: bytes) -> None:
    """The server's check before commit: raises 422 unless the signature holds."""
    verify_backup_signature(
        envelope,
        project_id=uuid.UUID(vectors["project_id"]),
        public_key=_public_key(vectors),
        payload_sha256=hashlib.sha256(payload).digest(),
        payload_size=len(payload),
        method="single",
    )


def test_public_key_is_the_one_of_the_documented_private_key(vectors: dict[str, Any]) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vectors["ed25519_private_key_seed_hex"]))
    assert key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) == _public_key(vectors)
    assert base64.b64decode(vectors["ed25519_public_key_base64"]) == _public_key(vectors)


def test_backup_vector_message_and_signature_match_the_server_verifier(vectors: dict[str, Any]) -> None:
    backup = vectors["backup"]
    payload = base64.b64decode(backup["payload_base64"])
    metadata = base64.b64decode(backup["metadata_base64"])
    assert payload == backup["payload_utf8"].encode()
    assert metadata == backup["metadata_utf8"].encode()
    assert (len(payload), len(metadata)) == (backup["payload_size"], backup["metadata_size"])
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


@pytest.mark.parametrize(
    ("marker", "block", "length"),
    [("zkeb-backup-message-table", "backup", 223), ("zkeb-auth-message-table", "auth", 69)],
)
def test_field_tables_are_the_signed_messages_cut_at_their_offsets(
    protocol: str, vectors: dict[str, Any], marker: str, block: str, length: int
) -> None:
    rows = _table(protocol, marker)
    assert rows, f"no rows under <!-- {marker} -->"
    offset = 0
    for row_offset, row_length, value in rows:
        assert (row_offset, row_length) == (offset, len(value))
        offset += row_length
    assert offset == length
    assert b"".join(value for _, _, value in rows).hex() == vectors[block]["signed_message_hex"]


def test_json_body_is_accepted_and_verified_by_the_single_shot_decoder(vectors: dict[str, Any]) -> None:
    backup = vectors["backup"]
    envelope, payload = _envelope_from_json(json.dumps(backup["json_body"]).encode())
    assert payload == base64.b64decode(backup["payload_base64"])
    assert envelope.device_id_hash.hex() == backup["device_id_hash_hex"]
    assert envelope.signature.hex() == backup["signature_hex"]
    _verify(vectors, envelope, payload)


def test_msgpack_body_is_the_same_envelope_as_the_json_body(vectors: dict[str, Any]) -> None:
    backup = vectors["backup"]
    from_json = _envelope_from_json(json.dumps(backup["json_body"]).encode())
    from_msgpack = _envelope_from_msgpack(bytes.fromhex(backup["msgpack_body_hex"]))
    assert from_msgpack == from_json
    _verify(vectors, *from_msgpack)


def test_tus_upload_metadata_in_either_form_is_the_same_envelope(vectors: dict[str, Any]) -> None:
    backup, tus = vectors["backup"], vectors["backup"]["tus"]
    envelope, payload = _envelope_from_json(json.dumps(backup["json_body"]).encode())
    assert tus["upload_length"] == len(payload)
    assert envelope_from_metadata(tus["upload_metadata"]) == envelope
    raw_value = f"device_id_hash {base64.b64encode(envelope.device_id_hash).decode()},"
    assert raw_value in tus["upload_metadata"]
    text_form = tus["upload_metadata"].replace(raw_value, f"device_id_hash {tus['device_id_hash_text_form']},")
    assert text_form != tus["upload_metadata"]
    assert base64.b64decode(tus["device_id_hash_text_form"]).decode() == backup["device_id_hash_hex"]
    assert envelope_from_metadata(text_form) == envelope
    assert envelope_from_metadata(tus["upload_metadata_text_form"]) == envelope
    _verify(vectors, envelope_from_metadata(tus["upload_metadata"]), payload)


def test_the_text_form_header_is_the_json_bodys_fields_as_strings(vectors: dict[str, Any]) -> None:
    body, header = vectors["backup"]["json_body"], vectors["backup"]["tus"]["upload_metadata_text_form"]
    strings = {key: (value or b"").decode() for key, value in parse_upload_metadata(header).items()}
    expected = {key: value for key, value in body.items() if key != "payload"}
    expected["device_id_hash"] = expected["device_id_hash"].lower()
    assert strings == expected


def test_a_vector_body_with_another_project_or_payload_is_refused(vectors: dict[str, Any]) -> None:
    envelope, payload = _envelope_from_json(json.dumps(vectors["backup"]["json_body"]).encode())
    with pytest.raises(UnprocessableError):
        _verify({**vectors, "project_id": str(uuid.UUID(int=1))}, envelope, payload)
    with pytest.raises(UnprocessableError):
        _verify(vectors, envelope, payload + b"\x00")


def test_token_request_body_carries_a_proof_the_server_accepts(vectors: dict[str, Any]) -> None:
    proof = vectors["auth"]
    request = msgspec.json.decode(json.dumps(proof["token_request"]).encode(), type=TokenRequest)
    message = auth_message(
        project_id=request.project_id,
        device_id_hash=bytes.fromhex(request.device_id_hash),
        timestamp_ms=request.timestamp_ms,
    )
    assert message.hex() == proof["signed_message_hex"]
    assert verify_ed25519(_public_key(vectors), base64.b64decode(request.signature, validate=True), message)


def test_openapi_envelope_example_is_the_protocol_vector(vectors: dict[str, Any]) -> None:
    assert vectors["backup"]["json_body"] == ENVELOPE_EXAMPLE
