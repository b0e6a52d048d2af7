"""The served OpenAPI document, completed with what Litestar cannot infer from the handlers.

Litestar builds the document from handler signatures; this render plugin (it serves `/schema/openapi.json`, which
Scalar and Swagger UI load) adds, once per process:
- the `ProblemDetails` schema and the problem+json error responses every operation can answer (401/429/503 and
  the rest), replacing Litestar's generic 400 (whose body is not what ZKEB sends);
- `security: []` on public operations (those the authentication middleware skips), bearer security elsewhere;
- the tus request and response headers on `/api/v1/uploads*`, and the discovery `OPTIONS` operation;
- the raw-body envelope of `POST /api/v1/backups` (JSON or msgpack) with the test-vector envelope of
  docs/protocol.md as its example;
- a description from the handler's docstring where an operation has none, and tag descriptions.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from litestar import Litestar, Request
from litestar.middleware import AbstractAuthenticationMiddleware, DefineMiddleware
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.routes import HTTPRoute

__all__ = ("ZkebOpenAPIJson", "complete_openapi")

_PROBLEM_REF = "#/components/schemas/ProblemDetails"
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details. Extra members (e.g. `errors`, `used`, `quota`) depend on the error.",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "description": "`about:blank` unless stated otherwise."},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string", "description": "The request path."},
        "request_id": {"type": "string", "description": "Also in the `X-Request-Id` header; quote it in reports."},
        "trace_id": {"type": "string", "description": "The W3C trace id (also in the `traceresponse` header)."},
        "errors": {"description": "Which fields were invalid, for 400 and 422."},
        "field": {"type": "string", "description": "The envelope field at fault (422, and 409 for `payload_nonce`)."},
        "backup_id": {
            "type": "string",
            "format": "uuid",
            "description": "409 for a reused nonce: the backup this very envelope was committed as, when it was.",
        },
        "reason": {"type": "string", "description": "Why a 403 refused (e.g. `append_only`)."},
    },
    "additionalProperties": True,
}

_PROBLEMS: dict[str, str] = {
    "400": "Malformed request (bad JSON, header or parameter).",
    "401": "No credential, or an invalid, expired or revoked one.",
    "404": "Unknown, or belonging to another tenant (never 403).",
    "409": "Conflict: duplicate, reused payload nonce, or tus offset mismatch.",
    "413": "Body or `Upload-Length` over the limit; sent before the body is read when the length is declared.",
    "415": "Unsupported `Content-Type`.",
    "422": "Valid syntax, invalid content (a field, or a signature that does not verify).",
    "429": "Rate limited; retry after `Retry-After` seconds.",
    "500": "Unexpected error; the body carries only the request id.",
    "503": "A dependency (database, Redis) is unavailable; retry later.",
}
_RATE_LIMIT_HEADERS = {
    "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}},
    "RateLimit": {"description": "IETF draft RateLimit header.", "schema": {"type": "string"}},
    "RateLimit-Policy": {"description": "IETF draft RateLimit-Policy header.", "schema": {"type": "string"}},
}
_SECURED = ("400", "401", "404", "422", "429", "500", "503")
_PUBLIC = ("400", "429", "500", "503")
_UPLOAD_EXTRA = ("409", "413", "415")

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
    "Zkeb-Backup-Id": {
        "description": "On the request that completes the upload: the committed backup's id.",
        "schema": {"type": "string", "format": "uuid"},
    },
}
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
    "container_id": "0192f5e4-7a3b-7c1d-9e2f-000000000001",
    "device_id_hash": "9224d0c18f375c8c8f6b3bdce41f18fe7b3b85281dfac188de41154dfcd42260",
    # pragma: allowlist nextline secret
    "payload": "WktFQiB0ZXN0IHZlY3RvcjogdGhpcyBzdGFuZHMgZm9yIEFFUy0yNTYtR0NNIGNpcGhlcnRleHQu",
    "payload_nonce": "AAECAwQFBgcICQoL",
    "payload_auth_tag": "EBESExQVFhcYGRobHB0eHw==",
    "metadata": "ZW5jcnlwdGVkIG1ldGFkYXRhIGV4YW1wbGU=",
    "metadata_nonce": "ICEiIyQlJicoKSor",
    "metadata_auth_tag": "MDEyMzQ1Njc4OTo7PD0+Pw==",
    # pragma: allowlist nextline secret
    "signature": "TJV5q0++8aGSn7Plf1jGJ+mGNTCuh9PJD+s4bUoR3+opg0SU7nH3qzlmgkY7RModDdS3o1xecepA8cO7OExeAw==",
    "backup_timestamp": "2026-11-27T10:00:00.123456Z",
}


def _b64(description: str) -> dict[str, Any]:
    return {"type": "string", "contentEncoding": "base64", "description": description}


ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "A backup envelope (docs/protocol.md §2). In msgpack, bytes fields are `bin`; `device_id_hash` 32 bytes."
    ),
    "required": list(ENVELOPE_EXAMPLE),
    "properties": {
        "container_id": {"type": "string", "format": "uuid"},
        "device_id_hash": {
            "type": "string",
            "pattern": "^[0-9a-f]{64}$",
            "description": "SHA-256 of the device id, hex.",
        },
        "payload": _b64("AES-256-GCM ciphertext, 1 byte .. MAX_UPLOAD_SIZE."),
        "payload_nonce": _b64("12 bytes."),
        "payload_auth_tag": _b64("16 bytes."),
        "metadata": _b64("Encrypted metadata, ≤ 8 KiB."),
        "metadata_nonce": _b64("12 bytes."),
        "metadata_auth_tag": _b64("16 bytes."),
        "signature": _b64("64-byte Ed25519 signature of the signed message (docs/protocol.md §4)."),
        "backup_timestamp": {"type": "string", "format": "date-time", "description": "RFC 3339 UTC."},
    },
}

_TAGS = [
    {"name": "health", "description": "Liveness, readiness, dependency probes and version; no credential."},
    {"name": "auth", "description": "Device tokens from a proof of possession."},
    {"name": "projects", "description": "Projects, their API keys and devices (org admin)."},
    {"name": "api keys", "description": "Revoking API keys (org admin)."},
    {"name": "devices", "description": "Revoking devices (org admin)."},
    {"name": "backups", "description": "Single-shot uploads, listing, restore and deletion."},
    {"name": "uploads (tus)", "description": "tus 1.0.0 resumable uploads."},
    {"name": "audit", "description": "The hash-chained audit log (org admin)."},
    {"name": "observability", "description": "Prometheus metrics."},
]


def _problem_response(status: str, description: str | None = None) -> dict[str, Any]:
    description = description or _PROBLEMS[status]
    response: dict[str, Any] = {
        "description": description,
        "content": {
            "application/problem+json": {
                "schema": {"$ref": _PROBLEM_REF},
                "example": {
                    "type": "about:blank",
                    "title": "Not Found" if status == "404" else "Error",
                    "status": int(status),
                    "detail": description,
                    "instance": "/api/v1/backups/0192f5e4-7a3b-7c1d-9e2f-000000000002",
                    "request_id": "4f9c2b7de0a14c0c9e1b5f3a2d6c7e81",
                    "trace_id": "0af7651916cd43dd8448eb211c80319c",
                },
            }
        },
    }
    if status == "429":
        response["headers"] = _RATE_LIMIT_HEADERS
    return response


def _public_patterns(app: Litestar) -> list[re.Pattern[str]]:
    patterns: list[re.Pattern[str]] = []
    for middleware in app.middleware:
        if (
            isinstance(middleware, DefineMiddleware)
            and isinstance(middleware.middleware, type)
            and issubclass(middleware.middleware, AbstractAuthenticationMiddleware)
        ):
            exclude = middleware.kwargs.get("exclude") or []
            patterns.extend(re.compile(p) for p in ([exclude] if isinstance(exclude, str) else exclude))
    return patterns


def _handlers(app: Litestar) -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            for handler in route.route_handlers:
                for method in handler.http_methods:
                    found[(method.lower(), route.path_format)] = handler
    return found


def _problem_statuses(method: str, path: str, operation: dict[str, Any], *, public: bool) -> list[str]:
    """The problem+json statuses an operation can answer."""
    statuses = list(_PUBLIC if public else _SECURED)
    if path.startswith("/api/v1/uploads") or (path == "/api/v1/backups" and method == "post"):
        statuses.extend(_UPLOAD_EXTRA)
    elif "requestBody" in operation:  # a JSON body declared as another content type
        statuses.append("415")
    return statuses


def complete_openapi(schema: dict[str, Any], app: Litestar) -> dict[str, Any]:
    """A copy of Litestar's `schema` completed as the module docstring describes."""
    document = copy.deepcopy(schema)
    components = document.setdefault("components", {})
    components.setdefault("schemas", {})["ProblemDetails"] = PROBLEM_SCHEMA
    components["schemas"]["BackupEnvelope"] = ENVELOPE_SCHEMA
    document["tags"] = _TAGS
    public = _public_patterns(app)
    handlers = _handlers(app)
    for path, item in document.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if not isinstance(operation, dict):
                continue
            handler = handlers.get((method, path))
            opt = getattr(handler, "opt", {}) or {}
            is_public = (
                bool(opt.get("exclude_from_auth")) or any(p.search(path) for p in public)
            ) and not operation.get("security")
            if is_public:
                operation["security"] = []
            if not operation.get("description") and handler is not None and getattr(handler.fn, "__doc__", None):
                operation["description"] = handler.fn.__doc__.strip().split("\n\n")[0]
            responses = operation.setdefault("responses", {})
            for status in _problem_statuses(method, path, operation, public=is_public):
                current = responses.get(status)
                if current is None or "application/problem+json" not in current.get("content", {}):
                    responses[status] = _problem_response(status)
            if path.startswith("/api/v1/uploads"):
                _document_tus(operation, method, path)
        if path == "/api/v1/uploads" and "options" not in item:
            item["options"] = copy.deepcopy(_TUS_DISCOVERY)
    payload = document.get("paths", {}).get("/api/v1/backups/{backup_id}/payload", {}).get("get")
    if isinstance(payload, dict):
        responses = payload.setdefault("responses", {})
        responses.setdefault(
            "206",
            {
                "description": "The byte range asked for (`Range`); `Content-Range` names it.",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
        )
        responses.setdefault("304", {"description": "`If-None-Match` matched the payload's `ETag`; no body."})
        responses.setdefault(
            "416", _problem_response("416", "The range selects no byte of the payload; `Content-Range: bytes */size`.")
        )
    backups = document.get("paths", {}).get("/api/v1/backups", {}).get("post")
    if isinstance(backups, dict) and "requestBody" not in backups:
        backups["requestBody"] = {
            "required": True,
            "description": "The whole envelope; body ≤ 16 MiB (use tus uploads for more).",
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/BackupEnvelope"},
                    "example": ENVELOPE_EXAMPLE,
                },
                "application/msgpack": {"schema": {"$ref": "#/components/schemas/BackupEnvelope"}},
            },
        }
    return document


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
        operation["responses"].setdefault(
            "460", _problem_response("460", "Checksum mismatch (tus checksum extension).")
        )
    if method in {"post", "patch"}:
        operation["responses"].setdefault(
            "507",
            _problem_response(
                "507", "Over the project's storage quota (`used`, `quota`, `requested` in bytes); nothing is kept."
            ),
        )
    if method in {"head", "patch"}:
        operation["responses"].setdefault("410", _problem_response("410", "The upload expired."))
    if method != "options":
        operation["responses"].setdefault("412", _problem_response("412", "Unsupported or missing `Tus-Resumable`."))
    for status, response in operation["responses"].items():
        if status.startswith("2"):
            headers = response.setdefault("headers", {})
            for name, header in _TUS_RESPONSE_HEADERS.items():
                headers.setdefault(name, header)


class ZkebOpenAPIJson(JsonRenderPlugin):
    """Serves `/schema/openapi.json`: Litestar's document completed by `complete_openapi` (built once)."""

    def __init__(self) -> None:
        super().__init__()
        self._rendered: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The completed document as JSON."""
        if self._rendered is None:
            self._rendered = self.render_json(request, complete_openapi(openapi_schema, request.app))
        return self._rendered
