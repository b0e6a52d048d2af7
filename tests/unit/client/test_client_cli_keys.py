"""`zkeb-client keygen` and `export-recovery` as a user runs them: a sealed key file opens only with its passphrase."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("zkeb-client"))


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ZKEB_")} | env
    return subprocess.run(
        [CLI, *args], env=environ, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )


def test_a_passphrase_sealed_key_file_opens_only_with_its_passphrase(tmp_path: Path) -> None:
    identity = str(tmp_path / "device.key")
    made = _run("keygen", ZKEB_IDENTITY=identity, ZKEB_PASSPHRASE="right passphrase")

    wrong = _run("export-recovery", ZKEB_IDENTITY=identity, ZKEB_PASSPHRASE="wrong passphrase")
    missing = _run("export-recovery", ZKEB_IDENTITY=identity)
    right = _run("export-recovery", ZKEB_IDENTITY=identity, ZKEB_PASSPHRASE="right passphrase")

    assert made.returncode == 0, made.stderr
    assert "cannot be restored by anyone" in made.stderr
    assert (wrong.returncode, wrong.stderr) == (4, "zkeb-client: error: wrong passphrase for the key file\n")
    assert missing.returncode == 4
    assert missing.stderr.count("\n") == 1
    assert "sealed" in missing.stderr
    assert right.returncode == 0
    assert right.stdout.startswith("ZKEB-RECOVERY-1\n")


def test_keygen_refuses_to_overwrite_and_recovery_rebuilds_the_same_identity(tmp_path: Path) -> None:
    identity = str(tmp_path / "device.key")
    first = _run("keygen", ZKEB_IDENTITY=identity)
    again = _run("keygen", ZKEB_IDENTITY=identity)
    form = _run("export-recovery", ZKEB_IDENTITY=identity).stdout
    rebuilt = subprocess.run(
        [CLI, "keygen", "--from-recovery"],
        env={k: v for k, v in os.environ.items() if not k.startswith("ZKEB_")} | {"ZKEB_IDENTITY": f"{identity}.2"},
        input=form,
        capture_output=True,
        text=True,
        check=False,
    )

    assert first.returncode == 0
    assert (again.returncode, again.stderr.count("\n")) == (4, 1)
    assert "refusing to overwrite" in again.stderr
    assert rebuilt.stdout == first.stdout  # the same device id hash


def _closed_port() -> int:
    with socket.socket() as probe:  # bound, never listening: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


#: A user name and password put in a server URL (made up for the test, never a real one).
_USERINFO = "alice:s3cretpw"  # pragma: allowlist secret


@pytest.mark.parametrize(
    ("server", "fragment"),
    [
        (f"http://{_USERINFO}@127.0.0.1:{{port}}", "cannot reach http://***@127.0.0.1:"),
        (f"ftp://{_USERINFO}@127.0.0.1:{{port}}", "server must be an http(s) URL, got 'ftp://***@127.0.0.1:"),
        (f"{_USERINFO}@127.0.0.1:{{port}}", "server must be an http(s) URL, got '***@127.0.0.1:"),
    ],
)
def test_a_password_in_the_server_url_is_never_shown(server: str, fragment: str) -> None:
    result = _run("ls", ZKEB_SERVER=server.format(port=_closed_port()), ZKEB_TOKEN="zkeb_x")

    assert result.returncode in {1, 2}, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr
    assert "s3cretpw" not in result.stderr
    assert "alice" not in result.stderr


def test_keygen_on_a_full_disk_leaves_no_file_and_a_later_keygen_works(tmp_path: Path) -> None:
    identity = tmp_path / "device.key"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ZKEB_")} | {"ZKEB_IDENTITY": str(identity)}
    full = subprocess.run(
        [CLI, "keygen"], env=environ, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)),  # every write fails, as on a full disk
    )  # fmt: skip
    left = sorted(p.name for p in tmp_path.iterdir())
    again = _run("keygen", ZKEB_IDENTITY=str(identity))

    assert (full.returncode, full.stderr.count("\n")) == (1, 1), full.stderr
    assert "File too large" in full.stderr
    assert left == [], "keygen left a file behind"
    assert again.returncode == 0, again.stderr
    assert json.loads(identity.read_bytes())["format"] == "zkeb-client-key/1"


def test_keygen_refuses_an_empty_passphrase(tmp_path: Path) -> None:
    identity = tmp_path / "device.key"
    result = _run("keygen", "--passphrase", "", ZKEB_IDENTITY=str(identity))

    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "zkeb-client: error: an empty passphrase protects nothing; give one, or --no-seal for an unsealed key file\n"
    )
    assert not identity.exists()


def test_a_key_file_other_users_can_read_is_refused_saying_how_to_fix_it(tmp_path: Path) -> None:
    identity = tmp_path / "device.key"
    assert _run("keygen", ZKEB_IDENTITY=str(identity)).returncode == 0
    identity.chmod(0o644)

    refused = _run("export-recovery", ZKEB_IDENTITY=str(identity))
    identity.chmod(0o600)
    accepted = _run("export-recovery", ZKEB_IDENTITY=str(identity))

    assert refused.returncode == 4, refused.stderr
    assert refused.stderr == (
        f"zkeb-client: error: {identity} is open to other users (mode 0644): its keys open every backup; "
        f"restrict it with `chmod 600 {identity}`\n"
    )
    assert refused.stdout == ""
    assert accepted.returncode == 0, accepted.stderr
