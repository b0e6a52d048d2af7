"""Bytecode for the venv modules the server imports, and only those (the Dockerfile's builder stage runs it).

Compiling the whole venv put 44 MB of bytecode in the image, half of it for modules no `zkeb` process imports
(test-support packages, optional backends, and Faker's locales and Pygments, both since left out of the image). With
none, every start compiles the ~1,100 venv modules it imports again (the venv is read-only to the service user):
start-to-ready went from about 2 s to about 4.7 s, and each granian worker pays it. So this imports the CLI and what
`zkeb serve` and `zkeb db upgrade` import, builds the app and its OpenAPI document as a granian worker does, and
writes bytecode for exactly the venv modules then loaded (about 22 MB). A module first imported on some other path
still works: it is compiled in memory when imported.

Run with `python -B` (nothing written as a side effect of importing): `python -B scripts/image_bytecode.py`.

`--sourceless` (the Dockerfile's build, never a development venv: it deletes sources) writes the bytecode of those
modules in place of their source instead (`module.pyc` beside where `module.py` was, which Python imports as it
would the source's cached bytecode), for every package but ours and those that read their own source when imported
(`_KEEP_SOURCE`). The image then carries one copy of each module the server imports instead of two: 21 MB less, the
same start-to-ready. What that costs: a traceback through a dependency shows its file and line but not the line's
text (look it up in the locked version), and `inspect.getsource` fails on those modules. ZKEB's own code keeps its
source (and cached bytecode), and so does every module the server does not import at start-up.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import os
import py_compile
import secrets
import sys
import tempfile
from pathlib import Path

import anyio

# The CLI, what `serve` imports before granian starts, what `db upgrade` runs (alembic's runtime) and the streams
# Litestar's responses use; the app factory each granian worker calls is built after these.
_SERVER_IMPORTS = (
    "zkeb.cli",
    "zkeb.prometheus_multiprocess",
    "zkeb.core.logging",
    "zkeb.core.metrics",
    "zkeb.core.telemetry",
    "zkeb.server",
    "zkeb.core.migrations",
    "alembic.command",
    "alembic.runtime.migration",
    "alembic.runtime.environment",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
)


# Sources `--sourceless` leaves in place: ours (its tracebacks are the ones read), and AnyIO's, whose lazy importer
# parses its package's source when imported (without it, AnyIO imports everything eagerly).
_KEEP_SOURCE = ("zkeb", "anyio")


def throwaway_production_settings(data_dir: str) -> None:
    """Settings the app can be built with; nothing connects to these addresses and the secrets are discarded."""
    os.environ.update(
        {
            "ZKEB_ENV": "production",
            "ZKEB_DATA_DIR": data_dir,
            "DATABASE_URL": "postgresql://build@127.0.0.1:9/build",
            "REDIS_URL": "redis://127.0.0.1:9/0",
            "ZKEB_MASTER_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
            "JWT_SECRET": secrets.token_urlsafe(48),
            "API_KEY_SALT": secrets.token_urlsafe(48),
        }
    )


def import_what_the_server_imports() -> None:
    """Imports what `zkeb serve` and `zkeb db upgrade` import (tests/unit/core/test_server_imports.py runs it too)."""
    for name in _SERVER_IMPORTS:
        importlib.import_module(name)
    from zkeb.app import create_app  # noqa: PLC0415 - after the settings are in the environment

    # The OpenAPI document as the first request to /schema builds it.
    create_app().openapi_schema.to_schema()
    # AnyIO's asyncio backend, which Litestar loads when it first serves a request.
    anyio.run(anyio.sleep, 0)
    anyio.run(_open_an_s3_client)


async def _open_an_s3_client() -> None:
    """What the S3 payload store loads when it opens its client at start-up (opening one sends no request)."""
    from aiobotocore.session import get_session  # noqa: PLC0415

    client = get_session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="build",
        aws_secret_access_key="build",  # pragma: allowlist secret (nothing is sent)
    )
    async with client:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sourceless",
        action="store_true",
        help="write dependencies' bytecode in place of their source (deletes the sources: for the image's build)",
    )
    sourceless = parser.parse_args(argv).sourceless
    venv = Path(sys.prefix).resolve()
    with tempfile.TemporaryDirectory() as data_dir:
        throwaway_production_settings(data_dir)
        import_what_the_server_imports()
    count = size = replaced = 0
    done: set[Path] = set()
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not source or not source.endswith(".py"):
            continue
        path = Path(source).resolve()
        if venv not in path.parents:
            continue  # the standard library: the base image's own bytecode
        if path in done:
            continue  # a module object listed under a second name
        done.add(path)
        # The top-level package (or module) it belongs to: lib/python3.X/site-packages/<top>/...
        top = path.relative_to(venv).parts[3].removesuffix(".py")
        if sourceless and top not in _KEEP_SOURCE:
            # In place of the source: SourcelessFileLoader checks the magic number only, so no invalidation mode.
            written = py_compile.compile(str(path), cfile=str(path.with_suffix(".pyc")), doraise=True)
            replaced += path.stat().st_size
            path.unlink()
        else:
            # Timestamp-checked, as `uv sync --compile-bytecode` writes it (COPY keeps the sources' mtimes).
            written = py_compile.compile(
                str(path), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP
            )
        count += 1
        size += Path(written).stat().st_size
    print(f"bytecode for the {count} venv modules the server imports: {size / 1e6:.1f} MB")
    if sourceless:
        print(f"  in place of {replaced / 1e6:.1f} MB of their source (all but {', '.join(_KEEP_SOURCE)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
