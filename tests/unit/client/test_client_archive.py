"""Directory backups: packing is reproducible and leaves special files out; extraction refuses foreign names and
skips links leaving the target."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from pathlib import Path

import pytest

from zkeb.client import IntegrityError, LeftOut, ZkebClientError
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


def test_packing_leaves_special_files_out_and_names_them(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "data.txt").write_bytes(b"data")
    os.mkfifo(tree / "sub" / "pipe")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tree / "sock"))

        left_out = pack_directory(tree, tmp_path / "tree.tar")

    with tarfile.open(tmp_path / "tree.tar") as archive:
        names = archive.getnames()
    assert names == ["tree", "tree/sub", "tree/sub/data.txt"]
    assert left_out == [
        LeftOut("tree/sock", "a socket: it holds no data"),
        LeftOut("tree/sub/pipe", "a FIFO: it holds no data"),
    ]


def test_a_packed_tree_with_outward_links_restores_without_them_and_says_so(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "kept.txt").write_bytes(b"kept")
    (tree / "inside").symlink_to("kept.txt")
    (tree / "absolute").symlink_to("/etc/passwd")
    (tree / "outward").symlink_to("../elsewhere")  # inside the extraction folder, outside the tree
    pack_directory(tree, tmp_path / "tree.tar")
    target = tmp_path / "target"
    target.mkdir()

    left_out = extract_tar(tmp_path / "tree.tar", target)

    assert sorted(p.name for p in (target / "tree").iterdir()) == ["inside", "kept.txt"]
    assert os.readlink(target / "tree" / "inside") == "kept.txt"
    assert [entry.path for entry in left_out] == ["tree/absolute", "tree/outward"]
    assert "/etc/passwd" in left_out[0].reason


@pytest.mark.parametrize("name", ["/etc/evil", "../evil", "dir/../../evil"])
def test_extraction_refuses_an_archive_whose_member_names_escape_the_target(tmp_path: Path, name: str) -> None:
    member = tarfile.TarInfo(name)
    member.size = 4
    archive = _archive(tmp_path / "evil.tar", member, b"evil")
    target = tmp_path / "target"
    target.mkdir()

    with pytest.raises(IntegrityError, match="refusing an unsafe archive member"):
        extract_tar(archive, target)

    assert not (tmp_path / "evil").exists()
    assert list(target.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "kind", "link"),
    [
        ("link", tarfile.SYMTYPE, "/etc/passwd"),
        ("link", tarfile.SYMTYPE, "../../outside"),
        ("hard", tarfile.LNKTYPE, "../outside"),
        ("pipe", tarfile.FIFOTYPE, ""),
        ("dev", tarfile.CHRTYPE, ""),
    ],
)
def test_extraction_skips_links_leaving_the_target_and_special_files(
    tmp_path: Path, name: str, kind: bytes, link: str
) -> None:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, link
    kept = tarfile.TarInfo("kept.txt")
    kept.size = 4
    archive = tmp_path / "mixed.tar"
    with tarfile.open(archive, "w") as writer:
        writer.addfile(member)
        writer.addfile(kept, io.BytesIO(b"kept"))
    target = tmp_path / "target"
    target.mkdir()

    left_out = extract_tar(archive, target)

    assert [entry.path for entry in left_out] == [name]
    assert [p.name for p in target.iterdir()] == ["kept.txt"]
    assert not (tmp_path / "outside").exists()


def test_a_pack_is_readable_by_its_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "secret.txt").write_bytes(b"plaintext")
    previous = os.umask(0o022)
    try:
        pack_directory(tree, tmp_path / "pack.tar")
    finally:
        os.umask(previous)
    assert (tmp_path / "pack.tar").stat().st_mode & 0o777 == 0o600


def test_packing_stops_before_the_pack_passes_the_limit(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.bin").write_bytes(os.urandom(3000))
    (tree / "b.bin").write_bytes(os.urandom(3000))

    with pytest.raises(ZkebClientError, match=r"^tree is more than 5000 bytes .*the server takes at most 5000 bytes$"):
        pack_directory(tree, tmp_path / "pack.tar", limit=5000)

    assert (tmp_path / "pack.tar").stat().st_size < 5000, "packing went on past the limit"
