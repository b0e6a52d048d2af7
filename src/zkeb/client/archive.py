"""Directories as tar streams: packed reproducibly for backup, extracted safely on restore.

Packing walks the tree in sorted order (tarfile sorts each directory listing) and keeps links as links, so the
same tree gives the same bytes: that is what lets an interrupted directory backup resume. Extraction refuses
absolute names outright, then applies the standard library's ``data`` filter: no ``..``, no links pointing outside
the target, no device files, and no set-uid bits.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from zkeb.client.errors import IntegrityError

__all__ = ("extract_tar", "pack_directory")


def pack_directory(source: Path, destination: Path) -> None:
    """Write ``source`` (a directory) as a PAX tar file at ``destination``, its top entry named after it."""
    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(source, arcname=source.name, recursive=True)


def _refuse_absolute_then_data(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
    # The stdlib's ``data`` filter strips a leading "/" and extracts inside the target; our archives never hold one,
    # so an absolute name means a foreign archive: refuse it rather than guess.
    if os.path.isabs(member.name) or member.name.startswith(("/", "\\")):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, destination)


def extract_tar(archive_path: Path, target: Path) -> None:
    """Extract a backup's tar stream into ``target`` (an empty directory), refusing any unsafe member.

    Raises:
        IntegrityError: If a member would land outside ``target`` or is otherwise unsafe.
    """
    try:
        with tarfile.open(archive_path, "r:") as archive:
            archive.extractall(target, filter=_refuse_absolute_then_data)  # noqa: S202  # nosec B202 - every member is filtered
    except tarfile.FilterError as exc:
        raise IntegrityError(f"refusing an unsafe archive member: {exc}") from None
    except tarfile.TarError as exc:
        raise IntegrityError(f"the backup's archive is unreadable: {exc}") from None
