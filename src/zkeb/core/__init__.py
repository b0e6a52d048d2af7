"""Shared infrastructure: settings wiring, database and tenant context, errors, stores and telemetry."""

from __future__ import annotations

from zkeb.core.plugin import CorePlugin

__all__ = ("CorePlugin",)
