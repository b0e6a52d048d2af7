"""The backups HTTP API: one module a resource family, HTTP only (parse, authorize, call a service, shape)."""
