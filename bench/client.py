"""`zkeb-client` end to end beside the server's own figures: backup and restore of a 100 MiB file, and the CLI's memory.

    uv run python bench/client.py            # DATABASE_URL of a PostgreSQL superuser, default the local one

Starts the server as bench/upload.py does (granian, one worker, production settings, a fresh database), enrolls a
key file made by `zkeb-client keygen`, then, in each of `--repeats` rounds for a 100 MiB random file:

- server tus upload: bench/upload.py's upload (one tus PATCH streamed by httpx from memory, pre-signed envelope),
  and the same PATCH from its plain socket (the server's rate without an HTTP library's cost);
- CLI backup: `zkeb-client backup FILE --container C --json`, wall clock of the whole process (start-up, device
  token, OPTIONS, the sealing pass, the tus upload that re-encrypts while sending);
- SDK backup: the same through `AsyncClient.backup_file` in this process (no start-up, warm connection and token);
- raw download: bench/upload.py's plain-socket restore of the same payload (the server's own throughput), and its
  httpx restore (what an httpx client can take);
- CLI restore: `zkeb-client restore ID -o PATH`, wall clock (start-up, download, signature and digest checks,
  decryption, SHA-256 of the plaintext, temporary file and rename); SDK restore: `AsyncClient.restore_file`.

Ratios are taken per round (the two sides measured back to back) and reported as median [min-max]. Peak RSS of
the CLI process (`ru_maxrss` from `wait4` in a small launcher) is compared between a 1 MiB and a 100 MiB file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from harness import ROOT, add_database_option, create_database, create_org, drop_database, granian, production_env
from harness import with_database as database_at
from upload import MIB, _restore, _restore_raw, _upload, _upload_raw, provision

from zkeb.client import AsyncClient, KeyFile

CLI = str(Path(sys.executable).with_name("zkeb-client"))
SIZE = 100 * MIB


# A small launcher reports the CLI's peak RSS: Linux keeps `ru_maxrss` across fork and exec, so measured from this
# process (which holds the 100 MiB payload) every child would seem to start at this process's size.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nmaxrss-kib {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _cli(env: dict[str, str], *args: str) -> tuple[float, int, str]:
    """Run `zkeb-client` to completion: (wall seconds, peak RSS KiB, stdout); raises on failure."""
    environment = {**os.environ, **env}
    if "PYTHONPYCACHEPREFIX" in env:
        environment.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, CLI, *args], env=environment, capture_output=True, check=False
    )
    elapsed = time.perf_counter() - started
    err = done.stderr.decode().strip().splitlines()
    if done.returncode != 0:
        raise RuntimeError(f"zkeb-client {args[0]} failed: {err[:-1]}")
    return elapsed, int(err[-1].split()[1]), done.stdout.decode()


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


@dataclass(frozen=True)
class Round:
    """Seconds for one round's transfers of the same 100 MiB."""

    server_up: float
    server_raw_up: float
    cli_up: float
    sdk_up: float
    raw_down: float
    httpx_down: float
    cli_down: float
    sdk_down: float


async def run(server_url: str, repeats: int, *, bytecode: bool) -> None:
    """Create a database, start the server, measure, print the table, drop the database."""
    name = await create_database(server_url)
    database_url = database_at(server_url, name)
    env = production_env(database_url, MAX_UPLOAD_SIZE="128MiB", ENABLE_RATE_LIMITING="false", DB_POOL_SIZE="10")
    work = Path(tempfile.mkdtemp(prefix="zkeb-bench-client-"))
    try:
        subprocess.run(  # noqa: ASYNC221 - set-up before anything is measured
            [sys.executable, "-m", "zkeb", "db", "upgrade"], env={**os.environ, **env}, check=True, cwd=ROOT,
            capture_output=True,
        )  # fmt: skip
        admin_key = create_org(env)
        with granian(env) as (base, _server):
            async with httpx.AsyncClient(base_url=base, timeout=300) as http:
                project_id, key, device = await provision(http, admin_key)
                cli_env = {
                    "ZKEB_SERVER": base,
                    "ZKEB_IDENTITY": str(work / "device.key"),
                    "ZKEB_TOKEN": admin_key,
                    "ZKEB_PROJECT": str(project_id),
                    "XDG_STATE_HOME": str(work / "state"),
                }
                if bytecode:
                    cli_env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
                _cli(cli_env, "keygen")
                _cli(cli_env, "enroll", "--label", "bench")
                small, large = work / "small.bin", work / "large.bin"
                small.write_bytes(os.urandom(MIB))
                large.write_bytes(os.urandom(SIZE))
                payload = large.read_bytes()

                rss: dict[str, list[int]] = {"small": [], "large": []}
                rows: list[Round] = []
                floor: list[float] = []  # wall seconds of the CLI backing up 1 MiB: start-up and round trips
                keys = KeyFile.from_bytes((work / "device.key").read_bytes())
                async with AsyncClient(base, keys=keys, state_dir=work / "sdk-state") as sdk:
                    for number in range(repeats):
                        container = str(uuid.uuid4())
                        small_up, peak, _ = _cli(cli_env, "backup", str(small), "--container", container, "--json")
                        rss["small"].append(peak)
                        floor.append(small_up)
                        cli_up, peak, out = _cli(cli_env, "backup", str(large), "--container", container, "--json")
                        rss["large"].append(peak)
                        backup_id = json.loads(out.strip().splitlines()[-1])["id"]
                        server_up, server_id = await _upload(http, key, project_id, device, payload)
                        server_raw_up, _ = await _upload_raw(http, key, project_id, device, payload)
                        started = time.perf_counter()
                        await sdk.backup_file(large, uuid.UUID(container))
                        sdk_up = time.perf_counter() - started
                        raw_down = await _restore_raw(base, key, server_id, SIZE)
                        httpx_down = await _restore(http, key, server_id, SIZE)
                        cli_down, peak, _ = _cli(cli_env, "restore", backup_id, "-o", str(work / f"cli-{number}.bin"))
                        rss["large"].append(peak)
                        # Each restore starts with no other 100 MiB file freshly written: one left in the page cache
                        # slowed the next restore's writes (0.27-0.38 s without it, up to 0.55 s with it).
                        (work / f"cli-{number}.bin").unlink()
                        started = time.perf_counter()
                        await sdk.restore_file(uuid.UUID(backup_id), work / f"sdk-{number}.bin")
                        sdk_down = time.perf_counter() - started
                        (work / f"sdk-{number}.bin").unlink()
                        rows.append(
                            Round(server_up, server_raw_up, cli_up, sdk_up, raw_down, httpx_down, cli_down, sdk_down)
                        )
    finally:
        await drop_database(server_url, name)
        shutil.rmtree(work, ignore_errors=True)

    def rate(seconds: float) -> str:
        return f"{SIZE / MIB / seconds:.0f}"

    cache = "with a bytecode cache" if bytecode else "as the environment says about bytecode"
    print(
        f"\n100 MiB file, {repeats} rounds, MiB/s; CLI = a new `zkeb-client` process per command ({cache}), "
        "SDK = AsyncClient\n"
    )
    print("| round | server tus upload (httpx) | (socket) | CLI backup | SDK backup | raw download (socket) "
          "| download (httpx) | CLI restore | SDK restore |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for number, r in enumerate(rows, 1):
        print(
            f"| {number} | {rate(r.server_up)} | {rate(r.server_raw_up)} | {rate(r.cli_up)} | {rate(r.sdk_up)} "
            f"| {rate(r.raw_down)} | {rate(r.httpx_down)} | {rate(r.cli_down)} | {rate(r.sdk_down)} |"
        )
    print("\nratios per round, median [min-max] (targets: backup >= 0.7 x server tus upload, restore >= 0.7 x raw)")
    print(f"  CLI backup / server tus upload:      {_spread([r.server_up / r.cli_up for r in rows])}")
    print(f"  SDK backup / server tus upload:      {_spread([r.server_up / r.sdk_up for r in rows])}")
    print(f"  CLI backup / server upload (socket): {_spread([r.server_raw_up / r.cli_up for r in rows])}")
    print(f"  CLI restore / raw socket download:   {_spread([r.raw_down / r.cli_down for r in rows])}")
    print(f"  SDK restore / raw socket download:   {_spread([r.raw_down / r.sdk_down for r in rows])}")
    print(f"  SDK restore / httpx download:        {_spread([r.httpx_down / r.sdk_down for r in rows])}")
    print(
        f"CLI fixed cost (wall seconds of a 1 MiB backup: start-up, token, round trips): {_spread(floor)}; "
        f"the 100 MiB raw download took {_spread([r.raw_down for r in rows])} s"
    )
    small_peak, large_peak = max(rss["small"]) / 1024, max(rss["large"]) / 1024
    print(
        f"CLI peak RSS: {small_peak:.1f} MiB backing up 1 MiB; {large_peak:.1f} MiB backing up or restoring 100 MiB; "
        f"growth {large_peak - small_peak:.1f} MiB (target < 64 MiB)"
    )


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_option(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--no-bytecode",
        dest="bytecode",
        action="store_false",
        help="run the CLI as this environment says (PYTHONDONTWRITEBYTECODE=1 here) instead of with a bytecode cache",
    )
    args = parser.parse_args()
    asyncio.run(run(args.database_url, args.repeats, bytecode=args.bytecode))


if __name__ == "__main__":
    main()
