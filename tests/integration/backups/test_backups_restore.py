"""Restore, listing, latest, deletion and scoping of backups."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from typing import Any

import asyncpg
import pytest
from backups_support import (
    MIB,
    Tenant,
    auth,
    device_token,
    make_tenant,
    row_counts,
    sign_envelope,
    tus_headers,
)
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.settings import Settings

from support import POSTGRES_ONLY, Envelope, problem, store_chunk_size

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def tenant(client: Client, settings: Settings) -> Tenant:
    return await make_tenant(client, settings)


async def upload(client: Client, tenant: Tenant, envelope: Envelope, credential: str | None = None) -> dict[str, Any]:
    """Upload through tus in one PATCH (any size), then fetch the backup's JSON."""
    key = credential or tenant.project_key
    created = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(
            key, **{"Upload-Length": str(len(envelope.payload)), "Upload-Metadata": envelope.tus_metadata()}
        ),
    )
    assert created.status_code == 201, created.text
    patched = await client.patch(
        created.headers["location"],
        content=envelope.payload,
        headers=tus_headers(key, **{"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}),
    )
    assert patched.status_code == 204, patched.text
    backup_id = patched.headers["zkeb-backup-id"]
    body: dict[str, Any] = (await client.get(f"/api/v1/backups/{backup_id}", headers=auth(key))).json()
    return body


@pytest.mark.parametrize("size", [1, MIB, MIB + 1, 25_000_000], ids=["1B", "1MiB", "1MiB+1", "25MB"])
async def test_restore_reads_back_the_exact_bytes(client: Client, tenant: Tenant, size: int) -> None:
    payload = os.urandom(size)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    response = await client.get(f"/api/v1/backups/{backup['id']}/payload", headers=auth(tenant.project_key))
    assert response.status_code == 200
    assert response.headers["content-length"] == str(size)
    assert response.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(payload).digest()
    assert response.content == payload


async def test_payload_response_headers(client: Client, tenant: Tenant) -> None:
    payload = os.urandom(1000)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    response = await client.get(f"/api/v1/backups/{backup['id']}/payload", headers=auth(tenant.project_key))
    digest = hashlib.sha256(payload).digest()
    assert response.headers["etag"] == f'"{digest.hex()}"'
    assert response.headers["repr-digest"] == f"sha-256=:{base64.b64encode(digest).decode()}:"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-disposition"] == f'attachment; filename="{backup["id"]}.bin"'
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["accept-ranges"] == "bytes"


async def test_if_none_match_answers_304(client: Client, tenant: Tenant) -> None:
    payload = os.urandom(100)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    url = f"/api/v1/backups/{backup['id']}/payload"
    etag = f'"{hashlib.sha256(payload).hexdigest()}"'
    matched = await client.get(url, headers={**auth(tenant.project_key), "If-None-Match": f'"other", {etag}'})
    assert matched.status_code == 304
    assert matched.content == b""
    assert matched.headers["etag"] == etag
    star = await client.get(url, headers={**auth(tenant.project_key), "If-None-Match": "*"})
    assert star.status_code == 304
    other = await client.get(url, headers={**auth(tenant.project_key), "If-None-Match": '"nope"'})
    assert other.status_code == 200
    assert other.content == payload


async def test_if_match_naming_another_payload_answers_412_before_any_other_condition(
    client: Client, tenant: Tenant
) -> None:
    # RFC 9110 §13.1.1: a client that names the payload it expects (a download manager checking it still resumes
    # the same file) must not get another one's bytes; the condition was ignored and the payload sent.
    payload = os.urandom(100)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    url = f"/api/v1/backups/{backup['id']}/payload"
    etag = f'"{hashlib.sha256(payload).hexdigest()}"'
    for method in ("GET", "HEAD"):
        for if_match, status in [
            (etag, 200),
            ("*", 200),
            (f'"other", {etag}', 200),
            ('"another-payload"', 412),
            (f"W/{etag}", 412),  # the strong comparison: a weak tag never matches
            ("not-a-tag", 412),
        ]:
            headers = {**auth(tenant.project_key), "If-Match": if_match}
            response = await client.request(method, url, headers=headers)
            assert response.status_code == status, (method, if_match, response.text)
            assert response.headers["etag"] == etag
            if status == 412 and method == "GET":
                assert problem(response)["detail"] == "If-Match names another payload: this one's ETag is in the answer"
        # Evaluated first: a failed If-Match is 412 even where Range or If-None-Match alone would answer otherwise.
        conditions = {"If-Match": '"another-payload"', "If-None-Match": etag, "Range": "bytes=0-9"}
        response = await client.request(method, url, headers={**auth(tenant.project_key), **conditions})
        assert response.status_code == 412, method
    ranged = await client.get(url, headers={**auth(tenant.project_key), "If-Match": etag, "Range": "bytes=0-9"})
    assert (ranged.status_code, ranged.content) == (206, payload[:10])


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=10-99", 10, 99),
        (f"bytes={MIB - 5}-{MIB + 5}", MIB - 5, MIB + 5),
        (f"bytes={2 * MIB}-", 2 * MIB, 3 * MIB + 99),
        ("bytes=-100", 3 * MIB, 3 * MIB + 99),
        ("bytes=5-999999999999", 5, 3 * MIB + 99),
    ],
)
async def test_single_range_answers_206_with_the_slice(
    client: Client, tenant: Tenant, header: str, start: int, end: int
) -> None:
    payload = os.urandom(3 * MIB + 100)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    response = await client.get(
        f"/api/v1/backups/{backup['id']}/payload", headers={**auth(tenant.project_key), "Range": header}
    )
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {start}-{end}/{len(payload)}"
    assert response.headers["content-length"] == str(end - start + 1)
    assert response.content == payload[start : end + 1]


async def test_head_gives_the_payloads_size_and_validators_without_the_body(client: Client, tenant: Tenant) -> None:
    payload = os.urandom(MIB + 10)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    url = f"/api/v1/backups/{backup['id']}/payload"
    etag = f'"{hashlib.sha256(payload).hexdigest()}"'
    response = await client.head(url, headers=auth(tenant.project_key))
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(len(payload))
    assert response.headers["etag"] == etag
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-type"] == "application/octet-stream"
    get = await client.get(url, headers=auth(tenant.project_key))
    assert {k: get.headers[k] for k in ("etag", "repr-digest", "content-disposition", "cache-control")} == {
        k: response.headers[k] for k in ("etag", "repr-digest", "content-disposition", "cache-control")
    }
    unchanged = await client.head(url, headers={**auth(tenant.project_key), "If-None-Match": etag})
    assert unchanged.status_code == 304
    assert (await client.head(url)).status_code == 401
    other = await client.head(f"/api/v1/backups/{uuid.uuid4()}/payload", headers=auth(tenant.project_key))
    assert other.status_code == 404


#: Headers every answer carries whatever the operation (core middleware), documented once for the whole API.
_GENERIC_HEADERS = {
    "content-type", "content-length", "date", "server", "x-request-id", "x-content-type-options",
    "strict-transport-security", "x-frame-options", "referrer-policy", "content-security-policy",
    "permissions-policy", "cross-origin-opener-policy", "cross-origin-resource-policy", "ratelimit",
    "ratelimit-policy", "vary", "traceresponse", "cache-control",
}  # fmt: skip


async def test_the_openapi_document_names_what_a_restore_reads_and_answers(client: Client, tenant: Tenant) -> None:
    # An integrator's generated client resumes a download only if the document has `Range`/`If-Range` and the
    # answers' `ETag`/`Content-Range` (it had neither: an API-integrator review).
    payload = os.urandom(100)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    url = f"/api/v1/backups/{backup['id']}/payload"
    etag = f'"{hashlib.sha256(payload).hexdigest()}"'
    document = (await client.get("/schema/openapi.json")).json()
    operations = document["paths"]["/api/v1/backups/{backup_id}/payload"]
    assert {p["name"] for p in operations["get"]["parameters"] if p["in"] == "header"} == {
        "Range",
        "If-Range",
        "If-Match",
        "If-None-Match",
    }
    assert {p["name"] for p in operations["head"]["parameters"] if p["in"] == "header"} == {"If-Match", "If-None-Match"}
    for method, extra, status in [
        ("get", {}, 200),
        ("get", {"Range": "bytes=10-", "If-Range": etag}, 206),
        ("get", {"If-None-Match": etag}, 304),
        ("get", {"Range": "bytes=100-"}, 416),
        ("get", {"If-Match": '"other"'}, 412),
        ("head", {}, 200),
        ("head", {"If-None-Match": etag}, 304),
        ("head", {"If-Match": '"other"'}, 412),
    ]:
        response = await client.request(method.upper(), url, headers={**auth(tenant.project_key), **extra})
        assert response.status_code == status, (method, extra)
        documented = operations[method]["responses"][str(status)]
        named = {name.lower() for name in documented.get("headers", {})}
        sent = {name.lower() for name in response.headers} - _GENERIC_HEADERS
        assert sent <= named, (method, status, sent - named)
        if status in {200, 206}:
            assert documented["content"]["application/octet-stream"]["schema"]["format"] == "binary"


async def test_if_range_resumes_only_the_same_payload(client: Client, tenant: Tenant) -> None:
    # RFC 9110 §13.1.5: a client resuming a download sends the ETag it has; a different one means its bytes are of
    # another payload, so it must get the whole payload (200), not a slice to append (206).
    payload = os.urandom(1000)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    url = f"/api/v1/backups/{backup['id']}/payload"
    etag = f'"{hashlib.sha256(payload).hexdigest()}"'
    for if_range, status in [
        (etag, 206),
        ('"another-payload"', 200),
        (f"W/{etag}", 200),  # If-Range compares strongly: a weak tag never matches
        ("Fri, 27 Nov 2026 11:00:00 GMT", 200),  # a date: the payload has no Last-Modified to match
    ]:
        headers = {**auth(tenant.project_key), "Range": "bytes=100-", "If-Range": if_range}
        response = await client.get(url, headers=headers)
        assert response.status_code == status, if_range
        assert response.content == (payload[100:] if status == 206 else payload), if_range


async def test_unsatisfiable_range_is_416(client: Client, tenant: Tenant) -> None:
    backup = await upload(client, tenant, sign_envelope(tenant, b"x" * 10))
    response = await client.get(
        f"/api/v1/backups/{backup['id']}/payload", headers={**auth(tenant.project_key), "Range": "bytes=10-"}
    )
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */10"
    problem(response)


async def test_multiple_ranges_are_served_whole(client: Client, tenant: Tenant) -> None:
    payload = os.urandom(50)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    response = await client.get(
        f"/api/v1/backups/{backup['id']}/payload", headers={**auth(tenant.project_key), "Range": "bytes=0-1,5-6"}
    )
    assert response.status_code == 200
    assert response.content == payload


@POSTGRES_ONLY  # a tampered `backup_chunks.data`; a tampered S3 object: test_backups_s3_store.py
async def test_tampered_chunk_aborts_the_restore(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(2 * MIB)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    await owner_connection.execute(
        "UPDATE backup_chunks SET data = overlay(data placing '\\x00'::bytea from 40 for 1) WHERE seq = 1"
    )
    response = await client.get(f"/api/v1/backups/{backup['id']}/payload", headers=auth(tenant.project_key))
    # The body ends short of its Content-Length, where the damage starts; a server then closes the connection and
    # the client sees a cut response (through granian: `test_backups_live_server`).
    assert response.status_code == 200
    assert 0 < len(response.content) < int(response.headers["content-length"])
    assert response.content == payload[: len(response.content)], "bytes of the damaged chunk were sent"


_LOSE_THE_LAST_CHUNK_ROW = (
    "DELETE FROM backup_chunks WHERE payload_id = $1"
    " AND seq = (SELECT max(seq) FROM backup_chunks WHERE payload_id = $1)"
)
_LOSE_A_MIDDLE_CHUNK_ROW = "DELETE FROM backup_chunks WHERE payload_id = $1 AND seq = 1"


@pytest.mark.parametrize("lose", [_LOSE_THE_LAST_CHUNK_ROW, _LOSE_A_MIDDLE_CHUNK_ROW], ids=["last", "middle"])
async def test_a_payload_that_lost_a_chunk_row_is_refused_before_any_byte(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, lose: str
) -> None:
    # The response would promise `Content-Length` bytes the server no longer has: a whole restore sent 1 MiB less
    # and cut the connection, a range in the lost tail a clean-looking empty 206 (a reviewer's finding). Refused
    # with a 500 problem instead, whatever the range, as a tampered chunk is.
    payload = os.urandom(9 * MIB + 100)  # several chunks in either store
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    payload_id = await owner_connection.fetchval(
        "SELECT payload_id FROM backups WHERE id = $1", uuid.UUID(backup["id"])
    )
    await owner_connection.execute(lose, payload_id)
    url = f"/api/v1/backups/{backup['id']}/payload"
    for extra in ({}, {"Range": "bytes=-50"}, {"Range": "bytes=0-0"}):
        response = await client.get(url, headers={**auth(tenant.project_key), **extra})
        assert response.status_code == 500, (extra, response.status_code)
        assert "cannot be restored" in problem(response)["detail"]


async def test_a_chunk_row_whose_size_is_not_its_chunks_stops_the_restore(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # The rows still tile the payload, but the last two sizes are swapped: the chunk decrypts (it is authentic) to
    # another length than its row says, and slicing it by the row would send wrong bytes.
    payload = os.urandom(9 * MIB + 100)
    backup = await upload(client, tenant, sign_envelope(tenant, payload))
    payload_id = await owner_connection.fetchval(
        "SELECT payload_id FROM backups WHERE id = $1", uuid.UUID(backup["id"])
    )
    rows = await owner_connection.fetch(
        "SELECT seq, byte_offset, plain_size FROM backup_chunks WHERE payload_id = $1 ORDER BY seq", payload_id
    )
    before_last, last = rows[-2], rows[-1]
    async with owner_connection.transaction():
        await owner_connection.execute(
            "UPDATE backup_chunks SET plain_size = $3 WHERE payload_id = $1 AND seq = $2",
            payload_id, before_last["seq"], last["plain_size"],
        )  # fmt: skip
        await owner_connection.execute(
            "UPDATE backup_chunks SET plain_size = $3, byte_offset = $4 WHERE payload_id = $1 AND seq = $2",
            payload_id, last["seq"], before_last["plain_size"], before_last["byte_offset"] + last["plain_size"],
        )  # fmt: skip
    url = f"/api/v1/backups/{backup['id']}/payload"
    at_the_damage = {"Range": f"bytes={before_last['byte_offset']}-{before_last['byte_offset'] + 9}"}
    response = await client.get(url, headers={**auth(tenant.project_key), **at_the_damage})
    assert response.status_code == 500
    assert "cannot be restored" in problem(response)["detail"]
    whole = await client.get(url, headers=auth(tenant.project_key))  # cut short of its Content-Length
    assert whole.status_code == 200
    assert len(whole.content) == before_last["byte_offset"], "the body did not end where the damage starts"
    assert int(whole.headers["content-length"]) == len(payload)


async def test_list_is_newest_first_with_filters_and_keyset_cursor(client: Client, tenant: Tenant) -> None:
    container = uuid.uuid4()
    ids = []
    for index in range(5):
        device = tenant.devices[index % 2]
        envelope = sign_envelope(tenant, os.urandom(10), container_id=container if index < 4 else None, device=device)
        ids.append((await upload(client, tenant, envelope))["id"])
    listed = await client.get("/api/v1/backups", params={"limit": 2}, headers=auth(tenant.project_key))
    assert listed.status_code == 200
    page = listed.json()
    seen = [item["id"] for item in page["items"]]
    while page["next_cursor"]:
        page = (
            await client.get(
                "/api/v1/backups", params={"limit": 2, "cursor": page["next_cursor"]}, headers=auth(tenant.project_key)
            )
        ).json()
        seen += [item["id"] for item in page["items"]]
    assert seen == list(reversed(ids))
    in_container = (
        await client.get("/api/v1/backups", params={"container_id": str(container)}, headers=auth(tenant.project_key))
    ).json()
    assert [item["id"] for item in in_container["items"]] == list(reversed(ids[:4]))
    # A cursor resumes only the listing that made it: passed back with other filters, it continued from its position
    # in another list (the rows before it there silently skipped); now it is the cursor's 400.
    filtered = {"container_id": str(container), "limit": "2"}
    first = (await client.get("/api/v1/backups", params=filtered, headers=auth(tenant.project_key))).json()
    device_filter = {"device_id_hash": tenant.devices[0].device_id_hash.hex()}
    others: list[dict[str, str]] = [{}, {"container_id": str(uuid.uuid4())}, device_filter, filtered | device_filter]
    for other in others:
        reused = await client.get(
            "/api/v1/backups", params={**other, "cursor": first["next_cursor"]}, headers=auth(tenant.project_key)
        )
        assert reused.status_code == 400, other
        assert [e["key"] for e in problem(reused)["errors"]] == ["cursor"]
    resumed = await client.get(
        "/api/v1/backups", params={**filtered, "cursor": first["next_cursor"]}, headers=auth(tenant.project_key)
    )
    assert [item["id"] for item in resumed.json()["items"]] == [ids[1], ids[0]]
    assert in_container["next_cursor"] is None
    for device_id_hash in (tenant.devices[1].device_id_hash.hex(), tenant.devices[1].device_id_hash.hex().upper()):
        by_device = (
            await client.get(
                "/api/v1/backups", params={"device_id_hash": device_id_hash}, headers=auth(tenant.project_key)
            )
        ).json()
        assert [item["id"] for item in by_device["items"]] == [ids[3], ids[1]], device_id_hash
    latest = await client.get(f"/api/v1/containers/{container}/backups/latest", headers=auth(tenant.project_key))
    assert latest.status_code == 200
    assert latest.json()["id"] == ids[3]


async def test_list_refuses_bad_limit_and_cursor(client: Client, tenant: Tenant) -> None:
    too_many = await client.get("/api/v1/backups", params={"limit": 101}, headers=auth(tenant.project_key))
    assert too_many.status_code == 400
    problem(too_many)
    # Garbage, and a well-formed cursor whose instant leaves the representable range once in UTC (500 before).
    out_of_range = base64.urlsafe_b64encode(f"0001-01-01T00:00:00+14:00|{uuid.uuid4()}".encode()).decode()
    for cursor in ("!!!", out_of_range):
        bad_cursor = await client.get("/api/v1/backups", params={"cursor": cursor}, headers=auth(tenant.project_key))
        assert bad_cursor.status_code == 400, cursor
        assert "not a cursor returned by this endpoint" in problem(bad_cursor)["detail"]
        trash = await client.get(
            f"/api/v1/projects/{tenant.project_id}/trash", params={"cursor": cursor}, headers=auth(tenant.admin_key)
        )
        assert trash.status_code == 400, cursor
        problem(trash)
    # A malformed device filter is a bad query parameter like the others (it was a 422 without `errors`).
    for device_filter in ("xyz", "ab" * 31, "g" * 64):
        bad_filter = await client.get(
            "/api/v1/backups", params={"device_id_hash": device_filter}, headers=auth(tenant.project_key)
        )
        assert bad_filter.status_code == 400, device_filter
        assert [e["key"] for e in problem(bad_filter)["errors"]] == ["device_id_hash"]
    upper = await client.get("/api/v1/backups", params={"device_id_hash": "AB" * 32}, headers=auth(tenant.project_key))
    assert upper.status_code == 200


async def test_latest_of_empty_container_is_404(client: Client, tenant: Tenant) -> None:
    response = await client.get(f"/api/v1/containers/{uuid.uuid4()}/backups/latest", headers=auth(tenant.project_key))
    assert response.status_code == 404
    problem(response)


async def test_delete_moves_to_the_trash_and_an_admin_purge_removes_backup_and_chunks(
    client: Client, settings: Settings, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    chunk = store_chunk_size(settings)
    keep = await upload(client, tenant, sign_envelope(tenant, os.urandom(chunk + 1)))
    gone = await upload(client, tenant, sign_envelope(tenant, os.urandom(2 * chunk + 1)))  # 3 chunks
    before = await row_counts(owner_connection)
    response = await client.delete(f"/api/v1/backups/{gone['id']}", headers=auth(tenant.project_key))
    assert response.status_code == 204
    assert await row_counts(owner_connection) == before  # in the trash: hidden, not deleted
    assert (await client.get(f"/api/v1/backups/{gone['id']}", headers=auth(tenant.project_key))).status_code == 404
    again = await client.delete(f"/api/v1/backups/{gone['id']}", headers=auth(tenant.project_key))
    assert again.status_code == 404
    problem(again)
    purged = await client.delete(
        f"/api/v1/backups/{gone['id']}", params={"purge": "true"}, headers=auth(tenant.admin_key)
    )
    assert purged.status_code == 204
    after = await row_counts(owner_connection)
    assert after["backups"] == before["backups"] - 1
    assert after["payloads"] == before["payloads"] - 1
    assert after["backup_chunks"] == before["backup_chunks"] - 3
    assert after["payload_nonces"] == before["payload_nonces"]  # nonces outlive their backups
    kept = await client.get(f"/api/v1/backups/{keep['id']}/payload", headers=auth(tenant.project_key))
    assert kept.status_code == 200


async def test_device_token_sees_only_its_own_device(client: Client, tenant: Tenant) -> None:
    mine = await upload(client, tenant, sign_envelope(tenant, b"mine", device=tenant.devices[0]))
    theirs = await upload(client, tenant, sign_envelope(tenant, b"theirs", device=tenant.devices[1]))
    token = await device_token(client, tenant, tenant.devices[0])
    listed = (await client.get("/api/v1/backups", headers=auth(token))).json()
    assert [item["id"] for item in listed["items"]] == [mine["id"]]
    for path in (f"/api/v1/backups/{theirs['id']}", f"/api/v1/backups/{theirs['id']}/payload"):
        response = await client.get(path, headers=auth(token))
        assert response.status_code == 404
        problem(response)
    refused = await client.delete(f"/api/v1/backups/{theirs['id']}", headers=auth(token))
    assert refused.status_code == 404
    assert (await client.get(f"/api/v1/backups/{mine['id']}/payload", headers=auth(token))).content == b"mine"
    project_view = (await client.get("/api/v1/backups", headers=auth(tenant.project_key))).json()
    assert {item["id"] for item in project_view["items"]} == {mine["id"], theirs["id"]}


async def test_other_project_and_other_org_ids_are_404(client: Client, tenant: Tenant, settings: Settings) -> None:
    backup = await upload(client, tenant, sign_envelope(tenant, b"secret"))
    stranger = await make_tenant(client, settings, name="other-org")
    second_project = await client.post("/api/v1/projects", json={"name": "second"}, headers=auth(tenant.admin_key))
    key = await client.post(
        f"/api/v1/projects/{second_project.json()['id']}/api-keys", json={"name": "k"}, headers=auth(tenant.admin_key)
    )
    for credential in (stranger.project_key, key.json()["key"]):
        for path in (f"/api/v1/backups/{backup['id']}", f"/api/v1/backups/{backup['id']}/payload"):
            response = await client.get(path, headers=auth(credential))
            assert response.status_code == 404
            problem(response)
        response = await client.delete(f"/api/v1/backups/{backup['id']}", headers=auth(credential))
        assert response.status_code == 404
        assert (await client.get("/api/v1/backups", headers=auth(credential))).json()["items"] == []
    assert (await client.get(f"/api/v1/backups/{backup['id']}", headers=auth(tenant.project_key))).status_code == 200
