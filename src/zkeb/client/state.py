"""Resume state of unfinished uploads, one JSON file each in the user's state directory.

The directory is ``$XDG_STATE_HOME/zkeb-client`` (default ``~/.local/state/zkeb-client``). A record holds what is
needed to reproduce the same ciphertext and envelope (nonces, timestamp, encrypted metadata, signature) and where
the tus upload lives; it names no key. A finished or abandoned upload's record is deleted.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import msgspec

__all__ = ("StateStore", "UploadState", "default_state_dir", "process_alive")


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/zkeb-client``, or ``~/.local/state/zkeb-client``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "zkeb-client"


class UploadState(msgspec.Struct, frozen=True):
    """An upload in flight: enough to resume it, and to tell whether the source changed since."""

    location: str
    source_size: int
    source_mtime_ns: int
    plain_sha256: bytes
    payload_nonce: bytes
    payload_auth_tag: bytes
    payload_sha256: bytes
    payload_size: int
    metadata: bytes
    metadata_nonce: bytes
    metadata_auth_tag: bytes
    signature: bytes
    backup_timestamp: datetime


def _server_name(server: str) -> str:
    """`server` with its scheme and host in lower case, no default port and no trailing slash."""
    url = httpx.URL(server)
    host = f"[{url.host}]" if ":" in url.host else url.host
    port = "" if url.port in {None, _DEFAULT_PORTS.get(url.scheme)} else f":{url.port}"
    return f"{url.scheme}://{host}{port}{url.path.rstrip('/')}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


class StateStore:
    """Upload records keyed by what is being backed up where."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_state_dir()

    @staticmethod
    def key(*, server: str, project_id: uuid.UUID, container_id: uuid.UUID, device_id_hash: bytes, source: str) -> str:
        """A stable file name for one source backed up by one device into one container on one server.

        The server is named as a URL normalizes (`HTTP://Backup.Example:443/` is `https://backup.example`), so
        the same server typed another way finds the same record; two names for one host (`localhost` and
        `127.0.0.1`) are two servers to the client.
        """
        text = "\n".join((_server_name(server), str(project_id), str(container_id), device_id_hash.hex(), source))
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / "uploads" / f"{key}.json"

    def scratch(self, key: str) -> Path:
        """A scratch file for this key (a directory's tar stream), in the state directory."""
        folder = self.root / "packs"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return folder / f"{key}.tar"

    def remove_stale_packs(self) -> None:
        """Delete the partial packs (``<key>.<pid>.tmp``) of backups killed while packing: those whose process is
        gone. A running backup's is left alone."""
        for partial in (self.root / "packs").glob("*.*.tmp"):
            pid = partial.name.rsplit(".", 2)[1]
            if pid.isdigit() and not process_alive(int(pid)):
                partial.unlink(missing_ok=True)

    def load(self, key: str) -> UploadState | None:
        """The record, or None when there is none (or it is unreadable, which is treated as none)."""
        try:
            return msgspec.json.decode(self._path(key).read_bytes(), type=UploadState)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def save(self, key: str, state: UploadState) -> None:
        """Write the record atomically."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(msgspec.json.encode(state))
        temporary.replace(path)

    def discard(self, key: str) -> None:
        """Forget the record (and any scratch file)."""
        self._path(key).unlink(missing_ok=True)
        (self.root / "packs" / f"{key}.tar").unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine; when that cannot be told, it is taken to run."""
    if os.name != "posix":
        return True  # Windows' os.kill would terminate the process instead of probing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or an id out of range): not ours to judge
    return True
