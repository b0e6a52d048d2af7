#!/usr/bin/env bash
# Smoke-test a running ZKEB deployment: readiness, /api/health, /api/version,
# /api/health/db and /api/health/redis. Used by deploy.yml and the CI image job.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: smoke-test.sh [--help] [BASE_URL]

Smoke-tests a running ZKEB server. Exits 0 when every check passes, 1 otherwise.

  1. waits (up to READY_WAIT_SECONDS) for GET /api/health/ready to answer 200;
  2. GET /api/health        -> 200, JSON status "healthy";
  3. GET /api/version       -> 200, JSON with "version" and "commit"
                               (and commit == EXPECT_COMMIT when that is set);
  4. GET /api/health/db     -> 200, JSON status "healthy";
  5. GET /api/health/redis  -> 200, JSON status "healthy" ("disabled" is accepted
                               unless REQUIRE_REDIS=1).
Each check is retried RETRIES times, RETRY_DELAY seconds apart, and every
request is bounded by PROBE_TIMEOUT seconds.

Environment (defaults in brackets):
  BASE_URL             server root, e.g. https://zkeb.example.com (or first argument)
  READY_WAIT_SECONDS   how long to wait for readiness [60]; 0 skips the wait
  RETRIES              attempts per check [3]
  RETRY_DELAY          seconds between attempts [2]
  PROBE_TIMEOUT        seconds per request [5] (not the server's REQUEST_TIMEOUT, in ms)
  EXPECT_COMMIT        commit /api/version must report [unset: not checked]
  REQUIRE_REDIS        1 = redis must be "healthy", not "disabled" [0]
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

BASE_URL="${1:-${BASE_URL:-}}"
if [[ -z "${BASE_URL}" ]]; then
  echo "smoke-test: BASE_URL is required (argument or environment)" >&2
  usage >&2
  exit 2
fi
BASE_URL="${BASE_URL%/}"
READY_WAIT_SECONDS="${READY_WAIT_SECONDS:-60}"
RETRIES="${RETRIES:-3}"
RETRY_DELAY="${RETRY_DELAY:-2}"
PROBE_TIMEOUT="${PROBE_TIMEOUT:-5}"
EXPECT_COMMIT="${EXPECT_COMMIT:-}"
REQUIRE_REDIS="${REQUIRE_REDIS:-0}"

for tool in curl python3; do
  command -v "${tool}" >/dev/null 2>&1 || { echo "smoke-test: ${tool} is required" >&2; exit 2; }
done

body_file="$(mktemp)"
trap 'rm -f "${body_file}"' EXIT

# fetch PATH: GET BASE_URL+PATH into $body_file; prints the HTTP status ("000" when unreachable).
fetch() {
  local status
  status="$(curl --silent --show-error --output "${body_file}" --write-out '%{http_code}' \
    --max-time "${PROBE_TIMEOUT}" --connect-timeout "${PROBE_TIMEOUT}" \
    -H 'Accept: application/json' "${BASE_URL}$1" 2>/dev/null)" || true
  printf '%s' "${status:-000}"
}

# json_check KIND: validates $body_file for one endpoint kind; prints a reason on failure.
json_check() {
  KIND="$1" EXPECT_COMMIT="${EXPECT_COMMIT}" REQUIRE_REDIS="${REQUIRE_REDIS}" \
    python3 - "${body_file}" <<'PY'
import json
import os
import sys

kind = os.environ["KIND"]
try:
    with open(sys.argv[1], encoding="utf-8") as handle:
        body = json.load(handle)
except (OSError, ValueError) as exc:
    print(f"body is not JSON ({exc})")
    sys.exit(1)
if not isinstance(body, dict):
    print("body is not a JSON object")
    sys.exit(1)
status = body.get("status")
if kind == "version":
    missing = [key for key in ("version", "commit") if not body.get(key)]
    if missing:
        print(f"missing {', '.join(missing)}")
        sys.exit(1)
    expected = os.environ.get("EXPECT_COMMIT", "")
    if expected and body["commit"] != expected:
        print(f"commit is {body['commit']!r}, expected {expected!r}")
        sys.exit(1)
elif kind == "redis":
    allowed = {"healthy"} if os.environ.get("REQUIRE_REDIS") == "1" else {"healthy", "disabled"}
    if status not in allowed:
        print(f"status is {status!r}, expected one of {sorted(allowed)}")
        sys.exit(1)
elif status != "healthy":
    print(f"status is {status!r}, expected 'healthy'")
    sys.exit(1)
PY
}

# check NAME PATH KIND: retried GET that must answer 200 with a body json_check accepts.
check() {
  local name="$1" path="$2" kind="$3" attempt status reason
  for ((attempt = 1; attempt <= RETRIES; attempt++)); do
    status="$(fetch "${path}")"
    if [[ "${status}" == "200" ]]; then
      if reason="$(json_check "${kind}")"; then
        echo "ok    ${name} (${path})"
        return 0
      fi
    else
      reason="HTTP ${status}"
    fi
    echo "retry ${name} (${path}): ${reason} [attempt ${attempt}/${RETRIES}]" >&2
    if ((attempt < RETRIES)); then
      sleep "${RETRY_DELAY}"
    fi
  done
  echo "FAIL  ${name} (${path}): ${reason}" >&2
  return 1
}

wait_ready() {
  local deadline status
  deadline=$((SECONDS + READY_WAIT_SECONDS))
  while :; do
    status="$(fetch /api/health/ready)"
    if [[ "${status}" == "200" ]]; then
      echo "ok    readiness (/api/health/ready)"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      echo "FAIL  readiness (/api/health/ready): HTTP ${status} after ${READY_WAIT_SECONDS}s" >&2
      return 1
    fi
    sleep 1
  done
}

echo "smoke-test: ${BASE_URL}"
failures=0
if ((READY_WAIT_SECONDS > 0)); then
  wait_ready || failures=$((failures + 1))
fi
check health /api/health health || failures=$((failures + 1))
check version /api/version version || failures=$((failures + 1))
check database /api/health/db health || failures=$((failures + 1))
check redis /api/health/redis redis || failures=$((failures + 1))

if ((failures > 0)); then
  echo "smoke-test: ${failures} check(s) failed" >&2
  exit 1
fi
echo "smoke-test: all checks passed"
