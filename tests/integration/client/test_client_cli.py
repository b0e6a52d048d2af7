"""`zkeb-client` end to end against a real granian server on PostgreSQL: keygen, enroll, backup, resume, restore.

The CLI runs as a subprocess, exactly as a user or script runs it; the database is then read as its owner to show
it holds no plaintext and no key material.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from client_support import MIB, Cli, Project, StallingProxy, assert_one_line_failure, database_bytes, make_project

from zkeb.client import KeyFile
from zkeb.lib.atrest import ChunkCipher, parse_master_key, unwrap_data_key

from support import granian_server, make_settings

#: Every 32-byte record of the test plaintext starts with this, so any 64-byte window of it holds a whole marker.
MARKER = b"ZKEB-PLAINTEXT:"
RECORD = 32


def marked_plaintext(size: int) -> bytes:
    """Random bytes in which every aligned 32-byte record starts with `MARKER` (size a multiple of 32)."""
    data = bytearray(os.urandom(size))
    data[0::RECORD] = MARKER[0:1] * (size // RECORD)
    for position in range(1, len(MARKER)):
        data[position::RECORD] = MARKER[position : position + 1] * (size // RECORD)
    return bytes(data)


@pytest.fixture
def live_url(base_settings_env: dict[str, str], database_url: str) -> Iterator[str]:
    with granian_server({**base_settings_env, "DATABASE_URL": database_url}) as url:
        yield url


@pytest.fixture
async def project(live_url: str, base_settings_env: dict[str, str], database_url: str) -> Project:
    return await make_project(live_url, make_settings(base_settings_env, DATABASE_URL=database_url))


@pytest.fixture
def cli(project: Project, tmp_path: Path) -> Cli:
    return Cli(
        {
            "ZKEB_SERVER": project.server,
            "ZKEB_IDENTITY": str(tmp_path / "device.key"),
            "ZKEB_TOKEN": project.admin_key,
            "ZKEB_PROJECT": str(project.project_id),
            "XDG_STATE_HOME": str(tmp_path / "state"),
            "ZKEB_TOKEN_PROJECT": project.project_key,  # not read by the CLI: the tests' own HEAD requests use it
        }
    )


@pytest.fixture
def enrolled(cli: Cli) -> Cli:
    cli.ok("keygen")
    cli.ok("enroll", "--label", "laptop")
    return cli


def _upload_location(state_home: Path) -> str:
    for _ in range(600):
        records = list((state_home / "zkeb-client" / "uploads").glob("*.json"))
        if records:
            location: str = json.loads(records[0].read_bytes())["location"]
            return location
        time.sleep(0.1)
    raise AssertionError("the CLI recorded no upload")


def _settled_offset(location: str, key: str) -> int:
    """The upload's offset once it has stopped moving for a second."""
    headers = {"Authorization": f"Bearer {key}", "Tus-Resumable": "1.0.0"}
    last, stable_since = -1, time.monotonic()
    while True:
        offset = int(httpx.head(location, headers=headers, timeout=10).headers["upload-offset"])
        if offset != last:
            last, stable_since = offset, time.monotonic()
        elif time.monotonic() - stable_since > 1.0:
            return offset
        time.sleep(0.1)


def _kill_mid_upload(cli: Cli, proxy: StallingProxy, source: Path, container: str, state_home: Path) -> int:
    """Back up through `proxy` (stalling after 12 MiB), kill the CLI there; returns the server's offset."""
    proxy.budget = 12 * MIB
    first = subprocess.Popen(
        cli.command("backup", str(source), "--container", container, "--json"),
        env=cli.environ(ZKEB_SERVER=proxy.url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    location = _upload_location(state_home)
    assert proxy.stalled.wait(120), "the upload never reached the proxy's budget"
    first.kill()
    first.wait()
    # The recorded Location names the proxy (the host the CLI spoke to); ask the server directly.
    host = f"http://{proxy.upstream[0]}:{proxy.upstream[1]}"
    offset = _settled_offset(location.replace(proxy.url, host), cli.env["ZKEB_TOKEN_PROJECT"])
    assert 8 * MIB <= offset < 30 * MIB
    proxy.budget = None
    return offset


def _backup_killed_then_rerun(
    cli: Cli, project: Project, source: Path, container: str, state_home: Path, *, change: bool = False
) -> tuple[dict[str, Any], int, int]:
    """Kill a backup mid-upload, optionally change the file (same size and mtime), then run the same command again.

    Returns:
        The re-run's JSON result, the server's offset after the kill, and the bytes the re-run sent.
    """
    proxy = StallingProxy(project.server)
    try:
        offset = _kill_mid_upload(cli, proxy, source, container, state_home)
        if change:
            before = source.stat()
            with source.open("r+b") as handle:
                handle.seek(5 * MIB)
                handle.write(b"changed!" * 1024)
            os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
        sent_before = proxy.forwarded
        result = cli.json("backup", str(source), "--container", container, ZKEB_SERVER=proxy.url)
        return result, offset, proxy.forwarded - sent_before
    finally:
        proxy.close()


async def test_backup_killed_mid_upload_resumes_from_the_server_offset_and_restores_byte_identical(
    enrolled: Cli, project: Project, tmp_path: Path, owner_connection: asyncpg.Connection
) -> None:
    plaintext = marked_plaintext(30 * MIB)
    source = tmp_path / "big-secret-file.bin"
    source.write_bytes(plaintext)
    container = str(uuid.uuid4())
    result, offset, sent_again = await asyncio.to_thread(
        _backup_killed_then_rerun, enrolled, project, source, container, tmp_path / "state"
    )

    assert result["transfer"] == "tus"
    assert result["resumed_from"] == offset
    assert sent_again < 30 * MIB - offset + MIB, "the re-run sent the whole file again instead of resuming"
    assert not list((tmp_path / "state" / "zkeb-client" / "uploads").glob("*.json")), "resume record not cleared"

    restored = tmp_path / "restored.bin"
    enrolled.ok("restore", "--latest", "--container", container, "-o", str(restored))
    assert restored.read_bytes() == plaintext

    stored = await database_bytes(owner_connection)
    assert b"client-e2e-project" in stored, "the scan does not read the tables"
    assert MARKER not in stored, "a 64-byte window of the plaintext is in the database"
    assert b"big-secret-file" not in stored, "the file name (metadata) is in the database in clear"
    keys = KeyFile.from_bytes((tmp_path / "device.key").read_bytes())
    for secret in (keys.backup_key, keys.signing_key.private_bytes_raw()):
        for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
            assert form not in stored, "key material is in the database"


async def test_a_file_changed_between_runs_is_sent_afresh_not_mixed_with_the_old_upload(
    enrolled: Cli, project: Project, tmp_path: Path, owner_connection: asyncpg.Connection
) -> None:
    source = tmp_path / "changing.bin"
    source.write_bytes(os.urandom(30 * MIB))
    container = str(uuid.uuid4())

    result, offset, sent_again = await asyncio.to_thread(
        _backup_killed_then_rerun, enrolled, project, source, container, tmp_path / "state", change=True
    )

    assert offset > 0
    assert result["resumed_from"] == 0
    assert sent_again > 30 * MIB, "the changed file was not sent whole"
    restored = tmp_path / "restored.bin"
    enrolled.ok("restore", result["id"], "-o", str(restored))
    assert restored.read_bytes() == source.read_bytes()
    assert await owner_connection.fetchval("SELECT count(*) FROM upload_sessions") == 0, "the old upload was kept"
    assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 1


async def test_directory_round_trip_restores_the_same_tree(enrolled: Cli, tmp_path: Path) -> None:
    tree = tmp_path / "photos"
    (tree / "2026" / "december").mkdir(parents=True)
    (tree / "2026" / "december" / "a.jpg").write_bytes(os.urandom(300_000))
    (tree / "readme.txt").write_text("hello\n")
    (tree / "empty").write_bytes(b"")
    (tree / "latest").symlink_to("2026/december/a.jpg")
    container = str(uuid.uuid4())
    backup = enrolled.json("backup", str(tree), "--container", container)
    assert backup["kind"] == "directory"

    out = tmp_path / "restored"
    out.mkdir()
    restored = enrolled.json("restore", backup["id"], "--container", container, "-o", str(out))
    assert restored["path"] == str(out / "photos")
    copy = out / "photos"
    assert (copy / "2026" / "december" / "a.jpg").read_bytes() == (tree / "2026" / "december" / "a.jpg").read_bytes()
    assert (copy / "readme.txt").read_text() == "hello\n"
    assert (copy / "empty").read_bytes() == b""
    assert os.readlink(copy / "latest") == "2026/december/a.jpg"
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == sorted(p.relative_to(tree) for p in tree.rglob("*"))
    assert not list((tmp_path / "state" / "zkeb-client" / "packs").iterdir()), "the tar stream was left behind"


async def test_a_directory_with_a_fifo_and_outward_links_backs_up_and_restores_saying_what_it_left_out(
    enrolled: Cli, tmp_path: Path
) -> None:
    tree = tmp_path / "home"
    tree.mkdir()
    (tree / "notes.txt").write_text("notes\n")
    (tree / "hosts").symlink_to("/etc/hosts")
    (tree / "up").symlink_to("../outside")
    os.mkfifo(tree / "pipe")
    container = str(uuid.uuid4())

    backed_up = enrolled.run("backup", str(tree), "--container", container, "--json")
    out = tmp_path / "restored"
    out.mkdir()
    restored = enrolled.run("restore", "--latest", "--container", container, "-o", str(out), "--json")

    assert backed_up.returncode == 0, backed_up.stderr
    backup = json.loads(backed_up.stdout.strip().splitlines()[-1])
    assert backup["left_out"] == [{"path": "home/pipe", "reason": "a FIFO: it holds no data"}]
    assert backed_up.stderr.strip() == "zkeb-client: left out home/pipe (a FIFO: it holds no data)"
    assert restored.returncode == 0, restored.stderr
    result = json.loads(restored.stdout.strip().splitlines()[-1])
    assert [entry["path"] for entry in result["left_out"]] == ["home/hosts", "home/up"]
    assert restored.stderr.strip().splitlines() == [
        "zkeb-client: did not restore home/hosts (a link to /etc/hosts, outside the restored directory)",
        "zkeb-client: did not restore home/up (a link to ../outside, outside the restored directory)",
    ]
    assert sorted(p.name for p in (out / "home").iterdir()) == ["notes.txt"]
    assert (out / "home" / "notes.txt").read_text() == "notes\n"


def _nothing_written(folder: Path, name: str) -> None:
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if ".zkeb-part" in p.name], "a temporary file was left behind"


async def test_restore_to_a_path_ending_in_a_slash_makes_that_folder_and_restores_inside_it(
    enrolled: Cli, tmp_path: Path
) -> None:
    source = tmp_path / "notes.txt"
    source.write_bytes(b"hello\n")
    container = str(uuid.uuid4())
    enrolled.ok("backup", str(source), "--container", container)

    restored = enrolled.json("restore", "--latest", "--container", container, "-o", f"{tmp_path}/new/folder/")

    assert restored["path"] == str(tmp_path / "new" / "folder" / "notes.txt")
    assert (tmp_path / "new" / "folder" / "notes.txt").read_bytes() == b"hello\n"


async def test_restore_with_a_wrong_backup_key_fails_in_one_line_and_writes_nothing(
    enrolled: Cli, tmp_path: Path
) -> None:
    source = tmp_path / "notes.txt"
    source.write_bytes(os.urandom(4096))
    container = str(uuid.uuid4())
    enrolled.ok("backup", str(source), "--container", container)
    real = KeyFile.from_bytes((tmp_path / "device.key").read_bytes())
    forged = KeyFile(real.device_id, real.signing_key, os.urandom(32), real.project_id)
    forged.write_new(tmp_path / "forged.key")
    out = tmp_path / "out"
    out.mkdir()

    result = enrolled.run(
        "restore", "--latest", "--container", container, "-o", str(out / "notes.txt"),
        ZKEB_IDENTITY=str(tmp_path / "forged.key"),
    )  # fmt: skip

    assert_one_line_failure(result, 3, "does not decrypt with this key")
    _nothing_written(out, "notes.txt")


async def test_restore_of_a_tampered_stored_chunk_fails_in_one_line_and_writes_nothing(
    enrolled: Cli, tmp_path: Path, owner_connection: asyncpg.Connection, base_settings_env: dict[str, str]
) -> None:
    source = tmp_path / "large.bin"
    source.write_bytes(os.urandom(10 * MIB))
    container = str(uuid.uuid4())
    backup = enrolled.json("backup", str(source), "--container", container)
    assert backup["transfer"] == "tus"
    # A malicious or broken server: one chunk's ciphertext altered and re-sealed at rest, so the server itself
    # serves it without complaint; only the client's checks can notice.
    payload = await owner_connection.fetchrow(
        "SELECT p.id, p.wrapped_key FROM payloads p JOIN backups b ON b.payload_id = p.id WHERE b.id = $1",
        uuid.UUID(backup["id"]),
    )
    master = parse_master_key(base_settings_env["ZKEB_MASTER_ENCRYPTION_KEY"], name="ZKEB_MASTER_ENCRYPTION_KEY")
    cipher = ChunkCipher(unwrap_data_key(master, payload["wrapped_key"], payload_id=payload["id"]), payload["id"])
    blob = await owner_connection.fetchval(
        "SELECT data FROM backup_chunks WHERE payload_id = $1 AND seq = 3", payload["id"]
    )
    chunk = bytearray(cipher.decrypt(3, blob))
    chunk[100] ^= 0x01
    await owner_connection.execute(
        "UPDATE backup_chunks SET data = $1 WHERE payload_id = $2 AND seq = 3", cipher.encrypt(3, chunk), payload["id"]
    )
    out = tmp_path / "out"
    out.mkdir()

    restored = enrolled.run("restore", backup["id"], "-o", str(out / "large.bin"))
    verified = enrolled.run("verify", backup["id"])

    assert_one_line_failure(restored, 3, "SHA-256 is not the signed one")
    assert_one_line_failure(verified, 3, "SHA-256 is not the signed one")
    _nothing_written(out, "large.bin")


async def test_restore_of_a_backup_with_a_replaced_signature_fails_in_one_line_and_writes_nothing(
    enrolled: Cli, tmp_path: Path, owner_connection: asyncpg.Connection
) -> None:
    source = tmp_path / "notes.txt"
    source.write_bytes(os.urandom(4096))
    container = str(uuid.uuid4())
    backup = enrolled.json("backup", str(source), "--container", container)
    await owner_connection.execute(
        "UPDATE backups SET signature = $1 WHERE id = $2", os.urandom(64), uuid.UUID(backup["id"])
    )
    out = tmp_path / "out"
    out.mkdir()

    result = enrolled.run("restore", "--latest", "--container", container, "-o", str(out))

    assert_one_line_failure(result, 3, "signature does not verify")
    assert list(out.iterdir()) == []


#: Runs a command with Ctrl-C's signal at its default, as a terminal's foreground command has it: a job started in
#: the background by a shell without job control (as CI may run the suite) inherits SIGINT ignored.
_WITH_CTRL_C = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
]


def _interrupt_mid_download(
    cli: Cli, project: Project, *args: str, signal_number: int = signal.SIGINT
) -> subprocess.CompletedProcess[str]:
    """Run a download command through a proxy that holds the answer after 2 MiB, and press Ctrl-C there (or send
    ``signal_number``)."""
    proxy = StallingProxy(project.server)
    proxy.hold_answer_after = 2 * MIB
    try:
        running = subprocess.Popen(
            [*_WITH_CTRL_C, *cli.command(*args)],
            env=cli.environ(ZKEB_SERVER=proxy.url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proxy.answer_held.wait(120), "the download never reached the proxy's hold"
        time.sleep(2)  # the client reads what came and waits for more: a stalled download
        running.send_signal(signal_number)
        # At once, not when the stalled read times out (60 s): Ctrl-C cuts the connection the download hangs on.
        stdout, stderr = running.communicate(timeout=15)
        return subprocess.CompletedProcess(running.args, running.returncode, stdout, stderr)
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("signal_number", "code", "destination"),
    [
        pytest.param(signal.SIGINT, 130, "large.bin", id="ctrl-c"),
        # SIGTERM (systemd, `docker stop`, `timeout`) is handled as Ctrl-C is; here the restore made the folders too.
        pytest.param(signal.SIGTERM, 143, "new/folder/", id="sigterm"),
    ],
)
async def test_an_interrupted_restore_says_nothing_was_restored_and_leaves_nothing(
    enrolled: Cli, project: Project, tmp_path: Path, signal_number: int, code: int, destination: str
) -> None:
    source = tmp_path / "large.bin"
    source.write_bytes(os.urandom(12 * MIB))
    container = str(uuid.uuid4())
    backup = enrolled.json("backup", str(source), "--container", container)
    out = tmp_path / "out"
    out.mkdir()

    result = await asyncio.to_thread(
        _interrupt_mid_download, enrolled, project, "restore", backup["id"], "-o", f"{out}/{destination}",
        signal_number=signal_number,
    )  # fmt: skip

    assert_one_line_failure(result, code, "interrupted; nothing was restored")
    assert "resume" not in result.stderr, "a restore does not resume across runs"
    assert list(out.iterdir()) == [], "the restore's temporary file or the folders it made were left"


async def test_enrolling_a_sealed_key_file_keeps_it_sealed_and_remembers_the_project(
    cli: Cli, project: Project, tmp_path: Path
) -> None:
    cli.ok("keygen", ZKEB_PASSPHRASE="a long passphrase")
    cli.ok("enroll", "--label", "laptop", ZKEB_PASSPHRASE="a long passphrase")
    document = json.loads((tmp_path / "device.key").read_bytes())
    source = tmp_path / "notes.txt"
    source.write_bytes(b"sealed notes")

    # No project given: the key file names it now.
    backup = cli.json("backup", str(source), "--container", str(uuid.uuid4()), ZKEB_PASSPHRASE="a long passphrase",
                      ZKEB_PROJECT="", ZKEB_TOKEN="")  # fmt: skip
    refused = cli.run("ls", ZKEB_PASSPHRASE="not it")

    assert "secret" not in document
    assert document["sealed"]["kdf"] == "scrypt"
    assert document["project_id"] == str(project.project_id)
    assert backup["size"] == len(b"sealed notes")
    assert_one_line_failure(refused, 4, "wrong passphrase")


async def test_ls_verify_and_rm(enrolled: Cli, tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_bytes(b"some notes")
    container = str(uuid.uuid4())
    backup = enrolled.json("backup", str(source), "--container", container)

    listed = enrolled.json("ls", "--container", container)
    verified = enrolled.json("verify", backup["id"])
    removed = enrolled.json("rm", backup["id"])
    after = enrolled.json("ls", "--container", container)
    gone = enrolled.run("restore", backup["id"], "-o", str(tmp_path / "copy.txt"))

    assert [(item["id"], item["name"], item["size"]) for item in listed["items"]] == [(backup["id"], "notes.txt", 10)]
    assert verified == {**verified, "id": backup["id"], "verified": True, "size": 10}
    assert removed == {"id": backup["id"], "deleted": True}
    assert after == {"items": []}
    assert_one_line_failure(gone, 1, "404")


async def test_a_file_over_the_server_limit_is_refused_before_any_upload(
    base_settings_env: dict[str, str], database_url: str, tmp_path: Path, owner_connection: asyncpg.Connection
) -> None:
    with granian_server({**base_settings_env, "DATABASE_URL": database_url, "MAX_UPLOAD_SIZE": "2MB"}) as url:
        project = await make_project(url, make_settings(base_settings_env, DATABASE_URL=database_url))
        cli = Cli(
            {
                "ZKEB_SERVER": url,
                "ZKEB_IDENTITY": str(tmp_path / "device.key"),
                "ZKEB_TOKEN": project.admin_key,
                "ZKEB_PROJECT": str(project.project_id),
                "XDG_STATE_HOME": str(tmp_path / "state"),
            }
        )
        cli.ok("keygen")
        cli.ok("enroll", "--label", "laptop")
        source = tmp_path / "big.bin"
        source.write_bytes(os.urandom(3 * MIB))
        tree = tmp_path / "tree"
        tree.mkdir()
        (tree / "big.bin").write_bytes(os.urandom(3 * MIB))

        result = cli.run("backup", str(source), "--container", str(uuid.uuid4()))
        directory = cli.run("backup", str(tree), "--container", str(uuid.uuid4()))

    assert_one_line_failure(result, 1, "the server takes at most 2000000 bytes")
    assert_one_line_failure(directory, 1, "the server takes at most 2000000 bytes")
    assert _packs(tmp_path / "state") == [], "the directory's plaintext pack was left behind"
    assert await owner_connection.fetchval("SELECT count(*) FROM upload_sessions") == 0
    assert await owner_connection.fetchval("SELECT count(*) FROM payloads") == 0


async def test_a_token_ending_in_a_space_and_carriage_return_works_and_one_with_a_space_inside_is_never_shown(
    cli: Cli, project: Project
) -> None:
    listed = cli.run("ls", "--json", ZKEB_TOKEN=project.project_key + " \r", ZKEB_IDENTITY="")
    started = time.monotonic()
    refused = cli.run("ls", ZKEB_TOKEN=project.project_key[:10] + " " + project.project_key[10:], ZKEB_IDENTITY="")
    elapsed = time.monotonic() - started

    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout.strip().splitlines()[-1]) == {"items": []}
    assert_one_line_failure(refused, 2, "the API key (--token or ZKEB_TOKEN) holds a space")
    assert project.project_key[10:] not in refused.stderr
    assert elapsed < 5, "the refusal was retried"


async def test_a_server_url_with_an_upper_case_scheme_is_the_same_server(enrolled: Cli, tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_bytes(b"some notes")
    container = str(uuid.uuid4())
    server = enrolled.env["ZKEB_SERVER"].replace("http://", "HTTP://")

    backup = enrolled.run("backup", str(source), "--container", container, "--json", ZKEB_SERVER=server)
    listed = enrolled.run("ls", "--container", container, "--json", ZKEB_SERVER=server)

    assert backup.returncode == 0, backup.stderr
    assert listed.returncode == 0, listed.stderr
    assert [item["name"] for item in json.loads(listed.stdout)["items"]] == ["notes.txt"]


def _packs(state_home: Path) -> list[str]:
    """The files in the client's pack folder: plaintext copies of directories."""
    folder = state_home / "zkeb-client" / "packs"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _a_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "secret.txt").write_bytes(b"plaintext" * 1000)
    return tree


async def test_a_directory_backup_to_an_unreachable_server_leaves_no_plaintext_pack(
    enrolled: Cli, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # bound, never listening: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"

    result = enrolled.run("backup", str(_a_tree(tmp_path)), "--container", str(uuid.uuid4()), ZKEB_SERVER=closed)

    assert_one_line_failure(result, 1, "cannot reach")
    assert _packs(tmp_path / "state") == [], "a pack was left when the server could not be reached"


async def test_a_directory_backup_by_a_revoked_device_leaves_no_plaintext_pack(
    enrolled: Cli, project: Project, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(
        base_url=project.server, headers={"Authorization": f"Bearer {project.admin_key}"}
    ) as admin:
        device = (await admin.get(f"/api/v1/projects/{project.project_id}/devices")).json()["items"][0]["id"]
        revoked = await admin.delete(f"/api/v1/devices/{device}")
    assert revoked.status_code == 204, revoked.text

    result = enrolled.run("backup", str(_a_tree(tmp_path)), "--container", str(uuid.uuid4()))

    assert_one_line_failure(result, 1, "401")
    assert _packs(tmp_path / "state") == [], "a pack was left when the server refused the device"


async def _devices(project: Project) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(
        base_url=project.server, headers={"Authorization": f"Bearer {project.admin_key}"}
    ) as admin:
        items: list[dict[str, Any]] = (await admin.get(f"/api/v1/projects/{project.project_id}/devices")).json()[
            "items"
        ]
    return items


def _on_a_full_disk(cli: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with every file write failing (EFBIG, from a file size limit of 0), as on a full disk."""
    return subprocess.run(
        cli.command(*args), env=cli.environ(), capture_output=True, text=True, check=False, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)),
    )  # fmt: skip


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


async def test_enroll_that_cannot_write_the_key_file_does_not_enroll_and_leaves_no_temporary_file(
    cli: Cli, project: Project, tmp_path: Path
) -> None:
    cli.ok("keygen")
    before = (tmp_path / "device.key").read_bytes()

    failed = _on_a_full_disk(cli, "enroll", "--label", "laptop")
    devices = await _devices(project)
    after = (tmp_path / "device.key").read_bytes()
    temporaries = _temporaries(tmp_path)
    again = cli.run("enroll", "--label", "laptop")

    assert_one_line_failure(failed, 1, "File too large")
    assert devices == [], "the device was enrolled although its key file could not be written"
    assert temporaries == [], "a temporary key file was left behind"
    assert after == before
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "device.key").read_bytes())["project_id"] == str(project.project_id)


async def test_a_key_file_rebuilt_from_its_recovery_form_enrolls_again_and_remembers_the_project(
    enrolled: Cli, project: Project, tmp_path: Path
) -> None:
    form = enrolled.ok("export-recovery").stdout
    rebuilt = tmp_path / "rebuilt.key"
    made = enrolled.run("keygen", "--from-recovery", input_text=form, ZKEB_IDENTITY=str(rebuilt))
    assert made.returncode == 0, made.stderr

    again = enrolled.run("enroll", "--label", "laptop", ZKEB_IDENTITY=str(rebuilt))

    assert again.returncode == 0, again.stderr
    assert json.loads(rebuilt.read_bytes())["project_id"] == str(project.project_id)
    assert len(await _devices(project)) == 1


async def test_enroll_of_another_key_under_an_enrolled_device_id_is_still_refused(
    enrolled: Cli, tmp_path: Path
) -> None:
    real = KeyFile.from_bytes((tmp_path / "device.key").read_bytes())
    impostor = KeyFile(real.device_id, KeyFile.generate().signing_key, os.urandom(32))
    impostor.write_new(tmp_path / "impostor.key")

    result = enrolled.run("enroll", "--label", "impostor", ZKEB_IDENTITY=str(tmp_path / "impostor.key"))

    assert_one_line_failure(result, 1, "409")
    assert "project_id" not in json.loads((tmp_path / "impostor.key").read_bytes())


async def test_enroll_through_a_symlinked_key_file_rewrites_its_target_and_keeps_the_link(
    cli: Cli, project: Project, tmp_path: Path
) -> None:
    (tmp_path / "keys").mkdir()
    target = tmp_path / "keys" / "device.key"
    cli.ok("keygen", ZKEB_IDENTITY=str(target))
    link = tmp_path / "device.key"
    link.symlink_to(target)

    cli.ok("enroll", "--label", "laptop", ZKEB_IDENTITY=str(link))

    assert link.is_symlink(), "the link was replaced by a file"
    assert json.loads(target.read_bytes())["project_id"] == str(project.project_id)
    assert target.stat().st_mode & 0o777 == 0o600
