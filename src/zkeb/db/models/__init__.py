"""SQLAlchemy models, one module per aggregate."""

from __future__ import annotations

from zkeb.db.models.accounts import ApiKey, Device, DeviceProof, Organization, Project, ProjectUsageShard
from zkeb.db.models.audit import AuditChainHead, AuditEvent, AuditPendingEvent
from zkeb.db.models.backups import Backup, BackupChunk, Payload, PayloadNonce, PayloadObjectDeletion, UploadSession

__all__ = (
    "TENANT_TABLES",
    "ApiKey",
    "AuditChainHead",
    "AuditEvent",
    "AuditPendingEvent",
    "Backup",
    "BackupChunk",
    "Device",
    "DeviceProof",
    "Organization",
    "Payload",
    "PayloadNonce",
    "PayloadObjectDeletion",
    "Project",
    "ProjectUsageShard",
    "UploadSession",
)

#: Every table holding tenant data; row-level security is enabled and forced on each.
TENANT_TABLES = (
    "organizations",
    "projects",
    "project_usage_shards",
    "api_keys",
    "devices",
    "device_proofs",
    "payloads",
    "backup_chunks",
    "backups",
    "payload_nonces",
    "upload_sessions",
    "payload_object_deletions",
    "audit_events",
    "audit_chain_heads",
    "audit_pending_events",
)
