"""The two forms a bytes field of the backup envelope may take inside tus `Upload-Metadata`.

tus carries each metadata value as base64 of some bytes. For a bytes field those bytes are either the field's raw
bytes (the *raw form*, what tuspy and aiotus send) or the field's JSON text (the *text form*: standard base64 with
padding, `device_id_hash` as 64 hex characters), which is what a client that only takes strings (tus-js-client,
TUSKit, tus-android-client) can send. The rule telling them apart is exact:

1. A fixed-length field is read by the length of its value. Raw is exactly `n` bytes; text is exactly
   `4 * ceil(n / 3)` characters of canonical standard base64 (`b64encode(b64decode(t)) == t`), or `2 * n` hex
   digits for `device_id_hash`. These lengths differ for every `n >= 1`, so no value fits both; a value that fits
   neither is refused naming the field.
2. The base64 fields share one form: a header whose fixed-length base64 fields mix raw and text is refused, naming
   the first field that differs. (`device_id_hash`, whose text form is hex, may take either form on its own.)
3. A variable-length field (the encrypted `metadata`) has no telling length, so it is read in the form its fixed-length
   siblings share: base64-decoded when they are text (refused unless canonical base64), as is when they are raw.
   A raw ciphertext that happens to spell base64 is therefore never mistaken for text.

Every field the rule reads is covered by the device's signature, so even a value read in a form its sender did not
mean can only make the signature check fail; it can never commit a backup with other bytes than the device signed.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ("BytesField", "FieldFormError", "TextEncoding", "ValueForm", "decode_bytes_fields", "form_of", "text_form")

_HEX = re.compile(rb"[0-9a-fA-F]*")


class ValueForm(enum.Enum):
    """How a bytes field's value is written: its raw bytes, or its JSON text."""

    RAW = "raw"
    TEXT = "text"


class TextEncoding(enum.Enum):
    """The text a field takes in JSON: standard base64 (with padding), or hex (`device_id_hash`)."""

    BASE64 = "base64"
    HEX = "hex"


@dataclass(frozen=True, slots=True)
class BytesField:
    """A bytes field of the envelope: its name, its fixed length (None when variable) and its JSON text encoding."""

    name: str
    length: int | None
    encoding: TextEncoding = TextEncoding.BASE64

    @property
    def text_length(self) -> int | None:
        """Characters of the text form of a fixed-length field (None when the length varies)."""
        if self.length is None:
            return None
        if self.encoding is TextEncoding.HEX:
            return 2 * self.length
        return 4 * -(-self.length // 3)


class FieldFormError(ValueError):
    """A value fits neither form of its field, or its form differs from its siblings'; `field` names it."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def text_form(field: BytesField, value: bytes) -> bytes:
    """The JSON text of `value` for `field` (standard base64 with padding, or lowercase hex), as ASCII bytes."""
    if field.encoding is TextEncoding.HEX:
        return value.hex().encode()
    return base64.b64encode(value)


def _from_text(field: BytesField, text: bytes) -> bytes | None:
    """The bytes `text` spells in `field`'s encoding, or None unless it is canonical text of that encoding."""
    if field.encoding is TextEncoding.HEX:
        if len(text) % 2 or not _HEX.fullmatch(text):
            return None
        return bytes.fromhex(text.decode())
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Canonical only (padding present, unused bits zero): one text per value, so the rule stays a bijection.
    return decoded if base64.b64encode(decoded) == text else None


def form_of(field: BytesField, value: bytes) -> ValueForm:
    """The form a fixed-length field's value is in, told by its length (rule 1 of the module docstring).

    Raises:
        FieldFormError: The value is neither the raw bytes nor their canonical text.
        ValueError: `field` has no fixed length.
    """
    if field.length is None:
        raise ValueError(f"{field.name} has no fixed length; its form comes from its siblings")
    if len(value) == field.length:
        return ValueForm.RAW
    if len(value) == field.text_length:
        decoded = _from_text(field, value)
        # Base64 text of the right length may still spell fewer bytes ("AAAAAAAAAAAAAAA=" is 11, not 12).
        if decoded is not None and len(decoded) == field.length:
            return ValueForm.TEXT
    text = "64 hex characters" if field.encoding is TextEncoding.HEX else f"standard base64 ({field.text_length} chars)"
    raise FieldFormError(
        field.name, f"must be {field.length} bytes: send them raw or as their {text}; got {len(value)} bytes"
    )


def _decode(field: BytesField, value: bytes, form: ValueForm) -> bytes:
    if form is ValueForm.RAW:
        return value
    decoded = _from_text(field, value)
    if decoded is None:
        raise FieldFormError(field.name, "must be standard base64 text with padding, as the other bytes fields are")
    return decoded


def decode_bytes_fields(fields: Sequence[BytesField], values: Mapping[str, bytes]) -> dict[str, bytes]:
    """Read each of `fields` from `values` (tus metadata, after tus's own base64) in its raw or text form.

    Args:
        fields: The bytes fields to read; every one must be present in `values`.
        values: Metadata key to value, as `parse_upload_metadata` decodes them.

    Returns:
        Each field's name mapped to the bytes it carries.

    Raises:
        FieldFormError: Naming the first field that fits neither form or whose form differs from its siblings'.
    """
    decoded: dict[str, bytes] = {}
    shared: tuple[str, ValueForm] | None = None
    for field in fields:
        if field.length is None:
            continue
        form = form_of(field, values[field.name])
        if field.encoding is TextEncoding.BASE64:
            if shared is None:
                shared = (field.name, form)
            elif form is not shared[1]:
                raise FieldFormError(
                    field.name,
                    f"is in {form.value} form but {shared[0]} is in {shared[1].value} form; "
                    "send every base64 field in one form",
                )
        decoded[field.name] = _decode(field, values[field.name], form)
    for field in fields:
        if field.length is None:
            form = shared[1] if shared is not None else ValueForm.RAW
            decoded[field.name] = _decode(field, values[field.name], form)
    return {field.name: decoded[field.name] for field in fields}
