"""Directory backups: packing is reproducible, and extraction refuses members that would escape the target."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from zkeb.client import IntegrityError
from zkeb.client.archive import extract_tar, pack_directory


def _archive(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as archive:
        archive.addfile(member, io.BytesIO(data) if data else None)
    return path


def test_packing_the_same_tree_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "b").mkdir(parents=True)
    (tree / "b" / "x").write_bytes(b"x")
    (tree / "a").write_bytes(b"a")
    pack_directory(tree, tmp_path / "one.tar")
    pack_directory(tree, tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


@pytest.mark.parametrize(
    ("name", "kind", "link"),
    [
        ("/etc/evil", tarfile.REGTYPE, ""),
        ("../evil", tarfile.REGTYPE, ""),
        ("dir/../../evil", tarfile.REGTYPE, ""),
        ("link", tarfile.SYMTYPE, "/etc/passwd"),
        ("link", tarfile.SYMTYPE, "../../outside"),
        ("hard", tarfile.LNKTYPE, "../outside"),
    ],
)
def test_extraction_refuses_members_escaping_the_target(tmp_path: Path, name: str, kind: bytes, link: str) -> None:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, link
    data = b"evil" if kind == tarfile.REGTYPE else b""
    member.size = len(data)
    archive = _archive(tmp_path / "evil.tar", member, data)
    target = tmp_path / "target"
    target.mkdir()

    with pytest.raises(IntegrityError):
        extract_tar(archive, target)

    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "outside").exists()
