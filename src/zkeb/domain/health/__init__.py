"""Health domain: liveness, readiness, dependency probes and version."""

from __future__ import annotations

from zkeb.domain.health.plugin import HealthPlugin

__all__ = ("HealthPlugin",)
