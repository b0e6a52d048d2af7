"""What `zkeb-client` imports: start-up is part of every command's time, so nothing a command does not use."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

import zkeb.client

#: Runs the console-script entry point with the given arguments and prints, at exit, which modules were imported
#: (a None entry blocks an import and is not one).
PROBE = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(name for name, module in sys.modules.items() if module))))
from zkeb.client.cli import main
sys.argv = ["zkeb-client", *sys.argv[1:]]
main()
"""


def _modules_after(*args: str, **env: str) -> tuple[int, set[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, set(json.loads(done.stdout.strip().splitlines()[-1])), done.stderr.strip()


@pytest.mark.parametrize("name", zkeb.client.__all__)
def test_the_package_exports_each_name_from_its_own_module(name: str) -> None:
    value = getattr(zkeb.client, name)
    assert value is getattr(importlib.import_module(value.__module__), name)


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        _ = zkeb.client.Nothing


def test_help_imports_neither_the_http_stack_nor_rich() -> None:
    code, modules, _ = _modules_after("--help")
    assert code == 0
    assert not {"httpx", "rich", "pygments", "zkeb.client.sdk"} & modules


def test_a_server_command_imports_httpx_without_its_command_line_and_no_progress_bar_when_piped() -> None:
    # No key file and no API key: the SDK is built (httpx imported), then the first request is refused before any I/O.
    code, modules, stderr = _modules_after("ls", ZKEB_SERVER="http://127.0.0.1:9", ZKEB_IDENTITY="", ZKEB_TOKEN="")
    assert code == 2, stderr
    assert stderr == "zkeb-client: error: a device command needs the key file and the project (--identity, --project)"
    assert {"httpx", "zkeb.client.sdk"} <= modules
    assert not {"httpx._main", "rich", "pygments"} & modules
