"""The served OpenAPI document: valid OpenAPI 3.1, and complete enough for an integrator to build a client."""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from openapi_spec_validator import validate

from zkeb.domain.backups.openapi import ENVELOPE_EXAMPLE

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch")


async def _document(client: AsyncTestClient[Litestar]) -> dict[str, Any]:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in _METHODS
    ]


async def test_openapi_document_validates_and_the_uis_are_served(client: AsyncTestClient[Litestar]) -> None:
    document = await _document(client)
    validate(document)
    assert document["openapi"].startswith("3.1")
    for ui in ("/schema/scalar", "/schema/swagger"):
        assert (await client.get(ui)).status_code == 200


async def test_every_operation_is_described_tagged_secured_and_lists_its_problem_responses(
    client: AsyncTestClient[Litestar],
) -> None:
    document = await _document(client)
    schemes = document["components"]["securitySchemes"]
    for scheme in ("OrgAdminKey", "ProjectKey", "DeviceToken"):
        assert schemes[scheme]["scheme"] == "bearer", scheme
        assert schemes[scheme]["description"], scheme
    operations = _operations(document)
    assert len(operations) >= 25
    for method, path, operation in operations:
        where = f"{method.upper()} {path}"
        assert operation.get("summary"), where
        assert operation.get("description"), where
        assert operation.get("tags"), where
        assert "security" in operation, where
        for requirement in operation["security"]:
            assert set(requirement) <= set(schemes), where
        responses = operation["responses"]
        for status in ("400", "429", "500", "503"):
            assert "application/problem+json" in responses[status]["content"], where
        if operation["security"]:
            assert "application/problem+json" in responses["401"]["content"], where
        if "requestBody" in operation:
            assert "application/problem+json" in responses["415"]["content"], where
    public = {path for method, path, op in operations if not op["security"]}
    assert {"/api/health/live", "/api/version", "/api/v1/auth/token"} <= public
    assert "/api/v1/backups" not in public
    assert document["paths"]["/metrics"]["get"]["security"] == [{"MetricsToken": []}]


async def test_each_operation_names_the_credentials_its_guards_let_through(client: AsyncTestClient[Litestar]) -> None:
    # One `BearerAuth` scheme for every operation left integrators guessing which credential an operation takes.
    paths = (await _document(client))["paths"]

    def accepted(method: str, path: str) -> list[str]:
        return [scheme for requirement in paths[path][method]["security"] for scheme in requirement]

    admin, backups, anyone = (
        ["OrgAdminKey"],
        ["ProjectKey", "DeviceToken"],
        ["OrgAdminKey", "ProjectKey", "DeviceToken"],
    )
    assert accepted("post", "/api/v1/projects") == admin
    assert accepted("get", "/api/v1/audit-events") == admin
    assert accepted("post", "/api/v1/backups/{backup_id}/restore") == admin
    assert accepted("get", "/api/v1/backups") == backups
    assert accepted("patch", "/api/v1/uploads/{upload_id}") == backups
    assert accepted("get", "/api/v1/backups/{backup_id}/payload") == backups
    assert accepted("delete", "/api/v1/backups/{backup_id}") == anyone
    assert accepted("get", "/api/v1/projects/{project_id}") == anyone
    assert accepted("options", "/api/v1/uploads") == []


async def test_tus_operations_document_their_headers(client: AsyncTestClient[Litestar]) -> None:
    paths = (await _document(client))["paths"]
    create = paths["/api/v1/uploads"]["post"]
    patch = paths["/api/v1/uploads/{upload_id}"]["patch"]
    create_headers = {p["name"] for p in create["parameters"] if p["in"] == "header"}
    patch_headers = {p["name"] for p in patch["parameters"] if p["in"] == "header"}
    assert {"Tus-Resumable", "Upload-Length", "Upload-Metadata", "Upload-Checksum"} <= create_headers
    assert {"Tus-Resumable", "Upload-Offset", "Content-Type", "Upload-Checksum"} <= patch_headers
    assert "application/offset+octet-stream" in patch["requestBody"]["content"]
    assert {"460", "409", "410", "412", "507"} <= patch["responses"].keys()
    assert "507" in create["responses"]
    assert "410" in paths["/api/v1/uploads/{upload_id}"]["head"]["responses"]
    download = paths["/api/v1/backups/{backup_id}/payload"]["get"]["responses"]
    assert {"200", "206", "304", "416"} <= download.keys()
    assert "application/problem+json" in download["416"]["content"]
    assert "Zkeb-Backup-Id" in patch["responses"]["204"]["headers"]
    assert "Location" in create["responses"]["201"]["headers"]
    # What a client needs to recover: the offset on a 409, the version on a 412, the quota's figures on a 507.
    assert "Upload-Offset" in patch["responses"]["409"]["headers"]
    assert "Tus-Version" in patch["responses"]["412"]["headers"]
    for operation in (create, patch):
        schemas = operation["responses"]["507"]["content"]["application/problem+json"]["schema"]["anyOf"]
        assert {"$ref": "#/components/schemas/QuotaProblem"} in schemas
    assert "nothing is kept" not in patch["responses"]["507"]["description"]
    assert "Location" in paths["/api/v1/backups"]["post"]["responses"]["201"]["headers"]
    # Discovery is public, and its 204 carries the capabilities and no body (schemathesis found it promising JSON).
    discovery = paths["/api/v1/uploads"]["options"]
    assert discovery["security"] == []
    assert {"Tus-Version", "Tus-Extension", "Tus-Max-Size"} <= discovery["responses"]["204"]["headers"].keys()
    assert "Upload-Offset" not in discovery["responses"]["204"]["headers"]
    assert not {"409", "413", "415"} & discovery["responses"].keys()


async def test_no_204_or_304_response_promises_a_body(client: AsyncTestClient[Litestar]) -> None:
    document = await _document(client)
    without_body = [
        (method, path, status)
        for method, path, operation in _operations(document)
        for status, response in operation["responses"].items()
        if status in {"204", "304"}
    ]
    assert len(without_body) >= 4, without_body  # PATCH and DELETE of an upload, discovery, the restore's 304
    for method, path, status in without_body:
        assert "content" not in document["paths"][path][method]["responses"][status], (method, path, status)


async def test_the_payload_operations_and_the_upload_bodies_document_their_other_statuses(
    client: AsyncTestClient[Litestar],
) -> None:
    # A conditional HEAD answers 304 as its GET does; a request body that stalls is cut off with 408
    # (core/connection.py) on every operation that reads one.
    paths = (await _document(client))["paths"]
    assert "304" in paths["/api/v1/backups/{backup_id}/payload"]["head"]["responses"]
    for method, path in (
        ("post", "/api/v1/backups"),
        ("post", "/api/v1/uploads"),
        ("patch", "/api/v1/uploads/{upload_id}"),
    ):
        assert "application/problem+json" in paths[path][method]["responses"]["408"]["content"], (method, path)


async def test_each_domain_adds_its_own_tags_and_problem_members(client: AsyncTestClient[Litestar]) -> None:
    document = await _document(client)
    tags = [tag["name"] for tag in document["tags"]]
    assert len(tags) == len(set(tags))
    used = {tag for _, _, operation in _operations(document) for tag in operation.get("tags", [])}
    assert used <= set(tags), used - set(tags)
    members = document["components"]["schemas"]["ProblemDetails"]["properties"]
    assert {"request_id", "errors", "field", "backup_id", "reason"} <= members.keys()


async def test_single_shot_upload_documents_the_envelope_with_the_guide_example(
    client: AsyncTestClient[Litestar],
) -> None:
    document = await _document(client)
    body = document["paths"]["/api/v1/backups"]["post"]["requestBody"]["content"]
    assert body["application/json"]["example"] == ENVELOPE_EXAMPLE
    assert "application/msgpack" in body
    envelope = document["components"]["schemas"]["BackupEnvelope"]
    assert set(envelope["required"]) == set(ENVELOPE_EXAMPLE)


async def test_links_lead_from_each_created_resource_to_the_operations_that_take_its_id(
    client: AsyncTestClient[Litestar],
) -> None:
    document = await _document(client)
    by_id = {operation["operationId"]: (method, path, operation) for method, path, operation in _operations(document)}
    targets: dict[tuple[str, str, str], set[tuple[str, str]]] = {}
    for method, path, operation in _operations(document):
        for status, response in operation["responses"].items():
            for link in response.get("links", {}).values():
                target_method, target_path, target = by_id[link["operationId"]]
                declared = {
                    parameter["name"] for parameter in target.get("parameters", []) if parameter["in"] == "path"
                }
                assert set(link["parameters"]) <= declared, (method, path, link)
                assert all(value.startswith(("$response.", "$request.")) for value in link["parameters"].values())
                targets.setdefault((method, path, status), set()).add((target_method, target_path))
    assert targets[("post", "/api/v1/projects", "201")] >= {
        ("get", "/api/v1/projects/{project_id}"),
        ("patch", "/api/v1/projects/{project_id}"),
        ("post", "/api/v1/projects/{project_id}/api-keys"),
        ("post", "/api/v1/projects/{project_id}/devices"),
        ("get", "/api/v1/projects/{project_id}/usage"),
    }
    assert targets[("post", "/api/v1/projects/{project_id}/api-keys", "201")] == {
        ("delete", "/api/v1/api-keys/{key_id}")
    }
    assert targets[("post", "/api/v1/projects/{project_id}/devices", "201")] == {
        ("delete", "/api/v1/devices/{device_id}")
    }
    assert targets[("post", "/api/v1/backups", "201")] >= {
        ("get", "/api/v1/backups/{backup_id}"),
        ("get", "/api/v1/backups/{backup_id}/payload"),
        ("delete", "/api/v1/backups/{backup_id}"),
        ("post", "/api/v1/backups/{backup_id}/restore"),
        ("get", "/api/v1/containers/{container_id}/backups/latest"),
    }
    assert targets[("post", "/api/v1/uploads", "201")] == {
        ("head", "/api/v1/uploads/{upload_id}"),
        ("patch", "/api/v1/uploads/{upload_id}"),
        ("delete", "/api/v1/uploads/{upload_id}"),
    }


async def test_tus_successes_promise_no_body_and_a_payload_head_names_its_media_type(
    client: AsyncTestClient[Litestar],
) -> None:
    paths = (await _document(client))["paths"]
    for method, operation in paths["/api/v1/uploads/{upload_id}"].items():
        assert all("content" not in r for s, r in operation["responses"].items() if s.startswith("2")), method
    assert "content" not in paths["/api/v1/uploads"]["post"]["responses"]["201"]
    head = paths["/api/v1/backups/{backup_id}/payload"]["head"]["responses"]["200"]
    assert list(head["content"]) == ["application/octet-stream"]


async def test_account_request_bodies_document_what_the_server_enforces(client: AsyncTestClient[Litestar]) -> None:
    # Unknown fields are a 422; bounds of 0 and 2**63 - 1 are exact (Litestar drops the one, rounds the other).
    schemas = (await _document(client))["components"]["schemas"]
    for name in ("ProjectCreate", "ProjectUpdate", "ApiKeyCreate", "DeviceEnroll", "TokenRequest"):
        assert schemas[name]["additionalProperties"] is False, name
    update = schemas["ProjectUpdate"]["properties"]
    assert update["storage_quota_bytes"]["minimum"] == 0
    assert update["append_only_min_age_days"]["minimum"] == 0
    assert schemas["ProjectCreate"]["properties"]["storage_quota_bytes"]["minimum"] == 0
    timestamp = schemas["TokenRequest"]["properties"]["timestamp_ms"]
    assert (timestamp["minimum"], timestamp["maximum"]) == (0, 2**63 - 1)
    assert isinstance(timestamp["maximum"], int)
