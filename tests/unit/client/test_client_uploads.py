"""Upload rules that need no server: a file changed between PATCHes is never re-sent under the same nonce."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from zkeb.client import KeyFile, ZkebClientError
from zkeb.client.sdk import _file_source
from zkeb.client.state import StateStore, UploadState
from zkeb.client.transport import Transport
from zkeb.client.uploads import Uploader


async def test_a_patch_refuses_to_send_when_the_file_changed_since_it_was_sealed(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(4096))
    source = _file_source(path, "data.bin", "file", str(path))
    state = UploadState(
        location="http://127.0.0.1:9/api/v1/uploads/x",  # never contacted: the check comes first
        source_size=source.size,
        source_mtime_ns=source.mtime_ns,
        plain_sha256=b"\0" * 32,
        payload_nonce=os.urandom(12),
        payload_auth_tag=os.urandom(16),
        payload_sha256=b"\0" * 32,
        payload_size=source.size,
        metadata=b"m",
        metadata_nonce=os.urandom(12),
        metadata_auth_tag=os.urandom(16),
        signature=os.urandom(64),
        backup_timestamp=datetime.now(UTC),
    )
    keys = KeyFile.generate()
    transport = Transport("http://127.0.0.1:9", keys=keys, project_id=uuid.uuid4())
    uploader = Uploader(transport, keys, uuid.uuid4(), StateStore(tmp_path / "state"))
    path.write_bytes(os.urandom(4096))
    os.utime(path, ns=(0, source.mtime_ns + 1_000_000_000))

    with pytest.raises(ZkebClientError, match="changed while it was being backed up"):
        await uploader._patch(state, source, 1024, None)
    await transport.aclose()
