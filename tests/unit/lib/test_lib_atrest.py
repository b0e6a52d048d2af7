from __future__ import annotations

import base64
import hashlib
import struct
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zkeb.lib.atrest import (
    CHUNK_OVERHEAD,
    ChunkCipher,
    ChunkIntegrityError,
    DataKeyUnwrapError,
    MasterKeyring,
    UnknownKeyIdError,
    master_key_id,
    new_data_key,
    parse_master_key,
    unwrap_data_key,
    wrap_data_key,
)

MASTER_KEY = bytes(range(32))
OTHER_MASTER_KEY = bytes(range(100, 132))
PAYLOAD_ID = UUID("0192f5a4-1b2c-7d3e-8f40-5a6b7c8d9e0f")
OTHER_PAYLOAD_ID = UUID("0192f5a4-1b2c-7d3e-8f40-5a6b7c8d9e10")
ENV_NAME = "ZKEB_MASTER_ENCRYPTION_KEY"


def test_chunk_overhead_is_nonce_plus_tag() -> None:
    assert CHUNK_OVERHEAD == 12 + 16


@pytest.mark.parametrize(
    "encoded",
    [
        MASTER_KEY.hex(),
        MASTER_KEY.hex().upper(),
        base64.b64encode(MASTER_KEY).decode(),
        base64.b64encode(MASTER_KEY).decode().rstrip("="),
        base64.urlsafe_b64encode(MASTER_KEY).decode(),
        base64.urlsafe_b64encode(MASTER_KEY).decode().rstrip("="),
        f"  {MASTER_KEY.hex()}\n",
    ],
)
def test_parse_master_key_accepts_each_encoding(encoded: str) -> None:
    assert parse_master_key(encoded, name=ENV_NAME) == MASTER_KEY


def test_parse_master_key_decodes_urlsafe_alphabet_correctly() -> None:
    key = b"\xfb\xff" * 16  # encodes with '+' and '/' (standard) or '-' and '_' (URL-safe)
    standard = base64.b64encode(key).decode()
    urlsafe = base64.urlsafe_b64encode(key).decode()
    assert "/" in standard
    assert "_" in urlsafe
    assert parse_master_key(standard, name=ENV_NAME) == key
    assert parse_master_key(urlsafe, name=ENV_NAME) == key


SECRET_LOOKING = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "   ",
        MASTER_KEY.hex()[:-2],  # 31 bytes of hex
        MASTER_KEY.hex() + "00",  # 33 bytes of hex
        "zz" * 32,
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        base64.b64encode(bytes(64)).decode(),
        SECRET_LOOKING,
        base64.b64encode(MASTER_KEY).decode()[:-2] + "!=",
        base64.b64encode(MASTER_KEY).decode() + "==",
        "A" * 41,  # impossible base64 length
        "key with spaces " + MASTER_KEY.hex(),
    ],
)
def test_parse_master_key_rejects_bad_values_without_echoing_them(encoded: str) -> None:
    with pytest.raises(ValueError, match=ENV_NAME) as caught:
        parse_master_key(encoded, name=ENV_NAME)
    message = str(caught.value)
    if encoded.strip():
        assert encoded.strip() not in message
        assert encoded.strip()[:8] not in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ is True


def test_master_key_id_known_answer_and_stability() -> None:
    expected = "mk-" + hashlib.sha256(b"zkeb-master-key-id\x00" + MASTER_KEY).hexdigest()[:16]
    assert master_key_id(MASTER_KEY) == expected
    assert master_key_id(bytes(MASTER_KEY)) == master_key_id(MASTER_KEY)
    assert master_key_id(bytes(32)) == "mk-" + hashlib.sha256(b"zkeb-master-key-id\x00" + bytes(32)).hexdigest()[:16]
    assert len(master_key_id(MASTER_KEY)) == 3 + 16
    assert master_key_id(MASTER_KEY) != master_key_id(OTHER_MASTER_KEY)
    assert MASTER_KEY.hex()[:16] not in master_key_id(MASTER_KEY)


def test_keyring_exposes_ids_and_keys() -> None:
    keyring = MasterKeyring(active=MASTER_KEY, others=(OTHER_MASTER_KEY,))
    assert keyring.active_id == master_key_id(MASTER_KEY)
    assert keyring.ids == (master_key_id(MASTER_KEY), master_key_id(OTHER_MASTER_KEY))
    assert keyring.get(master_key_id(MASTER_KEY)) == MASTER_KEY
    assert keyring.get(master_key_id(OTHER_MASTER_KEY)) == OTHER_MASTER_KEY


def test_keyring_deduplicates_repeated_keys() -> None:
    keyring = MasterKeyring(active=MASTER_KEY, others=(MASTER_KEY, OTHER_MASTER_KEY, OTHER_MASTER_KEY))
    assert keyring.ids == (master_key_id(MASTER_KEY), master_key_id(OTHER_MASTER_KEY))


def test_keyring_unknown_id_raises() -> None:
    keyring = MasterKeyring(active=MASTER_KEY)
    with pytest.raises(UnknownKeyIdError, match="mk-0000000000000000"):
        keyring.get("mk-0000000000000000")
    assert issubclass(UnknownKeyIdError, ValueError)


@pytest.mark.parametrize(("active", "others"), [(bytes(31), ()), (MASTER_KEY, (bytes(33),))])
def test_keyring_rejects_wrong_key_lengths(active: bytes, others: tuple[bytes, ...]) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MasterKeyring(active=active, others=others)


def test_keyring_repr_and_str_never_show_key_bytes() -> None:
    keyring = MasterKeyring(active=MASTER_KEY, others=(OTHER_MASTER_KEY,))
    for text in (repr(keyring), str(keyring), f"{keyring}", repr([keyring])):
        assert master_key_id(MASTER_KEY) in text
        for key in (MASTER_KEY, OTHER_MASTER_KEY):
            assert repr(key) not in text
            assert key.hex() not in text
            assert repr(key)[2:12] not in text


def test_keyring_is_frozen() -> None:
    keyring = MasterKeyring(active=MASTER_KEY)
    with pytest.raises(AttributeError):
        keyring.active = OTHER_MASTER_KEY  # type: ignore[misc]


def test_new_data_key_is_random_32_bytes() -> None:
    keys = {new_data_key() for _ in range(16)}
    assert len(keys) == 16
    assert all(len(key) == 32 for key in keys)


def test_wrap_unwrap_round_trip() -> None:
    data_key = new_data_key()
    wrapped = wrap_data_key(MASTER_KEY, data_key, payload_id=PAYLOAD_ID)
    assert len(wrapped) == 12 + 32 + 16
    assert data_key not in wrapped
    assert unwrap_data_key(MASTER_KEY, wrapped, payload_id=PAYLOAD_ID) == data_key


def test_wrapped_layout_is_nonce_then_aesgcm_with_documented_aad() -> None:
    data_key = bytes(range(200, 232))
    wrapped = wrap_data_key(MASTER_KEY, data_key, payload_id=PAYLOAD_ID)
    aad = b"zkeb-dek-v1\x00" + PAYLOAD_ID.bytes
    assert AESGCM(MASTER_KEY).decrypt(wrapped[:12], wrapped[12:], aad) == data_key


def test_wrapping_twice_uses_fresh_nonces() -> None:
    data_key = new_data_key()
    first = wrap_data_key(MASTER_KEY, data_key, payload_id=PAYLOAD_ID)
    second = wrap_data_key(MASTER_KEY, data_key, payload_id=PAYLOAD_ID)
    assert first[:12] != second[:12]
    assert first != second


def test_unwrap_with_wrong_master_key_fails() -> None:
    wrapped = wrap_data_key(MASTER_KEY, new_data_key(), payload_id=PAYLOAD_ID)
    with pytest.raises(DataKeyUnwrapError):
        unwrap_data_key(OTHER_MASTER_KEY, wrapped, payload_id=PAYLOAD_ID)


def test_unwrap_for_another_payload_fails() -> None:
    wrapped = wrap_data_key(MASTER_KEY, new_data_key(), payload_id=PAYLOAD_ID)
    with pytest.raises(DataKeyUnwrapError):
        unwrap_data_key(MASTER_KEY, wrapped, payload_id=OTHER_PAYLOAD_ID)


def test_unwrap_detects_any_flipped_bit() -> None:
    wrapped = wrap_data_key(MASTER_KEY, new_data_key(), payload_id=PAYLOAD_ID)
    for position in range(len(wrapped)):
        tampered = bytearray(wrapped)
        tampered[position] ^= 0x01
        with pytest.raises(DataKeyUnwrapError):
            unwrap_data_key(MASTER_KEY, bytes(tampered), payload_id=PAYLOAD_ID)


@pytest.mark.parametrize("length", [0, 12, 59, 61])
def test_unwrap_rejects_wrong_length(length: int) -> None:
    with pytest.raises(DataKeyUnwrapError, match="length"):
        unwrap_data_key(MASTER_KEY, bytes(length), payload_id=PAYLOAD_ID)


@pytest.mark.parametrize(("master_key", "data_key"), [(bytes(16), bytes(32)), (bytes(32), bytes(16))])
def test_wrap_rejects_wrong_key_lengths(master_key: bytes, data_key: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        wrap_data_key(master_key, data_key, payload_id=PAYLOAD_ID)


def test_unwrap_rejects_wrong_master_key_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        unwrap_data_key(bytes(16), bytes(60), payload_id=PAYLOAD_ID)


def test_rotation_rewraps_without_touching_chunks() -> None:
    data_key = new_data_key()
    chunk = ChunkCipher(data_key, PAYLOAD_ID).encrypt(0, b"ciphertext from the device")
    old_wrapped = wrap_data_key(MASTER_KEY, data_key, payload_id=PAYLOAD_ID)
    rewrapped = wrap_data_key(
        OTHER_MASTER_KEY, unwrap_data_key(MASTER_KEY, old_wrapped, payload_id=PAYLOAD_ID), payload_id=PAYLOAD_ID
    )
    recovered = unwrap_data_key(OTHER_MASTER_KEY, rewrapped, payload_id=PAYLOAD_ID)
    assert ChunkCipher(recovered, PAYLOAD_ID).decrypt(0, chunk) == b"ciphertext from the device"


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1024, 1024 * 1024 + 3])
def test_chunk_round_trip(size: int) -> None:
    cipher = ChunkCipher(new_data_key(), PAYLOAD_ID)
    plaintext = bytes(i % 251 for i in range(size))
    blob = cipher.encrypt(7, plaintext)
    assert len(blob) == size + CHUNK_OVERHEAD
    assert cipher.decrypt(7, blob) == plaintext


def test_chunk_accepts_bytearray_and_memoryview() -> None:
    cipher = ChunkCipher(new_data_key(), PAYLOAD_ID)
    source = bytearray(b"0123456789" * 10)
    blob = cipher.encrypt(0, memoryview(source)[10:30])
    assert cipher.decrypt(0, memoryview(blob)) == b"0123456789" * 2
    assert cipher.decrypt(1, memoryview(cipher.encrypt(1, source))) == bytes(source)


def test_chunk_layout_is_nonce_then_aesgcm_with_payload_and_seq_aad() -> None:
    data_key = new_data_key()
    blob = ChunkCipher(data_key, PAYLOAD_ID).encrypt(3, b"chunk")
    aad = PAYLOAD_ID.bytes + struct.pack(">Q", 3)
    assert AESGCM(data_key).decrypt(blob[:12], blob[12:], aad) == b"chunk"


def test_chunk_nonces_are_fresh() -> None:
    cipher = ChunkCipher(new_data_key(), PAYLOAD_ID)
    nonces = {cipher.encrypt(0, b"same")[:12] for _ in range(64)}
    assert len(nonces) == 64


def test_swapped_sequence_numbers_fail() -> None:
    cipher = ChunkCipher(new_data_key(), PAYLOAD_ID)
    first, second = cipher.encrypt(0, b"first"), cipher.encrypt(1, b"second")
    with pytest.raises(ChunkIntegrityError, match="chunk 0"):
        cipher.decrypt(0, second)
    with pytest.raises(ChunkIntegrityError, match="chunk 1"):
        cipher.decrypt(1, first)


def test_chunk_moved_to_another_payload_fails() -> None:
    data_key = new_data_key()
    blob = ChunkCipher(data_key, PAYLOAD_ID).encrypt(0, b"chunk")
    with pytest.raises(ChunkIntegrityError):
        ChunkCipher(data_key, OTHER_PAYLOAD_ID).decrypt(0, blob)


def test_chunk_with_wrong_data_key_fails() -> None:
    blob = ChunkCipher(new_data_key(), PAYLOAD_ID).encrypt(0, b"chunk")
    with pytest.raises(ChunkIntegrityError):
        ChunkCipher(new_data_key(), PAYLOAD_ID).decrypt(0, blob)


def test_any_flipped_bit_in_a_chunk_fails() -> None:
    cipher = ChunkCipher(new_data_key(), PAYLOAD_ID)
    blob = cipher.encrypt(0, b"a short chunk")
    for position in range(len(blob)):
        for bit in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[position] ^= bit
            with pytest.raises(ChunkIntegrityError):
                cipher.decrypt(0, bytes(tampered))


@pytest.mark.parametrize("cut", [1, 16, 27])
def test_truncated_chunk_fails(cut: int) -> None:
    cipher = ChunkCipher(new_data_key(), PAYLOAD_ID)
    blob = cipher.encrypt(0, b"some bytes")
    with pytest.raises(ChunkIntegrityError):
        cipher.decrypt(0, blob[:-cut])


@pytest.mark.parametrize("length", [0, 12, 27])
def test_chunk_shorter_than_overhead_fails(length: int) -> None:
    with pytest.raises(ChunkIntegrityError, match="too short"):
        ChunkCipher(new_data_key(), PAYLOAD_ID).decrypt(0, bytes(length))


def test_appended_bytes_fail() -> None:
    cipher = ChunkCipher(new_data_key(), PAYLOAD_ID)
    with pytest.raises(ChunkIntegrityError):
        cipher.decrypt(0, cipher.encrypt(0, b"chunk") + b"\x00")


@pytest.mark.parametrize("seq", [-1, 2**64])
def test_chunk_sequence_must_fit_u64(seq: int) -> None:
    cipher = ChunkCipher(new_data_key(), PAYLOAD_ID)
    with pytest.raises(ValueError, match="sequence"):
        cipher.encrypt(seq, b"x")
    with pytest.raises(ValueError, match="sequence"):
        cipher.decrypt(seq, bytes(40))


def test_chunk_sequence_extremes_round_trip() -> None:
    cipher = ChunkCipher(new_data_key(), PAYLOAD_ID)
    assert cipher.decrypt(2**64 - 1, cipher.encrypt(2**64 - 1, b"last")) == b"last"


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_chunk_cipher_rejects_wrong_data_key_length(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        ChunkCipher(bytes(length), PAYLOAD_ID)


def test_chunk_cipher_repr_hides_the_key() -> None:
    data_key = bytes(range(50, 82))
    text = repr(ChunkCipher(data_key, PAYLOAD_ID))
    assert str(PAYLOAD_ID) in text
    assert data_key.hex() not in text
    assert repr(data_key)[2:12] not in text


def test_integrity_errors_are_value_errors() -> None:
    assert issubclass(ChunkIntegrityError, ValueError)
    assert issubclass(DataKeyUnwrapError, ValueError)
