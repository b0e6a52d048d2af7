"""Background work of the backups domain: the maintenance runner, its sweepers, and master-key rotation."""
