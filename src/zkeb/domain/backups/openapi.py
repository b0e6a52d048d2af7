"""The backups domain's part of the OpenAPI document: what Litestar cannot infer from its handlers.

Registered in `Runtime.openapi_additions` by the domain's plugin; `zkeb.core.openapi` runs it after its generic
completion (problem responses, security, descriptions):
- the tus request and response headers on `/api/v1/uploads*` (whose 2xx responses have no body), their extra
  statuses (409, 410, 412, 413, 415, 460, 507), and the discovery `OPTIONS` operation (204, no body);
- the raw-body envelope of `POST /api/v1/backups` (JSON or msgpack) with the test-vector envelope of
  docs/protocol.md as its example, the restore's 206/304/416, and the payload's media type on its `HEAD`;
- the members the domain's problems add (`field`, `backup_id`, `reason`), and its tags;
- the links from each created or listed backup, tus upload and project to the operations that take its id.
"""

from __future__ import annotations

import copy
from typing import Any

from zkeb.core.openapi import PROBLEM_REF, Link, add_links, problem_response
from zkeb.domain.backups.envelope import ENVELOPE_FIELD_EXAMPLES, envelope_schema
from zkeb.domain.backups.schemas import MSGPACK_MEDIA_TYPES

__all__ = ("ENVELOPE_EXAMPLE", "ENVELOPE_SCHEMA", "add_backups_openapi")

_PROBLEM_MEMBERS: dict[str, Any] = {
    "field": {"type": "string", "description": "The envelope field at fault (422, and 409 for `payload_nonce`)."},
    "backup_id": {
        "type": "string",
        "format": "uuid",
        "description": "409 for a reused nonce: the backup this very envelope was committed as, when it was.",
    },
    "reason": {"type": "string", "description": "Why a 403 refused (e.g. `append_only`)."},
}
_TAGS = [
    {"name": "backups", "description": "Single-shot uploads, listing, restore and deletion."},
    {"name": "uploads (tus)", "description": "tus 1.0.0 resumable uploads."},
]
#: Statuses every upload (single-shot or tus) can answer beside the generic ones.
_UPLOAD_PROBLEMS = {
    "409": "Conflict: a duplicate backup, a reused payload nonce, or a tus offset that is not the server's.",
    "413": "Body or `Upload-Length` over the limit; sent before the body is read when the length is declared.",
    "415": "Unsupported `Content-Type`.",
}

#: Operations that answer a backup as JSON or msgpack by `Accept` (406 when it refuses both), and their success status.
_NEGOTIATED = {
    ("post", "/api/v1/backups"): "201",
    ("get", "/api/v1/backups/{backup_id}"): "200",
    ("post", "/api/v1/backups/{backup_id}/restore"): "200",
    ("get", "/api/v1/containers/{container_id}/backups/latest"): "200",
}
_MSGPACK_BACKUP = {
    "schema": {
        "type": "object",
        "description": "The same members as the JSON representation, as a msgpack map; bytes (`device_id_hash` "
        "included) are msgpack `bin`.",
    }
}
_NOT_ACCEPTABLE = "`Accept` refuses both representations (`application/json` and `application/msgpack`)."
_STALLED_BODY = (
    "The request body made no progress for `BODY_IDLE_TIMEOUT` seconds; the connection is closed (a tus upload "
    "keeps what it stored: resume at `Upload-Offset`)."
)

_TUS_RESUMABLE = {
    "name": "Tus-Resumable",
    "in": "header",
    "required": True,
    "description": "Must be `1.0.0` (else 412).",
    "schema": {"type": "string", "enum": ["1.0.0"]},
}


def _header(name: str, description: str, schema_type: str = "string", *, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": {"type": schema_type},
    }


_TUS_REQUEST_HEADERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("post", "/api/v1/uploads"): [
        _TUS_RESUMABLE,
        _header("Upload-Length", "Payload size in bytes (≤ `MAX_UPLOAD_SIZE`, else 413).", "integer", required=True),
        _header(
            "Upload-Metadata",
            "Every envelope field but `payload`, as `key base64value` pairs separated by commas; text fields are "
            "base64 of their UTF-8, bytes fields base64 of either their raw bytes or their JSON text (standard "
            "base64, `device_id_hash` hex), the base64 ones all in one form (docs/protocol.md §3.2 has the rule).",
            required=True,
        ),
        _header("Content-Type", "`application/offset+octet-stream` when the body carries the first bytes."),
        _header("Upload-Checksum", "`sha256 <base64>` or `sha1 <base64>` of this request's body (460 on mismatch)."),
    ],
    ("patch", "/api/v1/uploads/{upload_id}"): [
        _TUS_RESUMABLE,
        _header("Content-Type", "Must be `application/offset+octet-stream` (else 415).", required=True),
        _header(
            "Upload-Offset",
            "The offset this chunk starts at; must equal the server's (else 409).",
            "integer",
            required=True,
        ),
        _header("Upload-Checksum", "`sha256 <base64>` or `sha1 <base64>` of this chunk (460 on mismatch)."),
    ],
    ("head", "/api/v1/uploads/{upload_id}"): [_TUS_RESUMABLE],
    ("delete", "/api/v1/uploads/{upload_id}"): [_TUS_RESUMABLE],
}
_TUS_RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "Tus-Resumable": {"description": "`1.0.0`.", "schema": {"type": "string"}},
    "Upload-Offset": {"description": "Bytes stored so far.", "schema": {"type": "integer"}},
    "Upload-Length": {"description": "Declared payload size.", "schema": {"type": "integer"}},
    "Upload-Expires": {"description": "RFC 9110 date after which the upload is purged.", "schema": {"type": "string"}},
    "Location": {"description": "The new upload's URL.", "schema": {"type": "string"}},
    "Cache-Control": {"description": "`no-store`.", "schema": {"type": "string"}},
    "Zkeb-Backup-Id": {
        "description": "On the request that completes the upload: the committed backup's id.",
        "schema": {"type": "string", "format": "uuid"},
    },
}
#: The headers each tus operation's success carries (a creation's `Upload-Offset` and `Zkeb-Backup-Id` when it came
#: with a body; a PATCH's `Zkeb-Backup-Id` when it completed the upload, which then has no `Upload-Expires`).
_TUS_SUCCESS_HEADERS: dict[str, tuple[str, ...]] = {
    "post": ("Tus-Resumable", "Location", "Upload-Offset", "Upload-Expires", "Zkeb-Backup-Id"),
    "head": ("Tus-Resumable", "Upload-Offset", "Upload-Length", "Upload-Expires", "Cache-Control"),
    "patch": ("Tus-Resumable", "Upload-Offset", "Upload-Expires", "Zkeb-Backup-Id"),
    "delete": ("Tus-Resumable",),
}
#: What a restore's request may carry (docs/protocol.md §6.4): conditions and one byte range.
_IF_NONE_MATCH = _header("If-None-Match", "The payload's `ETag` (or `*`): 304 without a body when it matches.")
_IF_MATCH = _header(
    "If-Match", "The `ETag` (or `*`) the client expects: 412 when it names another payload (strong comparison)."
)
_PAYLOAD_REQUEST_HEADERS = {
    "get": [
        _header(
            "Range",
            "One range, `bytes=first-last`, `bytes=first-` or `bytes=-suffix`: 206 with that slice (the end clamped "
            "to the last byte), 416 when it selects no byte. Several ranges, another unit or a malformed value: 200 "
            "with the whole payload.",
        ),
        _header(
            "If-Range",
            "The `ETag` of the copy being resumed, beside `Range`: the range is honoured only while the payload is "
            "that one; another ETag or an HTTP date gets the whole payload (200).",
        ),
        _IF_MATCH,
        _IF_NONE_MATCH,
    ],
    "head": [_IF_MATCH, _IF_NONE_MATCH],
}
_ETAG = {"description": '`"<payload_sha256 hex>"`, a strong validator.', "schema": {"type": "string"}}
#: The headers every download answer (GET or HEAD, 200 or 206) carries.
_PAYLOAD_RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "ETag": _ETAG,
    "Repr-Digest": {
        "description": "`sha-256=:<base64 of the payload's SHA-256>:` (RFC 9530).",
        "schema": {"type": "string"},
    },
    "Accept-Ranges": {"description": "`bytes`.", "schema": {"type": "string"}},
    "Cache-Control": {"description": "`no-store`.", "schema": {"type": "string"}},
    "Content-Disposition": {"description": '`attachment; filename="<backup id>.bin"`.', "schema": {"type": "string"}},
    "Content-Length": {
        "description": "The length of the body (on `HEAD`, the payload's size).",
        "schema": {"type": "integer"},
    },
}
_CONTENT_RANGE = {"description": "`bytes first-last/size`.", "schema": {"type": "string"}}
_UNSATISFIABLE_RANGE = {"description": "`bytes */size`.", "schema": {"type": "string"}}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}

_TUS_DISCOVERY = {
    "tags": ["uploads (tus)"],
    "summary": "tus discovery",
    "description": "The server's tus capabilities. Needs no credential.",
    "security": [],
    "responses": {
        "204": {
            "description": "Capabilities.",
            "headers": {
                "Tus-Version": {"description": "`1.0.0`.", "schema": {"type": "string"}},
                "Tus-Extension": {
                    "description": "`creation,creation-with-upload,termination,checksum,expiration`.",
                    "schema": {"type": "string"},
                },
                "Tus-Max-Size": {"description": "`MAX_UPLOAD_SIZE` in bytes.", "schema": {"type": "integer"}},
                "Tus-Checksum-Algorithm": {"description": "`sha1,sha256`.", "schema": {"type": "string"}},
            },
        }
    },
}

#: The envelope of docs/protocol.md's test vectors (§9), as a `POST /api/v1/backups` JSON body.
ENVELOPE_EXAMPLE: dict[str, str] = {
    **ENVELOPE_FIELD_EXAMPLES,
    # pragma: allowlist nextline secret
    "payload": "WktFQiB0ZXN0IHZlY3RvcjogdGhpcyBzdGFuZHMgZm9yIEFFUy0yNTYtR0NNIGNpcGhlcnRleHQu",
}

ENVELOPE_SCHEMA: dict[str, Any] = envelope_schema(
    {"type": "string", "contentEncoding": "base64", "description": "AES-256-GCM ciphertext, 1 byte .. MAX_UPLOAD_SIZE."}
)


_BACKUP = "/api/v1/backups/{backup_id}"
_UPLOAD = "/api/v1/uploads/{upload_id}"
#: What uses a backup's id.
_BACKUP_USES = {
    "GetBackup": ("get", _BACKUP),
    "DownloadPayload": ("get", f"{_BACKUP}/payload"),
    "PayloadHeaders": ("head", f"{_BACKUP}/payload"),
    "RestoreBackup": ("post", f"{_BACKUP}/restore"),
    "DeleteBackup": ("delete", _BACKUP),
}
#: What uses a project's id here.
_PROJECT_USES = {
    "ProjectTrash": ("get", "/api/v1/projects/{project_id}/trash"),
    "ProjectUsage": ("get", "/api/v1/projects/{project_id}/usage"),
}
#: Where a backup's fields are in each response that names one (a runtime expression without the field's name).
_BACKUP_SOURCES = {
    ("post", "/api/v1/backups", "201"): "$response.body#/",
    ("get", "/api/v1/backups", "200"): "$response.body#/items/0/",
    ("get", "/api/v1/containers/{container_id}/backups/latest", "200"): "$response.body#/",
}


def _backups_links() -> list[Link]:
    """Links from each backup, upload and project a response names to the operations that take its id."""
    links: list[Link] = []
    for source, at in _BACKUP_SOURCES.items():
        links += [Link(name, source, target, {"backup_id": f"{at}id"}) for name, target in _BACKUP_USES.items()]
        links += [
            Link(name, source, target, {"project_id": f"{at}project_id"}) for name, target in _PROJECT_USES.items()
        ]
        links.append(
            Link(
                "LatestBackup",
                source,
                ("get", "/api/v1/containers/{container_id}/backups/latest"),
                {"container_id": f"{at}container_id"},
            )
        )
    # A deleted backup waits in the trash, where the org admin can restore it.
    links.append(
        Link(
            "RestoreBackup",
            ("delete", _BACKUP, "204"),
            _BACKUP_USES["RestoreBackup"],
            {"backup_id": "$request.path.backup_id"},
        )
    )
    links.append(
        Link(
            "RestoreBackup",
            ("get", "/api/v1/projects/{project_id}/trash", "200"),
            _BACKUP_USES["RestoreBackup"],
            {"backup_id": "$response.body#/items/0/id"},
        )
    )
    # The upload that completes answers with the committed backup's id in a header.
    links += [
        Link(name, ("patch", _UPLOAD, "204"), target, {"backup_id": "$response.header.Zkeb-Backup-Id"})
        for name, target in _BACKUP_USES.items()
    ]
    links += [
        Link(name, ("post", "/api/v1/projects", "201"), target, {"project_id": "$response.body#/id"})
        for name, target in _PROJECT_USES.items()
    ]
    # `Location` is the upload's path; the id is its last segment (schemathesis' `#regex:` extractor takes it).
    upload_id = "$response.header.Location#regex:/api/v1/uploads/([^/?]+)"
    for name, method in (("UploadOffset", "head"), ("Append", "patch"), ("Terminate", "delete")):
        links.append(
            Link(
                name,
                ("post", "/api/v1/uploads", "201"),
                (method, _UPLOAD),
                {"upload_id": upload_id},
                "The new upload, named by the last segment of its `Location`.",
            )
        )
    return links


def add_backups_openapi(document: dict[str, Any]) -> None:
    """Complete `document` (already generically completed) with the backups domain's part."""
    document["components"]["schemas"]["ProblemDetails"]["properties"].update(copy.deepcopy(_PROBLEM_MEMBERS))
    document["components"]["schemas"]["BackupEnvelope"] = copy.deepcopy(ENVELOPE_SCHEMA)
    document["tags"].extend(copy.deepcopy(_TAGS))
    paths = document.get("paths", {})
    for path, item in paths.items():
        if not path.startswith("/api/v1/uploads"):
            continue
        if path == "/api/v1/uploads":
            _document_discovery(item)
        for method, operation in item.items():
            if isinstance(operation, dict) and "responses" in operation and method != "options":
                _add_upload_problems(operation)
                _document_tus(operation, method, path)
    _document_payload(paths.get("/api/v1/backups/{backup_id}/payload", {}))
    _document_negotiation(paths)
    backups = paths.get("/api/v1/backups", {}).get("post")
    if isinstance(backups, dict):
        _add_upload_problems(backups)
        created = backups["responses"].get("201")
        if isinstance(created, dict):
            created.setdefault("headers", {})["Location"] = {
                "description": "`/api/v1/backups/{id}`, the new backup.",
                "schema": {"type": "string"},
            }
        backups["responses"].setdefault("408", problem_response("408", _STALLED_BODY))
        backups.setdefault(
            "requestBody",
            {
                "required": True,
                "description": "The whole envelope; body ≤ 16 MiB (use tus uploads for more).",
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/BackupEnvelope"},
                        "example": ENVELOPE_EXAMPLE,
                    },
                    "application/msgpack": {"schema": {"$ref": "#/components/schemas/BackupEnvelope"}},
                },
            },
        )
    add_links(document, _backups_links())


def _document_payload(item: dict[str, Any]) -> None:
    """The restore's conditions and range (GET), its validators and digest on every answer, its 206/304/416."""
    for method, operation in item.items():
        if method not in _PAYLOAD_REQUEST_HEADERS or not isinstance(operation, dict):
            continue
        parameters = operation.setdefault("parameters", [])
        parameters.extend(copy.deepcopy(_PAYLOAD_REQUEST_HEADERS[method]))
        responses = operation.setdefault("responses", {})
        # The ciphertext; on HEAD no body, but the `Content-Type` (and `Content-Length`) a GET would send.
        responses.setdefault("200", {"description": "The whole payload."})["content"] = copy.deepcopy(_BINARY)
        responses["200"]["headers"] = copy.deepcopy(_PAYLOAD_RESPONSE_HEADERS)
        responses["304"] = {
            "description": "`If-None-Match` matched the payload's `ETag`; no body.",
            "headers": {k: copy.deepcopy(v) for k, v in _PAYLOAD_RESPONSE_HEADERS.items() if k != "Content-Length"},
        }
        responses["412"] = problem_response("412", "`If-Match` names another payload; `ETag` is this one's.")
        responses["412"]["headers"] = {"ETag": copy.deepcopy(_ETAG)}
        if method == "get":
            responses["206"] = {
                "description": "The byte range asked for (`Range`); `Content-Range` names it.",
                "content": copy.deepcopy(_BINARY),
                "headers": copy.deepcopy(_PAYLOAD_RESPONSE_HEADERS) | {"Content-Range": copy.deepcopy(_CONTENT_RANGE)},
            }
            responses["416"] = problem_response("416", "The range selects no byte of the payload.")
            responses["416"]["headers"] = {"Content-Range": copy.deepcopy(_UNSATISFIABLE_RANGE)}


def _document_negotiation(paths: dict[str, Any]) -> None:
    """The msgpack representation and the 406 of the operations that answer a backup by `Accept`."""
    for (method, path), status in _NEGOTIATED.items():
        operation = paths.get(path, {}).get(method)
        if not isinstance(operation, dict):
            continue
        responses = operation.setdefault("responses", {})
        content = responses.get(status, {}).get("content")
        if isinstance(content, dict):
            for media_type in sorted(MSGPACK_MEDIA_TYPES):
                content.setdefault(media_type, copy.deepcopy(_MSGPACK_BACKUP))
        responses.setdefault("406", problem_response("406", _NOT_ACCEPTABLE))


def _document_discovery(item: dict[str, Any]) -> None:
    """The discovery `OPTIONS`: its 204 carries the capability headers and no body."""
    discovery = item.setdefault("options", {"responses": {}})
    discovery.update({key: copy.deepcopy(value) for key, value in _TUS_DISCOVERY.items() if key != "responses"})
    discovery.setdefault("responses", {}).update(copy.deepcopy(_TUS_DISCOVERY["responses"]))


#: What a tus 507 leaves behind (docs/protocol.md §6.3).
_TUS_QUOTA = {
    "post": (
        "`Upload-Length` does not fit the project's storage quota: nothing is created. On a creation with upload, "
        "a 507 for the storage itself (`Retry-After`) carries the upload's `Location`: it exists, resume it there."
    ),
    "patch": (
        "Over the project's storage quota (the completing PATCH, when concurrent uploads took the room) or the "
        "server's storage is full (`Retry-After`): the upload stays at the offset `HEAD` gives; make room and send "
        "the rest again."
    ),
}


def _quota_response(description: str) -> dict[str, Any]:
    """A 507: the quota's `used`, `quota` and `requested` (the `QuotaProblem` schema), or a full store's problem."""
    return {
        "description": description,
        "content": {
            "application/problem+json": {
                "schema": {"anyOf": [{"$ref": "#/components/schemas/QuotaProblem"}, {"$ref": PROBLEM_REF}]}
            }
        },
    }


def _add_upload_problems(operation: dict[str, Any]) -> None:
    responses = operation["responses"]
    for status, description in _UPLOAD_PROBLEMS.items():
        current = responses.get(status)
        if current is None or "application/problem+json" not in current.get("content", {}):
            responses[status] = problem_response(status, description)


def _document_tus(operation: dict[str, Any], method: str, path: str) -> None:
    parameters = operation.setdefault("parameters", [])
    present = {(p.get("in"), p.get("name", "").lower()) for p in parameters}
    for header in _TUS_REQUEST_HEADERS.get((method, path), []):
        if ("header", header["name"].lower()) not in present:
            parameters.append(header)
    if method == "patch":
        operation["requestBody"] = {
            "required": True,
            "content": {"application/offset+octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    responses = operation["responses"]
    if method in {"post", "patch"}:  # a creation with upload checks its body's `Upload-Checksum` too
        responses.setdefault("460", problem_response("460", "Checksum mismatch (tus checksum extension)."))
        responses.setdefault("408", problem_response("408", _STALLED_BODY))
        responses["507"] = _quota_response(_TUS_QUOTA[method])
    if method == "patch":
        responses["409"]["headers"] = {"Upload-Offset": copy.deepcopy(_TUS_RESPONSE_HEADERS["Upload-Offset"])}
    if method in {"head", "patch"}:
        responses.setdefault("410", problem_response("410", "The upload expired."))
    if method != "options":
        responses.setdefault("412", problem_response("412", "Unsupported or missing `Tus-Resumable`."))
        responses["412"]["headers"] = {"Tus-Version": {"description": "`1.0.0`.", "schema": {"type": "string"}}}
    for status, response in operation["responses"].items():
        if status.startswith("2"):
            response.pop("content", None)  # tus answers in headers; its 2xx responses have no body
            headers = response.setdefault("headers", {})
            for name in _TUS_SUCCESS_HEADERS.get(method, ("Tus-Resumable",)):
                headers.setdefault(name, _TUS_RESPONSE_HEADERS[name])
