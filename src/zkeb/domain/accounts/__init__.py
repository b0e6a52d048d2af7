"""Accounts domain: organizations, projects, API keys, devices and device tokens."""

from __future__ import annotations

from zkeb.domain.accounts.plugin import AccountsPlugin

__all__ = ("AccountsPlugin",)
