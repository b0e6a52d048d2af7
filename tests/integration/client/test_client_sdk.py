"""The SDK (`AsyncClient`, `Client`) against a real granian server on PostgreSQL: bytes, files, streams, errors."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from client_support import MIB, Project, StallingProxy, make_project

from zkeb.client import (
    ApiError,
    AsyncClient,
    Client,
    ConfigurationError,
    IntegrityError,
    KeyFile,
    RetryPolicy,
    TransferError,
    ZkebClientError,
)
from zkeb.client.restores import Restorer
from zkeb.client.state import UploadState
from zkeb.client.uploads import Uploader

from support import granian_server, make_settings

_PACED = b'{"status": 429, "title": "Too Many Requests", "detail": "rate limit exceeded"}'
#: What a rate limiter in front of the server answers, whole (the proxy sends it in place of the server's answer).
_RATE_LIMITED = (
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nConnection: close\r\n"
    b"Content-Type: application/problem+json\r\nContent-Length: " + str(len(_PACED)).encode() + b"\r\n\r\n" + _PACED
)


@pytest.fixture
def live_url(base_settings_env: dict[str, str], database_url: str) -> Iterator[str]:
    with granian_server({**base_settings_env, "DATABASE_URL": database_url}) as url:
        yield url


@pytest.fixture
async def project(live_url: str, base_settings_env: dict[str, str], database_url: str) -> Project:
    return await make_project(live_url, make_settings(base_settings_env, DATABASE_URL=database_url))


@pytest.fixture
async def keys(project: Project) -> KeyFile:
    keys = KeyFile.generate().with_project(project.project_id)
    async with AsyncClient(project.server, keys=keys, api_key=project.admin_key) as admin:
        enrollment = await admin.enroll("sdk-test")
    assert enrollment.device_id_hash == keys.device_id_hash.hex()
    return keys


async def test_async_client_round_trips_bytes_and_streams_with_progress(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    container = uuid.uuid4()
    small, large = os.urandom(100_000), os.urandom(9 * MIB + 3)
    seen: list[tuple[int, int]] = []
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(large)

    feeder = threading.Thread(target=feed)
    feeder.start()
    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as client:
        one = await client.backup_bytes(small, container, name="small.bin")
        with os.fdopen(read_end, "rb") as pipe:  # a stream that cannot seek: spooled, then sent by tus
            two = await client.backup_stream(
                pipe, container, name="large.bin", progress=lambda d, t: seen.append((d, t))
            )
        sink = io.BytesIO()
        restored = await client.restore_stream(two.id, sink)
        small_back = await client.restore_bytes(one.id)
        listed = await client.list(container)
        verified = await client.verify(one.id)
    feeder.join()

    assert (one.transfer, two.transfer) == ("single-shot", "tus")
    assert small_back == small
    assert sink.getvalue() == large
    assert restored.size == len(large)
    assert seen[-1] == (two.encrypted_size, two.encrypted_size)
    assert [(r.id, r.name, r.size) for r in listed] == [
        (two.id, "large.bin", len(large)),
        (one.id, "small.bin", 100_000),
    ]
    assert verified.verified


async def test_server_problems_become_api_errors_with_status_title_detail_and_request_id(
    project: Project, keys: KeyFile
) -> None:
    async with AsyncClient(project.server, keys=keys) as client:
        backup = await client.backup_bytes(b"to be deleted", uuid.uuid4())
        await client.delete(backup.id)
        with pytest.raises(ApiError) as caught:
            await client.restore_bytes(backup.id)

    error = caught.value
    assert error.status == 404
    assert error.title
    assert error.detail
    assert error.request_id
    assert str(error).startswith("server answered 404")


async def test_503_with_retry_after_is_retried_after_the_time_the_server_asks(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    proxy = StallingProxy(project.server)
    proxy.busy_answers = 2  # the first two connections (each request's, as the 503 closes them) are refused
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            started = time.monotonic()
            backup = await client.backup_bytes(b"through a busy server", uuid.uuid4())
            elapsed = time.monotonic() - started
            restored = await client.restore_bytes(backup.id)
    finally:
        proxy.close()

    assert restored == b"through a busy server"
    assert proxy.busy_answers == 0
    assert elapsed >= 2.0, "the client did not wait the Retry-After it was given"


async def test_a_download_cut_mid_way_resumes_with_range_and_if_range(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(10 * MIB)
    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as direct:
        backup = await direct.backup_bytes(data, uuid.uuid4(), name="cut.bin")
    proxy = StallingProxy(project.server)
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            envelope = await client.envelope(backup.id)
            proxy.cut_response_after = 4 * MIB
            restored = await client.restore_bytes(backup.id)
    finally:
        proxy.close()

    ranged = [head for head in proxy.requests if b"/payload" in head and b"\r\nrange: bytes=" in head.lower()]
    assert restored == data
    assert proxy.cuts == 1, "the download was never cut"
    assert len(ranged) == 1
    assert f'if-range: "{envelope.payload_sha256}"'.encode() in ranged[0].lower()
    assert proxy.answered < 10 * MIB + 4 * MIB + MIB, "the download started over instead of resuming"


def test_blocking_client_backs_up_and_restores_a_file(project: Project, keys: KeyFile, tmp_path: Path) -> None:
    source = tmp_path / "report.pdf"
    source.write_bytes(os.urandom(2 * MIB))
    container = uuid.uuid4()

    with Client(project.server, keys=keys, state_dir=tmp_path / "state") as client:
        limit = client.max_upload_size()
        backup = client.backup_file(source, container)
        restored = client.restore_file(None, tmp_path / "out.pdf", container_id=container)
        with pytest.raises(ZkebClientError, match="already exists"):
            client.restore_file(backup.id, tmp_path / "out.pdf")

    assert limit == 100 * 1000 * 1000
    assert restored.path == tmp_path / "out.pdf"
    assert (tmp_path / "out.pdf").read_bytes() == source.read_bytes()


async def test_a_bit_flipped_late_in_the_download_fails_the_restore_and_leaves_nothing(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(12 * MIB + 5)
    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as direct:
        backup = await direct.backup_bytes(data, uuid.uuid4(), name="late.bin")
    out = tmp_path / "out"
    out.mkdir()
    proxy = StallingProxy(project.server)
    proxy.flip_response_byte = 11 * MIB  # in the payload's last blocks, long after the first ones were written
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            with pytest.raises(IntegrityError, match="SHA-256 is not the signed one"):
                await client.restore_file(backup.id, out / "late.bin")
    finally:
        proxy.close()

    assert proxy.flips == 1, "the download was never altered"
    assert list(out.iterdir()) == [], "a partial or temporary file was left behind"


class _FullDisk:
    """A sink with room for `room` bytes, then ENOSPC, as a full disk answers."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.written = 0

    def write(self, data: bytes) -> int:
        size = len(data)
        if self.written + size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += size
        return size


async def test_a_failing_write_ends_the_restore_with_that_error(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(16 * MIB)
    sink = _FullDisk(3 * MIB)
    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as client:
        backup = await client.backup_bytes(data, uuid.uuid4(), name="big.bin")
        with pytest.raises(OSError, match="No space left on device"):
            await client.restore_stream(backup.id, sink)  # type: ignore[arg-type]
        assert await client.restore_bytes(backup.id) == data  # the client is still usable
    assert sink.written <= 3 * MIB


async def test_a_cancelled_restore_stops_its_threads_leaves_nothing_and_reported_progress_on_the_loop(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(48 * MIB)
    out = tmp_path / "out"
    out.mkdir()
    reporters: set[int] = set()
    restoring: asyncio.Task[object] | None = None

    def progress(done: int, _total: int) -> None:
        reporters.add(threading.get_ident())
        if done >= 2 * MIB and restoring is not None:
            restoring.cancel()

    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as client:
        backup = await client.backup_bytes(data, uuid.uuid4(), name="big.bin")
        restoring = asyncio.create_task(client.restore_file(backup.id, out / "big.bin", progress=progress))
        with pytest.raises(asyncio.CancelledError):
            await restoring
        workers = [thread.name for thread in threading.enumerate() if thread.name.startswith("zkeb-restore")]
        await asyncio.sleep(0.3)
        left = list(out.iterdir())

    assert reporters == {threading.get_ident()}
    assert workers == []
    assert left == [], "a partial or temporary file was left behind, or written after the restore was cancelled"


async def test_a_lost_answer_to_the_completing_patch_is_the_committed_backup_not_a_failure(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(9 * MIB)
    container = uuid.uuid4()
    proxy = StallingProxy(project.server)
    proxy.lose_answer_to, proxy.lose_answers = b"PATCH ", 1
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            backup = await client.backup_bytes(data, container, name="big.bin")
            listed = await client.list(container)
            restored = await client.restore_bytes(backup.id)
    finally:
        proxy.close()

    assert proxy.lost == 1, "the PATCH's answer was never lost"
    assert [record.id for record in listed] == [backup.id]
    assert restored == data


async def test_a_rerun_after_the_completing_patch_lost_its_answer_returns_that_backup_without_a_duplicate(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(9 * MIB))
    container = uuid.uuid4()
    proxy = StallingProxy(project.server)
    proxy.lose_answer_to, proxy.lose_answers = b"PATCH ", 1
    try:
        async with AsyncClient(
            proxy.url, keys=keys, state_dir=tmp_path / "state", retry=RetryPolicy(attempts=1)
        ) as first:
            with pytest.raises(TransferError, match="run the same command again"):
                await first.backup_file(source, container)
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as again:
            backup = await again.backup_file(source, container)
            listed = await again.list(container)
    finally:
        proxy.close()

    assert proxy.lost == 1
    assert [record.id for record in listed] == [backup.id]
    assert backup.resumed_from == backup.encrypted_size
    assert not list((tmp_path / "state" / "uploads").glob("*.json")), "the resume record was kept"


async def test_a_rerun_whose_upload_is_gone_uploads_again_from_zero_under_the_same_nonce(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 * MIB))
    container = uuid.uuid4()
    proxy = StallingProxy(project.server)
    proxy.budget = 4 * MIB
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as first:
            stalled = asyncio.create_task(first.backup_file(source, container))
            assert await asyncio.to_thread(proxy.stalled.wait, 60), "the upload never reached the proxy's budget"
            stalled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stalled
        (record,) = (tmp_path / "state" / "uploads").glob("*.json")
        recorded = msgspec.json.decode(record.read_bytes(), type=UploadState)
        # The upload ends on the server (as an expired one is purged) before the same backup runs again.
        path = "/api/v1/uploads/" + recorded.location.rsplit("/", 1)[1]
        headers = {"Authorization": f"Bearer {project.project_key}", "Tus-Resumable": "1.0.0"}
        async with httpx.AsyncClient(base_url=project.server, headers=headers) as http:
            assert (await http.delete(path)).status_code == 204
        proxy.budget = None
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as again:
            backup = await again.backup_file(source, container)
            envelope = await again.envelope(backup.id)
            restored = await again.restore_bytes(backup.id)
    finally:
        proxy.close()

    assert backup.resumed_from == 0
    assert envelope.payload_nonce == recorded.payload_nonce, "a new nonce: the file was sealed again"
    assert restored == source.read_bytes()


async def test_a_lost_answer_to_the_upload_creation_leaves_no_second_upload_behind(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(9 * MIB)
    proxy = StallingProxy(project.server)
    proxy.lose_answer_to, proxy.lose_answers = b"POST /api/v1/uploads ", 1
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            backup = await client.backup_bytes(data, uuid.uuid4(), name="big.bin")
            restored = await client.restore_bytes(backup.id)
    finally:
        proxy.close()

    assert proxy.lost == 1, "the creation's answer was never lost"
    assert restored == data
    async with httpx.AsyncClient(base_url=project.server) as http:
        usage = await http.get(
            f"/api/v1/projects/{project.project_id}/usage", headers={"Authorization": f"Bearer {project.admin_key}"}
        )
    assert (usage.json()["open_uploads"], usage.json()["reserved_bytes"]) == (0, 0), "an upload was left open"


async def test_a_lost_answer_to_the_single_shot_post_is_the_committed_backup_not_a_conflict(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    container = uuid.uuid4()
    proxy = StallingProxy(project.server)
    proxy.lose_answer_to, proxy.lose_answers = b"POST /api/v1/backups ", 1
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            backup = await client.backup_bytes(b"hello world", container, name="hello.txt")
            listed = await client.list(container)
    finally:
        proxy.close()

    assert proxy.lost == 1, "the POST's answer was never lost"
    assert [record.id for record in listed] == [backup.id]


async def test_a_retried_rm_whose_first_answer_was_lost_succeeds(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    container = uuid.uuid4()
    proxy = StallingProxy(project.server)
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            backup = await client.backup_bytes(b"to be deleted", container)
            proxy.lose_answer_to, proxy.lose_answers = b"DELETE /api/v1/backups/", 1
            await client.delete(backup.id)
            listed = await client.list(container)
            with pytest.raises(ApiError) as again:
                await client.delete(backup.id)  # a 404 without a lost answer before it is still an error
    finally:
        proxy.close()

    assert proxy.lost == 1
    assert listed == []
    assert again.value.status == 404


async def test_a_lost_answer_to_the_device_token_request_is_retried_with_a_fresh_proof(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    proxy = StallingProxy(project.server)
    proxy.lose_answer_to, proxy.lose_answers = b"POST /api/v1/auth/token ", 1
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            listed = await client.list()
    finally:
        proxy.close()

    tokens = [head for head in proxy.requests if head.startswith(b"POST /api/v1/auth/token ")]
    assert proxy.lost == 1, "the token's answer was never lost"
    assert listed == []
    assert len(tokens) == 2


async def test_a_file_created_at_the_destination_during_the_restore_is_not_overwritten(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / "report.bin"

    def someone_writes_there(done: int, total: int) -> None:
        if done < total and not target.exists():
            target.write_bytes(b"written by someone else during the download")

    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as client:
        backup = await client.backup_bytes(os.urandom(6 * MIB), uuid.uuid4(), name="report.bin")
        with pytest.raises(ConfigurationError, match="appeared during the restore; refusing to overwrite it"):
            await client.restore_file(backup.id, target, progress=someone_writes_there)

    assert target.read_bytes() == b"written by someone else during the download"
    assert list(out.iterdir()) == [target], "the temporary file was left behind"


async def test_an_empty_directory_created_at_the_destination_during_the_restore_is_not_replaced(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    source = tmp_path / "photos"
    source.mkdir()
    (source / "a.bin").write_bytes(os.urandom(6 * MIB))
    out = tmp_path / "out"
    out.mkdir()
    target = out / "photos"

    def someone_makes_it(done: int, total: int) -> None:
        if done < total:
            target.mkdir(exist_ok=True)

    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as client:
        backup = await client.backup_file(source, uuid.uuid4())
        with pytest.raises(ConfigurationError, match="appeared during the restore"):
            await client.restore_file(backup.id, out, progress=someone_makes_it)

    assert target.is_dir()
    assert list(target.iterdir()) == []
    assert list(out.iterdir()) == [target], "a temporary file or folder was left behind"


async def test_a_failed_restore_removes_the_folders_it_created_and_only_those(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as direct:
        backup = await direct.backup_bytes(os.urandom(3 * MIB), uuid.uuid4(), name="late.bin")
    kept = tmp_path / "kept"
    kept.mkdir()
    proxy = StallingProxy(project.server)
    proxy.flip_response_byte = 2 * MIB
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            with pytest.raises(IntegrityError):
                await client.restore_file(backup.id, kept / "new" / "deeper" / "late.bin")
    finally:
        proxy.close()

    assert proxy.flips == 1, "the download was never altered"
    assert kept.is_dir(), "a folder that existed before the restore was removed"
    assert list(kept.iterdir()) == [], "the folders the failed restore created were left behind"


async def test_a_directory_holding_the_clients_state_directory_is_packed_without_it(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    state = home / ".local" / "state" / "zkeb-client"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_bytes(b"water the plants")
    # What an interrupted run leaves: an upload record and a pack.
    (state / "uploads").mkdir(parents=True)
    (state / "uploads" / "interrupted.json").write_bytes(b"{}")
    (state / "packs").mkdir()
    (state / "packs" / "interrupted.tar").write_bytes(os.urandom(MIB))

    async with AsyncClient(project.server, keys=keys, state_dir=state) as client:
        backup = await client.backup_file(home, uuid.uuid4())
        packed = await client.restore_bytes(backup.id)

    with tarfile.open(fileobj=io.BytesIO(packed)) as archive:
        names = archive.getnames()
    assert names == ["home", "home/.local", "home/.local/state", "home/notes", "home/notes/todo.txt"]
    assert [(entry.path, entry.reason) for entry in backup.left_out] == [
        ("home/.local/state/zkeb-client", "the client's own state directory: upload records and packs")
    ]


async def test_a_download_cut_again_and_again_completes_while_each_attempt_progresses_and_fails_when_none_does(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(12 * MIB)
    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as direct:
        backup = await direct.backup_bytes(data, uuid.uuid4(), name="cut.bin")
    proxy = StallingProxy(project.server)
    retry = RetryPolicy(attempts=3, base_delay=0.05)
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state", retry=retry) as client:
            envelope = await client.envelope(backup.id)
            proxy.cut_response_after, proxy.cut_answers = MIB, 8  # each attempt gets about 1 MiB, then is cut
            restored = await client.restore_bytes(backup.id)
            cuts_while_progressing = proxy.cuts
            proxy.cut_response_after, proxy.cut_answers = 0, 100  # now no attempt receives a byte
            with pytest.raises(TransferError, match="the download kept failing"):
                await Restorer(client.transport, keys).to_stream(envelope, io.BytesIO())
    finally:
        proxy.close()

    assert restored == data
    assert cuts_while_progressing == 8, "the download was not cut as often as planned"
    assert proxy.cuts - cuts_while_progressing == retry.attempts, "attempts that received nothing were not bounded"


async def test_an_upload_cut_again_and_again_completes_while_the_server_offset_advances(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(16 * MIB)
    proxy = StallingProxy(project.server)
    proxy.cut_request_after, proxy.cut_requests = 2 * MIB, 6  # each PATCH delivers about 2 MiB, then is cut
    # Backoff long enough for the server to record what a cut PATCH stored before the HEAD asks: with 0.05 s, a busy
    # machine answered the HEAD first and the next PATCH got 409 at a stale offset (once in a full run).
    try:
        async with AsyncClient(
            proxy.url, keys=keys, state_dir=tmp_path / "state", retry=RetryPolicy(attempts=3, base_delay=0.5)
        ) as client:
            backup = await client.backup_bytes(data, uuid.uuid4(), name="cut.bin")
            restored = await client.restore_bytes(backup.id)
    finally:
        proxy.close()

    patches = [head for head in proxy.requests if head.startswith(b"PATCH ")]
    assert proxy.request_cuts == 6, "the upload was not cut as often as planned"
    assert len(patches) == 7
    assert restored == data


async def test_a_409_naming_an_offset_ahead_resumes_from_there_as_progress_without_a_head(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(12 * MIB)
    proxy = StallingProxy(project.server)
    proxy.cut_request_after, proxy.cut_requests = 2 * MIB, 1  # the first PATCH stores some MiB, then is cut
    # The HEAD after the cut answers as if the server had not yet recorded what the cut PATCH stored (a race seen in a
    # full run); the PATCH from that stale offset is answered 409 with the true one.
    proxy.rewrite_answer_to, proxy.rewrites = b"HEAD ", 1
    proxy.rewrite = lambda answer: re.sub(rb"(?i)(upload-offset: )\d+", rb"\g<1>0", answer)
    try:
        # Two attempts: the cut is one failure; counting the 409 as another would end the upload.
        async with AsyncClient(
            proxy.url, keys=keys, state_dir=tmp_path / "state", retry=RetryPolicy(attempts=2, base_delay=0.5)
        ) as client:
            backup = await client.backup_bytes(data, uuid.uuid4(), name="stale.bin")
            restored = await client.restore_bytes(backup.id)
    finally:
        proxy.close()

    tus = [head.split(b"\r\n")[0] for head in proxy.requests if b"/api/v1/uploads/" in head.split(b"\r\n")[0]]
    offsets = [
        int(re.search(rb"(?i)upload-offset: (\d+)", head).group(1))  # type: ignore[union-attr]
        for head in proxy.requests
        if head.startswith(b"PATCH ")
    ]
    assert proxy.request_cuts == 1, "the upload was not cut"
    assert proxy.rewritten == 1, "the HEAD after the cut was not answered with a stale offset"
    assert [line.split(b" ")[0] for line in tus] == [b"PATCH", b"HEAD", b"PATCH", b"PATCH"], "a HEAD after the 409"
    assert any(answer.startswith(b"HTTP/1.1 409") for answer in proxy.answers)
    assert offsets[:2] == [0, 0]
    assert offsets[2] > 0, "the PATCH after the 409 did not go on from the offset it named"
    assert restored == data


async def test_a_rate_limited_download_is_waited_out_without_counting_as_a_failure(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(3 * MIB)
    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as direct:
        backup = await direct.backup_bytes(data, uuid.uuid4(), name="paced.bin")
    proxy = StallingProxy(project.server)
    proxy.refuse, proxy.refusals = f"GET /api/v1/backups/{backup.id}/payload".encode(), 4
    proxy.refusal = _RATE_LIMITED
    try:
        async with AsyncClient(
            proxy.url, keys=keys, state_dir=tmp_path / "state", retry=RetryPolicy(attempts=2, base_delay=0.05)
        ) as client:
            restored = await client.restore_bytes(backup.id)
            refused_while_paced = proxy.refused
            proxy.refusals = 100  # a server that never lets the download through
            client.transport.retry = RetryPolicy(max_rate_limited=5)
            with pytest.raises(TransferError, match="refused as rate limited 5 times in a row"):
                await client.restore_bytes(backup.id)
    finally:
        proxy.close()

    assert refused_while_paced == 4, "the downloads were not refused"
    assert restored == data
    assert proxy.refused - refused_while_paced == 5, "the rate-limited waits were not bounded"


@pytest.fixture
def impatient_url(base_settings_env: dict[str, str], database_url: str) -> Iterator[str]:
    """A server that cuts off a request body after one second without progress (408)."""
    with granian_server({**base_settings_env, "DATABASE_URL": database_url, "BODY_IDLE_TIMEOUT": "1"}) as url:
        yield url


@pytest.fixture
async def impatient_project(impatient_url: str, base_settings_env: dict[str, str], database_url: str) -> Project:
    return await make_project(impatient_url, make_settings(base_settings_env, DATABASE_URL=database_url))


async def _enrolled(project: Project) -> KeyFile:
    keys = KeyFile.generate().with_project(project.project_id)
    async with AsyncClient(project.server, keys=keys, api_key=project.admin_key) as admin:
        await admin.enroll("sdk-test")
    return keys


@pytest.mark.parametrize(("size", "transfer"), [(4 * MIB, "single-shot"), (12 * MIB, "tus")])
async def test_a_body_the_server_cut_off_with_408_is_sent_again_or_resumed(
    impatient_project: Project, tmp_path: Path, size: int, transfer: str
) -> None:
    keys = await _enrolled(impatient_project)
    data = os.urandom(size)
    container = uuid.uuid4()
    proxy = StallingProxy(impatient_project.server)
    proxy.stall_request_after = 2 * MIB  # the upload's body stops there once; the server answers 408 a second later
    try:
        async with AsyncClient(proxy.url, keys=keys, state_dir=tmp_path / "state") as client:
            backup = await client.backup_bytes(data, container, name="stalled.bin")
            listed = await client.list(container)
            restored = await client.restore_bytes(backup.id)
    finally:
        proxy.close()

    uploads = [head for head in proxy.requests if head.startswith((b"POST /api/v1/backups ", b"PATCH "))]
    assert proxy.stalled.is_set(), "the upload never stalled"
    assert any(answer.startswith(b"HTTP/1.1 408") for answer in proxy.answers), "the server never answered 408"
    assert backup.transfer == transfer
    assert len(uploads) == 2
    if transfer == "tus":
        assert b"upload-offset: 0\r\n" not in uploads[1].lower(), "the PATCH after the 408 started over"
    assert [record.id for record in listed] == [backup.id]
    assert restored == data


async def test_a_rate_limited_patch_is_sent_again_at_the_known_offset_without_counting_as_a_failure(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    data = os.urandom(12 * MIB)
    proxy = StallingProxy(project.server)
    proxy.refuse, proxy.refusals = b"PATCH ", 4
    proxy.refusal = _RATE_LIMITED
    try:
        async with AsyncClient(
            proxy.url, keys=keys, state_dir=tmp_path / "state", retry=RetryPolicy(attempts=2, base_delay=0.05)
        ) as client:
            backup = await client.backup_bytes(data, uuid.uuid4(), name="paced.bin")
            restored = await client.restore_bytes(backup.id)
        tus = [head.split(b" ")[0] for head in proxy.requests if b"/api/v1/uploads/" in head.split(b"\r\n")[0]]
        refused_while_paced = proxy.refused
        proxy.refusals = 100  # a server that never lets the upload through
        async with AsyncClient(
            proxy.url, keys=keys, state_dir=tmp_path / "state", retry=RetryPolicy(max_rate_limited=5)
        ) as client:
            with pytest.raises(TransferError, match="refused as rate limited 5 times in a row"):
                await client.backup_bytes(data, uuid.uuid4(), name="never.bin")
    finally:
        proxy.close()

    assert refused_while_paced == 4, "the PATCHes were not refused"
    assert tus == [b"PATCH"] * 5, "a HEAD was sent after a refusal that changed nothing"
    assert restored == data
    assert proxy.refused - refused_while_paced == 5, "the rate-limited waits were not bounded"


def _dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


async def test_a_restore_and_a_backup_remove_what_killed_runs_left_behind_and_nothing_a_live_one_owns(
    project: Project, keys: KeyFile, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    stale_part = out / f".late.bin.{dead}.k1ll3d00.zkeb-part"  # a restore killed while downloading
    stale_folder = out / f".late.bin.{dead}.k1ll3d01.zkeb-part"  # one killed while extracting a directory
    live_part = out / f".late.bin.{os.getpid()}.runn1ng0.zkeb-part"  # a restore still running
    other_part = out / f".late.bin.1.{dead}.k1ll3d02.zkeb-part"  # a live restore to 'late.bin.1', not to 'late.bin'
    stale_part.write_bytes(b"unverified plaintext")
    stale_folder.mkdir()
    (stale_folder / "late.bin").write_bytes(b"unverified plaintext")
    live_part.write_bytes(b"being written")
    other_part.write_bytes(b"being written")
    state = tmp_path / "state"
    (state / "packs").mkdir(parents=True)
    stale_pack = state / "packs" / f"{'a' * 64}.{dead}.tmp"  # a backup killed while packing a directory
    live_pack = state / "packs" / f"{'b' * 64}.{os.getpid()}.tmp"
    stale_pack.write_bytes(b"half a tar")
    live_pack.write_bytes(b"half a tar")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a photo")

    async with AsyncClient(project.server, keys=keys, state_dir=state) as client:
        backup = await client.backup_bytes(b"late", uuid.uuid4(), name="late.bin")
        await client.restore_file(backup.id, out / "late.bin")
        await client.backup_file(folder, uuid.uuid4())

    assert sorted(entry.name for entry in out.iterdir()) == sorted(["late.bin", live_part.name, other_part.name])
    assert sorted(entry.name for entry in (state / "packs").iterdir()) == [live_pack.name]


async def test_a_directory_that_fails_to_pack_leaves_no_partial_pack(
    project: Project, keys: KeyFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_bytes(b"readable" * 1000)
    (tree / "b.txt").write_bytes(b"unreadable")

    def unreadable(path: str, *args: Any, **kwargs: Any) -> Any:  # as a file of another user's is to us
        if str(path).endswith("b.txt"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return open(path, *args, **kwargs)  # the builtin, for every other file

    monkeypatch.setattr("zkeb.client.archive.open", unreadable, raising=False)
    state = tmp_path / "state"
    async with AsyncClient(project.server, keys=keys, state_dir=state) as client:
        with pytest.raises(PermissionError):
            await client.backup_file(tree, uuid.uuid4())

    assert list((state / "packs").iterdir()) == [], "the partial pack was left behind"


async def test_a_small_file_that_changes_during_its_backup_is_refused_not_stored_torn(
    project: Project, keys: KeyFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "notes.txt"
    source.write_bytes(b"the first version")
    size_limit = Uploader.max_upload_size

    async def meanwhile_the_file_changes(uploader: Uploader) -> int:  # between the file's stat and its read
        source.write_bytes(b"the second version, written while the backup ran")
        return await size_limit(uploader)

    monkeypatch.setattr(Uploader, "max_upload_size", meanwhile_the_file_changes)
    container = uuid.uuid4()
    async with AsyncClient(project.server, keys=keys, state_dir=tmp_path / "state") as client:
        with pytest.raises(ZkebClientError, match=r"^notes\.txt changed while it was being backed up"):
            await client.backup_file(source, container)
        monkeypatch.undo()
        stored = await client.list(container)
        backup = await client.backup_file(source, container)

    assert stored == [], "the changed file was stored"
    assert backup.size == len(b"the second version, written while the backup ran")
