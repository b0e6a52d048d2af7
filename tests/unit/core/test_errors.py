"""Problem details for errors raised below the domains: repository errors and body validation."""

from __future__ import annotations

import msgspec
from advanced_alchemy.exceptions import DuplicateKeyError, NotFoundError, RepositoryError
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


@post("/things")
async def create(data: JSONBody[Body]) -> Body:
    return data


def _client() -> TestClient[Litestar]:
    return TestClient(Litestar([missing, duplicate, broken, create], exception_handlers=exception_handlers()))


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
