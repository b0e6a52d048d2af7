"""The envelope's one field list: what derives from `BackupEnvelope` agrees with it, and its forms round-trip."""

from __future__ import annotations

import uuid
from dataclasses import fields
from datetime import UTC, datetime
from types import SimpleNamespace

import msgspec
import pytest
from sqlalchemy.orm import class_mapper

from zkeb.core.errors import UnprocessableError
from zkeb.db.models import Backup, UploadSession
from zkeb.domain.backups.envelope import (
    ENVELOPE_FIELDS,
    BackupEnvelope,
    FieldKind,
    envelope_columns,
    envelope_from_json,
    envelope_from_msgpack,
    envelope_of_row,
    read_fields,
    validate_envelope,
)
from zkeb.domain.backups.openapi import ENVELOPE_SCHEMA
from zkeb.domain.backups.schemas import BackupRead, BackupReadMsgpack, EnvelopeJson, EnvelopeMsgpack

_ENVELOPE = BackupEnvelope(
    container_id=uuid.UUID("0192f5e4-7a3b-7c1d-9e2f-000000000001"),
    device_id_hash=bytes(range(32)),
    payload_nonce=b"\1" * 12,
    payload_auth_tag=b"\2" * 16,
    metadata=b"sealed metadata",
    metadata_nonce=b"\3" * 12,
    metadata_auth_tag=b"\4" * 16,
    signature=b"\5" * 64,
    backup_timestamp=datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC),
)
_NAMES = [f.name for f in fields(BackupEnvelope)]


def test_the_field_list_is_the_dataclass_in_order_with_a_spec_each() -> None:
    assert [f.name for f in ENVELOPE_FIELDS] == _NAMES
    assert {f.kind for f in ENVELOPE_FIELDS} == set(FieldKind)


@pytest.mark.parametrize("model", [Backup, UploadSession])
def test_both_tables_hold_every_field_in_a_column_of_its_name(model: type[Backup | UploadSession]) -> None:
    columns = {attribute.key: attribute.columns[0].name for attribute in class_mapper(model).column_attrs}
    assert {f.column: columns.get(f.column) for f in ENVELOPE_FIELDS} == {f.column: f.name for f in ENVELOPE_FIELDS}


@pytest.mark.parametrize(
    ("struct", "extra"),
    [
        (EnvelopeJson, ["payload"]),
        (EnvelopeMsgpack, ["payload"]),
        (BackupRead, ["id", "project_id", "encrypted_payload_size", "payload_sha256", "created_at"]),
        (BackupReadMsgpack, ["id", "project_id", "encrypted_payload_size", "payload_sha256", "created_at"]),
    ],
)
def test_every_wire_struct_carries_the_fields_and_only_its_own_extras(
    struct: type[msgspec.Struct], extra: list[str]
) -> None:
    assert list(struct.__struct_fields__) == [*_NAMES, *extra]


def test_the_openapi_schema_lists_every_field_and_the_payload() -> None:
    assert list(ENVELOPE_SCHEMA["properties"]) == [*_NAMES, "payload"]
    assert ENVELOPE_SCHEMA["required"] == [*_NAMES, "payload"]


def test_a_row_holds_the_envelope_it_was_given() -> None:
    row = SimpleNamespace(**envelope_columns(_ENVELOPE))
    assert envelope_of_row(row) == _ENVELOPE


def test_json_and_msgpack_bodies_of_a_row_decode_back_to_its_envelope() -> None:
    row = SimpleNamespace(**envelope_columns(_ENVELOPE))
    as_json = msgspec.json.encode({**read_fields(row, digest_as_hex=True), "payload": b"x"})
    as_msgpack = msgspec.msgpack.encode({**read_fields(row, digest_as_hex=False), "payload": b"x"})
    assert read_fields(row, digest_as_hex=True)["device_id_hash"] == bytes(range(32)).hex()
    assert envelope_from_json(msgspec.json.decode(as_json, type=EnvelopeJson)) == _ENVELOPE
    assert envelope_from_msgpack(msgspec.msgpack.decode(as_msgpack, type=EnvelopeMsgpack)) == _ENVELOPE


@pytest.mark.parametrize(
    ("field", "value", "detail"),
    [
        ("payload_nonce", b"\1" * 11, "must be 12 bytes, got 11"),
        ("device_id_hash", b"\0" * 33, "must be 32 bytes, got 33"),
        ("metadata", b"\0" * 8193, "must be at most 8192 bytes, got 8193"),
        ("backup_timestamp", "yesterday", ""),
        ("metadata_nonce", b"\1" * 12, "must differ from payload_nonce"),
    ],
)
def test_validation_names_the_field_at_fault(field: str, value: object, detail: str) -> None:
    values = {name: getattr(_ENVELOPE, name) for name in _NAMES} | {"backup_timestamp": "2026-11-27T10:00:00Z"}
    with pytest.raises(UnprocessableError) as caught:
        validate_envelope({**values, field: value})
    assert caught.value.problem_extra["field"] == field
    assert [error["key"] for error in caught.value.problem_extra["errors"]] == [field]
    assert detail in str(caught.value.detail)
