"""`zkeb-client --help` and each command's help, and the one-line errors that need no server."""

from __future__ import annotations

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
