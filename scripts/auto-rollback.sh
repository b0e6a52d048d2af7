#!/usr/bin/env bash
# Watch a fresh deployment's health and roll back after N consecutive failures.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'EOF'
Usage: auto-rollback.sh [--help] [HEALTH_URL]

Polls HEALTH_URL every INTERVAL seconds, at most MAX_CHECKS times. A check fails
when the URL does not answer 2xx within PROBE_TIMEOUT seconds. After
FAILURE_THRESHOLD consecutive failures the rollback command runs exactly once
and the script exits 1. When all MAX_CHECKS polls finish without reaching the
threshold the deployment is considered healthy and the script exits 0. The
script always stops: at most MAX_CHECKS polls, and never after DEADLINE_SECONDS.

Environment (defaults in brackets):
  HEALTH_URL          URL to poll (or first argument) [required]
  INTERVAL            seconds between polls [5]
  MAX_CHECKS          number of polls [12]
  FAILURE_THRESHOLD   consecutive failures that trigger the rollback [3]
  PROBE_TIMEOUT       seconds per request [5] (not the server's REQUEST_TIMEOUT, in ms)
  DEADLINE_SECONDS    hard stop for the whole watch [INTERVAL*MAX_CHECKS + 60]
  ROLLBACK_CMD        shell command that performs the rollback
                      [scripts/railway-deploy.sh rollback "$ROLLBACK_DEPLOYMENT_ID"]
  ROLLBACK_DEPLOYMENT_ID  Railway deployment to restore (default command only;
                      empty = the deployment before the newest successful one)
  RAILWAY_SERVICE     Railway service for the default command [api-server]

Exit status: 0 healthy, 1 rolled back (or the rollback itself failed: see the
log), 2 usage error.
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

HEALTH_URL="${1:-${HEALTH_URL:-}}"
if [[ -z "${HEALTH_URL}" ]]; then
  echo "auto-rollback: HEALTH_URL is required (argument or environment)" >&2
  exit 2
fi
INTERVAL="${INTERVAL:-5}"
MAX_CHECKS="${MAX_CHECKS:-12}"
FAILURE_THRESHOLD="${FAILURE_THRESHOLD:-3}"
PROBE_TIMEOUT="${PROBE_TIMEOUT:-5}"
DEADLINE_SECONDS="${DEADLINE_SECONDS:-}"

for name in INTERVAL MAX_CHECKS FAILURE_THRESHOLD PROBE_TIMEOUT DEADLINE_SECONDS; do
  if [[ "${name}" == DEADLINE_SECONDS && -z "${DEADLINE_SECONDS}" ]]; then
    DEADLINE_SECONDS=$((INTERVAL * MAX_CHECKS + 60))
  fi
  if [[ ! "${!name}" =~ ^[0-9]+$ ]]; then
    echo "auto-rollback: ${name} must be a non-negative integer, got '${!name}'" >&2
    exit 2
  fi
done
if ((MAX_CHECKS < 1 || FAILURE_THRESHOLD < 1 || PROBE_TIMEOUT < 1)); then
  echo "auto-rollback: MAX_CHECKS, FAILURE_THRESHOLD and PROBE_TIMEOUT must be at least 1" >&2
  exit 2
fi
command -v curl >/dev/null 2>&1 || { echo "auto-rollback: curl is required" >&2; exit 2; }

rollback() {
  echo "auto-rollback: ${FAILURE_THRESHOLD} consecutive failures: rolling back" >&2
  local rc=0
  if [[ -n "${ROLLBACK_CMD:-}" ]]; then
    bash -c "${ROLLBACK_CMD}" || rc=$?
  else
    bash "${SCRIPT_DIR}/railway-deploy.sh" rollback "${ROLLBACK_DEPLOYMENT_ID:-}" || rc=$?
  fi
  if ((rc != 0)); then
    echo "auto-rollback: the rollback command FAILED (exit ${rc}): act by hand (docs/operations.md)" >&2
  else
    echo "auto-rollback: rollback triggered" >&2
  fi
  exit 1
}

consecutive=0
start=${SECONDS}
echo "auto-rollback: watching ${HEALTH_URL} (${MAX_CHECKS} checks, every ${INTERVAL}s, threshold ${FAILURE_THRESHOLD})"
for ((check = 1; check <= MAX_CHECKS; check++)); do
  if curl --silent --fail --output /dev/null --max-time "${PROBE_TIMEOUT}" \
    --connect-timeout "${PROBE_TIMEOUT}" "${HEALTH_URL}"; then
    consecutive=0
    echo "auto-rollback: check ${check}/${MAX_CHECKS} healthy"
  else
    consecutive=$((consecutive + 1))
    echo "auto-rollback: check ${check}/${MAX_CHECKS} FAILED (${consecutive}/${FAILURE_THRESHOLD} consecutive)" >&2
    if ((consecutive >= FAILURE_THRESHOLD)); then
      rollback
    fi
  fi
  if ((SECONDS - start >= DEADLINE_SECONDS)); then
    echo "auto-rollback: deadline of ${DEADLINE_SECONDS}s reached after ${check} checks" >&2
    break
  fi
  if ((check < MAX_CHECKS)); then
    sleep "${INTERVAL}"
  fi
done

if ((consecutive > 0)); then
  echo "auto-rollback: watch ended with ${consecutive} trailing failure(s), below the threshold" >&2
fi
echo "auto-rollback: deployment healthy"
