"""The served OpenAPI document, completed with what Litestar cannot infer from the handlers.

Litestar builds the document from handler signatures; this render plugin (it serves `/schema/openapi.json`, which
Scalar and Swagger UI load) adds, once per process:
- the `ProblemDetails` schema and the problem+json error responses every operation can answer (401/429/503 and
  the rest), replacing Litestar's generic 400 (whose body is not what ZKEB sends);
- `security: []` on public operations (those the authentication middleware skips); elsewhere the bearer
  credentials the operation's guards let through (`zkeb.core.auth.accepted_credentials`): an org admin key, a
  project key, a device token;
- a description from the handler's docstring where an operation has none, and tag descriptions;
- no content on 204 and 304 responses (Litestar declares its default media type there);
- then what each domain registers in `Runtime.openapi_additions` (e.g. the backups domain's tus headers and
  envelope schema, and each domain's `Link`s, added with `add_links`): core knows no domain's paths.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from litestar import Litestar, Request
from litestar.middleware import AbstractAuthenticationMiddleware, DefineMiddleware
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.routes import HTTPRoute

from zkeb.core.auth import accepted_credentials
from zkeb.core.errors import status_phrase
from zkeb.core.runtime import get_runtime

__all__ = ("PROBLEM_REF", "Link", "ZkebOpenAPIJson", "add_links", "complete_openapi", "problem_response")

#: The problem+json schema every error response refers to; domains add their extra members to its properties.
PROBLEM_REF = "#/components/schemas/ProblemDetails"
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
    },
    "additionalProperties": True,
}

_PROBLEMS: dict[str, str] = {
    "400": "Malformed request (bad JSON, header or parameter).",
    "401": "No credential, or an invalid, expired or revoked one.",
    "404": "Unknown, or belonging to another tenant (never 403).",
    "409": "Conflict with the resource's current state.",
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

_TAGS = [
    {"name": "health", "description": "Liveness, readiness, dependency probes and version; no credential."},
    {"name": "observability", "description": "Prometheus metrics."},
]


def problem_response(status: str, description: str | None = None) -> dict[str, Any]:
    """An OpenAPI response of a problem+json body with `status` (described generically unless `description`)."""
    description = description or _PROBLEMS[status]
    response: dict[str, Any] = {
        "description": description,
        "content": {
            "application/problem+json": {
                "schema": {"$ref": PROBLEM_REF},
                "example": {
                    "type": "about:blank",
                    "title": status_phrase(int(status)),
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


@dataclass(frozen=True)
class Link:
    """An OpenAPI link (OAS 3.1 §4.8.20) from one operation's response to an operation that uses a value of it.

    `parameters` map the target's parameter names to runtime expressions (`$response.body#/id`,
    `$response.header.Location`); clients and stateful fuzzers follow them from a created resource to its uses.
    """

    name: str
    source: tuple[str, str, str]  #: method, path and status of the response the value comes from
    target: tuple[str, str]  #: method and path of the operation that uses it
    parameters: dict[str, str] = field(default_factory=dict)
    description: str = ""


def add_links(document: dict[str, Any], links: list[Link]) -> None:
    """Add `links` to the responses of `document`; the target is named by its `operationId`.

    A link whose source response or target operation is not in the document is left out, so a domain can name
    another domain's operations without knowing whether that domain is installed.
    """
    paths = document.get("paths", {})
    for link in links:
        method, path, status = link.source
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        target = paths.get(link.target[1], {}).get(link.target[0])
        if not isinstance(response, dict) or not isinstance(target, dict) or "operationId" not in target:
            continue
        entry: dict[str, Any] = {"operationId": target["operationId"], "parameters": dict(link.parameters)}
        if link.description:
            entry["description"] = link.description
        response.setdefault("links", {})[link.name] = entry


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


def _problem_statuses(operation: dict[str, Any], *, public: bool) -> list[str]:
    """The problem+json statuses an operation can answer."""
    statuses = list(_PUBLIC if public else _SECURED)
    if "requestBody" in operation:  # a JSON body declared as another content type
        statuses.append("415")
    return statuses


def complete_openapi(schema: dict[str, Any], app: Litestar) -> dict[str, Any]:
    """A copy of Litestar's `schema` completed as the module docstring describes."""
    document = copy.deepcopy(schema)
    components = document.setdefault("components", {})
    components.setdefault("schemas", {})["ProblemDetails"] = copy.deepcopy(PROBLEM_SCHEMA)
    document["tags"] = copy.deepcopy(_TAGS)
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
            elif handler is not None and not operation.get("security"):
                guards = handler.resolve_guards()
                operation["security"] = [{scheme: []} for scheme in accepted_credentials(list(guards))]
            if not operation.get("description") and handler is not None and getattr(handler.fn, "__doc__", None):
                operation["description"] = handler.fn.__doc__.strip().split("\n\n")[0]
            responses = operation.setdefault("responses", {})
            for status in _problem_statuses(operation, public=is_public):
                current = responses.get(status)
                if current is None or "application/problem+json" not in current.get("content", {}):
                    responses[status] = problem_response(status)
            for status in ("204", "304"):
                if status in responses:
                    responses[status].pop("content", None)
    for addition in get_runtime(app.state).openapi_additions:
        addition(document)
    return document


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
