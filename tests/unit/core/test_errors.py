"""Problem details for errors raised below the domains: repository errors, a full disk and body validation."""

from __future__ import annotations

import msgspec
from advanced_alchemy.exceptions import DuplicateKeyError, NotFoundError, RepositoryError
from asyncpg.exceptions import DiskFullError
from litestar import Litestar, get, post
from litestar.params import JSONBody
from litestar.testing import TestClient

from zkeb.core.errors import exception_handlers

from support import problem


class Body(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    size: int


@get("/missing")
async def missing() -> None:
    raise NotFoundError("SELECT * FROM secret_table WHERE id = 42")


@get("/duplicate")
async def duplicate() -> None:
    raise DuplicateKeyError("duplicate key value violates unique constraint uq_other_tenant")


@get("/broken")
async def broken() -> None:
    raise RepositoryError("connection details")


@get("/disk-full")
async def disk_full() -> None:
    try:
        raise DiskFullError('could not extend file "base/5/16384": No space left on device')
    except DiskFullError as exc:
        raise RuntimeError("the chunk writer stopped") from exc


@post("/things")
async def create(data: JSONBody[Body]) -> Body:
    return data


def _client() -> TestClient[Litestar]:
    handlers = [missing, duplicate, broken, disk_full, create]
    return TestClient(Litestar(handlers, exception_handlers=exception_handlers()))


def test_repository_errors_become_404_and_409_without_sql() -> None:
    with _client() as client:
        not_found = client.get("/missing")
        conflict = client.get("/duplicate")
        other = client.get("/broken")
    assert not_found.status_code == 404
    assert "secret_table" not in not_found.text
    assert problem(not_found)["detail"] == "not found"
    assert conflict.status_code == 409
    assert "uq_other_tenant" not in conflict.text
    problem(conflict)
    assert other.status_code == 500
    assert "connection details" not in other.text


def test_postgresql_out_of_disk_anywhere_in_the_chain_is_507_with_retry_after_and_no_file_name() -> None:
    with _client() as client:
        response = client.get("/disk-full")
    assert response.status_code == 507
    assert response.headers["retry-after"] == "60"
    assert "storage is full" in problem(response)["detail"]
    assert "base/5" not in response.text


def test_invalid_body_fields_are_422_naming_each_field() -> None:
    with _client() as client:
        wrong_type = client.post("/things", json={"name": "a", "size": "big"})
        missing_field = client.post("/things", json={"name": "a"})
        unknown_field = client.post("/things", json={"name": "a", "size": 1, "extra": True})
        malformed = client.post("/things", content=b"{not json", headers={"Content-Type": "application/json"})
    for response, field in ((wrong_type, "size"), (missing_field, "size"), (unknown_field, "extra")):
        assert response.status_code == 422, response.text
        body = problem(response)
        assert field in {error.get("key") for error in body["errors"]}
    assert malformed.status_code == 400
    problem(malformed)
