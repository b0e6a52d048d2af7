"""`zkeb serve` end to end: the embedded default comes up ready, SIGTERM exits cleanly, production guards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from zkeb.core.migrations import head_revision

ZKEB = [sys.executable, "-m", "zkeb"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZKEB_", "DATABASE_", "REDIS_", "JWT_", "API_KEY"))}
    env.update(extra)
    return env


def _wait_ready(url: str, process: subprocess.Popen[bytes], deadline_s: float) -> httpx.Response:
    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, stderr = process.communicate()
            pytest.fail(f"server exited early with {process.returncode}: {stderr.decode()[-3000:]}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    pytest.fail(f"not ready within {deadline_s}s: {last}")


def test_serve_with_no_environment_starts_embedded_postgres_and_becomes_ready(tmp_path: Path) -> None:
    port = _free_port()
    data_dir = tmp_path / "data"
    env = _clean_env(ZKEB_DATA_DIR=str(data_dir), HOST="127.0.0.1", PORT=str(port))
    env.pop("XDG_RUNTIME_DIR", None)  # as in containers, CI and sudo
    process = subprocess.Popen([*ZKEB, "serve"], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        ready = _wait_ready(f"http://127.0.0.1:{port}/api/health/ready", process, deadline_s=60)
        assert ready.json()["status"] == "ready"
        health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).json()
        assert health["checks"]["database"]["schema_revision"] == health["checks"]["database"]["schema_head"]
        assert (data_dir / "pgdata" / "PG_VERSION").exists()
        assert (data_dir / "dev-secrets.json").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert b"DEVELOPMENT secrets" in stderr
    assert b"Warning" not in stderr, stderr.decode()[-2000:]  # e.g. platformdirs' about XDG_RUNTIME_DIR, via pgserver
    # The embedded server stopped with the last process that used it.
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()


def test_production_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    env = _clean_env(ZKEB_ENV="production", ZKEB_DATA_DIR=str(tmp_path), DATABASE_URL="postgres://u@127.0.0.1:1/x")
    result = subprocess.run([*ZKEB, "serve"], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode != 0
    message = result.stderr.decode()
    for name in ("ZKEB_MASTER_ENCRYPTION_KEY", "JWT_SECRET", "API_KEY_SALT"):
        assert name in message
    assert "Traceback" not in message
    assert not (tmp_path / "dev-secrets.json").exists()


def test_db_commands_work_against_a_database_url(empty_database_url: str, tmp_path: Path) -> None:
    env = _clean_env(DATABASE_URL=empty_database_url, ZKEB_DATA_DIR=str(tmp_path))
    upgrade = subprocess.run([*ZKEB, "db", "upgrade"], env=env, capture_output=True, timeout=120, check=False)
    assert upgrade.returncode == 0, upgrade.stderr.decode()
    head = head_revision()
    assert f"database schema at revision {head}: from an empty database to {head}".encode() in upgrade.stderr
    current = subprocess.run([*ZKEB, "db", "current"], env=env, capture_output=True, timeout=60, check=False)
    assert current.returncode == 0
    assert b"(head)" in current.stdout
    history = subprocess.run([*ZKEB, "db", "history"], env=env, capture_output=True, timeout=60, check=False)
    assert history.returncode == 0, history.stderr.decode()
    assert b"(head)" in history.stdout
    assert b"(current)" in history.stdout
    down = subprocess.run([*ZKEB, "db", "downgrade", "base"], env=env, capture_output=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr.decode()
    assert f"database schema at revision (none): from {head} to no schema".encode() in down.stderr


def test_unreachable_database_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    env = _clean_env(DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere", ZKEB_DATA_DIR=str(tmp_path))
    result = subprocess.run([*ZKEB, "db", "upgrade"], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode != 0
    assert b"cannot reach the database" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("command", [("serve",), ("db", "current")])
def test_an_embedded_postgresql_that_cannot_start_is_one_line_saying_why(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    (tmp_path / "pgdata").write_bytes(b"")  # where initdb must make a directory
    env = _clean_env(ZKEB_DATA_DIR=str(tmp_path), HOST="127.0.0.1", PORT=str(_free_port()))
    result = subprocess.run([*ZKEB, *command], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert lines[-1] == (
        f"Error: the embedded PostgreSQL could not start in {tmp_path / 'pgdata'} (initdb failed): "
        f'initdb: error: could not access directory "{tmp_path / "pgdata"}": Not a directory'
    ), lines
    assert "Traceback" not in result.stderr.decode()
    assert "Failed postgres command" not in result.stderr.decode()  # pgserver's own 20 lines of it


@pytest.mark.parametrize(
    "command", [("db", "upgrade"), ("db", "current"), ("db", "history"), ("admin", "create-org", "x")]
)
def test_a_database_that_refuses_the_connection_is_one_line_not_a_traceback(
    pg_server_url: str, tmp_path: Path, command: tuple[str, ...]
) -> None:
    missing = make_url(pg_server_url).set(database=f"zkeb_missing_{uuid.uuid4().hex[:8]}").render_as_string(False)
    env = _clean_env(DATABASE_URL=missing, ZKEB_DATA_DIR=str(tmp_path))
    result = subprocess.run([*ZKEB, *command], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    assert b"the database refused: database" in result.stderr
    assert b"does not exist" in result.stderr
    assert b"Traceback" not in result.stderr


def test_history_without_a_database_lists_the_migrations_from_disk(tmp_path: Path) -> None:
    env = _clean_env(ZKEB_DATA_DIR=str(tmp_path))
    result = subprocess.run([*ZKEB, "db", "history"], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert f"Rev: {head_revision()} (head)".encode() in result.stdout
    assert not (tmp_path / "pgdata").exists()  # no embedded server started to read files


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "bogus"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_PYTHON_EXCLUDED_URLS": "["}, "OTEL_PYTHON_EXCLUDED_URLS"),
        ({"ZKEB_MASTER_ENCRYPTION_KEY": "short"}, "ZKEB_MASTER_ENCRYPTION_KEY"),
        ({"HOST": "localhost"}, "HOST must be an IP address"),
        ({"WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY must be an integer"),
    ],
)
def test_serve_refuses_what_its_workers_would_crash_on_in_one_line(
    tmp_path: Path, variables: dict[str, str], named: str
) -> None:
    # Checked before any worker starts: each worker would otherwise fail at start, be respawned, and crash-loop.
    env = _clean_env(ZKEB_DATA_DIR=str(tmp_path), DATABASE_URL="postgresql://postgres@127.0.0.1:1/x", **variables)
    result = subprocess.run([*ZKEB, "serve"], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    assert f"Error: configuration error: {named}".encode() in result.stderr
    assert b"Traceback" not in result.stderr
    assert b"listening" not in result.stderr


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (("db", "downgrade"), "Error: migration refused: Relative revision -1"),
        (("db", "upgrade", "nope"), "Error: migration refused: Can't locate revision identified by 'nope'"),
        (("admin", "create-org", "acme"), "Error: the database schema is not migrated: run `zkeb db upgrade` first"),
        # Each maintenance task failed alone with its own traceback (9 of them), audit verify named a missing table.
        (("maintenance", "run", "--once"), "Error: the database schema is not migrated: run `zkeb db upgrade` first"),
        (("audit", "verify"), "Error: the database schema is not migrated: run `zkeb db upgrade` first"),
    ],
)
def test_refusals_on_an_unmigrated_database_are_one_line(
    empty_database_url: str, tmp_path: Path, command: tuple[str, ...], says: str
) -> None:
    env = _clean_env(DATABASE_URL=empty_database_url, ZKEB_DATA_DIR=str(tmp_path), ZKEB_AUTO_MIGRATE="false")
    result = subprocess.run([*ZKEB, *command], env=env, capture_output=True, timeout=120, check=False)
    assert result.returncode == 1
    assert says.encode() in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("part", "says"),
    [("database", "the database refused: database"), ("username", "the database refused: role")],
)
def test_serve_with_a_database_that_refuses_the_owner_is_one_line_before_any_worker(
    pg_server_url: str, tmp_path: Path, part: str, says: str
) -> None:
    # DATABASE_URL set: no auto-migration, so nothing else logs in before the workers (which would crash-loop).
    name = f"zkeb_missing_{uuid.uuid4().hex[:8]}"
    url = make_url(pg_server_url)
    missing = (url.set(database=name) if part == "database" else url.set(username=name)).render_as_string(False)
    env = _clean_env(DATABASE_URL=missing, ZKEB_DATA_DIR=str(tmp_path), HOST="127.0.0.1", PORT=str(_free_port()))
    result = subprocess.run([*ZKEB, "serve"], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    assert f"Error: {says}".encode() in result.stderr
    assert b"does not exist" in result.stderr
    assert b"Traceback" not in result.stderr
    assert b"listening" not in result.stderr


def test_serve_with_an_unreachable_database_starts_and_answers_not_ready(tmp_path: Path) -> None:
    port = _free_port()
    env = _clean_env(
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{_free_port()}/x",
        ZKEB_DATA_DIR=str(tmp_path),
        HOST="127.0.0.1",
        PORT=str(port),
    )
    process = subprocess.Popen([*ZKEB, "serve"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        status = None
        while status != 503 and time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/api/health/ready", timeout=2).status_code
            except httpx.HTTPError:
                time.sleep(0.3)
        assert status == 503
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()[-2000:]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (("--host", "localhost"), "Invalid value for '--host': must be an IP address"),
        (("--host", "999.1.1.1"), "Invalid value for '--host': must be an IP address"),
        (("--port", "70000"), "Invalid value for '--port': 70000 is not in the range 1<=x<=65535"),
        (("--port", "0"), "Invalid value for '--port'"),
        (("--workers", "0"), "Invalid value for '--workers': 0 is not in the range x>=1"),
        (("--workers", "-1"), "Invalid value for '--workers'"),
    ],
)
def test_serve_refuses_a_bad_option_in_one_line_before_starting(
    tmp_path: Path, options: tuple[str, ...], says: str
) -> None:
    env = _clean_env(ZKEB_DATA_DIR=str(tmp_path), DATABASE_URL="postgresql://postgres@127.0.0.1:1/x")
    result = subprocess.run([*ZKEB, "serve", *options], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 2
    assert says.encode() in result.stderr
    assert b"Traceback" not in result.stderr
    assert b"listening" not in result.stderr


@pytest.mark.parametrize("through", ["option", "variable"])
def test_serve_on_a_port_in_use_is_one_line_before_starting(tmp_path: Path, through: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _clean_env(
            ZKEB_DATA_DIR=str(tmp_path), DATABASE_URL="postgresql://postgres@127.0.0.1:1/x", HOST="127.0.0.1"
        )
        options = ["--port", str(port)] if through == "option" else []
        if through == "variable":
            env["PORT"] = str(port)
        result = subprocess.run([*ZKEB, "serve", *options], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    assert f"Error: port {port} is already in use".encode() in result.stderr
    assert b"Traceback" not in result.stderr
    assert b"listening" not in result.stderr


@pytest.mark.parametrize("clash", ["in use", "the API's"])
def test_serve_with_a_metrics_port_it_cannot_bind_is_one_line_before_starting(tmp_path: Path, clash: str) -> None:
    # An operator review: a METRICS_PORT in use printed a 40-line traceback, and one equal to PORT let the metrics
    # listener take the port, then granian failed with a 137-line backtrace.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port = _free_port()
        metrics = str(busy) if clash == "in use" else str(port)
        env = _clean_env(
            ZKEB_DATA_DIR=str(tmp_path),
            DATABASE_URL="postgresql://postgres@127.0.0.1:1/x",
            HOST="127.0.0.1",
            PORT=str(port),
            METRICS_PORT=metrics,
        )
        result = subprocess.run([*ZKEB, "serve"], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    says = f"METRICS_PORT: port {busy} is already in use" if clash == "in use" else "METRICS_PORT must differ"
    assert says.encode() in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr
    assert b"listening" not in result.stderr
