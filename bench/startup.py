"""Start-up to ready: how long `zkeb serve` takes to answer `/api/health/ready` 200 on a migrated database.

    uv run python bench/startup.py            # DATABASE_URL of a PostgreSQL superuser, default the local one

It creates a fresh database on that server (dropped at the end) and migrates it once, then starts `zkeb serve`
`--runs` times with production settings (ZKEB_ENV=production, secrets generated for this run, auto-migrate on, so
every start also checks the schema is at head) and measures, from the moment the process is spawned, the time to
the first 200 from `/api/health/ready` (polled every 10 ms). Two installs are timed side by side:

- `production`: the install the container image ships, `uv sync --locked --no-dev --no-editable` with compiled
  bytecode, kept in `.bench/venv-production` and synced at each run;
- `development`: the project's own `.venv` with the dev dependency group. Some libraries import optional
  extras when they are installed (advanced-alchemy imports pydantic, which only the dev tools pull in), so this
  one starts slower; it is not what runs in production.

Target (issue 7): under 2 s on an already-migrated database, for the production install.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import ROOT, add_database_option, create_database, drop_database, free_port, production_env, with_database

PRODUCTION_VENV = ROOT / ".bench" / "venv-production"
TARGET_SECONDS = 2.0


def _production_python() -> Path:
    """The interpreter of a production install (no dev group, non-editable, compiled bytecode), brought up to date.

    uv installs only what changed; the project itself is reinstalled every time, since a non-editable install does
    not see source edits.
    """
    print(f"syncing the production environment in {PRODUCTION_VENV} ...", flush=True)
    subprocess.run(
        ["uv", "sync", "--locked", "--no-dev", "--no-editable", "--compile-bytecode", "--quiet",
         "--reinstall-package", "zkeb"],
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(PRODUCTION_VENV)},
        cwd=ROOT,
        check=True,
    )  # fmt: skip
    return PRODUCTION_VENV / "bin" / "python"


def _time_to_ready(python: Path, env: dict[str, str]) -> float:
    """Seconds from spawning `zkeb serve` to its first ready 200; the server is stopped again (SIGTERM)."""
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [str(python), "-m", "zkeb", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}/api/health/ready"
    try:
        with httpx.Client(timeout=1) as client:
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"zkeb serve exited: {server.stderr.read().decode() if server.stderr else ''}")
                try:
                    if client.get(url).status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                if time.perf_counter() - started > 60:
                    raise RuntimeError("zkeb serve not ready after 60 s")
                time.sleep(0.01)
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(server_url: str, redis_url: str | None, runs: int) -> bool:
    """Time both installs; True when the production install meets the target."""
    production = _production_python()
    name = asyncio.run(create_database(server_url))
    env = production_env(with_database(server_url, name))
    if redis_url:
        env["REDIS_URL"] = redis_url
    try:
        subprocess.run([str(production), "-m", "zkeb", "db", "upgrade"], env={**os.environ, **env}, check=True)
        _time_to_ready(production, env)  # warm the page cache for both installs' files
        _time_to_ready(Path(sys.executable), env)
        results: dict[str, list[float]] = {"production": [], "development": []}
        for _ in range(runs):  # interleaved, so drift on a shared machine hits both alike
            results["production"].append(_time_to_ready(production, env))
            results["development"].append(_time_to_ready(Path(sys.executable), env))
    finally:
        asyncio.run(drop_database(server_url, name))
    print(f"\nstart-up to ready on a migrated database, {runs} runs each (target < {TARGET_SECONDS:.0f} s)\n")
    print(f"{'install':<12} {'median s':>9} {'min s':>7} {'max s':>7}")
    for label, times in results.items():
        print(f"{label:<12} {statistics.median(times):>9.2f} {min(times):>7.2f} {max(times):>7.2f}")
    met = statistics.median(results["production"]) < TARGET_SECONDS
    print(f"\nproduction install {'meets' if met else 'MISSES'} the target")
    return met


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_option(parser)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL"),
        help="a Redis URL the server connects to at start-up (default: none, in-memory rate limiting)",
    )
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    sys.exit(0 if run(args.database_url, args.redis_url, args.runs) else 1)


if __name__ == "__main__":
    main()
