"""Helpers shared by the tests (importable as `support`)."""

from __future__ import annotations

from typing import Any

from zkeb.settings import Settings

__all__ = ("make_settings", "problem")


def make_settings(base: dict[str, str], **overrides: str) -> Settings:
    """Settings from the shared test environment plus `overrides` (env-var names as keys)."""
    return Settings.from_env({**base, **overrides})


def problem(response: Any) -> dict[str, Any]:
    """Assert `response` is RFC 9457 problem+json and return its body."""
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == response.status_code
    assert body["title"]
    return body
