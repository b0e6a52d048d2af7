"""The backups rules: admission, storing and committing a backup, tus uploads, quotas, retention and the trash."""
