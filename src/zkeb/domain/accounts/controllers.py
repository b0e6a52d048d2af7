"""Accounts routes: projects, API keys, devices and device-token issuance.

Controllers parse, authorize (guards, then `Principal.require_project` and organization-filtered lookups under
row-level security), call a service and shape the answer. Unknown and other-tenant ids answer 404.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.ext.asyncio import AsyncSession

from zkeb.core.auth import Principal, principal_of, requires_org_admin
from zkeb.core.json_bodies import refuse_loose_json_bodies
from zkeb.core.runtime import get_runtime
from zkeb.db.models import ApiKey, Device, Project
from zkeb.domain.accounts.schemas import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPage,
    ApiKeyRead,
    DeviceEnroll,
    DevicePage,
    DeviceRead,
    ProblemDetails,
    ProjectCreate,
    ProjectPage,
    ProjectRead,
    ProjectUpdate,
    TokenRequest,
    TokenResponse,
)
from zkeb.domain.accounts.services import (
    ApiKeyService,
    DeviceService,
    DeviceTokenService,
    ProjectService,
    record_account_event,
)
from zkeb.lib.apikeys import hashing_salt

__all__ = ("ApiKeyController", "AuthTokenController", "DeviceController", "ProjectController")

_NO_STORE = {"Cache-Control": "no-store"}

Limit = Annotated[
    int, Parameter(ge=1, le=MAX_LIST_LIMIT, description=f"page size, at most {MAX_LIST_LIMIT}", required=False)
]
Cursor = Annotated[str | None, Parameter(description="`next_cursor` of the previous page", required=False)]


_PROBLEM_DESCRIPTIONS = {
    400: "Malformed request or parameter",
    401: "No valid credential (for a token request: the proof was refused)",
    404: "Unknown, or another tenant's (never 403)",
    409: "Conflicts with existing state",
    422: "Invalid body; `errors` names each field",
}


def _problems(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem+json answers a route gives."""
    return {
        code: ResponseSpec(
            data_container=ProblemDetails,
            description=_PROBLEM_DESCRIPTIONS[code],
            media_type="application/problem+json",
            generate_examples=False,
        )
        for code in codes
    }


def _project_read(project: Project) -> ProjectRead:
    return ProjectRead(
        id=project.id,
        name=project.name,
        organization_id=project.organization_id,
        created_at=project.created_at,
        updated_at=project.updated_at,
        storage_quota_bytes=project.storage_quota_bytes,
        used_bytes=project.total_used_bytes,
        retention_keep_last=project.retention_keep_last,
        retention_days=project.retention_days,
        append_only=project.append_only,
        append_only_min_age_days=project.append_only_min_age_days,
    )


def _api_key_read(key: ApiKey) -> ApiKeyRead:
    return ApiKeyRead(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        project_id=key.project_id,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        revoked_at=key.revoked_at,
    )


def _device_read(device: Device) -> DeviceRead:
    return DeviceRead(
        id=device.id,
        device_id_hash=device.device_id_hash.hex(),
        public_key=base64.b64encode(device.public_key).decode(),
        label=device.label,
        project_id=device.project_id,
        created_at=device.created_at,
        revoked_at=device.revoked_at,
    )


async def _admin_project(projects: ProjectService, principal: Principal, project_id: UUID) -> Project:
    principal.require_project(project_id)
    return await projects.get_project(project_id, organization_id=principal.organization_id)


class ProjectController(Controller):
    """`/api/v1/projects`: an organization's projects and their storage policy."""

    before_request = staticmethod(refuse_loose_json_bodies)

    path = "/api/v1/projects"
    tags = ["projects"]  # noqa: RUF012 - Litestar's declared attribute

    @post(
        "/",
        guards=[requires_org_admin],
        status_code=HTTP_201_CREATED,
        summary="Create a project",
        responses=_problems(401, 404, 409, 422),
    )
    async def create_project(
        self,
        request: Request[Any, Any, Any],
        state: State,
        db_session: NamedDependency[AsyncSession],
        project_service: NamedDependency[ProjectService],
        data: JSONBody[ProjectCreate],
    ) -> ProjectRead:
        """Create a project; `storage_quota_bytes` absent takes `DEFAULT_PROJECT_QUOTA` (null: unlimited)."""
        principal = principal_of(request)
        project = await project_service.create_project(
            data,
            organization_id=principal.organization_id,
            default_quota=get_runtime(state).settings.default_project_quota,
        )
        await record_account_event(
            db_session,
            principal=principal,
            request=request,
            action="project.created",
            target_type="project",
            target_id=project.id,
            details={"name": project.name},
        )
        return _project_read(project)

    @get("/", guards=[requires_org_admin], summary="List projects", responses=_problems(401, 404))
    async def list_projects(
        self,
        request: Request[Any, Any, Any],
        project_service: NamedDependency[ProjectService],
        limit: Limit = DEFAULT_LIST_LIMIT,
        cursor: Cursor = None,
    ) -> ProjectPage:
        """The organization's projects, oldest first, by keyset cursor."""
        page = await project_service.page(
            organization_id=principal_of(request).organization_id, limit=limit, cursor=cursor
        )
        return ProjectPage(items=[_project_read(p) for p in page.items], next_cursor=page.next_cursor)

    @get("/{project_id:uuid}", summary="Get a project", responses=_problems(401, 404))
    async def get_project(
        self,
        request: Request[Any, Any, Any],
        project_service: NamedDependency[ProjectService],
        project_id: FromPath[UUID],
    ) -> ProjectRead:
        """A project: org admins see every project of theirs, project keys and devices only their own."""
        principal = principal_of(request)
        return _project_read(await _admin_project(project_service, principal, project_id))

    @patch(
        "/{project_id:uuid}",
        guards=[requires_org_admin],
        summary="Change a project's storage policy",
        responses=_problems(401, 404, 409, 422),
    )
    async def update_project(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        project_service: NamedDependency[ProjectService],
        project_id: FromPath[UUID],
        data: JSONBody[ProjectUpdate],
    ) -> ProjectRead:
        """Change any of name, quota, retention and append-only settings; null clears a limit."""
        principal = principal_of(request)
        project = await project_service.get_project(
            project_id, organization_id=principal.organization_id, for_update=True
        )
        project, changed, was = await project_service.update_project(project, data)
        if changed:
            await record_account_event(
                db_session,
                principal=principal,
                request=request,
                action="project.updated",
                target_type="project",
                target_id=project.id,
                details={"changed": changed, "was": was},  # a lowered quota or a shorter retention can be undone
            )
        return _project_read(project)

    @post(
        "/{project_id:uuid}/api-keys",
        guards=[requires_org_admin],
        status_code=HTTP_201_CREATED,
        summary="Create a project API key (shown once)",
        responses=_problems(401, 404, 422),
    )
    async def create_api_key(
        self,
        request: Request[Any, Any, Any],
        *,
        state: State,
        db_session: NamedDependency[AsyncSession],
        project_service: NamedDependency[ProjectService],
        api_key_service: NamedDependency[ApiKeyService],
        project_id: FromPath[UUID],
        data: JSONBody[ApiKeyCreate],
    ) -> Response[ApiKeyCreated]:
        """Issue a project key; the answer is the only time the key is shown."""
        principal = principal_of(request)
        project = await _admin_project(project_service, principal, project_id)
        secrets = get_runtime(state).settings.secrets
        new_key = await api_key_service.issue(
            organization_id=principal.organization_id,
            project_id=project.id,
            name=data.name,
            salt=hashing_salt(secrets.api_key_salt, secrets.api_key_salt_new),
        )
        await record_account_event(
            db_session,
            principal=principal,
            request=request,
            action="api_key.created",
            target_type="api_key",
            target_id=new_key.record.id,
            details={"kind": "project", "project_id": str(project.id), "key_prefix": new_key.record.prefix},
        )
        record = new_key.record
        body = ApiKeyCreated(
            id=record.id,
            key=new_key.key,
            name=record.name,
            prefix=record.prefix,
            project_id=record.project_id,
            created_at=record.created_at,
        )
        return Response(body, status_code=HTTP_201_CREATED, headers=_NO_STORE)

    @get(
        "/{project_id:uuid}/api-keys",
        guards=[requires_org_admin],
        summary="List a project's API keys",
        responses=_problems(401, 404),
    )
    async def list_api_keys(
        self,
        request: Request[Any, Any, Any],
        *,
        project_service: NamedDependency[ProjectService],
        api_key_service: NamedDependency[ApiKeyService],
        project_id: FromPath[UUID],
        limit: Limit = DEFAULT_LIST_LIMIT,
        cursor: Cursor = None,
    ) -> ApiKeyPage:
        """The project's keys (never the key nor its hash), oldest first."""
        principal = principal_of(request)
        project = await _admin_project(project_service, principal, project_id)
        page = await api_key_service.page(
            organization_id=principal.organization_id, project_id=project.id, limit=limit, cursor=cursor
        )
        return ApiKeyPage(items=[_api_key_read(k) for k in page.items], next_cursor=page.next_cursor)

    @post(
        "/{project_id:uuid}/devices",
        guards=[requires_org_admin],
        status_code=HTTP_201_CREATED,
        summary="Enroll a device",
        responses=_problems(401, 404, 409, 422),
    )
    async def enroll_device(
        self,
        request: Request[Any, Any, Any],
        *,
        db_session: NamedDependency[AsyncSession],
        project_service: NamedDependency[ProjectService],
        device_service: NamedDependency[DeviceService],
        project_id: FromPath[UUID],
        data: JSONBody[DeviceEnroll],
    ) -> DeviceRead:
        """Enroll a device by the SHA-256 of its identifier and its 32-byte Ed25519 public key."""
        principal = principal_of(request)
        project = await _admin_project(project_service, principal, project_id)
        device = await device_service.enroll(data, organization_id=principal.organization_id, project_id=project.id)
        await record_account_event(
            db_session,
            principal=principal,
            request=request,
            action="device.enrolled",
            target_type="device",
            target_id=device.id,
            details={"project_id": str(project.id), "device_id_hash": device.device_id_hash.hex()},
        )
        return _device_read(device)

    @get(
        "/{project_id:uuid}/devices",
        guards=[requires_org_admin],
        summary="List a project's devices",
        responses=_problems(401, 404),
    )
    async def list_devices(
        self,
        request: Request[Any, Any, Any],
        *,
        project_service: NamedDependency[ProjectService],
        device_service: NamedDependency[DeviceService],
        project_id: FromPath[UUID],
        limit: Limit = DEFAULT_LIST_LIMIT,
        cursor: Cursor = None,
    ) -> DevicePage:
        """The project's devices, revoked ones included, oldest first."""
        principal = principal_of(request)
        project = await _admin_project(project_service, principal, project_id)
        page = await device_service.page(
            organization_id=principal.organization_id, project_id=project.id, limit=limit, cursor=cursor
        )
        return DevicePage(items=[_device_read(d) for d in page.items], next_cursor=page.next_cursor)


class ApiKeyController(Controller):
    """`/api/v1/api-keys/{id}`: revocation."""

    path = "/api/v1/api-keys"
    tags = ["api keys"]  # noqa: RUF012

    @delete(
        "/{key_id:uuid}",
        guards=[requires_org_admin],
        status_code=HTTP_204_NO_CONTENT,
        summary="Revoke an API key",
        responses=_problems(401, 404, 409),
    )
    async def revoke_api_key(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        api_key_service: NamedDependency[ApiKeyService],
        key_id: FromPath[UUID],
    ) -> None:
        """Revoke a key at once on every replica; the organization's last active org admin key is kept (409)."""
        principal = principal_of(request)
        key, revoked = await api_key_service.revoke(key_id, organization_id=principal.organization_id)
        if revoked:
            await record_account_event(
                db_session,
                principal=principal,
                request=request,
                action="api_key.revoked",
                target_type="api_key",
                target_id=key.id,
                details={"kind": key.kind, "key_prefix": key.prefix},
            )


class DeviceController(Controller):
    """`/api/v1/devices/{id}`: revocation."""

    path = "/api/v1/devices"
    tags = ["devices"]  # noqa: RUF012

    @delete(
        "/{device_id:uuid}",
        guards=[requires_org_admin],
        status_code=HTTP_204_NO_CONTENT,
        summary="Revoke a device",
        responses=_problems(401, 404),
    )
    async def revoke_device(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        device_service: NamedDependency[DeviceService],
        device_id: FromPath[UUID],
    ) -> None:
        """Revoke a device: no new tokens, and its live tokens fail from now on."""
        principal = principal_of(request)
        device, revoked = await device_service.revoke(device_id, organization_id=principal.organization_id)
        if revoked:
            await record_account_event(
                db_session,
                principal=principal,
                request=request,
                action="device.revoked",
                target_type="device",
                target_id=device.id,
                details={"project_id": str(device.project_id)},
            )


class AuthTokenController(Controller):
    """`POST /api/v1/auth/token`: a device token for a proof of possession."""

    before_request = staticmethod(refuse_loose_json_bodies)

    path = "/api/v1/auth"
    tags = ["auth"]  # noqa: RUF012
    security = []  # noqa: RUF012
    opt = {"exclude_from_auth": True}  # noqa: RUF012

    @post(
        "/token",
        status_code=HTTP_200_OK,
        summary="Get a device token",
        description=(
            'The device signs `"ZKEB-AUTH-V1\\0" || project_id(16) || device_id_hash(32) || u64be(timestamp_ms)` '
            "with its Ed25519 key. The timestamp must be within 5 minutes of the server clock and each proof is "
            "accepted once. Any failure answers the same 401."
        ),
        responses=_problems(401, 422),
    )
    async def issue_token(
        self,
        request: Request[Any, Any, Any],
        state: State,
        device_token_service: NamedDependency[DeviceTokenService],
        data: JSONBody[TokenRequest],
    ) -> Response[TokenResponse]:
        """Verify the proof and return a short-lived HS256 device token."""
        runtime = get_runtime(state)
        issued = await device_token_service.issue_token(
            data, settings=runtime.settings, redis=runtime.redis, request=request
        )
        return Response(TokenResponse(access_token=issued.token, expires_in=issued.expires_in), headers=_NO_STORE)
