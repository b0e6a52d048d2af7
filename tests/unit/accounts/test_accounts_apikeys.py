"""API key format, lookup prefix and salted hashing, including salt rotation."""

from __future__ import annotations

import hashlib
import hmac

from zkeb.lib.apikeys import (
    API_KEY_PREFIX,
    PUBLIC_PREFIX_LENGTH,
    generate_api_key,
    hash_api_key,
    matching_salt,
    public_prefix,
    salts_in_use,
)


def test_generated_keys_carry_256_random_bits_in_url_safe_base64_after_the_zkeb_prefix() -> None:
    keys = {generate_api_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith(API_KEY_PREFIX)
        body = key.removeprefix(API_KEY_PREFIX)
        assert len(body) == 43  # 32 bytes, unpadded base64
        assert set(body) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_the_public_prefix_is_a_short_slice_of_a_well_formed_key_and_none_otherwise() -> None:
    key = generate_api_key()
    prefix = public_prefix(key)
    assert prefix == key[len(API_KEY_PREFIX) : len(API_KEY_PREFIX) + PUBLIC_PREFIX_LENGTH]
    for malformed in ("", "zkeb_", key[:-1], key + "A", key.replace("zkeb_", "zkex_"), key[:-1] + "!"):
        assert public_prefix(malformed) is None


def test_the_stored_hash_is_hmac_sha256_under_the_salt_and_differs_per_salt() -> None:
    key = generate_api_key()
    assert hash_api_key("salt-a", key) == hmac.new(b"salt-a", key.encode(), hashlib.sha256).digest()
    assert hash_api_key("salt-a", key) != hash_api_key("salt-b", key)
    assert len(hash_api_key("salt-a", key)) == 32


def test_during_rotation_the_new_salt_is_preferred_and_the_old_one_still_matches() -> None:
    assert salts_in_use("old", "new") == ("new", "old")
    assert salts_in_use("old", None) == ("old",)
    key = generate_api_key()
    salts = salts_in_use("old", "new")
    assert matching_salt(key, hash_api_key("old", key), salts) == 1
    assert matching_salt(key, hash_api_key("new", key), salts) == 0
    assert matching_salt(key, hash_api_key("retired", key), salts) is None
    assert matching_salt(generate_api_key(), hash_api_key("new", key), salts) is None
