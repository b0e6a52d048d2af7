"""`zkeb-client --help` and each command's help, and the one-line errors that need no server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zkeb.client.cli import cli

COMMANDS = {
    "keygen": "0600",
    "export-recovery": "recovery form",
    "enroll": "org-admin key",
    "backup": "--container",
    "restore": "--latest",
    "ls": "--container",
    "verify": "writes nothing",
    "rm": "trash",
}


def test_the_top_level_help_names_every_command_the_settings_and_the_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for word in [*COMMANDS, "ZKEB_SERVER", "ZKEB_IDENTITY", "ZKEB_TOKEN", "ZKEB_PROJECT", "ZKEB_PASSPHRASE", "Exit"]:
        assert word in result.output


@pytest.mark.parametrize(("command", "phrase"), COMMANDS.items())
def test_every_command_has_clear_help(command: str, phrase: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert f"Usage: cli {command}" in result.output or f"Usage: zkeb-client {command}" in result.output
    assert phrase in " ".join(result.output.split())


def test_a_command_without_a_server_fails_with_one_line_and_exit_2(tmp_path: object) -> None:
    result = CliRunner().invoke(cli, ["ls"], env={"ZKEB_SERVER": ""})
    assert result.exit_code == 2
    assert result.stderr.strip() == "zkeb-client: error: no server: pass --server or set ZKEB_SERVER"


def test_restore_needs_an_id_or_latest() -> None:
    result = CliRunner().invoke(cli, ["--server", "http://127.0.0.1:9", "restore", "-o", "x"])
    assert result.exit_code == 2
    assert "give a backup ID or --latest" in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["backup", ".", "--container", "not-a-uuid"], "Invalid value for '--container': 'not-a-uuid' is not a UUID"),
        (["backup", "--container", "0b5e6a3c-2f51-4f0e-9d54-1f6f1a2b3c4d"], "Missing argument 'PATH'"),
        (["restore", "--container", "nope", "-o", "x"], "Invalid value for '--container'"),
        (["ls", "--jsn"], "No such option '--jsn'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_a_usage_error_is_one_stderr_line_with_exit_2(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(cli, args, prog_name="zkeb-client")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("zkeb-client: error: ")
    assert fragment in lines[0]


def test_the_installed_command_reports_a_usage_error_in_one_line_and_help_as_before() -> None:
    command = str(Path(sys.executable).with_name("zkeb-client"))
    bad = subprocess.run(
        [command, "backup", "--container", "nope"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("zkeb-client: error: ")
    helped = subprocess.run([command, "backup", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert helped.returncode == 0
    assert helped.stdout.startswith("Usage: zkeb-client backup [OPTIONS] PATH")
    assert helped.stderr == ""


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_takes_the_settings_after_its_name_too(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    for flag in ("--server", "--identity", "--token", "--project", "--passphrase"):
        assert flag in result.output


def test_a_setting_after_the_command_overrides_the_environment_and_the_flag_before_it() -> None:
    token = "zkeb_" + "a" * 43  # pragma: allowlist secret
    result = CliRunner().invoke(
        cli,
        ["--server", "http://127.0.0.1:9", "ls", "--server", "ftp://after", "--token", token],
        env={"ZKEB_SERVER": "http://127.0.0.1:8", "ZKEB_PROJECT": "0b5e6a3c-2f51-4f0e-9d54-1f6f1a2b3c4d"},
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == "zkeb-client: error: server must be an http(s) URL, got 'ftp://after'"
    refused = CliRunner().invoke(cli, ["restore", "--project", "nope", "-o", "x"])
    assert refused.exit_code == 2
    assert "Invalid value for '--project': 'nope' is not a UUID" in refused.stderr
