"""Directories as tar streams: packed reproducibly for backup, extracted safely on restore.

Packing walks the tree in sorted order and keeps links as links, so the same tree gives the same bytes: that is what
lets an interrupted directory backup resume. Special files (FIFOs, sockets, character and block devices) hold no
data and could not be restored safely, so they are left out, and the caller is told which.

Extraction refuses the whole archive for a member whose *name* is absolute or climbs out of the target with ``..``:
our packer never writes one, so such an archive was not made by it. A member that is unsafe to recreate but harmless
to leave out — a symbolic or hard link pointing outside the target (an absolute or outward symlink is a normal thing
to back up), or a special file from an archive packed before they were left out — is skipped and reported, and the
rest is extracted with the standard library's ``data`` filter (no set-uid bits, no ownership).
"""

from __future__ import annotations

import os
import stat
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

from zkeb.client.errors import IntegrityError, ZkebClientError
from zkeb.client.models import LeftOut

__all__ = ("extract_tar", "pack_directory")


def _special_kind(mode: int) -> str | None:
    """What special file a mode describes ("a FIFO", ...), or None for a file, directory or link."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"))
    for test, kind in (*kinds, (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return None


@dataclass(frozen=True)
class _Packing:
    """What `_add` checks as it goes: what to leave out, and when to stop."""

    left_out: list[LeftOut]
    state: tuple[int, int] | None
    limit: int | None
    stop: threading.Event | None
    name: str


def pack_directory(
    source: Path,
    destination: Path,
    *,
    state_dir: Path | None = None,
    limit: int | None = None,
    stop: threading.Event | None = None,
) -> list[LeftOut]:
    """Write ``source`` (a directory) as a PAX tar file at ``destination`` (mode 0600), its top entry named after it.

    Args:
        source: The directory.
        destination: The tar file to write (left out, should it lie inside ``source``).
        state_dir: The client's own state directory (upload records and packs), left out should it lie inside
            ``source``: packing it would put earlier packs into this one, which then never matches the last run's.
        limit: The server's largest payload: packing stops as soon as the tar file would pass it.
        stop: Packing stops once it is set (the backup was cancelled).

    Returns:
        What was left out (special files; the state directory), in the order met.

    Raises:
        ZkebClientError: If the tar file would pass ``limit``, or ``stop`` was set; ``destination`` is then partial.
    """
    packing = _Packing([], _identity(state_dir) if state_dir is not None else None, limit, stop, source.name)
    # A copy of the user's plaintext: readable by its owner only, whatever the umask.
    with (
        open(destination, "wb", opener=lambda path, flags: os.open(path, flags, 0o600)) as file,
        tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        _add(archive, str(source), source.name, packing)
    return packing.left_out


def _identity(path: Path) -> tuple[int, int] | None:
    """A directory's (device, inode), however it is spelled (relative, through a link); None when it is missing."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _add(archive: tarfile.TarFile, path: str, arcname: str, packing: _Packing) -> None:
    """Add ``path`` as `TarFile.add` would (recursively, sorted), leaving special files and the state out."""
    if archive.name is not None and os.path.abspath(path) == archive.name:
        return  # the archive being written, should it lie inside the tree
    if packing.stop is not None and packing.stop.is_set():
        raise ZkebClientError("packing was stopped")
    found = os.lstat(path)
    if packing.state is not None and stat.S_ISDIR(found.st_mode) and (found.st_dev, found.st_ino) == packing.state:
        reason = "the client's own state directory: upload records and packs"
        packing.left_out.append(LeftOut(path=arcname, reason=reason))
        return
    kind = _special_kind(found.st_mode)
    info = None if kind is not None else archive.gettarinfo(path, arcname)
    if info is None:
        reason = f"{kind or 'an unsupported file type'}: it holds no data"
        packing.left_out.append(LeftOut(path=arcname, reason=reason))
        return
    if packing.limit is not None and archive.offset + tarfile.BLOCKSIZE + info.size > packing.limit:
        raise ZkebClientError(
            f"{packing.name} is more than {packing.limit} bytes as a tar stream; "
            f"the server takes at most {packing.limit} bytes"
        )
    if info.isreg():
        with open(path, "rb") as handle:
            archive.addfile(info, handle)
    else:
        archive.addfile(info)
    if info.isdir():
        for name in sorted(os.listdir(path)):
            _add(archive, os.path.join(path, name), os.path.join(arcname, name), packing)


class _SafeMembers:
    """The extraction filter: refuses foreign names, skips (and remembers) links and special files it cannot keep."""

    def __init__(self) -> None:
        self.left_out: list[LeftOut] = []

    def __call__(self, member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
        # The stdlib's ``data`` filter strips a leading "/" and extracts inside the target; our archives never hold
        # one, so an absolute name means a foreign archive: refuse it rather than guess.
        if os.path.isabs(member.name) or member.name.startswith(("/", "\\")):
            raise tarfile.AbsolutePathError(member)
        try:
            filtered = tarfile.data_filter(member, destination)
        except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError):
            reason = f"a link to {member.linkname}, outside the restored directory"
        except tarfile.SpecialFileError:
            reason = "a special file (FIFO or device): it holds no data"
        else:
            if not member.issym() or _symlink_stays_inside(member, destination):
                return filtered
            reason = f"a link to {member.linkname}, outside the restored directory"
        self.left_out.append(LeftOut(path=member.name, reason=reason))
        return None


def _symlink_stays_inside(member: tarfile.TarInfo, destination: str) -> bool:
    """Whether a symlink resolves inside the archive's top directory (the one restored), not merely the target."""
    top = os.path.realpath(os.path.join(destination, member.name.split("/", 1)[0]))
    points_to = os.path.realpath(os.path.join(destination, os.path.dirname(member.name), member.linkname))
    return os.path.commonpath([top, points_to]) == top


def extract_tar(archive_path: Path, target: Path) -> list[LeftOut]:
    """Extract a backup's tar stream into ``target`` (an empty directory).

    Returns:
        The members skipped: links pointing outside ``target``, and special files.

    Raises:
        IntegrityError: If a member's name is absolute or would land outside ``target``, or the archive is unreadable.
    """
    members = _SafeMembers()
    try:
        with tarfile.open(archive_path, "r:") as archive:
            archive.extractall(target, filter=members)  # noqa: S202  # nosec B202 - every member is filtered
    except tarfile.FilterError as exc:
        raise IntegrityError(f"refusing an unsafe archive member: {exc}") from None
    except tarfile.TarError as exc:
        raise IntegrityError(f"the backup's archive is unreadable: {exc}") from None
    return members.left_out
