#!/usr/bin/env bash
# Run the ZKEB server. With no DATABASE_URL it starts an embedded PostgreSQL in ./.zkeb and migrates it.
# Installs uv (via pip) and the locked dependencies when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--help" ]]; then
  echo "usage: scripts/serve.sh [zkeb serve options]   (e.g. --port 3000 --workers 2)"
  exit 0
fi
if command -v uv >/dev/null 2>&1; then
  uv=(uv)
else
  python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
  uv=(python3 -m uv)
fi
exec "${uv[@]}" run --locked zkeb serve "$@"
