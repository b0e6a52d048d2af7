"""Account services. Every call runs inside a transaction whose tenant is the organization acted for.

Row-level security already hides other tenants' rows; the services filter on the organization as well, so a
lookup is explicit about whose data it wants and an unknown or foreign id is simply "not found" (404).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import logging
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec
from advanced_alchemy.exceptions import IntegrityError
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from advanced_alchemy.service import SQLAlchemyAsyncRepositoryService
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from redis.asyncio import Redis
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from zkeb.core import auditthrottle
from zkeb.core.audit import AuditOutcome, record_event
from zkeb.core.auth import BEARER_CHALLENGE, Principal
from zkeb.core.errors import ConflictError, NotFoundError, UnprocessableError
from zkeb.core.tenancy import TENANT_INFO_KEY
from zkeb.db.models import ApiKey, Device, DeviceProof, Organization, Project
from zkeb.domain.accounts.pagination import Page, fetch_page
from zkeb.domain.accounts.schemas import DeviceEnroll, ProjectCreate, ProjectUpdate, TokenRequest
from zkeb.lib.apikeys import generate_api_key, hash_api_key, public_prefix
from zkeb.lib.devicekeys import InvalidPublicKeyError, validate_ed25519_public_key
from zkeb.lib.devicetokens import MAX_TOKEN_LIFETIME, issue_device_token, signing_secret
from zkeb.lib.envelope import auth_message, verify_ed25519
from zkeb.settings import Settings

__all__ = (
    "PROOF_MAX_SKEW",
    "ApiKeyService",
    "DeviceService",
    "DeviceTokenService",
    "IssuedDeviceToken",
    "NewApiKey",
    "OrganizationService",
    "ProjectService",
    "invalid_field",
    "record_account_event",
    "validated_name",
)

logger = logging.getLogger("zkeb.accounts")

#: How far a proof's timestamp may be from the server clock, either way.
PROOF_MAX_SKEW = datetime.timedelta(minutes=5)
#: Spent proofs older than this are purged a batch at a time, on successful issuance.
_PROOF_PURGE_BATCH = 100
#: No refused proof is answered sooner: longer than a refusal's work with its audit write takes on a healthy server.
REFUSAL_MIN_SECONDS = 0.05
#: The tenant an unknown project's device lookup runs as: no organization has it, so nothing is visible.
_NO_TENANT = UUID(int=0)
#: What a proof is checked against when there is no usable device key.
_STAND_IN_KEY = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
_INVALID_PROOF = "invalid proof of possession"
_LOCK_ORGANIZATION = text("SELECT id FROM organizations WHERE id = :id FOR UPDATE")


def _violates(exc: BaseException, constraint: str) -> bool:
    """Whether the driver error under `exc` is a unique violation of `constraint` (SQLSTATE 23505)."""
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            return False
        if getattr(current, "sqlstate", None) == "23505" and getattr(current, "constraint_name", None) == constraint:
            return True
        current = current.__cause__ or current.__context__
    return False


def invalid_field(key: str, message: str) -> UnprocessableError:
    """A 422 whose problem body names the offending body field, shaped like Litestar's validation errors."""
    return UnprocessableError(
        f"{key}: {message}", extra={"errors": [{"key": key, "message": message, "source": "body"}]}
    )


def validated_name(value: str, *, key: str = "name") -> str:
    """A display name, trimmed: 1 to 200 characters, no control or format characters.

    Raises:
        UnprocessableError: the name is empty, too long, or contains control characters (names `key`).
    """
    name = value.strip()
    if not name:
        raise invalid_field(key, "must not be empty")
    if len(name) > 200:
        raise invalid_field(key, "must be at most 200 characters")
    if any(unicodedata.category(char)[0] == "C" for char in name):
        raise invalid_field(key, "must not contain control characters")
    return name


async def record_account_event(
    session: AsyncSession,
    *,
    principal: Principal,
    request: ASGIConnection[Any, Any, Any, Any] | None,
    action: str,
    target_type: str,
    target_id: object,
    details: Mapping[str, object] | None = None,
    outcome: AuditOutcome = "success",
) -> None:
    """Append an audit event for an action `principal` took, in the caller's transaction."""
    await record_event(
        session,
        organization_id=principal.organization_id,
        action=action,
        actor_type=principal.actor_type,
        actor_id=principal.actor_id,
        outcome=outcome,
        target_type=target_type,
        target_id=str(target_id),
        details=details,
        request=request,
    )


@dataclass(frozen=True)
class NewApiKey:
    """A freshly issued key: `key` is shown once and never stored."""

    record: ApiKey
    key: str


@dataclass(frozen=True)
class IssuedDeviceToken:
    """A signed device token and its lifetime in seconds."""

    token: str
    expires_in: int
    device: Device


class OrganizationService(SQLAlchemyAsyncRepositoryService[Organization]):
    """Organizations (tenants)."""

    class Repo(SQLAlchemyAsyncRepository[Organization]):
        """Organization repository."""

        model_type = Organization

    repository_type = Repo

    async def create_with_admin_key(
        self, name: str, *, salt: str, settings: Settings | None = None, organization_id: UUID | None = None
    ) -> tuple[Organization, NewApiKey]:
        """Create an organization and its first org admin key in one transaction, audited as done by the CLI.

        Raises:
            UnprocessableError: the name is invalid.
        """
        name = validated_name(name)
        session = self.repository.session
        organization = Organization(id=organization_id or uuid7(), name=name)
        # The new row is only visible to (and insertable by) a transaction acting for it.
        session.info[TENANT_INFO_KEY] = organization.id
        organization = await self.create(organization, auto_commit=False, auto_refresh=False)
        admin_key = await ApiKeyService(session=session).issue(
            organization_id=organization.id, project_id=None, name="bootstrap admin key", salt=salt
        )
        for action, target_type, target_id, details in (
            ("organization.created", "organization", organization.id, {"name": name}),
            (
                "api_key.created",
                "api_key",
                admin_key.record.id,
                {"kind": "org_admin", "key_prefix": admin_key.record.prefix},
            ),
        ):
            await record_event(
                session,
                organization_id=organization.id,
                action=action,
                actor_type="cli",
                actor_id=None,
                target_type=target_type,
                target_id=str(target_id),
                details=details,
                settings=settings,
            )
        await session.commit()
        return organization, admin_key

    async def issue_key(
        self,
        *,
        organization_id: UUID,
        project_id: UUID | None,
        name: str,
        salt: str,
        settings: Settings | None = None,
    ) -> NewApiKey:
        """Issue an org admin key (no project) or a project key from the CLI, audited as done by the CLI.

        Raises:
            NotFoundError: the organization, or the project within it, does not exist.
            UnprocessableError: the name is invalid.
        """
        name = validated_name(name)
        session = self.repository.session
        session.info[TENANT_INFO_KEY] = organization_id
        if await self.get_one_or_none(Organization.id == organization_id) is None:
            raise NotFoundError("organization not found")
        if project_id is not None:
            await ProjectService(session=session).get_project(project_id, organization_id=organization_id)
        new_key = await ApiKeyService(session=session).issue(
            organization_id=organization_id, project_id=project_id, name=name, salt=salt
        )
        await record_event(
            session,
            organization_id=organization_id,
            action="api_key.created",
            actor_type="cli",
            actor_id=None,
            target_type="api_key",
            target_id=str(new_key.record.id),
            details={"kind": new_key.record.kind, "key_prefix": new_key.record.prefix, "project_id": str(project_id)},
            settings=settings,
        )
        await session.commit()
        return new_key


class ProjectService(SQLAlchemyAsyncRepositoryService[Project]):
    """Projects and their storage policy."""

    class Repo(SQLAlchemyAsyncRepository[Project]):
        """Project repository."""

        model_type = Project

    repository_type = Repo

    async def create_project(
        self,
        data: ProjectCreate,
        *,
        organization_id: UUID,
        default_quota: int | None,
        project_id: UUID | None = None,
    ) -> Project:
        """Create a project; an absent quota takes `DEFAULT_PROJECT_QUOTA`.

        Raises:
            ConflictError: the organization already has a project of that name.
            UnprocessableError: the name is invalid.
        """
        quota = default_quota if data.storage_quota_bytes is msgspec.UNSET else data.storage_quota_bytes
        project = Project(
            id=project_id or uuid7(),
            organization_id=organization_id,
            name=validated_name(data.name),
            storage_quota_bytes=quota,
            retention_keep_last=data.retention_keep_last,
            retention_days=data.retention_days,
            append_only=data.append_only,
            append_only_min_age_days=data.append_only_min_age_days,
        )
        try:
            return await self.create(project, auto_commit=False)
        except IntegrityError as exc:
            if _violates(exc, "uq_projects_org_name"):
                raise ConflictError("a project with this name already exists") from None
            raise

    async def get_project(self, project_id: UUID, *, organization_id: UUID, for_update: bool = False) -> Project:
        """The organization's project `project_id`.

        Raises:
            NotFoundError: unknown, or another organization's.
        """
        project = await self.get_one_or_none(
            Project.id == project_id, Project.organization_id == organization_id, with_for_update=for_update
        )
        if project is None:
            raise NotFoundError("project not found")
        return project

    async def page(self, *, organization_id: UUID, limit: int, cursor: str | None) -> Page[Project]:
        """One page of the organization's projects, oldest first."""
        statement = select(Project).where(Project.organization_id == organization_id)
        return await fetch_page(self.repository.session, statement, Project, limit=limit, cursor=cursor)

    async def update_project(
        self, project: Project, changes: ProjectUpdate
    ) -> tuple[Project, dict[str, object], dict[str, object]]:
        """Apply the fields present in `changes`; returns the project, what changed (new values) and what it was.

        Raises:
            ConflictError: the new name is taken in the organization.
            UnprocessableError: the new name is invalid.
        """
        updates: dict[str, object] = {
            name: value for name in changes.__struct_fields__ if (value := getattr(changes, name)) is not msgspec.UNSET
        }
        if "name" in updates:
            updates["name"] = validated_name(str(updates["name"]))
        changed = {name: value for name, value in updates.items() if getattr(project, name) != value}
        if not changed:
            return project, {}, {}
        was = {name: getattr(project, name) for name in changed}
        for name, value in changed.items():
            setattr(project, name, value)
        try:
            project = await self.update(project, auto_commit=False)
        except IntegrityError as exc:
            if _violates(exc, "uq_projects_org_name"):
                raise ConflictError("a project with this name already exists") from None
            raise
        return project, changed, was


class ApiKeyService(SQLAlchemyAsyncRepositoryService[ApiKey]):
    """API keys: issued once, stored as HMACs."""

    class Repo(SQLAlchemyAsyncRepository[ApiKey]):
        """API key repository."""

        model_type = ApiKey

    repository_type = Repo

    async def issue(self, *, organization_id: UUID, project_id: UUID | None, name: str, salt: str) -> NewApiKey:
        """Create a key for a project (or, with no project, an org admin key).

        Raises:
            UnprocessableError: the name is invalid.
        """
        key = generate_api_key()
        prefix = public_prefix(key)
        if prefix is None:  # pragma: no cover - generate_api_key always yields a well-formed key
            msg = "generated an API key without a public prefix"
            raise RuntimeError(msg)
        record = ApiKey(
            id=uuid7(),
            organization_id=organization_id,
            project_id=project_id,
            kind="project" if project_id else "org_admin",
            name=validated_name(name),
            prefix=prefix,
            key_hash=hash_api_key(salt, key),
        )
        record = await self.create(record, auto_commit=False)
        return NewApiKey(record=record, key=key)

    async def page(self, *, organization_id: UUID, project_id: UUID, limit: int, cursor: str | None) -> Page[ApiKey]:
        """One page of a project's keys, oldest first."""
        statement = select(ApiKey).where(ApiKey.organization_id == organization_id, ApiKey.project_id == project_id)
        return await fetch_page(
            self.repository.session, statement, ApiKey, limit=limit, cursor=cursor, scope=(project_id,)
        )

    async def revoke(self, key_id: UUID, *, organization_id: UUID) -> tuple[ApiKey, bool]:
        """Revoke a key at once; returns the key and whether this call revoked it (False: already revoked).

        Org admin keys may be revoked too, but never the organization's last active one: the organization row
        is locked first, so two concurrent revocations cannot both pass that check.

        Raises:
            NotFoundError: unknown, or another organization's.
            ConflictError: the key is the organization's last active org admin key.
        """
        session = self.repository.session
        await session.execute(_LOCK_ORGANIZATION, {"id": organization_id})
        key = await self.get_one_or_none(ApiKey.id == key_id, ApiKey.organization_id == organization_id)
        if key is None:
            raise NotFoundError("API key not found")
        if key.revoked_at is not None:
            return key, False
        if key.kind == "org_admin":
            active_admin_keys = await self.count(
                ApiKey.organization_id == organization_id, ApiKey.kind == "org_admin", ApiKey.revoked_at.is_(None)
            )
            if active_admin_keys <= 1:
                raise ConflictError("the organization's last active org admin key cannot be revoked")
        key.revoked_at = datetime.datetime.now(datetime.UTC)
        key = await self.update(key, auto_commit=False)
        return key, True


class DeviceService(SQLAlchemyAsyncRepositoryService[Device]):
    """Enrolled devices and their public keys."""

    class Repo(SQLAlchemyAsyncRepository[Device]):
        """Device repository."""

        model_type = Device

    repository_type = Repo

    async def enroll(self, data: DeviceEnroll, *, organization_id: UUID, project_id: UUID) -> Device:
        """Enroll a device in a project.

        Raises:
            UnprocessableError: the public key is not base64 of a valid Ed25519 public key, or the label is invalid.
            ConflictError: the project already has a device with this `device_id_hash` (revoked ones included).
        """
        try:
            public_key = base64.b64decode(data.public_key, validate=True)
        except (binascii.Error, ValueError):
            raise invalid_field("public_key", "must be standard base64") from None
        try:
            validate_ed25519_public_key(public_key)
        except InvalidPublicKeyError as exc:
            raise invalid_field("public_key", f"not a valid Ed25519 public key: {exc}") from None
        label = None if data.label is None else validated_name(data.label, key="label")
        device = Device(
            id=uuid7(),
            organization_id=organization_id,
            project_id=project_id,
            device_id_hash=bytes.fromhex(data.device_id_hash),
            public_key=public_key,
            label=label,
        )
        try:
            return await self.create(device, auto_commit=False)
        except IntegrityError as exc:
            if _violates(exc, "uq_devices_project_hash"):
                raise ConflictError("this device is already enrolled in the project") from None
            raise

    async def page(self, *, organization_id: UUID, project_id: UUID, limit: int, cursor: str | None) -> Page[Device]:
        """One page of a project's devices, oldest first."""
        statement = select(Device).where(Device.organization_id == organization_id, Device.project_id == project_id)
        return await fetch_page(
            self.repository.session, statement, Device, limit=limit, cursor=cursor, scope=(project_id,)
        )

    async def revoke(self, device_id: UUID, *, organization_id: UUID) -> tuple[Device, bool]:
        """Revoke a device: it gets no new token and its live tokens stop working at once.

        Returns:
            The device and whether this call revoked it (False: already revoked).

        Raises:
            NotFoundError: unknown, or another organization's.
        """
        device = await self.get_one_or_none(
            Device.id == device_id, Device.organization_id == organization_id, with_for_update=True
        )
        if device is None:
            raise NotFoundError("device not found")
        if device.revoked_at is not None:
            return device, False
        device.revoked_at = datetime.datetime.now(datetime.UTC)
        device = await self.update(device, auto_commit=False)
        return device, True


class DeviceTokenService(SQLAlchemyAsyncRepositoryService[DeviceProof]):
    """Device tokens for a proof of possession; spent proofs are remembered in `device_proofs` (all processes)."""

    class Repo(SQLAlchemyAsyncRepository[DeviceProof]):
        """Spent-proof repository."""

        model_type = DeviceProof

    repository_type = Repo

    async def issue_token(
        self,
        data: TokenRequest,
        *,
        settings: Settings,
        redis: Redis | None = None,
        request: ASGIConnection[Any, Any, Any, Any] | None = None,
        now: datetime.datetime | None = None,
    ) -> IssuedDeviceToken:
        """Verify a proof of possession and sign a device token.

        Every refusal is the same 401 (no oracle for which part failed) after the same work: an unknown project or
        device still costs a device lookup and a signature check (against a stand-in key), and no refusal answers
        sooner than `REFUSAL_MIN_SECONDS`, which covers the audit write that only a known project gets. That write
        is aggregated (`zkeb.core.auditthrottle`): one `auth.token_refused` event per project and minute.

        Raises:
            NotAuthorizedException: unknown project, unknown or revoked device, stale timestamp, bad signature, or
                a proof already used.
        """
        started = time.monotonic()
        session = self.repository.session
        now = now or datetime.datetime.now(datetime.UTC)
        organization_id: UUID | None = await session.scalar(select(func.zkeb_project_organization(data.project_id)))
        # That lookup ran before the tenant was known: end its transaction so the next one begins as the tenant.
        await session.rollback()
        # An unknown project looks its device up as no tenant at all: row-level security finds nothing.
        session.info[TENANT_INFO_KEY] = organization_id or _NO_TENANT
        device_id_hash = bytes.fromhex(data.device_id_hash)
        device = await session.scalar(
            select(Device).where(
                Device.organization_id == (organization_id or _NO_TENANT),
                Device.project_id == data.project_id,
                Device.device_id_hash == device_id_hash,
            )
        )
        reason = await self._refusal_reason(data, device, device_id_hash=device_id_hash, now=now)
        if organization_id is None:
            reason = "unknown project"
        if reason is not None or device is None or organization_id is None:
            await self._record_refusal(
                data, organization_id, device, reason or "unknown device", redis=redis, request=request
            )
            await session.commit()
            await asyncio.sleep(max(0.0, REFUSAL_MIN_SECONDS - (time.monotonic() - started)))
            raise _invalid_proof()
        await self._purge_expired_proofs(now)
        token, expires_in = issue_device_token(
            signing_secret(settings.secrets.jwt_secret, settings.secrets.jwt_secret_new),
            device_id=device.id,
            organization_id=organization_id,
            project_id=device.project_id,
            device_id_hash=device.device_id_hash,
            lifetime=MAX_TOKEN_LIFETIME,
            now=now,
        )
        await record_event(
            session,
            organization_id=organization_id,
            action="device_token.issued",
            actor_type="device",
            actor_id=str(device.id),
            target_type="device",
            target_id=str(device.id),
            details={"project_id": str(device.project_id), "expires_in": expires_in},
            request=request,
        )
        return IssuedDeviceToken(token=token, expires_in=expires_in, device=device)

    async def _record_refusal(
        self,
        data: TokenRequest,
        organization_id: UUID | None,
        device: Device | None,
        reason: str,
        *,
        redis: Redis | None,
        request: ASGIConnection[Any, Any, Any, Any] | None,
    ) -> None:
        """The first refusal of a project in each minute goes to its audit log, counting the previous minute's."""
        admission = await auditthrottle.admit(redis, f"token-refused:{data.project_id}")
        if organization_id is None or not admission.record:
            logger.info("device token refused: %s", reason)
            return
        await record_event(
            self.repository.session,
            organization_id=organization_id,
            action="auth.token_refused",
            actor_type="device",
            actor_id=str(device.id) if device is not None else None,
            outcome="failure",
            target_type="project",
            target_id=str(data.project_id),
            details={
                "reason": reason,
                "device_id_hash": data.device_id_hash.lower(),
                "window_seconds": auditthrottle.WINDOW_SECONDS,
                "refusals_in_previous_window": admission.previous_window_count,
            },
            request=request,
        )

    async def _refusal_reason(
        self, data: TokenRequest, device: Device | None, *, device_id_hash: bytes, now: datetime.datetime
    ) -> str | None:
        signature = base64.b64decode(data.signature)  # 64 bytes: `TokenRequest` admits no other shape
        message = auth_message(
            project_id=data.project_id, device_id_hash=device_id_hash, timestamp_ms=data.timestamp_ms
        )
        usable = device is not None and device.revoked_at is None
        # Checked whatever else is wrong, against a stand-in key when there is no usable one: the same work.
        verified = verify_ed25519(
            device.public_key if device is not None and usable else _STAND_IN_KEY, signature, message
        )
        if device is None:
            return "unknown device"
        if device.revoked_at is not None:
            return "device revoked"
        now_ms = int(now.timestamp() * 1000)
        if abs(now_ms - data.timestamp_ms) > PROOF_MAX_SKEW // datetime.timedelta(milliseconds=1):
            return "stale timestamp"
        if not verified:
            return "bad signature"
        # Spent once, everywhere: the unique (organization, proof hash) row is the cross-process replay guard.
        expires_at = datetime.datetime.fromtimestamp(data.timestamp_ms / 1000, datetime.UTC) + PROOF_MAX_SKEW
        spent = await self.repository.session.execute(
            insert(DeviceProof)
            .values(
                id=uuid7(),
                organization_id=device.organization_id,
                proof_sha256=hashlib.sha256(signature).digest(),
                expires_at=expires_at + datetime.timedelta(minutes=1),
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(constraint="uq_device_proofs_hash")
            .returning(DeviceProof.id)
        )
        if spent.scalar_one_or_none() is None:
            return "replayed proof"
        return None

    async def _purge_expired_proofs(self, now: datetime.datetime) -> None:
        expired = (
            select(DeviceProof.id)
            .where(DeviceProof.expires_at < now)
            .order_by(DeviceProof.expires_at)
            .limit(_PROOF_PURGE_BATCH)
            .with_for_update(skip_locked=True)
        )
        await self.repository.session.execute(delete(DeviceProof).where(DeviceProof.id.in_(expired.scalar_subquery())))


def _invalid_proof() -> NotAuthorizedException:
    return NotAuthorizedException(_INVALID_PROOF, headers={"WWW-Authenticate": BEARER_CHALLENGE})
