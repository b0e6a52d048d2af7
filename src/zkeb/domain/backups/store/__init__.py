"""The backups domain's raw SQL: pooled asyncpg connections, tenant-scoped transactions and the statements."""
