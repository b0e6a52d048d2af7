#!/usr/bin/env bash
# Railway deployment steps used by deploy.yml and auto-rollback.sh (Railway CLI >= 5.28).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: railway-deploy.sh [--help] COMMAND [ARG]

Commands (all act on RAILWAY_SERVICE in RAILWAY_ENVIRONMENT when set):
  current        print the id of the active deployment (newest with status SUCCESS);
                 prints nothing when the service has none yet
  up [MESSAGE]   upload the working tree (`railway up --detach --json`) and print
                 the new deployment id
  wait ID        poll `railway deployment list --json` until deployment ID is
                 SUCCESS (exit 0) or FAILED/CRASHED/REMOVED (exit 1); at most
                 WAIT_TIMEOUT seconds (exit 1), polling every WAIT_INTERVAL seconds
  rollback [ID]  roll back to deployment ID with the public API's
                 deploymentRollback mutation (`railway api`), which restores that
                 deployment's image and variables. Without ID: the newest
                 SUCCESS/REMOVED deployment older than the active one.

Environment (defaults in brackets):
  RAILWAY_TOKEN        project token (CI); or a logged-in CLI
  RAILWAY_SERVICE      service name [api-server]
  RAILWAY_ENVIRONMENT  environment name [the linked/token environment]
  WAIT_TIMEOUT         seconds for `wait` [900]
  WAIT_INTERVAL        seconds between polls for `wait` [10]
EOF
}

RAILWAY_SERVICE="${RAILWAY_SERVICE:-api-server}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-900}"
WAIT_INTERVAL="${WAIT_INTERVAL:-10}"

scope=(--service "${RAILWAY_SERVICE}")
if [[ -n "${RAILWAY_ENVIRONMENT:-}" ]]; then
  scope+=(--environment "${RAILWAY_ENVIRONMENT}")
fi

require() {
  local tool
  for tool in "$@"; do
    command -v "${tool}" >/dev/null 2>&1 || { echo "railway-deploy: ${tool} is required" >&2; exit 2; }
  done
}

# deployments: newest-first JSON list [{id, status, createdAt, meta}].
deployments() {
  railway deployment list "${scope[@]}" --json --limit 20
}

# pick MODE [ID]: reads the deployment list on stdin.
pick() {
  python3 -c '
import json, sys
mode = sys.argv[1]
target = sys.argv[2] if len(sys.argv) > 2 else ""
items = json.load(sys.stdin)
items.sort(key=lambda item: item.get("createdAt", ""), reverse=True)
if mode == "current":
    print(next((i["id"] for i in items if i.get("status") == "SUCCESS"), ""))
elif mode == "previous":
    seen_active = False
    for item in items:
        if not seen_active:
            seen_active = item.get("status") == "SUCCESS"
            continue
        if item.get("status") in ("SUCCESS", "REMOVED"):
            print(item["id"])
            break
elif mode == "status":
    print(next((i.get("status", "") for i in items if i.get("id") == target), "MISSING"))
' "$@"
}

cmd_current() {
  deployments | pick current
}

cmd_up() {
  local message="${1:-deploy $(git rev-parse --short HEAD 2>/dev/null || echo local)}"
  railway up "${scope[@]}" --detach --json --message "${message}" |
    python3 -c 'import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["deploymentId"])'
}

cmd_wait() {
  local id="${1:?wait needs a deployment id}" status deadline
  deadline=$((SECONDS + WAIT_TIMEOUT))
  while :; do
    status="$(deployments | pick status "${id}")" || status="UNKNOWN"
    echo "railway-deploy: deployment ${id}: ${status}" >&2
    case "${status}" in
      SUCCESS) return 0 ;;
      FAILED | CRASHED | REMOVED | REMOVING | SKIPPED) return 1 ;;
      *) ;;
    esac
    if ((SECONDS >= deadline)); then
      echo "railway-deploy: deployment ${id} not live after ${WAIT_TIMEOUT}s" >&2
      return 1
    fi
    sleep "${WAIT_INTERVAL}"
  done
}

cmd_rollback() {
  local id="${1:-}"
  if [[ -z "${id}" ]]; then
    id="$(deployments | pick previous)"
  fi
  if [[ -z "${id}" ]]; then
    echo "railway-deploy: no earlier deployment to roll back to" >&2
    return 1
  fi
  echo "railway-deploy: rolling back ${RAILWAY_SERVICE} to deployment ${id}" >&2
  # shellcheck disable=SC2016 # $id is a GraphQL variable, not a shell expansion
  railway api 'mutation ZkebRollback($id: String!) { deploymentRollback(id: $id) }' --raw-var "id=${id}" >/dev/null
}

case "${1:-}" in
  -h | --help)
    usage
    ;;
  current | up | wait | rollback)
    require railway python3
    command="$1"
    shift
    "cmd_${command}" "$@"
    ;;
  *)
    usage >&2
    exit 2
    ;;
esac
