"""The S3 chunk store against moto's standalone S3 server: layout, conditional writes, reads, deletion, listing."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from aiobotocore.session import AioSession
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zkeb.domain.backups.store.s3 import (
    ChunkConflictError,
    ChunkMissingError,
    PayloadStoreUnavailableError,
    S3ChunkStore,
    S3PayloadStore,
    StoredObject,
)
from zkeb.lib.atrest import ChunkCipher, ChunkIntegrityError, new_data_key
from zkeb.settings import PayloadStoreSettings

from support import raw_s3_client


@pytest.fixture
async def store(s3_store_settings: PayloadStoreSettings) -> AsyncIterator[S3ChunkStore]:
    async with S3ChunkStore(s3_store_settings) as opened:
        yield opened


async def _get_raw(settings: PayloadStoreSettings, key: str) -> tuple[bytes, dict[str, str]]:
    async with raw_s3_client(settings) as client:
        response = await client.get_object(Bucket=settings.bucket, Key=key)
        async with response["Body"] as body:
            return await body.read(), dict(response["Metadata"])


async def _put_raw(settings: PayloadStoreSettings, key: str, body: bytes) -> None:
    async with raw_s3_client(settings) as client:
        await client.put_object(Bucket=settings.bucket, Key=key, Body=body)


_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


async def _serve(answer: bytes, *, head: bytes = _OK, ssl: Any = None) -> asyncio.Server:
    """A fake store on loopback: `answer` to every request but a HEAD, `head` to a HEAD (by default the bucket exists,
    as botocore, redirected to the right region, would see)."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            request = await reader.readuntil(b"\r\n\r\n")
            writer.write(head if request.startswith(b"HEAD ") else answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(respond, "127.0.0.1", 0, ssl=ssl)


def _settings_of(server: asyncio.Server, scheme: str = "http") -> PayloadStoreSettings:
    port = server.sockets[0].getsockname()[1]
    return PayloadStoreSettings(kind="s3", bucket="zkeb-any", endpoint_url=f"{scheme}://127.0.0.1:{port}")


async def test_chunks_round_trip_under_the_documented_keys(
    store: S3ChunkStore, s3_store_settings: PayloadStoreSettings
) -> None:
    organization_id, payload_id = uuid4(), uuid4()
    chunks = [(seq, os.urandom(100 + seq)) for seq in range(3)]
    await store.put_chunks(organization_id, payload_id, chunks)

    assert await store.get_chunks(organization_id, payload_id, [2, 0]) == [chunks[2][1], chunks[0][1]]
    assert await store.list_payload(organization_id, payload_id) == [
        StoredObject(organization_id, payload_id, seq, len(blob)) for seq, blob in chunks
    ]
    key = f"zkeb/payloads/{organization_id}/{payload_id}/00000001"
    assert store.key(organization_id, payload_id, 1) == key
    assert (await _get_raw(s3_store_settings, key))[0] == chunks[1][1]


async def test_a_chunk_is_never_overwritten(store: S3ChunkStore) -> None:
    organization_id, payload_id = uuid4(), uuid4()
    await store.put_chunk(organization_id, payload_id, 0, b"first")

    with pytest.raises(ChunkConflictError) as refused:
        await store.put_chunk(organization_id, payload_id, 0, b"second")

    assert refused.value.status_code == 503
    assert bytes(await store.get_chunk(organization_id, payload_id, 0)) == b"first"


async def test_a_missing_chunk_is_reported_as_missing(store: S3ChunkStore) -> None:
    with pytest.raises(ChunkMissingError, match="chunk 4 of the payload is missing"):
        await store.get_chunks(uuid4(), uuid4(), [4])


async def test_deleting_from_a_chunk_keeps_the_ones_before_and_other_payloads(store: S3ChunkStore) -> None:
    organization_id, payload_id, other = uuid4(), uuid4(), uuid4()
    await store.put_chunks(organization_id, payload_id, [(seq, b"x" * (seq + 1)) for seq in range(5)])
    await store.put_chunks(organization_id, other, [(0, b"other")])

    assert await store.delete_chunks_from(organization_id, payload_id, 3) == 2
    assert [obj.seq for obj in await store.list_payload(organization_id, payload_id)] == [0, 1, 2]
    assert await store.delete_payload(organization_id, payload_id) == 3
    assert await store.list_payload(organization_id, payload_id) == []
    assert [obj.payload_id async for obj in store.list_all()] == [other]


async def test_listing_skips_keys_that_are_not_chunks(
    store: S3ChunkStore, s3_store_settings: PayloadStoreSettings
) -> None:
    organization_id, payload_id = uuid4(), uuid4()
    await store.put_chunk(organization_id, payload_id, 0, b"chunk")
    for stray in ("zkeb/payloads/readme.txt", f"zkeb/payloads/{organization_id}/{payload_id}/notaseq1"):
        await _put_raw(s3_store_settings, stray, b"?")

    assert [obj.seq async for obj in store.list_all()] == [0]


async def test_a_bucket_that_does_not_exist_fails_the_check_in_one_line(
    s3_store_settings: PayloadStoreSettings,
) -> None:
    settings = PayloadStoreSettings(
        kind="s3", bucket="zkeb-no-such-bucket", endpoint_url=s3_store_settings.endpoint_url
    )
    async with S3ChunkStore(settings) as store:
        with pytest.raises(PayloadStoreUnavailableError) as failed:
            await store.check()
    assert failed.value.detail == "the S3 bucket 'zkeb-no-such-bucket' does not exist"


async def test_an_unreachable_store_is_unavailable_not_an_error(s3_store_settings: PayloadStoreSettings) -> None:
    with socket_closed_port() as port:
        settings = PayloadStoreSettings(kind="s3", bucket="zkeb-any", endpoint_url=f"http://127.0.0.1:{port}")
        async with S3ChunkStore(settings, connect_timeout=1.0, read_timeout=1.0) as store:
            with pytest.raises(PayloadStoreUnavailableError, match="cannot reach the S3 store"):
                await store.check()
            with pytest.raises(PayloadStoreUnavailableError, match="could not store a chunk") as failed:
                await store.put_chunk(uuid4(), uuid4(), 0, b"bytes")
            with pytest.raises(PayloadStoreUnavailableError, match="could not read a chunk") as failed_read:
                await store.get_chunk(uuid4(), uuid4(), 0)
    assert failed.value.status_code == failed_read.value.status_code == 503


@pytest.mark.usefixtures("s3_store_settings")  # for its credentials in the AWS variables
async def test_a_store_that_stops_answering_mid_body_times_out_as_unavailable() -> None:
    """A GET whose response stalls after its first bytes ends at the read timeout, as a 503."""
    stalled: list[asyncio.StreamWriter] = []

    async def answer_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst bytes")
        await writer.drain()
        stalled.append(writer)  # held open, silent

    server = await asyncio.start_server(answer_then_stall, "127.0.0.1", 0)
    try:
        async with S3ChunkStore(_settings_of(server), connect_timeout=1.0, read_timeout=0.5) as store:
            started = time.monotonic()
            with pytest.raises(PayloadStoreUnavailableError, match="could not read a chunk") as failed:
                await store.get_chunk(uuid4(), uuid4(), 0)
            elapsed = time.monotonic() - started
    finally:
        for writer in stalled:
            writer.close()
        server.close()
    assert failed.value.status_code == 503
    # At the read timeout (obstore does not retry a response whose body had begun), not at the bound of a whole GET.
    assert stalled
    assert 0.5 <= elapsed < 5


#: The access key id a store's refusal echoes: made up, in AWS's format.
_KEY_ID = "AKIAEXAMPLEKEYID0001"  # pragma: allowlist secret
_REFUSALS = {
    "xml": (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SignatureDoesNotMatch</Code>'
        b"<AWSAccessKeyId>%s</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256 x</StringToSign></Error>" % _KEY_ID.encode()
    ),
    "json": b'{"Code": "SignatureDoesNotMatch", "AWSAccessKeyId": "%s", "StringToSign": "x"}' % _KEY_ID.encode(),
    "text": b"SignatureDoesNotMatch for %s, StringToSign: AWS4-HMAC-SHA256 x" % _KEY_ID.encode(),
}


@pytest.mark.usefixtures("s3_store_settings")  # for its credentials in the AWS variables
@pytest.mark.parametrize("body", ["xml", "json", "text"])
async def test_a_refused_read_is_logged_without_the_stores_answer(caplog: pytest.LogCaptureFixture, body: str) -> None:
    """A store's error body can echo the request (here an access key id and the string signed): it is not logged."""
    answer = _REFUSALS[body]

    server = await _serve(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
    try:
        async with S3ChunkStore(_settings_of(server), connect_timeout=1.0, read_timeout=1.0) as store:
            with (
                caplog.at_level("WARNING", logger="zkeb.backups.s3"),
                pytest.raises(PayloadStoreUnavailableError) as failed,
            ):
                await store.get_chunk(uuid4(), uuid4(), 0)
    finally:
        server.close()
    assert failed.value.status_code == 503
    logged = caplog.text
    assert "cannot read a chunk" in logged
    assert "403" in logged
    assert _KEY_ID not in logged
    assert "StringToSign" not in logged
    assert _KEY_ID not in str(failed.value.detail)


async def test_reads_ask_botocores_chain_for_credentials_once_not_for_every_get(
    store: S3ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    organization_id, payload_id = uuid4(), uuid4()
    await store.put_chunks(organization_id, payload_id, [(seq, b"chunk %d" % seq) for seq in range(5)])
    asked: list[None] = []
    resolve = AioSession.get_credentials

    async def counted(session: AioSession) -> Any:
        asked.append(None)
        return await resolve(session)

    monkeypatch.setattr(AioSession, "get_credentials", counted)
    for seq in range(5):
        assert bytes(await store.get_chunk(organization_id, payload_id, seq)) == b"chunk %d" % seq
        await asyncio.sleep(0.1)  # requests in the same instant share one refresh; apart, a stale cache shows
    assert len(asked) == 1  # was 5 while credentials were handed over with 5 minutes left: obstore's threshold


@pytest.mark.usefixtures("s3_store_settings")  # for its credentials in the AWS variables
async def test_a_store_that_redirects_reads_fails_the_read_check_in_one_line() -> None:
    """AWS answers a request to the wrong region with a 301; botocore follows it, the read client does not."""
    server = await _serve(b"HTTP/1.1 301 Moved Permanently\r\nContent-Length: 0\r\n\r\n")
    try:
        async with S3ChunkStore(_settings_of(server), connect_timeout=1.0, read_timeout=1.0) as opened:
            with pytest.raises(PayloadStoreUnavailableError, match="the S3 store refuses reads") as failed:
                await opened.check_reads()
            reason = await S3PayloadStore(opened).check()
    finally:
        server.close()
    assert "\n" not in failed.value.detail
    assert reason is not None
    assert reason.startswith("payload store: the S3 store refuses reads")


@pytest.mark.usefixtures("s3_store_settings")  # for its credentials in the AWS variables
async def test_a_store_that_breaks_its_client_is_reported_not_ready_rather_than_raising() -> None:
    """A 301 to everything, with no region to follow: botocore's redirect handling never ends."""

    moved = b"HTTP/1.1 301 Moved Permanently\r\nContent-Length: 0\r\n\r\n"
    server = await _serve(moved, head=moved)
    try:
        async with S3ChunkStore(_settings_of(server), connect_timeout=1.0, read_timeout=1.0) as opened:
            reason = await S3PayloadStore(opened, check_timeout=20.0).check()
    finally:
        server.close()
    assert reason is not None
    assert reason.startswith("payload store: ")


def _private_ca(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA of our own (its certificate written to `directory`) and a TLS context for 127.0.0.1 signed by it."""
    now = datetime.now(UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zkeb test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, leaf_file, key_file = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(leaf_file, key_file)
    return ca_file, context


@pytest.mark.usefixtures("s3_store_settings")  # for its credentials in the AWS variables
async def test_reads_trust_the_private_ca_botocore_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A self-hosted store behind a private CA: `AWS_CA_BUNDLE` makes reads work, not only botocore's requests."""
    ca_file, context = _private_ca(tmp_path)
    server = await _serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", ssl=context)
    settings = _settings_of(server, "https")
    try:
        async with S3ChunkStore(settings, connect_timeout=1.0, read_timeout=1.0) as untrusting:
            with pytest.raises(PayloadStoreUnavailableError, match="the S3 store refuses reads"):
                await untrusting.check_reads()
        monkeypatch.setenv("AWS_CA_BUNDLE", str(ca_file))
        async with S3ChunkStore(settings, connect_timeout=1.0, read_timeout=1.0) as trusting:
            await trusting.check_reads()  # the 404 of a key never written: reads work
    finally:
        server.close()


async def test_objects_hold_only_ciphertext_and_a_tampered_one_fails_authentication(
    store: S3ChunkStore, s3_store_settings: PayloadStoreSettings
) -> None:
    organization_id, payload_id = uuid4(), uuid4()
    data_key = new_data_key()
    cipher = ChunkCipher(data_key, payload_id)
    plaintext = b"device ciphertext, recognisable " * 64
    await store.put_chunk(organization_id, payload_id, 0, cipher.encrypt(0, plaintext))

    key = store.key(organization_id, payload_id, 0)
    stored, metadata = await _get_raw(s3_store_settings, key)
    assert plaintext[:32] not in stored
    assert data_key not in stored
    assert metadata == {}
    assert cipher.decrypt(0, await store.get_chunk(organization_id, payload_id, 0)) == plaintext

    tampered = bytearray(stored)
    tampered[20] ^= 1
    await store.delete_payload(organization_id, payload_id)
    await store.put_chunk(organization_id, payload_id, 0, bytes(tampered))
    with pytest.raises(ChunkIntegrityError, match="chunk 0 failed authentication"):
        cipher.decrypt(0, await store.get_chunk(organization_id, payload_id, 0))


class socket_closed_port:  # noqa: N801 - used as a context manager
    """A loopback port nothing listens on, for as long as the block runs."""

    def __enter__(self) -> int:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        port: int = self._socket.getsockname()[1]
        return port

    def __exit__(self, *exc_info: object) -> None:
        self._socket.close()
