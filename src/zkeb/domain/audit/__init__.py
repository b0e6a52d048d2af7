"""Audit domain: the append-only, hash-chained audit log; listing, verification and head anchoring."""

from __future__ import annotations

from zkeb.domain.audit.plugin import AuditPlugin

__all__ = ("AuditPlugin",)
