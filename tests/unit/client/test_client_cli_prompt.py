"""The passphrase prompt as a user meets it: on a terminal (a pseudo-terminal here), Ctrl-C, and with no terminal."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("zkeb-client"))


def _environ(**env: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ZKEB_")} | env


def _read(fd: int, seconds: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], seconds)
    if not ready:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:  # the child closed the terminal
        return b""


def _ctrl_c_at_the_prompt(args: list[str], env: dict[str, str]) -> tuple[int | None, str]:
    """Run the CLI on a pseudo-terminal, press Ctrl-C once at its passphrase prompt; its exit status and output."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal's foreground command, Ctrl-C at its default
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(CLI, [CLI, *args], env)
    output = b""
    deadline = time.monotonic() + 30
    while b"passphrase" not in output.lower() and time.monotonic() < deadline:
        output += _read(fd, 0.5)
    assert b"passphrase" in output.lower(), output
    time.sleep(0.5)  # the prompt is up and waiting
    os.write(fd, b"\x03")
    deadline = time.monotonic() + 10
    status: int | None = None
    while status is None and time.monotonic() < deadline:
        output += _read(fd, 0.2)
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(code)
    if status is None:  # still at the prompt: the Ctrl-C was ignored
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    while chunk := _read(fd, 0.2):
        output += chunk
    os.close(fd)
    return status, output.decode(errors="replace")


@pytest.mark.parametrize(
    "args",
    [
        ["ls"],
        ["backup", ".", "--container", "0b5e6a3c-2f51-4f0e-9d54-1f6f1a2b3c4d"],
        ["export-recovery"],
        ["keygen", "--seal"],
    ],
)
def test_one_ctrl_c_at_the_passphrase_prompt_ends_the_command_saying_interrupted(
    tmp_path: Path, args: list[str]
) -> None:
    identity = tmp_path / "device.key"
    sealed = subprocess.run(
        [CLI, "keygen"], env=_environ(ZKEB_IDENTITY=str(identity), ZKEB_PASSPHRASE="a passphrase"),
        capture_output=True, check=False,
    )  # fmt: skip
    assert sealed.returncode == 0, sealed.stderr
    if args[0] == "keygen":
        identity = tmp_path / "new.key"
    env = _environ(ZKEB_IDENTITY=str(identity), ZKEB_SERVER="http://127.0.0.1:9", XDG_STATE_HOME=str(tmp_path))

    status, output = _ctrl_c_at_the_prompt(args, env)

    assert status == 130, output
    assert output.splitlines()[-1] == "zkeb-client: error: interrupted", output
    assert "Abort" not in output
    if args[0] == "keygen":
        assert not identity.exists()


def test_keygen_seal_without_a_terminal_says_how_to_give_the_passphrase(tmp_path: Path) -> None:
    identity = tmp_path / "device.key"
    result = subprocess.run(
        [CLI, "keygen", "--seal"], env=_environ(ZKEB_IDENTITY=str(identity)), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, check=False, start_new_session=True,  # no controlling terminal
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "zkeb-client: error: --seal needs a terminal for its prompt; use --passphrase or ZKEB_PASSPHRASE\n"
    )
    assert not identity.exists()
