"""Resume records: one server typed in different ways finds the same record; anything else is another."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from zkeb.client.state import StateStore

PROJECT, CONTAINER, DEVICE = uuid.uuid4(), uuid.uuid4(), bytes(range(32))


def _key(server: str, source: str = "/home/me/notes.txt") -> str:
    return StateStore.key(
        server=server, project_id=PROJECT, container_id=CONTAINER, device_id_hash=DEVICE, source=source
    )


@pytest.mark.parametrize(
    ("typed", "same_as"),
    [
        ("HTTPS://Backup.Example.COM", "https://backup.example.com"),
        ("https://backup.example.com:443/", "https://backup.example.com"),
        ("http://127.0.0.1:80", "http://127.0.0.1"),
        ("http://[::1]:3000/", "http://[::1]:3000"),
        ("https://example.com/zkeb/", "https://example.com/zkeb"),
    ],
)
def test_one_server_typed_another_way_has_the_same_record(typed: str, same_as: str) -> None:
    assert _key(typed) == _key(same_as)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("http://localhost:3000", "http://127.0.0.1:3000"),
        ("http://backup.example.com", "https://backup.example.com"),
        ("http://127.0.0.1:3000", "http://127.0.0.1:3001"),
        ("https://example.com/a", "https://example.com/b"),
    ],
)
def test_another_server_has_another_record(one: str, other: str) -> None:
    assert _key(one) != _key(other)


@pytest.mark.parametrize("server", ["http://127.0.0.1:3000", "https://backup.example.com", "https://example.com/zkeb"])
def test_a_server_typed_in_normal_form_keeps_the_key_earlier_versions_gave_it(server: str) -> None:
    # Records written before the server's name was normalized (the name hashed as typed) still resume.
    source = "/home/me/notes.txt"
    as_typed = "\n".join((server, str(PROJECT), str(CONTAINER), DEVICE.hex(), source))
    assert _key(server, source) == hashlib.sha256(as_typed.encode()).hexdigest()
