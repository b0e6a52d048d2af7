"""ZKEB under load at rising concurrency, against a bare Litestar route served the same way, in one run.

    uv run python bench/load.py                      # local PostgreSQL superuser, Redis db 7
    uv run python bench/load.py --runs 5 --seconds 5 --concurrency 1,8,32,128

Production settings (ZKEB_ENV=production, secrets generated for this run, tracing off, rate limiting on against
Redis with budgets too large to refuse the bench): `zkeb serve` on a fresh database of the bench's own (dropped at
the end), and beside it `bench/ceiling.py`, a one-route Litestar app served by the same `zkeb.server` settings. A load
generator on raw asyncio sockets (keep-alive HTTP/1.1, one connection per client, requests prepared ahead) drives,
for each concurrency and each run, in an order rotating between runs:

- `ceiling`: `GET /bare` on the bare app;
- `live`: `GET /api/health/live` (the per-request cost of ZKEB's middleware);
- `envelope`: `GET /api/v1/backups/{id}` with a device token (authentication, one tenant transaction, JSON);
- `mix`: list backups (30 %), get an envelope (30 %), restore a 4 KiB payload (20 %), upload a 4 KiB backup in one
  signed JSON body (10 %), issue a device token from a fresh proof (10 %).

Per step it prints requests/s, p50/p95/p99 latency, errors (any status but the expected one, or a broken
connection), the server's CPU per request and the ratio to the ceiling of the same run; medians over the runs with
their spread (min-max). The generator's own CPU share during the ceiling step shows whether it is the bottleneck:
below one core, the ceiling is the server's. With `--profile FILE` it then records the app's worker with py-spy
while driving `--profile-workload` at 32 clients, writes the collapsed stacks (flamegraph.pl and speedscope read
them) and prints the frames found in the most samples.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from harness import (
    ROOT,
    add_database_option,
    create_database,
    create_org,
    drop_database,
    free_port,
    rate_limited_env,
    with_database,
)

from zkeb.lib.envelope import auth_message, backup_signed_message, format_rfc3339_utc

WORKLOADS = ("ceiling", "live", "envelope", "mix")
PAYLOAD_SIZE = 4096
SEEDED_BACKUPS = 64
DEVICES = 8
PROFILE_FRAMES = 60


# -- the load generator ---------------------------------------------------------------------------------------------


class BrokenResponseError(Exception):
    """The server closed the connection or sent something that is not an HTTP/1.1 response."""


class Connection:
    """One keep-alive HTTP/1.1 connection that sends prepared requests and reads whole responses."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send `raw` (a whole request) and return the status and body; reconnects when the server closed."""
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.writer.write(raw)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            raise BrokenResponseError(str(exc)) from None
        status = int(head[9:12])
        headers = head.lower()
        length_at = headers.find(b"\r\ncontent-length:")
        if length_at >= 0:
            end = headers.index(b"\r\n", length_at + 2)
            body = await self.reader.readexactly(int(headers[length_at + 17 : end]))
        elif b"\r\ntransfer-encoding: chunked" in headers:
            body = await self._chunked()
        else:
            body = b""
        if b"\r\nconnection: close" in headers:
            self.close()
        return status, body

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        pieces = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            pieces.append(await self.reader.readexactly(size + 2))
            if size == 0:
                return b"".join(pieces)

    def close(self) -> None:
        """Close the socket; the next request opens a new one."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in {"POST", "PUT", "PATCH"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Sample:
    """One step: one workload at one concurrency for a few seconds."""

    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    server_cpu: float
    client_cpu: float
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Requests answered as expected, per second."""
        return (self.requests - self.errors) / self.seconds

    def quantile(self, q: float) -> float:
        """Latency quantile `q` in ms."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def cpu_per_request(self) -> float:
        """The server's CPU seconds per request (all its processes)."""
        return self.server_cpu / max(self.requests, 1)


#: A workload yields, per call, a prepared request and the status that counts as success.
Workload = Callable[[random.Random], tuple[bytes, int]]


def _cpu_seconds(pid: int) -> float:
    process = psutil.Process(pid)
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        try:
            times = each.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def drive(port: int, workload: Workload, concurrency: int, seconds: float, server_pid: int) -> Sample:
    """`concurrency` clients, each on its own connection, sending `workload`'s requests back to back."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + seconds

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        connection = Connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                raw, expected = workload(rng)
                started = time.perf_counter()
                try:
                    status, _ = await connection.request(raw)
                except (BrokenResponseError, OSError) as exc:
                    kind = type(exc).__name__
                else:
                    kind = "" if status == expected else str(status)
                latencies.append(time.perf_counter() - started)
                if kind:
                    errors[kind] = errors.get(kind, 0) + 1
        finally:
            connection.close()

    server_before, client_before, started = _cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(seed) for seed in range(concurrency)))
    elapsed = time.perf_counter() - started
    return Sample(
        requests=len(latencies),
        errors=sum(errors.values()),
        seconds=elapsed,
        latencies=latencies,
        server_cpu=_cpu_seconds(server_pid) - server_before,
        client_cpu=(time.process_time() - client_before) / elapsed,
        error_kinds=errors,
    )


# -- the tenant the load acts for -----------------------------------------------------------------------------------


@dataclass
class Device:
    """An enrolled device, its token, and the last proof time it used (each proof is spent once)."""

    key: Ed25519PrivateKey
    id_hash: bytes
    token: str = ""
    last_proof_ms: int = 0

    def proof(self, project_id: uuid.UUID) -> bytes:
        """A fresh `POST /api/v1/auth/token` body: the timestamp strictly grows, so no proof repeats."""
        self.last_proof_ms = max(int(time.time() * 1000), self.last_proof_ms + 1)
        message = auth_message(project_id=project_id, device_id_hash=self.id_hash, timestamp_ms=self.last_proof_ms)
        return json.dumps(
            {
                "project_id": str(project_id),
                "device_id_hash": self.id_hash.hex(),
                "timestamp_ms": self.last_proof_ms,
                "signature": base64.b64encode(self.key.sign(message)).decode(),
            }
        ).encode()

    def backup(self, project_id: uuid.UUID, payload: bytes) -> bytes:
        """A signed single-shot `POST /api/v1/backups` JSON body for `payload`."""
        nonce, tag, metadata_nonce, metadata_tag = os.urandom(12), os.urandom(16), os.urandom(12), os.urandom(16)
        metadata, container, when = b"bench-metadata", uuid.uuid4(), time.time()
        from datetime import UTC, datetime  # noqa: PLC0415 - only the envelope needs it

        moment = datetime.fromtimestamp(when, UTC)
        message = backup_signed_message(
            project_id=project_id, container_id=container, device_id_hash=self.id_hash, backup_timestamp=moment,
            payload_nonce=nonce, payload_auth_tag=tag, payload_sha256=hashlib.sha256(payload).digest(),
            payload_size=len(payload), metadata_nonce=metadata_nonce, metadata_auth_tag=metadata_tag,
            metadata_sha256=hashlib.sha256(metadata).digest(), metadata_size=len(metadata),
        )  # fmt: skip
        b64 = base64.b64encode
        return json.dumps(
            {
                "container_id": str(container),
                "device_id_hash": self.id_hash.hex(),
                "payload": b64(payload).decode(),
                "payload_nonce": b64(nonce).decode(),
                "payload_auth_tag": b64(tag).decode(),
                "metadata": b64(metadata).decode(),
                "metadata_nonce": b64(metadata_nonce).decode(),
                "metadata_auth_tag": b64(metadata_tag).decode(),
                "signature": b64(self.key.sign(message)).decode(),
                "backup_timestamp": format_rfc3339_utc(moment),
            }
        ).encode()


@dataclass
class Tenant:
    """A project with enrolled devices and seeded backups."""

    project_id: uuid.UUID
    devices: list[Device]
    #: Each seeded backup's id and the index of the device that made it (a device token sees only its own).
    backups: list[tuple[str, int]]


def provision(base: str, admin_key: str) -> Tenant:
    """A project, `DEVICES` enrolled devices with tokens, and `SEEDED_BACKUPS` small backups."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30) as client:
        project_id = uuid.UUID(client.post("/api/v1/projects", json={"name": "load"}).raise_for_status().json()["id"])
        devices = []
        for index in range(DEVICES):
            key = Ed25519PrivateKey.generate()
            device = Device(key=key, id_hash=hashlib.sha256(uuid.uuid4().bytes).digest())
            public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            client.post(
                f"/api/v1/projects/{project_id}/devices",
                json={"device_id_hash": device.id_hash.hex(), "public_key": base64.b64encode(public).decode(),
                      "label": f"load-{index}"},
            ).raise_for_status()  # fmt: skip
            issued = client.post(
                "/api/v1/auth/token", content=device.proof(project_id), headers={"Content-Type": "application/json"}
            )
            device.token = issued.raise_for_status().json()["access_token"]
            devices.append(device)
        backups = []
        for index in range(SEEDED_BACKUPS):
            device = devices[index % DEVICES]
            created = client.post(
                "/api/v1/backups",
                content=device.backup(project_id, os.urandom(PAYLOAD_SIZE)),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {device.token}"},
            )
            backups.append((created.raise_for_status().json()["id"], index % DEVICES))
    return Tenant(project_id, devices, backups)


def workloads(tenant: Tenant) -> dict[str, Workload]:
    """The four workloads, as functions of the client's random generator."""
    devices = tenant.devices
    bearer = [{"Authorization": f"Bearer {d.token}"} for d in devices]
    envelope_reads = [_request("GET", f"/api/v1/backups/{b}", bearer[d]) for b, d in tenant.backups]
    restores = [_request("GET", f"/api/v1/backups/{b}/payload", bearer[d]) for b, d in tenant.backups]
    lists = [_request("GET", "/api/v1/backups?limit=20", h) for h in bearer]
    json_type = {"Content-Type": "application/json"}
    ceiling = _request("GET", "/bare")
    live = _request("GET", "/api/health/live")

    def upload(rng: random.Random) -> tuple[bytes, int]:
        index = rng.randrange(DEVICES)
        body = devices[index].backup(tenant.project_id, rng.randbytes(PAYLOAD_SIZE))
        return _request("POST", "/api/v1/backups", {**bearer[index], **json_type}, body), 201

    def token(rng: random.Random) -> tuple[bytes, int]:
        body = devices[rng.randrange(DEVICES)].proof(tenant.project_id)
        return _request("POST", "/api/v1/auth/token", json_type, body), 200

    def mix(rng: random.Random) -> tuple[bytes, int]:
        draw = rng.random()
        if draw < 0.3:
            return rng.choice(lists), 200
        if draw < 0.6:
            return rng.choice(envelope_reads), 200
        if draw < 0.8:
            return rng.choice(restores), 200
        if draw < 0.9:
            return upload(rng)
        return token(rng)

    return {
        "ceiling": lambda _: (ceiling, 200),
        "live": lambda _: (live, 200),
        "envelope": lambda rng: (rng.choice(envelope_reads), 200),
        "mix": mix,
    }


# -- the servers ----------------------------------------------------------------------------------------------------


@contextmanager
def _process(command: list[str], env: dict[str, str], ready_url: str, cwd: str) -> Iterator[subprocess.Popen[bytes]]:
    log_path = os.path.join(ROOT, ".bench", f"load-{os.path.basename(command[-1])}-{os.getpid()}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            deadline = time.monotonic() + 90
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command} exited; see {log_path}")
                try:
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command} not ready; see {log_path}")
                time.sleep(0.2)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _worker_pid(server: subprocess.Popen[bytes]) -> int:
    """The granian worker (the process running the app) under `server`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = psutil.Process(server.pid).children(recursive=True)
        if children:
            busiest: int = max(children, key=lambda p: p.cpu_times().user).pid
            return busiest
        time.sleep(0.1)
    return server.pid


# -- the report -----------------------------------------------------------------------------------------------------


def _spread(values: list[float], fmt: str) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return format(median, fmt)
    return f"{format(median, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(
    samples: dict[tuple[int, str], list[Sample]],
    concurrencies: list[int],
    workloads: tuple[str, ...],
    runs: int,
    seconds: float,
) -> None:
    """The table, then the targets at 32 clients."""
    print(
        f"\nZKEB under load: {runs} runs of {seconds:g} s per step; medians (min-max over runs); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(
        "| clients | workload | req/s | x ceiling | p50 ms"
        " | p95 ms | p99 ms | errors | server CPU µs/req | client CPU |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for concurrency in concurrencies:
        ceiling = samples[(concurrency, "ceiling")]
        for workload in workloads:
            steps = samples[(concurrency, workload)]
            ratio = (
                ""
                if workload == "ceiling"
                else _spread([s.rate / c.rate for s, c in zip(steps, ceiling, strict=True)], ".2f")
            )
            errors = sum(s.errors for s in steps)
            kinds: dict[str, int] = {}
            for step in steps:
                for kind, count in step.error_kinds.items():
                    kinds[kind] = kinds.get(kind, 0) + count
            error_text = f"{errors} {kinds}" if errors else "0"
            print(
                f"| {concurrency} | {workload} | {_spread([s.rate for s in steps], '.0f')} | {ratio} "
                f"| {statistics.median(s.quantile(0.5) for s in steps):.1f} "
                f"| {statistics.median(s.quantile(0.95) for s in steps):.1f} "
                f"| {_spread([s.quantile(0.99) for s in steps], '.1f')} | {error_text} "
                f"| {statistics.median(s.cpu_per_request for s in steps) * 1e6:.0f} "
                f"| {statistics.median(s.client_cpu for s in steps):.0%} |"
            )
    if 32 not in concurrencies:
        return
    ceiling = samples[(32, "ceiling")]

    def ratio_at_32(workload: str) -> float:
        return statistics.median(s.rate / c.rate for s, c in zip(samples[(32, workload)], ceiling, strict=True))

    def p99_at_32(workload: str) -> float:
        return statistics.median(s.quantile(0.99) for s in samples[(32, workload)])

    def errors_at_32(workload: str) -> int:
        return sum(s.errors for s in samples[(32, workload)])

    checks: dict[str, Callable[[], tuple[str, bool, str]]] = {
        "live": lambda: (
            "live ≥ 0.70 x ceiling, 0 errors",
            ratio_at_32("live") >= 0.7 and errors_at_32("live") == 0,
            f"{ratio_at_32('live'):.2f}",
        ),
        "envelope": lambda: (
            "envelope ≥ 0.15 x ceiling, p99 < 25 ms, 0 errors",
            ratio_at_32("envelope") >= 0.15 and p99_at_32("envelope") < 25 and errors_at_32("envelope") == 0,
            f"{ratio_at_32('envelope'):.2f}, p99 {p99_at_32('envelope'):.1f} ms",
        ),
        "mix": lambda: (
            "mix p99 < 100 ms, 0 errors",
            p99_at_32("mix") < 100 and errors_at_32("mix") == 0,
            f"p99 {p99_at_32('mix'):.1f} ms",
        ),
    }
    print("\nTargets at 32 clients (issue 20):")
    for workload in workloads[1:]:
        label, met, figure = checks[workload]()
        print(f"  {'met    ' if met else 'MISSED '} {label}: {figure}")


# -- the run --------------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    """Create the database, start both servers, drive every step `--runs` times, report, clean up."""
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    chosen = ("ceiling", *(w for w in WORKLOADS[1:] if w in args.workloads.split(",")))
    name = await create_database(args.database_url)
    env = rate_limited_env(with_database(args.database_url, name), args.redis_url)
    for variable in [v for v in os.environ if v.startswith("OTEL_")]:
        del os.environ[variable]
    app_port, ceiling_port = free_port(), free_port()
    try:
        with ExitStack() as stack:
            app = stack.enter_context(
                _process(
                    [sys.executable, "-m", "zkeb", "serve", "--host", "127.0.0.1", "--port", str(app_port)],
                    env, f"http://127.0.0.1:{app_port}/api/health/ready", str(ROOT),
                )
            )  # fmt: skip
            ceiling = stack.enter_context(
                _process(
                    [sys.executable, "ceiling.py", str(ceiling_port)], env,
                    f"http://127.0.0.1:{ceiling_port}/bare", str(ROOT / "bench"),
                )
            )  # fmt: skip
            admin_key = create_org(env)
            tenant = provision(f"http://127.0.0.1:{app_port}", admin_key)
            loads = workloads(tenant)
            ports = {"ceiling": ceiling_port, "live": app_port, "envelope": app_port, "mix": app_port}
            pids = {"ceiling": _worker_pid(ceiling), **dict.fromkeys(("live", "envelope", "mix"), _worker_pid(app))}
            for workload in chosen:  # warm-up: connections, caches, the JIT-less interpreter's first paths
                await drive(ports[workload], loads[workload], 8, 1.0, pids[workload])
            samples: dict[tuple[int, str], list[Sample]] = {}
            for round_ in range(args.runs):
                order = chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]
                for concurrency in concurrencies:
                    for workload in order:
                        sample = await drive(
                            ports[workload], loads[workload], concurrency, args.seconds, pids[workload]
                        )
                        samples.setdefault((concurrency, workload), []).append(sample)
                print(f"run {round_ + 1}/{args.runs} done", file=sys.stderr)
            report(samples, concurrencies, chosen, args.runs, args.seconds)
            if args.profile:
                await _profile(args.profile, pids[args.profile_workload], ports[args.profile_workload],
                               loads[args.profile_workload])  # fmt: skip
    finally:
        await drop_database(args.database_url, name)


async def _profile(path: str, pid: int, port: int, workload: Workload) -> None:
    """py-spy records the worker while 32 clients drive `workload`; prints the frames in the most samples.

    `--gil` samples only the thread holding the GIL: where the worker's Python time goes, not where it waits.
    """
    seconds = 15
    recorder = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--duration", str(seconds),
        "--rate", "200", "--gil", "--format", "raw", "--output", path, "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1)
    await drive(port, workload, 32, seconds, pid)
    await recorder.wait()
    inclusive: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    # py-spy's non-blocking samples can hold a torn frame name (bytes read while the worker ran): such a line is
    # not "stack count" and is skipped, and stray bytes are replaced rather than failing the decode.
    text = Path(path).read_bytes().decode(errors="replace")  # noqa: ASYNC240 - after the load, nothing else runs
    for line in text.splitlines():
        stack, _, samples_text = line.rpartition(" ")
        if stack and samples_text.isdigit():
            samples = int(samples_text)
            total += samples
            frames = stack.split(";")
            leaves[frames[-1]] = leaves.get(frames[-1], 0) + samples
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + samples
    print(f"\nprofile of the worker ({total} samples, collapsed stacks in {path}); frames in most samples:")
    for frame, count in sorted(inclusive.items(), key=lambda item: -item[1])[:PROFILE_FRAMES]:
        print(f"  {count / total:6.1%}  {frame}")
    print("frames most often on top of the stack (an empty one: a thread with no Python frame, granian's own):")
    for frame, count in sorted(leaves.items(), key=lambda item: -item[1])[: PROFILE_FRAMES // 3]:
        print(f"  {count / total:6.1%}  {frame}")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_option(parser)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7"))
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each step")
    parser.add_argument("--runs", type=int, default=3, help="how many times every step runs")
    parser.add_argument("--concurrency", default="1,8,32,128", help="comma-separated client counts")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated; the ceiling always runs")
    parser.add_argument(
        "--profile", help="after the runs, write py-spy's collapsed stacks of the app's worker to this file"
    )
    parser.add_argument("--profile-workload", choices=WORKLOADS[1:], default="envelope")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
