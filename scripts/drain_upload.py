"""Drain check for scripts/image-check.sh: SIGTERM reaches the server while a tus upload is in flight.

    uv run python scripts/drain_upload.py BASE_URL ADMIN_KEY SERVER_PID [--size-mib 30] [--signal-after-mib 5]

Enrolls a device (bench/upload.py's helpers), creates a tus upload, streams one PATCH slowly enough that it is
still in flight when, after `--signal-after-mib` MiB have been handed to the socket, this process sends SIGTERM to
SERVER_PID. The server must finish the request: the PATCH answers 204 with the committed backup's id, which is
printed on stdout (the caller checks the row and the server's exit status). Exits 1, naming the failure, otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from upload import provision

MIB = 1024 * 1024


async def _slow_pieces(payload: bytes, signal_after: int, server_pid: int, pause: float) -> AsyncIterator[bytes]:
    view = memoryview(payload)
    for start in range(0, len(payload), MIB):
        if start == signal_after:
            os.kill(server_pid, signal.SIGTERM)
            sys.stderr.write(f"drain: SIGTERM sent to {server_pid} after {start // MIB} MiB of {len(payload) // MIB}\n")
        yield bytes(view[start : start + MIB])
        await asyncio.sleep(pause)


async def run(base_url: str, admin_key: str, server_pid: int, size_mib: int, signal_after_mib: int) -> str:
    """Upload `size_mib` MiB, signalling the server part way; the committed backup's id."""
    payload = os.urandom(size_mib * MIB)
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        project_id, key, device = await provision(client, admin_key)
        tus = {"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {key}"}
        created = await client.post(
            "/api/v1/uploads",
            headers={
                **tus,
                "Upload-Length": str(len(payload)),
                "Upload-Metadata": device.metadata_header(project_id, payload),
            },
        )
        created.raise_for_status()
        patched = await client.patch(
            created.headers["location"],
            content=_slow_pieces(payload, signal_after_mib * MIB, server_pid, pause=0.1),
            headers={
                **tus,
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
                "Content-Length": str(len(payload)),
            },
        )
    if patched.status_code != 204:
        msg = f"the in-flight PATCH answered {patched.status_code}, not 204: {patched.text[:200]}"
        raise RuntimeError(msg)
    backup_id: str = patched.headers["zkeb-backup-id"]
    return backup_id


def main() -> None:
    """Parse the arguments, run the upload, print the backup id."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url")
    parser.add_argument("admin_key")
    parser.add_argument("server_pid", type=int)
    parser.add_argument("--size-mib", type=int, default=30)
    parser.add_argument("--signal-after-mib", type=int, default=5)
    args = parser.parse_args()
    try:
        backup_id = asyncio.run(
            run(args.base_url, args.admin_key, args.server_pid, args.size_mib, args.signal_after_mib)
        )
    except (httpx.HTTPError, RuntimeError, KeyError) as exc:
        sys.stderr.write(f"drain: FAILED: {type(exc).__name__}: {exc}\n")
        sys.exit(1)
    sys.stdout.write(f"{backup_id}\n")


if __name__ == "__main__":
    main()
