"""Rolling-deploy drill: blue and green `zkeb serve` behind a local nginx, client load running, zero failed requests.

    scripts/deploy-drill.sh                       # PostgreSQL superuser at BENCH_DATABASE_URL or the local one

1. A database of the drill's own (created now, dropped at the end); blue (`zkeb serve`, production settings,
   secrets generated for the run) on a free port; nginx (Debian's, its own configuration and pid in a temporary
   directory, a free port; never the system's) proxying to blue with request buffering off, so an upload streams
   through to the server that accepted it.
2. Client load through nginx: small single-shot uploads, listings and restores, back to back, and one 50 MB tus
   upload sent slowly enough to be in flight through the whole switch.
3. Green starts and passes `/api/health/ready`; nginx is reloaded with green as its only upstream (its old worker
   finishes what it proxies to blue, the new one sends everything to green); blue gets SIGTERM and drains: it must
   finish the 50 MB upload and exit 0.
   The 50 MB upload sends 10 MB, waits for blue's SIGTERM, then sends the rest: it is in flight during the drain.
4. Load stops. Every request must have succeeded, and every backup made during the drill must restore byte for byte
   through nginx. Prints the result; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import (
    ROOT,
    add_database_option,
    create_database,
    create_org,
    drop_database,
    free_port,
    production_env,
    with_database,
)

from support import Envelope, sign_backup

BIG_UPLOAD = 50 * 1000 * 1000
BIG_PIECE = 1024 * 1024
SMALL_UPLOAD = 64 * 1024
LOAD_CLIENTS = 4
NGINX_CONF = """
worker_processes 1;
user root;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream zkeb {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_read_timeout 120s;
        proxy_send_timeout 120s;
        location / {{ proxy_pass http://zkeb; }}
    }}
}}
"""


@dataclass
class Drill:
    """What the clients did and saw."""

    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    stored: dict[str, bytes] = field(default_factory=dict)

    def check(self, label: str, response: httpx.Response, expected: int) -> bool:
        self.outcomes[f"{label} {response.status_code}"] += 1
        if response.status_code != expected:
            self.failures.append(f"{label}: {response.status_code} {response.text[:200]}")
            return False
        return True


class Nginx:
    """nginx with its own configuration, pid file and temporary paths in `root`."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.conf = root / "nginx.conf"
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / name).mkdir()

    def point_at(self, upstream: int) -> None:
        """Write the configuration for `upstream`; start nginx, or reload it when it runs."""
        self.conf.write_text(NGINX_CONF.format(root=self.root, upstream=upstream, port=self.port))
        running = (self.root / "nginx.pid").exists()
        command = ["nginx", "-p", str(self.root), "-c", str(self.conf)] + (["-s", "reload"] if running else [])
        subprocess.run(command, check=True, capture_output=True)

    def stop(self) -> None:
        """Quit nginx."""
        if (self.root / "nginx.pid").exists():
            subprocess.run(
                ["nginx", "-p", str(self.root), "-c", str(self.conf), "-s", "quit"], check=False, capture_output=True
            )


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """`zkeb serve` on `port`, ready."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "zkeb", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"zkeb serve exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"zkeb serve not ready; see {log}")
        time.sleep(0.3)


async def provision(url: str, admin_key: str) -> tuple[dict[str, str], Callable[[bytes], Envelope]]:
    """A project, its key and a device; returns the key's headers and a function signing envelopes."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        project = await client.post("/api/v1/projects", json={"name": "drill"}, headers=admin)
        project_id = uuid.UUID(project.json()["id"])
        key = (await client.post(f"/api/v1/projects/{project_id}/api-keys", json={"name": "d"}, headers=admin)).json()
        device = Ed25519PrivateKey.generate()
        device_id_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
        public = device.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        enrolled = await client.post(
            f"/api/v1/projects/{project_id}/devices",
            json={"device_id_hash": device_id_hash.hex(), "public_key": base64.b64encode(public).decode()},
            headers=admin,
        )
        enrolled.raise_for_status()

    def envelope(payload: bytes) -> Envelope:
        return sign_backup(device, project_id=project_id, device_id_hash=device_id_hash, payload=payload)

    return {"Authorization": f"Bearer {key['key']}"}, envelope


async def load(
    url: str, auth: dict[str, str], sign: Callable[[bytes], Envelope], drill: Drill, stop: asyncio.Event
) -> None:
    """One client: upload a small backup, list, restore it, until `stop`."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while not stop.is_set():
            envelope = sign(os.urandom(SMALL_UPLOAD))
            try:
                created = await client.post("/api/v1/backups", json=envelope.json(), headers=auth)
                if not drill.check("upload", created, 201):
                    continue
                backup_id = created.json()["id"]
                drill.stored[backup_id] = envelope.payload
                drill.check("list", await client.get("/api/v1/backups", headers=auth), 200)
                restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth)
                if drill.check("restore", restored, 200) and restored.content != envelope.payload:
                    drill.failures.append(f"restore of {backup_id}: different bytes")
            except httpx.HTTPError as exc:
                drill.outcomes[type(exc).__name__] += 1
                drill.failures.append(f"{type(exc).__name__}: {exc}")


async def big_upload(
    url: str, auth: dict[str, str], sign: Callable[[bytes], Envelope], drill: Drill, terminated: asyncio.Event
) -> None:
    """One 50 MB tus upload in one PATCH: 10 MB, then (once blue got SIGTERM) the rest, over a few seconds."""
    payload = os.urandom(BIG_UPLOAD)
    envelope = sign(payload)
    tus = {"Tus-Resumable": "1.0.0", **auth}

    async def pieces() -> AsyncIterator[bytes]:
        for offset in range(0, BIG_UPLOAD, BIG_PIECE):
            if offset == 10 * BIG_PIECE:
                await asyncio.wait_for(terminated.wait(), timeout=180)
                drill.outcomes["50 MB upload: MB sent before blue's SIGTERM"] = offset // 1_000_000
            yield payload[offset : offset + BIG_PIECE]
            await asyncio.sleep(0.1)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        created = await client.post(
            "/api/v1/uploads",
            headers={**tus, "Upload-Length": str(BIG_UPLOAD), "Upload-Metadata": envelope.tus_metadata()},
        )
        if not drill.check("50 MB upload (create)", created, 201):
            return
        try:
            patched = await client.patch(
                created.headers["location"],
                content=pieces(),
                headers={**tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
                         "Content-Length": str(BIG_UPLOAD)},
            )  # fmt: skip
        except httpx.HTTPError as exc:
            drill.failures.append(f"50 MB upload: {type(exc).__name__}: {exc}")
            return
        if drill.check("50 MB upload", patched, 204):
            drill.stored[patched.headers["zkeb-backup-id"]] = payload


async def run(server_url: str) -> int:
    """The drill; 0 when every request succeeded and every backup restored."""
    if shutil.which("nginx") is None:
        print("nginx is missing: apt-get install nginx-light (or nginx)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="zkeb-drill-"))
    name = await create_database(server_url)
    env = production_env(with_database(server_url, name), SHUTDOWN_GRACE_SECONDS="60", ENABLE_RATE_LIMITING="false")
    nginx = Nginx(root, free_port())
    blue_port, green_port = free_port(), free_port()
    blue = green = None
    drill = Drill()
    try:
        blue = start_server(env, blue_port, root / "blue.log")
        nginx.point_at(blue_port)
        url = f"http://127.0.0.1:{nginx.port}"
        auth, sign = await provision(url, create_org(env))
        stop = asyncio.Event()
        clients = [asyncio.create_task(load(url, auth, sign, drill, stop)) for _ in range(LOAD_CLIENTS)]
        terminated = asyncio.Event()
        upload = asyncio.create_task(big_upload(url, auth, sign, drill, terminated))
        await asyncio.sleep(3)
        print("blue serving, load and the 50 MB upload running; starting green", file=sys.stderr)
        green = await asyncio.to_thread(
            start_server, {**env, "ZKEB_AUTO_MIGRATE": "false"}, green_port, root / "green.log"
        )
        nginx.point_at(green_port)
        print("green ready and now nginx's only upstream; SIGTERM to blue", file=sys.stderr)
        await asyncio.sleep(1)
        blue.send_signal(signal.SIGTERM)
        terminated.set()
        drained_at = time.monotonic()
        blue_code = await asyncio.to_thread(blue.wait, 90)
        drained = time.monotonic() - drained_at
        await upload
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*clients)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for backup_id, payload in drill.stored.items():
                restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth)
                if (
                    restored.status_code != 200
                    or hashlib.sha256(restored.content).digest() != hashlib.sha256(payload).digest()
                ):
                    drill.failures.append(f"backup {backup_id} does not restore ({restored.status_code})")
        print(f"\nRolling-deploy drill: blue drained in {drained:.1f} s and exited {blue_code}")
        print(f"requests: {dict(sorted(drill.outcomes.items()))}")
        print(f"backups made during the drill: {len(drill.stored)}, each restored byte for byte: {not drill.failures}")
        if blue_code != 0:
            drill.failures.append(f"blue exited {blue_code}")
        print(f"failed requests: {len(drill.failures)}" + "".join(f"\n  {f}" for f in drill.failures[:20]))
        print("RESULT:", "PASS" if not drill.failures else "FAIL")
        return 0 if not drill.failures else 1
    finally:
        nginx.stop()
        for process in (blue, green):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
        await drop_database(server_url, name)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    """Parse arguments and run the drill."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_option(parser)
    sys.exit(asyncio.run(run(parser.parse_args().database_url)))


if __name__ == "__main__":
    main()
