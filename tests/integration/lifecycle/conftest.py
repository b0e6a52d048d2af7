"""Every test here whose app is built from `payload_store_env` runs once per payload store (PostgreSQL, S3)."""

from support import parametrize_stores as pytest_generate_tests

__all__ = ("pytest_generate_tests",)
