"""Backups domain: single-shot and tus uploads, streamed encrypted chunk storage, restore and deletion."""

from __future__ import annotations

from zkeb.domain.backups.plugin import BackupsPlugin

__all__ = ("BackupsPlugin",)
