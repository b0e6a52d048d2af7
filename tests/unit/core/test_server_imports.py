"""What the server needs of the packages the image leaves out: nothing.

Litestar declares polyfactory (and through it Faker) for example generation ZKEB never asks for, so the lock excludes
them (pyproject.toml); rich declares Pygments, which the image does not install (Dockerfile). Here the server's imports
run, exactly as scripts/image_bytecode.py performs them in the image's build, in a fresh interpreter where those
packages cannot be imported, as in the image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: Makes the packages named in argv[2] unimportable, records which of them anything tried to import, and runs
#: scripts/image_bytecode.py's import of what `zkeb serve` and `zkeb db upgrade` import, with the OpenAPI document.
PROBE = """
import json, runpy, sys, tempfile
from importlib.abc import MetaPathFinder

absent, asked = set(sys.argv[2].split(",")), set()

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in absent:
            asked.add(top)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
script = runpy.run_path(sys.argv[1], run_name="image_bytecode")
with tempfile.TemporaryDirectory() as data_dir:
    script["throwaway_production_settings"](data_dir)
    script["import_what_the_server_imports"]()
print(json.dumps(sorted(asked)))
"""

LEFT_OUT = ("polyfactory", "faker", "pygments")


def test_the_server_builds_its_app_and_openapi_document_without_the_packages_the_image_leaves_out(
    project_root: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(project_root / "scripts" / "image_bytecode.py"), ",".join(LEFT_OUT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    asked = set(json.loads(done.stdout.strip().splitlines()[-1]))
    # Mako (Alembic's templates) tries Pygments for highlighting and falls back without it; nothing asks for the rest.
    assert asked <= {"pygments"}
