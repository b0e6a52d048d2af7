#!/usr/bin/env bash
# Local development setup: uv, dependencies, a .env with fresh secrets, migrations, seed data.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: dev-setup.sh [--help] [--no-seed]

Prepares a development checkout (idempotent; safe to re-run):
  1. installs uv (https://astral.sh/uv) when it is not on PATH;
  2. `uv sync --locked` (runtime and dev dependencies);
  3. creates .env from deploy/.env.example when .env is absent, filling
     ZKEB_MASTER_ENCRYPTION_KEY, JWT_SECRET and API_KEY_SALT with fresh
     32-byte secrets (openssl rand -base64 32, or Python's secrets module);
     an existing .env is never modified;
  4. `uv run --env-file .env zkeb db upgrade` (embedded PostgreSQL in
     ZKEB_DATA_DIR unless .env sets DATABASE_URL);
  5. `uv run --env-file .env zkeb db seed` (demo organization, project and
     device; skipped with --no-seed).

Environment:
  ZKEB_ENV_FILE   file to create/use [.env in the repository root]
EOF
}

seed=1
while (($# > 0)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --no-seed) seed=0 ;;
    *) echo "dev-setup: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
ENV_FILE="${ZKEB_ENV_FILE:-${ROOT}/.env}"
EXAMPLE="${ROOT}/deploy/.env.example"

step() { printf '\n==> %s\n' "$*"; }

step "uv"
if ! command -v uv >/dev/null 2>&1; then
  echo "uv not found: installing it with the official installer"
  curl -LsSf https://astral.sh/uv/install.sh | sh
  export PATH="${HOME}/.local/bin:${PATH}"
fi
uv --version

step "dependencies"
uv sync --locked

new_secret() {
  if command -v openssl >/dev/null 2>&1; then
    openssl rand -base64 32
  else
    python3 -c 'import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())'
  fi
}

step "environment file"
if [[ -f "${ENV_FILE}" ]]; then
  echo "${ENV_FILE} exists: left unchanged"
else
  [[ -f "${EXAMPLE}" ]] || { echo "dev-setup: ${EXAMPLE} is missing" >&2; exit 1; }
  umask 077
  tmp="$(mktemp "${ENV_FILE}.XXXXXX")"
  master="$(new_secret)" jwt="$(new_secret)" salt="$(new_secret)"
  MASTER="${master}" JWT="${jwt}" SALT="${salt}" python3 - "${EXAMPLE}" "${tmp}" <<'PY'
import os
import sys

values = {
    "ZKEB_ENV": "development",
    "ZKEB_MASTER_ENCRYPTION_KEY": os.environ["MASTER"],
    "JWT_SECRET": os.environ["JWT"],
    "API_KEY_SALT": os.environ["SALT"],
}
lines = []
with open(sys.argv[1], encoding="utf-8") as example:
    for line in example:
        name = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and name in values:
            line = f"{name}={values.pop(name)}\n"
        lines.append(line)
for name, value in values.items():
    lines.append(f"{name}={value}\n")
with open(sys.argv[2], "w", encoding="utf-8") as env_file:
    env_file.writelines(lines)
PY
  unset master jwt salt
  mv "${tmp}" "${ENV_FILE}"
  echo "created ${ENV_FILE} with fresh secrets (mode 600; never commit it)"
fi

step "database migrations"
uv run --env-file "${ENV_FILE}" zkeb db upgrade

if ((seed)); then
  step "seed data"
  uv run --env-file "${ENV_FILE}" zkeb db seed
fi

cat <<EOF

Development environment ready.
  Start the server:  uv run --env-file .env zkeb serve --port 3000
  Run the tests:     uv run pytest
  Health:            curl http://127.0.0.1:3000/api/health
  Full stack:        docker compose -f deploy/docker-compose.yml --env-file .env up --build
EOF
