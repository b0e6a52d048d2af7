"""Backups domain: single-shot and tus uploads, streamed encrypted chunk storage, restore and deletion.

Where things are (each module's docstring says more):

- `plugin.py` wires the domain into the app (controllers, dependency providers from `deps.py`, the keyring and
  payload stores of `context.py`, the maintenance runner, OpenAPI additions from `openapi.py`, metrics from
  `metrics.py`); it holds no rules.
- `envelope.py` declares the envelope's fields once; `schemas.py` the request and response bodies; `errors.py` the
  domain's problems; `tus.py` the tus protocol's headers and errors.
- `controllers/`: HTTP only. `backups.py` (single-shot upload, reads, restore, deletion), `uploads.py` (tus),
  `project_storage.py` (usage and trash).
- `services/`: the rules. `finalize.py` (a payload in memory admitted, stored and committed in one transaction),
  `uploads.py` and `upload_patch.py` (tus sessions and their PATCHes), `backups.py` (who may act for which device,
  queries, the streamed commit), `lifecycle.py` (quota, retention, trash, append-only).
- `chunk_writes.py`, `chunk_reads.py` and `crypto.py`: the payload pipelines and per-payload data keys.
- `store/`: the only raw SQL (`connection.py` opens a tenant's transaction, `reads.py` the envelope and restore
  reads, `commits.py` the one-transaction commit, `upload_leases.py` the tus sessions), and the payload stores
  (`payloads.py` for PostgreSQL, `s3.py` for a bucket).
- `jobs/`: work outside a request: the maintenance runner and its sweepers, key rotation, storage migration and
  reconciliation.
"""

from __future__ import annotations

from zkeb.domain.backups.plugin import BackupsPlugin

__all__ = ("BackupsPlugin",)
