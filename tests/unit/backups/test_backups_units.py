"""Pure parts of the backups domain: read planning, tus metadata, envelope validation, the keyring."""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import UTC, datetime
from typing import cast

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.errors import ProblemError, UnprocessableError
from zkeb.domain.backups.chunk_reads import ChunkSpan, ReadStep, StoredPayloadCorruptError, _PayloadReader, plan_read
from zkeb.domain.backups.context import build_keyring
from zkeb.domain.backups.envelope import ENVELOPE_FIELDS, envelope_from_metadata, validate_envelope
from zkeb.domain.backups.store.payloads import PayloadStores
from zkeb.lib.atrest import ChunkCipher, master_key_id, parse_master_key
from zkeb.lib.ranges import ByteRange
from zkeb.settings import Settings, SettingsError

CHUNKS = [ChunkSpan(0, 0, 10), ChunkSpan(1, 10, 10), ChunkSpan(2, 20, 5)]


def _plan(chunks: list[ChunkSpan], byte_range: ByteRange | None, size: int = 25) -> list[ReadStep]:
    return plan_read(chunks, byte_range, payload_id=uuid.uuid4(), payload_size=size)


def test_plan_read_whole_payload_reads_every_chunk() -> None:
    assert _plan(CHUNKS, None) == [ReadStep(0, 0, 10, 10), ReadStep(1, 0, 10, 10), ReadStep(2, 0, 5, 5)]


@pytest.mark.parametrize(
    ("start", "end", "steps"),
    [
        (0, 0, [ReadStep(0, 0, 1, 10)]),
        (9, 10, [ReadStep(0, 9, 10, 10), ReadStep(1, 0, 1, 10)]),
        (12, 18, [ReadStep(1, 2, 9, 10)]),
        (15, 24, [ReadStep(1, 5, 10, 10), ReadStep(2, 0, 5, 5)]),
        (24, 24, [ReadStep(2, 4, 5, 5)]),
    ],
)
def test_plan_read_decrypts_only_the_chunks_a_range_touches(start: int, end: int, steps: list[ReadStep]) -> None:
    assert _plan(CHUNKS, ByteRange(start, end)) == steps


@pytest.mark.parametrize(
    ("chunks", "size"),
    [
        pytest.param([ChunkSpan(0, 0, 10), ChunkSpan(2, 10, 10)], 20, id="a-chunk-missing-in-the-middle"),
        pytest.param([ChunkSpan(0, 0, 10), ChunkSpan(1, 11, 10)], 21, id="a-gap-between-chunks"),
        pytest.param([ChunkSpan(1, 0, 10)], 10, id="the-first-chunk-missing"),
        pytest.param(CHUNKS[:2], 25, id="the-last-chunk-missing"),
        pytest.param([], 25, id="every-chunk-missing"),
        pytest.param(CHUNKS, 24, id="more-bytes-than-the-payload"),
    ],
)
@pytest.mark.parametrize("byte_range", [None, ByteRange(0, 0)], ids=["whole", "a-range-before-the-damage"])
def test_plan_read_refuses_chunks_that_do_not_tile_the_payload(
    chunks: list[ChunkSpan], size: int, byte_range: ByteRange | None
) -> None:
    # A restore promises `Content-Length` bytes before it sends one: with a chunk row lost it would send fewer and
    # cut the connection (or a clean-looking empty 206), so it is refused before any byte, whatever the range.
    with pytest.raises(StoredPayloadCorruptError) as refused:
        _plan(chunks, byte_range, size)
    assert refused.value.status_code == 500


def _metadata(**values: bytes | None) -> str:
    base: dict[str, bytes | None] = {
        "container_id": str(uuid.uuid4()).encode(),
        "device_id_hash": b"\x01" * 32,
        "payload_nonce": b"\x02" * 12,
        "payload_auth_tag": b"\x03" * 16,
        "metadata": b"meta",
        "metadata_nonce": b"\x04" * 12,
        "metadata_auth_tag": b"\x05" * 16,
        "signature": b"\x06" * 64,
        "backup_timestamp": b"2026-11-27T10:00:00.5+01:00",
        "filename": b"ignored.bin",
    }
    base.update(values)
    return ",".join(k if v is None else f"{k} {base64.b64encode(v).decode()}" for k, v in base.items())


def test_envelope_from_metadata_decodes_every_field() -> None:
    envelope = envelope_from_metadata(_metadata())
    assert envelope.device_id_hash == b"\x01" * 32
    assert envelope.signature == b"\x06" * 64
    assert envelope.metadata == b"meta"
    assert envelope.backup_timestamp == datetime(2026, 11, 27, 9, 0, 0, 500000, tzinfo=UTC)


def test_envelope_from_metadata_accepts_empty_metadata_and_hex_device_hash() -> None:
    envelope = envelope_from_metadata(_metadata(metadata=None, device_id_hash=(b"ab" * 32)))
    assert envelope.metadata == b""
    assert envelope.device_id_hash == b"\xab" * 32


@pytest.mark.parametrize("key", [f.name for f in ENVELOPE_FIELDS if f.name != "metadata"])
def test_envelope_from_metadata_names_a_missing_field(key: str) -> None:
    header = ",".join(part for part in _metadata().split(",") if not part.startswith(f"{key} "))
    with pytest.raises(UnprocessableError) as caught:
        envelope_from_metadata(header)
    assert caught.value.problem_extra["field"] == key
    assert [error["key"] for error in caught.value.problem_extra["errors"]] == [key]


def test_envelope_from_metadata_malformed_header_is_400() -> None:
    with pytest.raises(ProblemError) as caught:
        envelope_from_metadata("container_id not*base64")
    assert caught.value.status_code == 400


def test_validate_envelope_checks_lengths_and_timestamp() -> None:
    good = {
        "container_id": uuid.uuid4(),
        "device_id_hash": b"\0" * 32,
        "payload_nonce": b"\0" * 12,
        "payload_auth_tag": b"\0" * 16,
        "metadata": b"",
        "metadata_nonce": b"\1" * 12,
        "metadata_auth_tag": b"\0" * 16,
        "signature": b"\0" * 64,
        "backup_timestamp": "2026-01-01T00:00:00Z",
    }
    assert validate_envelope(good).metadata == b""
    for field, bad in [("signature", b"\0" * 63), ("metadata", b"\0" * 8193), ("backup_timestamp", "2026-01-01")]:
        with pytest.raises(UnprocessableError) as caught:
            validate_envelope({**good, field: bad})
        assert caught.value.problem_extra["field"] == field
        assert [error["key"] for error in caught.value.problem_extra["errors"]] == [field]


def _settings(**env: str) -> Settings:
    return Settings.from_env(
        {"ZKEB_ENV": "test", "JWT_SECRET": "j", "API_KEY_SALT": "s", "DATABASE_URL": "postgresql://u@h/d", **env}
    )


def test_keyring_uses_the_new_master_key_during_rotation() -> None:
    current = base64.b64encode(b"\1" * 32).decode()
    new = (b"\2" * 32).hex()
    assert build_keyring(_settings(ZKEB_MASTER_ENCRYPTION_KEY=current)).active_id == master_key_id(b"\1" * 32)
    rotating = build_keyring(_settings(ZKEB_MASTER_ENCRYPTION_KEY=current, ZKEB_MASTER_ENCRYPTION_KEY_NEW=new))
    assert rotating.active_id == master_key_id(parse_master_key(new, name="x"))
    assert master_key_id(b"\1" * 32) in rotating.ids


def test_keyring_error_names_the_variable_not_the_value() -> None:
    with pytest.raises(SettingsError, match="ZKEB_MASTER_ENCRYPTION_KEY_NEW") as caught:
        build_keyring(
            _settings(ZKEB_MASTER_ENCRYPTION_KEY=(b"\1" * 32).hex(), ZKEB_MASTER_ENCRYPTION_KEY_NEW="hunter2")
        )
    assert "hunter2" not in str(caught.value)


async def _still_reading() -> None:
    await asyncio.Event().wait()


async def test_a_payload_reader_cancelled_while_waiting_for_a_batch_leaves_no_task_behind() -> None:
    # The client went away mid-download: the response closes the stream, which cancels the reader while it waits
    # for the fetcher's next batch. Its wait on the batch queue must go with it, not linger until garbage collection
    # ("Task was destroyed but it is pending!").
    reader = _PayloadReader(
        cast("AsyncEngine", None),
        PayloadStores("postgres"),
        store_kind="postgres",
        organization_id=uuid.uuid4(),
        payload_id=uuid.uuid4(),
        cipher=cast("ChunkCipher", None),
        steps=[],
    )
    fetcher = asyncio.create_task(_still_reading())
    before = asyncio.all_tasks()
    waiting = asyncio.create_task(reader._next_batch(fetcher))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()
    fetcher.cancel()
