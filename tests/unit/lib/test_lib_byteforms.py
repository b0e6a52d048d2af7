"""The raw and text forms of bytes fields in tus metadata: the rule is exact, round-trips and refuses the rest."""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zkeb.lib.byteforms import (
    BytesField,
    FieldFormError,
    TextEncoding,
    ValueForm,
    decode_bytes_fields,
    form_of,
    text_form,
)
from zkeb.lib.envelope import backup_signed_message, verify_ed25519

# The envelope's bytes fields, as the tus controller declares them.
FIELDS = (
    BytesField("device_id_hash", 32, TextEncoding.HEX),
    BytesField("payload_nonce", 12),
    BytesField("payload_auth_tag", 16),
    BytesField("metadata", None),
    BytesField("metadata_nonce", 12),
    BytesField("metadata_auth_tag", 16),
    BytesField("signature", 64),
)
FIXED = tuple(field for field in FIELDS if field.length is not None)
FIXED_LENGTHS = tuple((field, field.length) for field in FIELDS if field.length is not None)
BASE64_FIXED = tuple(field for field in FIXED if field.encoding is TextEncoding.BASE64)
METADATA = FIELDS[3]
# Bytes that spell standard base64: what a raw ciphertext looks like when it happens to be base64 text.
base64_spelling = st.binary(max_size=300).map(base64.b64encode)


def envelope_fields(draw: st.DrawFn) -> dict[str, bytes]:
    values = {field.name: draw(st.binary(min_size=length, max_size=length)) for field, length in FIXED_LENGTHS}
    values["metadata"] = draw(st.one_of(st.binary(max_size=300), base64_spelling))
    return values


envelopes = st.composite(envelope_fields)()
# No per-example deadline: the suite shares a busy machine, and a slow example is not a wrong one.
relaxed = settings(deadline=None)


def encode(values: dict[str, bytes], form: ValueForm, *, device_form: ValueForm) -> dict[str, bytes]:
    """What a client puts under tus's base64: every base64 field in `form`, `device_id_hash` in `device_form`."""
    encoded = {}
    for field in FIELDS:
        chosen = device_form if field.encoding is TextEncoding.HEX else form
        value = values[field.name]
        encoded[field.name] = text_form(field, value) if chosen is ValueForm.TEXT else value
    return encoded


def test_the_two_forms_of_a_fixed_length_field_never_have_the_same_length() -> None:
    for length in range(1, 10_000):
        for encoding in TextEncoding:
            field = BytesField("f", length, encoding)
            assert field.text_length is not None
            assert field.text_length > length
            assert len(text_form(field, bytes(length))) == field.text_length


@relaxed
@given(st.sampled_from(FIXED), st.data())
def test_a_fixed_length_value_round_trips_in_both_forms(field: BytesField, data: st.DataObject) -> None:
    assert field.length is not None
    value = data.draw(st.binary(min_size=field.length, max_size=field.length))
    assert form_of(field, value) is ValueForm.RAW
    assert form_of(field, text_form(field, value)) is ValueForm.TEXT


@relaxed
@given(st.sampled_from(FIXED), st.binary(max_size=200))
@example(BytesField("payload_nonce", 12), b"A" * 15 + b"=")  # right length, not canonical base64
@example(BytesField("payload_auth_tag", 16), b"AAAAAAAAAAAAAAAAAAAAAB==")  # unused bits set: not canonical
@example(BytesField("payload_auth_tag", 16), b"AAAAAAAAAAAAAAAAAAAAAA")  # no padding
@example(BytesField("payload_nonce", 12), b"AAAAAAAAAAAAAAA=")  # 16 characters that spell 11 bytes
@example(BytesField("signature", 64), base64.b64encode(b"Sig" * 21 + b"!"))
@example(BytesField("device_id_hash", 32, TextEncoding.HEX), b"AB" * 32)
@example(BytesField("device_id_hash", 32, TextEncoding.HEX), b"g" * 64)
def test_every_value_has_exactly_one_reading_or_is_refused_naming_the_field(field: BytesField, value: bytes) -> None:
    refusal: FieldFormError | None = None
    try:
        form = form_of(field, value)
    except FieldFormError as exc:
        refusal = exc
    if refusal is not None:
        assert refusal.field == field.name
        assert str(refusal).startswith(f"{field.name}: must be {field.length} bytes")
        assert len(value) != field.length
        return
    if form is ValueForm.RAW:
        assert len(value) == field.length
    else:
        # A text reading is canonical: the bytes it spells give back exactly this text.
        decoded = decode_bytes_fields((field,), {field.name: value})[field.name]
        assert len(decoded) == field.length
        canonical = value.lower() if field.encoding is TextEncoding.HEX else value
        assert text_form(field, decoded) == canonical


def test_hex_device_id_hash_is_read_in_either_case() -> None:
    field = FIXED[0]
    digest = hashlib.sha256(b"device").digest()
    upper = digest.hex().upper().encode()
    assert decode_bytes_fields((field,), {field.name: upper}) == {field.name: digest}


@relaxed
@given(envelopes, st.sampled_from(ValueForm), st.sampled_from(ValueForm))
def test_an_envelope_in_either_form_decodes_to_the_bytes_the_client_meant(
    values: dict[str, bytes], form: ValueForm, device_form: ValueForm
) -> None:
    assert decode_bytes_fields(FIELDS, encode(values, form, device_form=device_form)) == values


@relaxed
@given(envelopes)
@example({**{f.name: bytes(f.length or 0) for f in FIXED}, "metadata": b"QUJD"})
@example({**{f.name: bytes(f.length or 0) for f in FIXED}, "metadata": b""})
def test_raw_metadata_that_spells_base64_is_read_raw_when_its_siblings_are_raw(values: dict[str, bytes]) -> None:
    raw = encode(values, ValueForm.RAW, device_form=ValueForm.RAW)
    assert decode_bytes_fields(FIELDS, raw)["metadata"] == values["metadata"]


@relaxed
@given(envelopes, st.sampled_from(BASE64_FIXED[1:]))
def test_base64_fields_in_mixed_forms_are_refused_naming_the_first_that_differs(
    values: dict[str, bytes], odd_one: BytesField
) -> None:
    mixed = encode(values, ValueForm.TEXT, device_form=ValueForm.TEXT)
    mixed[odd_one.name] = values[odd_one.name]
    with pytest.raises(FieldFormError) as refused:
        decode_bytes_fields(FIELDS, mixed)
    assert refused.value.field == odd_one.name
    assert "raw form but payload_nonce is in text form" in str(refused.value)


@pytest.mark.parametrize("metadata", [b"not base64!", b"QUJD\n", b"QUI", b"QUJ=", b"QR=="])
def test_text_metadata_that_is_not_canonical_base64_is_refused_naming_metadata(metadata: bytes) -> None:
    values = encode({f.name: bytes(f.length or 0) for f in FIELDS}, ValueForm.TEXT, device_form=ValueForm.TEXT)
    with pytest.raises(FieldFormError) as refused:
        decode_bytes_fields(FIELDS, {**values, "metadata": metadata})
    assert refused.value.field == "metadata"


def test_a_variable_length_field_has_no_form_of_its_own() -> None:
    with pytest.raises(ValueError, match="no fixed length"):
        form_of(METADATA, b"x")


@relaxed
@given(envelopes)
def test_a_field_read_in_the_other_form_never_verifies_under_the_device_signature(values: dict[str, bytes]) -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ids, when = (uuid.uuid4(), uuid.uuid4()), datetime.now(UTC)

    def message(fields: dict[str, bytes]) -> bytes:
        return backup_signed_message(
            project_id=ids[0],
            container_id=ids[1],
            device_id_hash=fields["device_id_hash"],
            backup_timestamp=when,
            payload_nonce=fields["payload_nonce"],
            payload_auth_tag=fields["payload_auth_tag"],
            payload_sha256=hashlib.sha256(b"payload").digest(),
            payload_size=7,
            metadata_nonce=fields["metadata_nonce"],
            metadata_auth_tag=fields["metadata_auth_tag"],
            metadata_sha256=hashlib.sha256(fields["metadata"]).digest(),
            metadata_size=len(fields["metadata"]),
        )

    signature = key.sign(message(values))
    # A client that sends the text of its metadata while its other fields are raw: the server reads the text's bytes.
    misread = decode_bytes_fields(
        FIELDS,
        {
            **encode(values, ValueForm.RAW, device_form=ValueForm.RAW),
            "metadata": text_form(METADATA, values["metadata"]),
        },
    )
    assert verify_ed25519(public, signature, message(values))
    if misread["metadata"] != values["metadata"]:
        assert not verify_ed25519(public, signature, message(misread))
