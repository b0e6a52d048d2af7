"""Pure parts of the lifecycle: retention policy, the 507 problem, deleted_by, key status."""

from __future__ import annotations

import base64
from uuid import UUID

import pytest

from zkeb.core.auth import Principal
from zkeb.domain.backups.context import build_keyring
from zkeb.domain.backups.errors import InsufficientStorageError
from zkeb.domain.backups.jobs.key_rotation import KeyStatus, configured_key_ids
from zkeb.domain.backups.services.lifecycle import (
    RetentionPolicy,
    deleted_by_of,
    quota_exceeded,
)
from zkeb.lib.atrest import master_key_id, parse_master_key
from zkeb.settings import Settings, SettingsError

from support import make_settings

NEW_KEY = base64.b64encode(bytes(range(32, 64))).decode()


def test_a_policy_without_limits_removes_nothing() -> None:
    assert not RetentionPolicy().active
    assert RetentionPolicy(keep_last=3).active
    assert RetentionPolicy(days=7).active


def test_quota_exceeded_is_a_507_naming_used_quota_and_requested() -> None:
    error = quota_exceeded(used=900, quota=1000, requested=200)
    assert isinstance(error, InsufficientStorageError)
    assert error.status_code == 507
    assert error.problem_extra == {"used": 900, "quota": 1000, "requested": 200}
    assert "1000" in error.detail


def test_deleted_by_names_the_credential_kind_and_id_within_the_column() -> None:
    principal = Principal(kind="device", organization_id=UUID(int=1), credential_id="j" * 200)
    value = deleted_by_of(principal)
    assert value.startswith("device:")
    assert len(value) == 80


def _settings(base_settings_env: dict[str, str], **overrides: str) -> Settings:
    return make_settings(base_settings_env, **overrides)


def test_configured_key_ids_follow_the_new_variable(base_settings_env: dict[str, str]) -> None:
    old_id = master_key_id(parse_master_key(base_settings_env["ZKEB_MASTER_ENCRYPTION_KEY"], name="k"))
    new_id = master_key_id(parse_master_key(NEW_KEY, name="k"))
    plain = _settings(base_settings_env)
    assert configured_key_ids(plain, build_keyring(plain)) == {"ZKEB_MASTER_ENCRYPTION_KEY": old_id}
    rotating = _settings(base_settings_env, ZKEB_MASTER_ENCRYPTION_KEY_NEW=NEW_KEY)
    keyring = build_keyring(rotating)
    assert keyring.active_id == new_id
    assert configured_key_ids(rotating, keyring) == {
        "ZKEB_MASTER_ENCRYPTION_KEY": old_id,
        "ZKEB_MASTER_ENCRYPTION_KEY_NEW": new_id,
    }


def test_key_status_counts_what_is_left_and_flags_unknown_ids() -> None:
    status = KeyStatus(
        active_key_id="mk-new",
        configured={"ZKEB_MASTER_ENCRYPTION_KEY": "mk-old", "ZKEB_MASTER_ENCRYPTION_KEY_NEW": "mk-new"},
        data_keys={"mk-new": 5, "mk-old": 2, "mk-lost": 1, "mk-gone": 0},
    )
    assert status.remaining == 3
    assert status.unknown_key_ids == ["mk-lost"]


def test_a_bad_new_master_key_is_named_without_its_value(base_settings_env: dict[str, str]) -> None:
    settings = _settings(base_settings_env, ZKEB_MASTER_ENCRYPTION_KEY_NEW="tooshort")
    with pytest.raises(SettingsError) as raised:
        build_keyring(settings)
    message = str(raised.value)
    assert "ZKEB_MASTER_ENCRYPTION_KEY_NEW" in message
    assert "tooshort" not in message
