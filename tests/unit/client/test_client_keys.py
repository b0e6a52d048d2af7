"""The key file: mode 0600, never overwritten, sealed with scrypt so it opens only with its passphrase."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import pytest

from zkeb.client import KeyFile, KeyFileError, ScryptParameters

FAST = ScryptParameters(n=2**12)


def test_keygen_writes_mode_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    KeyFile.generate().write_new(path)
    first = path.read_bytes()

    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        KeyFile.generate().write_new(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == first


def test_an_unsealed_key_file_round_trips() -> None:
    keys = KeyFile.generate()
    opened = KeyFile.from_bytes(keys.to_bytes())
    assert (opened.device_id, opened.backup_key, opened.public_key) == (
        keys.device_id,
        keys.backup_key,
        keys.public_key,
    )


def test_a_sealed_key_file_opens_only_with_its_passphrase() -> None:
    keys = KeyFile.generate()
    data = keys.to_bytes("correct horse", FAST)
    document = json.loads(data)

    with pytest.raises(KeyFileError, match="wrong passphrase"):
        KeyFile.from_bytes(data, "wrong horse")
    with pytest.raises(KeyFileError, match="sealed"):
        KeyFile.from_bytes(data)
    opened = KeyFile.from_bytes(data, "correct horse")

    assert opened.backup_key == keys.backup_key
    assert "secret" not in document
    assert document["sealed"]["kdf"] == "scrypt"
    assert document["sealed"]["n"] == 2**12
    assert keys.backup_key.hex() not in data.decode()


def test_the_default_seal_is_memory_hard() -> None:
    document = json.loads(KeyFile.generate().to_bytes("pw"))
    assert document["sealed"]["n"] * document["sealed"]["r"] * 128 >= 128 * 1024 * 1024


def test_a_sealed_secret_moved_to_another_identity_does_not_open() -> None:
    one, two = json.loads(KeyFile.generate().to_bytes("pw", FAST)), json.loads(KeyFile.generate().to_bytes("pw", FAST))
    two["sealed"] = one["sealed"]
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        KeyFile.from_bytes(json.dumps(two).encode(), "pw")


def test_the_recovery_form_rebuilds_the_keys_and_catches_a_typo() -> None:
    keys = KeyFile.generate()
    text = keys.recovery_text()
    rebuilt = KeyFile.from_recovery_text(text.lower())
    body = text.splitlines()[1]
    typo = text.replace(body, ("B" if body[0] != "B" else "C") + body[1:])

    assert (rebuilt.device_id, rebuilt.backup_key, rebuilt.public_key) == (
        keys.device_id,
        keys.backup_key,
        keys.public_key,
    )
    with pytest.raises(KeyFileError, match="checksum"):
        KeyFile.from_recovery_text(typo)


def test_a_key_file_whose_public_part_does_not_match_its_secret_is_refused() -> None:
    document = json.loads(KeyFile.generate().to_bytes())
    document["public_key"] = json.loads(KeyFile.generate().to_bytes())["public_key"]
    with pytest.raises(KeyFileError, match="inconsistent"):
        KeyFile.from_bytes(json.dumps(document).encode())


def test_rewriting_a_sealed_key_file_keeps_its_own_stronger_scrypt_parameters(tmp_path: Path) -> None:
    keys = KeyFile.generate()
    path = tmp_path / "device.key"
    path.write_bytes(keys.to_bytes("a long passphrase", ScryptParameters(n=2**18, r=8, p=2)))

    keys.with_project(uuid.uuid4()).rewrite(path, "a long passphrase")

    sealed = json.loads(path.read_bytes())["sealed"]
    assert (sealed["n"], sealed["r"], sealed["p"]) == (2**18, 8, 2)
    assert KeyFile.from_bytes(path.read_bytes(), "a long passphrase").project_id is not None


def test_keygen_on_a_file_system_without_hard_links_still_writes_and_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_hard_links(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")  # what Linux answers on FAT

    monkeypatch.setattr("zkeb.client.keys.os.link", no_hard_links)
    path = tmp_path / "device.key"
    keys = KeyFile.generate()
    keys.write_new(path)

    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        KeyFile.generate().write_new(path)

    assert KeyFile.from_bytes(path.read_bytes()).device_id == keys.device_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]
