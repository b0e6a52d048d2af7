"""Accounts domain: organizations, projects, API keys, devices and device tokens."""
