#!/usr/bin/env bash
# Rolling-deploy drill: blue and green `zkeb serve` behind a local nginx (its own config on free ports, never the
# system's), client load and an in-flight 50 MB upload through the switch; zero failed requests, every backup
# restorable. Needs nginx (apt-get install nginx-light) and a PostgreSQL superuser URL (--database-url or
# BENCH_DATABASE_URL, default the local one). See scripts/deploy_drill.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--help" ]]; then
  exec uv run python scripts/deploy_drill.py --help
fi
exec uv run python scripts/deploy_drill.py "$@"
