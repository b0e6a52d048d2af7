"""What the server logs when a database statement fails unexpectedly: the error, never the statement's values.

SQLAlchemy puts a failed statement's parameters in its exception's text (`[parameters: (...)]`), and the traceback
of a 500 is logged: for the statements that store an envelope those are ciphertext, nonces, tags, the signature and
a wrapped data key. An operator's review found them in the ERROR log of a tus creation whose INSERT was refused.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator

import asyncpg
import pytest
from backups_support import Tenant, make_tenant, sign_envelope, tus_headers
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.core.database import RUNTIME_ROLE
from zkeb.core.logging import JsonFormatter
from zkeb.settings import Settings

from support import POSTGRES_ONLY, problem

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def tenant(client: Client, settings: Settings) -> Tenant:
    return await make_tenant(client, settings)


@pytest.fixture
def server_log() -> Iterator[io.StringIO]:
    """Every record logged meanwhile, formatted as production formats it (JSON, tracebacks included)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


@POSTGRES_ONLY
@pytest.mark.parametrize("table", ["upload_sessions", "payloads"])
async def test_a_refused_insert_logs_its_error_without_the_envelopes_bytes(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, server_log: io.StringIO, table: str
) -> None:
    envelope = sign_envelope(tenant, b"a payload whose creation fails")
    await owner_connection.execute(f"REVOKE INSERT ON {table} FROM {RUNTIME_ROLE}")
    try:
        created = await client.post(
            "/api/v1/uploads",
            headers=tus_headers(
                tenant.project_key,
                **{"Upload-Length": str(len(envelope.payload)), "Upload-Metadata": envelope.tus_metadata()},
            ),
        )
    finally:
        await owner_connection.execute(f"GRANT INSERT ON {table} TO {RUNTIME_ROLE}")
    log = "\n".join(" ".join(map(str, json.loads(line).values())) for line in server_log.getvalue().splitlines())

    assert created.status_code == 500, created.text
    problem(created)
    assert "InsufficientPrivilege" in log, "the failure was not logged"  # so the checks below look at something
    for name in ("payload_nonce", "payload_auth_tag", "metadata", "metadata_nonce", "metadata_auth_tag", "signature"):
        value: bytes = getattr(envelope, name)
        for form in (repr(value)[2:-1], value.hex(), base64.b64encode(value).decode()):
            assert form not in log, f"{name} is in the log"
    assert "[parameters:" not in log
