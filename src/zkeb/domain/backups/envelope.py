"""The backup envelope, declared once: every place that lists its fields derives them from `BackupEnvelope`.

`BackupEnvelope` is the validated envelope without its payload (the payload is the body's bulk and travels apart).
Each of its fields carries a `FieldSpec` in its annotation: what kind of value it is, its exact length, what it is
for and the test vector's value (docs/protocol.md §9). From those come, here:

- `ENVELOPE_FIELDS`, the fields in order, which the rest of the domain iterates;
- the wire structs' envelope parts (`JsonEnvelopeFields`, `MsgpackEnvelopeFields`), which the request and response
  bodies in `zkeb.domain.backups.schemas` extend;
- the decoders of each form (`envelope_from_json`, `envelope_from_msgpack`, `envelope_from_metadata` for tus) and
  the validation every form ends in (`validate_envelope`);
- the row mappings (`envelope_columns`, `envelope_of_row`, `read_fields`) and the OpenAPI schema and example
  (`envelope_schema`, `ENVELOPE_FIELD_EXAMPLES`).

Adding a field therefore takes: its annotated line in `BackupEnvelope`; its column in `zkeb.db.models.backups`
(`EnvelopeColumns`, both tables) with a migration; and, if the signature covers it, the signed message
(`zkeb.lib.envelope.backup_signed_message`, docs/protocol.md §4) and the client.

Forms by kind: a `UUID` is its text in JSON and msgpack, and base64 of its text in tus metadata; a `DIGEST` (32
bytes) is lowercase hex in JSON, `bin` in msgpack, and raw or hex in tus; `BYTES` are standard base64 in JSON, `bin`
in msgpack, raw or base64 text in tus (`zkeb.lib.byteforms` holds the rule); a `TIMESTAMP` is RFC 3339 UTC text
everywhere.
"""

from __future__ import annotations

import enum
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import msgspec

from zkeb.core.errors import ProblemError, UnprocessableError
from zkeb.lib.byteforms import BytesField, FieldFormError, TextEncoding, decode_bytes_fields
from zkeb.lib.envelope import (
    AUTH_TAG_LENGTH,
    DEVICE_ID_HASH_LENGTH,
    ED25519_SIGNATURE_LENGTH,
    NONCE_LENGTH,
    format_rfc3339_utc,
    parse_rfc3339_utc,
)
from zkeb.lib.tus import TusHeaderError, parse_upload_metadata

__all__ = (
    "ENVELOPE_FIELDS",
    "ENVELOPE_FIELD_EXAMPLES",
    "MAX_METADATA_SIZE",
    "BackupEnvelope",
    "EnvelopeField",
    "FieldKind",
    "FieldSpec",
    "JsonEnvelopeFields",
    "MsgpackEnvelopeFields",
    "envelope_columns",
    "envelope_from_json",
    "envelope_from_metadata",
    "envelope_from_msgpack",
    "envelope_of_row",
    "envelope_schema",
    "invalid_field",
    "parse_device_id_hash_hex",
    "read_fields",
    "validate_envelope",
)

MAX_METADATA_SIZE = 8192
_HEX_HASH = re.compile(r"[0-9a-fA-F]{64}")


class FieldKind(enum.Enum):
    """What an envelope field holds; its forms in JSON, msgpack, tus metadata and the database follow from it."""

    UUID = "uuid"
    DIGEST = "digest"
    BYTES = "bytes"
    TIMESTAMP = "timestamp"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """What `BackupEnvelope` says of one field: its kind, exact length in bytes (None: any, up to a maximum)."""

    kind: FieldKind
    description: str
    #: The field's JSON form in docs/protocol.md's test vector (§9).
    example: str
    length: int | None = None
    max_length: int | None = None


@dataclass(frozen=True, slots=True)
class BackupEnvelope:
    """A validated envelope without its payload: what the signature covers, besides the payload's digest."""

    container_id: Annotated[
        UUID,
        FieldSpec(
            FieldKind.UUID,
            "The container (a logical backup set) this backup belongs to.",
            example=("0192f5e4-7a3b-7c1d-9e2f-000000000001"),
        ),
    ]
    device_id_hash: Annotated[
        bytes,
        FieldSpec(
            FieldKind.DIGEST,
            "SHA-256 of the device id, hex.",
            example="9224d0c18f375c8c8f6b3bdce41f18fe7b3b85281dfac188de41154dfcd42260",  # pragma: allowlist secret
            length=DEVICE_ID_HASH_LENGTH,
        ),
    ]
    payload_nonce: Annotated[
        bytes, FieldSpec(FieldKind.BYTES, "12 bytes.", example="AAECAwQFBgcICQoL", length=NONCE_LENGTH)
    ]
    payload_auth_tag: Annotated[
        bytes, FieldSpec(FieldKind.BYTES, "16 bytes.", example="EBESExQVFhcYGRobHB0eHw==", length=AUTH_TAG_LENGTH)
    ]
    metadata: Annotated[
        bytes,
        FieldSpec(
            FieldKind.BYTES,
            "Encrypted metadata, ≤ 8 KiB.",
            example="ZW5jcnlwdGVkIG1ldGFkYXRhIGV4YW1wbGU=",
            max_length=MAX_METADATA_SIZE,
        ),
    ]
    metadata_nonce: Annotated[
        bytes, FieldSpec(FieldKind.BYTES, "12 bytes.", example="ICEiIyQlJicoKSor", length=NONCE_LENGTH)
    ]
    metadata_auth_tag: Annotated[
        bytes, FieldSpec(FieldKind.BYTES, "16 bytes.", example="MDEyMzQ1Njc4OTo7PD0+Pw==", length=AUTH_TAG_LENGTH)
    ]
    signature: Annotated[
        bytes,
        FieldSpec(
            FieldKind.BYTES,
            "64-byte Ed25519 signature of the signed message (docs/protocol.md §4).",
            # pragma: allowlist nextline secret
            example="TJV5q0++8aGSn7Plf1jGJ+mGNTCuh9PJD+s4bUoR3+opg0SU7nH3qzlmgkY7RModDdS3o1xecepA8cO7OExeAw==",
            length=ED25519_SIGNATURE_LENGTH,
        ),
    ]
    backup_timestamp: Annotated[
        datetime,
        FieldSpec(
            FieldKind.TIMESTAMP,
            "RFC 3339 with `Z` or an offset, at most 6 fractional digits; ZKEB answers it in UTC (`Z`).",
            example="2026-11-27T10:00:00.123456Z",
        ),
    ]


@dataclass(frozen=True, slots=True)
class EnvelopeField:
    """One field of `BackupEnvelope`, as the rest of the domain iterates them."""

    name: str
    spec: FieldSpec

    @property
    def kind(self) -> FieldKind:
        """What the field holds."""
        return self.spec.kind

    @property
    def column(self) -> str:
        """The ORM attribute holding it (`metadata` is `metadata_`: SQLAlchemy reserves the name)."""
        return "metadata_" if self.name == "metadata" else self.name


def _fields() -> tuple[EnvelopeField, ...]:
    hints = typing.get_type_hints(BackupEnvelope, include_extras=True)
    return tuple(EnvelopeField(name, hint.__metadata__[0]) for name, hint in hints.items())


ENVELOPE_FIELDS = _fields()
_BY_KIND = {kind: tuple(f for f in ENVELOPE_FIELDS if f.kind is kind) for kind in FieldKind}
#: The bytes fields of tus `Upload-Metadata`, each raw or in its JSON text form (`zkeb.lib.byteforms`).
_TUS_BYTES_FIELDS = tuple(
    BytesField(f.name, f.spec.length, TextEncoding.HEX if f.kind is FieldKind.DIGEST else TextEncoding.BASE64)
    for f in ENVELOPE_FIELDS
    if f.kind in {FieldKind.DIGEST, FieldKind.BYTES}
)
#: Fields a tus client may leave without a value (`key` alone in `Upload-Metadata`): those that may be empty.
_MAY_BE_EMPTY = frozenset(f.name for f in _BY_KIND[FieldKind.BYTES] if f.spec.length is None)

_JSON_TYPES: dict[FieldKind, Any] = {
    FieldKind.UUID: UUID,
    FieldKind.DIGEST: str,
    FieldKind.BYTES: bytes,
    FieldKind.TIMESTAMP: str,
}
_MSGPACK_TYPES: dict[FieldKind, Any] = {**_JSON_TYPES, FieldKind.DIGEST: bytes}

if TYPE_CHECKING:
    # To the type checker the generated bases are plain structs: code reaches their fields through
    # `ENVELOPE_FIELDS`, never by name.
    JsonEnvelopeFields = msgspec.Struct
    MsgpackEnvelopeFields = msgspec.Struct
else:
    JsonEnvelopeFields = msgspec.defstruct(
        "JsonEnvelopeFields", [(f.name, _JSON_TYPES[f.kind]) for f in ENVELOPE_FIELDS]
    )
    JsonEnvelopeFields.__doc__ = "The envelope's fields in JSON: bytes as standard base64, the digest as hex."
    MsgpackEnvelopeFields = msgspec.defstruct(
        "MsgpackEnvelopeFields", [(f.name, _MSGPACK_TYPES[f.kind]) for f in ENVELOPE_FIELDS]
    )
    MsgpackEnvelopeFields.__doc__ = "The envelope's fields in msgpack: bytes and the digest as `bin`."


def invalid_field(field: str, detail: str) -> UnprocessableError:
    """A 422 naming the envelope field at fault: `field`, and `errors` shaped as every other 400/422 of the API."""
    return UnprocessableError(
        f"{field}: {detail}", extra={"field": field, "errors": [{"key": field, "message": detail}]}
    )


def parse_device_id_hash_hex(value: str) -> bytes:
    """Decode a hex `device_id_hash`: ZKEB writes it lowercase and, as at device enrolment, reads either case.

    Raises:
        UnprocessableError: not 64 hex characters.
    """
    if not _HEX_HASH.fullmatch(value):
        raise invalid_field("device_id_hash", "must be 64 hex characters (a SHA-256)")
    return bytes.fromhex(value)


def _checked(field: EnvelopeField, value: Any) -> Any:
    spec = field.spec
    if field.kind is FieldKind.TIMESTAMP:
        try:
            return parse_rfc3339_utc(value)
        except ValueError as exc:
            raise invalid_field(field.name, str(exc)) from None
    if field.kind is FieldKind.UUID:
        return value
    if spec.length is not None and len(value) != spec.length:
        raise invalid_field(field.name, f"must be {spec.length} bytes, got {len(value)}")
    if spec.max_length is not None and len(value) > spec.max_length:
        raise invalid_field(field.name, f"must be at most {spec.max_length} bytes, got {len(value)}")
    return bytes(value)


def validate_envelope(values: Mapping[str, Any]) -> BackupEnvelope:
    """Check every field but the payload against `BackupEnvelope`'s specs.

    Args:
        values: Each field's decoded value: a `UUID`, bytes (or a view of them), or the timestamp's text.

    Raises:
        UnprocessableError: a field is invalid; the problem names it.
    """
    envelope = BackupEnvelope(**{f.name: _checked(f, values[f.name]) for f in ENVELOPE_FIELDS})
    if envelope.metadata_nonce == envelope.payload_nonce:
        raise invalid_field("metadata_nonce", "must differ from payload_nonce (one key encrypts both)")
    return envelope


def envelope_from_json(body: JsonEnvelopeFields) -> BackupEnvelope:
    """The envelope a decoded JSON body carries (the digest from hex).

    Raises:
        UnprocessableError: a field is invalid; the problem names it.
    """
    values = {f.name: getattr(body, f.name) for f in ENVELOPE_FIELDS}
    for field in _BY_KIND[FieldKind.DIGEST]:
        values[field.name] = parse_device_id_hash_hex(values[field.name])
    return validate_envelope(values)


def envelope_from_msgpack(body: MsgpackEnvelopeFields) -> BackupEnvelope:
    """The envelope a decoded msgpack body carries.

    Raises:
        UnprocessableError: a field is invalid; the problem names it.
    """
    return validate_envelope({f.name: getattr(body, f.name) for f in ENVELOPE_FIELDS})


def envelope_from_metadata(header: str) -> BackupEnvelope:
    """The envelope a tus `Upload-Metadata` header carries (the module docstring says each field's form).

    Other keys (e.g. a client's `filename`) are ignored.

    Raises:
        ProblemError: 400 when the header is malformed; 422 naming a missing or invalid field.
    """
    try:
        values = parse_upload_metadata(header)
    except TusHeaderError as exc:
        raise ProblemError(str(exc), status_code=400) from None
    for field in ENVELOPE_FIELDS:
        if field.name not in values or (values[field.name] is None and field.name not in _MAY_BE_EMPTY):
            raise invalid_field(field.name, "is required in Upload-Metadata")

    def raw(key: str) -> bytes:
        return values[key] or b""

    def text_of(key: str) -> str:
        try:
            return raw(key).decode("ascii")
        except UnicodeDecodeError:
            raise invalid_field(key, "must be base64 of ASCII text") from None

    decoded: dict[str, Any] = {f.name: text_of(f.name) for f in _BY_KIND[FieldKind.TIMESTAMP]}
    for field in _BY_KIND[FieldKind.UUID]:
        try:
            decoded[field.name] = UUID(text_of(field.name))
        except ValueError:
            raise invalid_field(field.name, "must be base64 of a UUID") from None
    try:
        decoded |= decode_bytes_fields(_TUS_BYTES_FIELDS, {f.name: raw(f.name) for f in _TUS_BYTES_FIELDS})
    except FieldFormError as exc:
        raise invalid_field(exc.field, exc.detail) from None
    return validate_envelope(decoded)


def envelope_columns(envelope: BackupEnvelope) -> dict[str, Any]:
    """The envelope as keyword arguments of an ORM row that holds it (`Backup`, `UploadSession`)."""
    return {f.column: getattr(envelope, f.name) for f in ENVELOPE_FIELDS}


def envelope_of_row(row: object) -> BackupEnvelope:
    """The envelope an ORM row holds (the reverse of `envelope_columns`)."""
    return BackupEnvelope(**{f.name: getattr(row, f.column) for f in ENVELOPE_FIELDS})


def read_fields(row: object, *, digest_as_hex: bool) -> dict[str, Any]:
    """The envelope of a stored backup in a response body's types (hex digests in JSON, `bin` in msgpack)."""
    body: dict[str, Any] = {}
    for field in ENVELOPE_FIELDS:
        value = getattr(row, field.column)
        if field.kind is FieldKind.TIMESTAMP:
            value = format_rfc3339_utc(value)
        elif field.kind is FieldKind.DIGEST and digest_as_hex:
            value = value.hex()
        body[field.name] = value
    return body


def _schema_of(field: EnvelopeField) -> dict[str, Any]:
    description = field.spec.description
    if field.kind is FieldKind.UUID:
        return {"type": "string", "format": "uuid"}
    if field.kind is FieldKind.DIGEST:
        return {
            "type": "string",
            "pattern": f"^[0-9a-fA-F]{{{2 * (field.spec.length or 0)}}}$",
            "description": f"{description} Hex: ZKEB writes lower case and reads either case.",
        }
    if field.kind is FieldKind.TIMESTAMP:
        return {"type": "string", "format": "date-time", "description": description}
    return {"type": "string", "contentEncoding": "base64", "description": description}


def envelope_schema(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of an envelope body: every field of `BackupEnvelope`, and `payload` as `payload` says."""
    properties = {f.name: _schema_of(f) for f in ENVELOPE_FIELDS} | {"payload": payload}
    return {
        "type": "object",
        "description": (
            "A backup envelope (docs/protocol.md §2). In msgpack, bytes fields are `bin`; `device_id_hash` 32 bytes."
        ),
        "required": list(properties),
        "properties": properties,
    }


#: docs/protocol.md's test-vector envelope without its payload, in its JSON forms.
ENVELOPE_FIELD_EXAMPLES: dict[str, str] = {f.name: f.spec.example for f in ENVELOPE_FIELDS}
