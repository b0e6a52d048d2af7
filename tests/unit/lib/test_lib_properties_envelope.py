"""Properties of the signed messages, Ed25519 verification and RFC 3339 timestamps (protocol §4 and §5.2)."""

from __future__ import annotations

import hashlib
import struct
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from zkeb.lib.envelope import (
    AUTH_SIGNATURE_DOMAIN,
    BACKUP_SIGNATURE_DOMAIN,
    auth_message,
    backup_signed_message,
    datetime_to_epoch_microseconds,
    format_rfc3339_utc,
    parse_rfc3339_utc,
    verify_ed25519,
)

# No per-example deadline: the suite shares a busy machine, and a slow example is not a wrong one.
bounded = settings(deadline=None, max_examples=150)

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
LENGTHS = {
    "device_id_hash": 32,
    "payload_nonce": 12,
    "payload_auth_tag": 16,
    "payload_sha256": 32,
    "metadata_nonce": 12,
    "metadata_auth_tag": 16,
    "metadata_sha256": 32,
}
u64 = st.integers(min_value=0, max_value=2**64 - 1)
# Fixed offsets: zoneinfo's ambiguous and skipped local times do not compare equal across zones in Python.
fixed_offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda m: timezone(timedelta(minutes=m))
)
aware_datetimes = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=fixed_offsets)


@st.composite
def backup_fields(draw: st.DrawFn) -> dict[str, object]:
    fields: dict[str, object] = {name: draw(st.binary(min_size=n, max_size=n)) for name, n in LENGTHS.items()}
    fields["project_id"] = draw(st.uuids())
    fields["container_id"] = draw(st.uuids())
    fields["backup_timestamp"] = draw(aware_datetimes)
    fields["payload_size"] = draw(u64)
    fields["metadata_size"] = draw(u64)
    return fields


@bounded
@given(fields=backup_fields())
def test_backup_message_has_the_documented_layout(fields: dict[str, object]) -> None:
    message = backup_signed_message(**fields)  # type: ignore[arg-type]
    assert len(message) == 223
    assert message.startswith(BACKUP_SIGNATURE_DOMAIN)
    project_id, container_id = fields["project_id"], fields["container_id"]
    assert isinstance(project_id, uuid.UUID)
    assert isinstance(container_id, uuid.UUID)
    assert message[15:31] == project_id.bytes
    assert message[31:47] == container_id.bytes
    assert message[47:79] == fields["device_id_hash"]
    moment = fields["backup_timestamp"]
    assert isinstance(moment, datetime)
    assert struct.unpack(">q", message[79:87])[0] == datetime_to_epoch_microseconds(moment)
    assert struct.unpack(">Q", message[147:155])[0] == fields["payload_size"]
    assert struct.unpack(">Q", message[215:223])[0] == fields["metadata_size"]


@bounded
@given(fields=backup_fields(), field=st.sampled_from(sorted(LENGTHS)), data=st.data())
def test_backup_message_refuses_a_field_of_the_wrong_length_naming_it(
    fields: dict[str, object], field: str, data: st.DataObject
) -> None:
    wrong = data.draw(st.binary(max_size=70).filter(lambda value: len(value) != LENGTHS[field]))
    with pytest.raises(ValueError, match=field):
        backup_signed_message(**{**fields, field: wrong})  # type: ignore[arg-type]


@bounded
@given(
    fields=backup_fields(),
    field=st.sampled_from(["payload_size", "metadata_size"]),
    size=st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64)),
)
def test_backup_message_refuses_sizes_outside_u64(fields: dict[str, object], field: str, size: int) -> None:
    with pytest.raises(ValueError, match=field):
        backup_signed_message(**{**fields, field: size})  # type: ignore[arg-type]


@bounded
@given(fields=backup_fields(), data=st.data())
def test_signature_verifies_and_any_changed_bit_breaks_it(fields: dict[str, object], data: st.DataObject) -> None:
    message = backup_signed_message(**fields)  # type: ignore[arg-type]
    signature = KEY.sign(message)
    assert verify_ed25519(PUBLIC, signature, message)
    bit = data.draw(st.integers(min_value=0, max_value=len(message) * 8 - 1))
    flipped = bytearray(message)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert not verify_ed25519(PUBLIC, signature, bytes(flipped))
    sig_bit = data.draw(st.integers(min_value=0, max_value=511))
    bad_signature = bytearray(signature)
    bad_signature[sig_bit // 8] ^= 1 << (sig_bit % 8)
    assert not verify_ed25519(PUBLIC, bytes(bad_signature), message)


@bounded
@given(public_key=st.binary(max_size=40), signature=st.binary(max_size=80), message=st.binary(max_size=300))
def test_verify_never_raises_on_arbitrary_bytes(public_key: bytes, signature: bytes, message: bytes) -> None:
    assert verify_ed25519(public_key, signature, message) in {True, False}


@bounded
@given(project_id=st.uuids(), device_id_hash=st.binary(min_size=32, max_size=32), timestamp_ms=u64)
def test_auth_message_has_the_documented_layout(
    project_id: uuid.UUID, device_id_hash: bytes, timestamp_ms: int
) -> None:
    message = auth_message(project_id=project_id, device_id_hash=device_id_hash, timestamp_ms=timestamp_ms)
    assert message == AUTH_SIGNATURE_DOMAIN + project_id.bytes + device_id_hash + struct.pack(">Q", timestamp_ms)


@bounded
@given(
    project_id=st.uuids(),
    device_id_hash=st.binary(max_size=64),
    timestamp_ms=st.integers(min_value=-(2**70), max_value=2**70),
)
def test_auth_message_builds_or_raises_value_error(
    project_id: uuid.UUID, device_id_hash: bytes, timestamp_ms: int
) -> None:
    try:
        message = auth_message(project_id=project_id, device_id_hash=device_id_hash, timestamp_ms=timestamp_ms)
    except ValueError:
        assert len(device_id_hash) != 32 or not 0 <= timestamp_ms < 2**64
        return
    assert len(message) == len(AUTH_SIGNATURE_DOMAIN) + 56


@bounded
@given(moment=aware_datetimes)
def test_rfc3339_round_trips_to_the_microsecond(moment: datetime) -> None:
    text = format_rfc3339_utc(moment)
    assert text.endswith("Z")
    assert parse_rfc3339_utc(text) == moment
    assert parse_rfc3339_utc(text).tzinfo is UTC


@bounded
@given(moment=aware_datetimes, offset_minutes=st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59))
def test_rfc3339_with_an_offset_names_the_same_instant(moment: datetime, offset_minutes: int) -> None:
    local = moment.astimezone(UTC).replace(tzinfo=None) + timedelta(minutes=offset_minutes)
    if not datetime(1, 1, 1) < local < datetime(9999, 12, 31):
        return
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    text = f"{local.isoformat(timespec='microseconds')}{sign}{hours:02d}:{minutes:02d}"
    assert parse_rfc3339_utc(text) == moment


@bounded
@given(text=st.one_of(st.text(max_size=50), st.text(alphabet=st.sampled_from("0123456789-:.TZz+ "), max_size=40)))
def test_rfc3339_parses_to_aware_utc_or_raises_value_error(text: str) -> None:
    try:
        parsed = parse_rfc3339_utc(text)
    except ValueError:
        return
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("2026-12-07T10:00:00.1234567Z", "more than 6 fractional digits"),
        ("2026-12-07T10:00:00.123456789+02:00", "more than 6 fractional digits"),
        ("2026-12-07T10:00:00", "must be RFC 3339 with an offset"),
        ("yesterday", "must be RFC 3339 with an offset"),
    ],
)
def test_a_refused_timestamp_says_why(text: str, says: str) -> None:
    # An API-integrator review: seven fractional digits were refused as "must be RFC 3339 with an offset", which
    # the value had.
    with pytest.raises(ValueError, match=says):
        parse_rfc3339_utc(text)


def test_signed_message_digests_are_over_the_exact_bytes() -> None:
    """The message carries sha256 of the payload; a device that hashes different bytes does not verify."""
    fields = {name: bytes(n) for name, n in LENGTHS.items()}
    fields["payload_sha256"] = hashlib.sha256(b"payload").digest()
    base = {
        **fields,
        "project_id": uuid.UUID(int=1),
        "container_id": uuid.UUID(int=2),
        "backup_timestamp": datetime(2026, 1, 1, tzinfo=UTC),
        "payload_size": 7,
        "metadata_size": 0,
    }
    signature = KEY.sign(backup_signed_message(**base))  # type: ignore[arg-type]
    other = {**base, "payload_sha256": hashlib.sha256(b"payloaD").digest()}
    assert not verify_ed25519(PUBLIC, signature, backup_signed_message(**other))  # type: ignore[arg-type]
