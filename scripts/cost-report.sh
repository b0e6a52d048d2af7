#!/usr/bin/env bash
# Railway cost report: the billing period's usage by resource (and by service),
# the estimated bill, and an alert when it crosses COST_ALERT_DOLLARS.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cost-report.sh [--help] [--json] [--project NAME_OR_ID] [--fail-over]

Reads `railway usage --json` (workspace billing period: usage so far, estimated
bill, usage limit, line items CPU/Memory/Egress/Volume/Backup) and, with
--project, `railway usage projects --project NAME --json` (cost per service),
and prints a report. Requires a logged-in Railway CLI (>= 5.25) or RAILWAY_API_TOKEN.

Options:
  --project NAME   also break the cost down by service for this project
                   [RAILWAY_PROJECT, e.g. zkeb-production]
  --period P       current | previous | YYYY-MM [current]
  --json           print one JSON object instead of text
  --fail-over      exit 3 when the estimated bill exceeds COST_ALERT_DOLLARS

Environment:
  COST_ALERT_DOLLARS   alert threshold in dollars [50]
  RAILWAY_PROJECT      default for --project
EOF
}

project="${RAILWAY_PROJECT:-}"
period="current"
as_json=0
fail_over=0
while (($# > 0)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --json) as_json=1 ;;
    --fail-over) fail_over=1 ;;
    --project) project="${2:?--project needs a value}"; shift ;;
    --period) period="${2:?--period needs a value}"; shift ;;
    *) echo "cost-report: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
threshold="${COST_ALERT_DOLLARS:-50}"
if [[ ! "${threshold}" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "cost-report: COST_ALERT_DOLLARS must be a number, got '${threshold}'" >&2
  exit 2
fi

for tool in railway python3; do
  command -v "${tool}" >/dev/null 2>&1 || { echo "cost-report: ${tool} is required" >&2; exit 2; }
done

workdir="$(mktemp -d)"
trap 'rm -rf "${workdir}"' EXIT

if ! railway usage --period "${period}" --json >"${workdir}/usage.json"; then
  echo "cost-report: 'railway usage --json' failed (logged in? CLI >= 5.25?)" >&2
  exit 1
fi
if [[ -n "${project}" ]]; then
  if ! railway usage projects --project "${project}" --period "${period}" --json >"${workdir}/project.json"; then
    echo "cost-report: 'railway usage projects --project ${project} --json' failed" >&2
    exit 1
  fi
fi

rc=0
python3 - "${workdir}" "${threshold}" "${as_json}" <<'PY' || rc=$?
import json
import os
import sys

workdir, threshold, as_json = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
try:
    with open(os.path.join(workdir, "usage.json"), encoding="utf-8") as handle:
        usage = json.load(handle)
    project = None
    if os.path.exists(os.path.join(workdir, "project.json")):
        with open(os.path.join(workdir, "project.json"), encoding="utf-8") as handle:
            project = json.load(handle)
except ValueError as exc:
    print(f"cost-report: the Railway CLI did not print JSON ({exc})", file=sys.stderr)
    sys.exit(1)

current = float(usage.get("currentUsageDollars") or 0.0)
estimated = usage.get("estimatedBillDollars")
estimated = float(estimated) if estimated is not None else current
period = usage.get("billingPeriod") or {}
limit = usage.get("usageLimit") or {}
items = {item.get("label", "?"): float(item.get("currentUsageDollars") or 0.0) for item in usage.get("lineItems") or []}
services = []
if project is not None:
    services = sorted(
        ((s.get("name", "?"), float(s.get("totalDollars") or 0.0)) for s in project.get("services") or []),
        key=lambda pair: pair[1],
        reverse=True,
    )
over = estimated > threshold

if as_json:
    report = {
        "workspace": (usage.get("workspace") or {}).get("name"),
        "billingPeriod": period,
        "currentUsageDollars": round(current, 2),
        "estimatedBillDollars": round(estimated, 2),
        "lineItems": {label: round(value, 2) for label, value in items.items()},
        "services": {name: round(value, 2) for name, value in services},
        "usageLimit": limit or None,
        "alertThresholdDollars": threshold,
        "overThreshold": over,
    }
    print(json.dumps(report, indent=2, sort_keys=True))
else:
    print("Railway cost report")
    print("===================")
    workspace = (usage.get("workspace") or {}).get("name", "?")
    print(f"Workspace:        {workspace}")
    print(f"Billing period:   {period.get('start', '?')} .. {period.get('end', '?')}")
    print("")
    print("Usage by resource:")
    for label in ("CPU", "Memory", "Egress", "Volume", "Backup"):
        print(f"  {label:<10} ${items.pop(label, 0.0):>10.2f}")
    for label, value in sorted(items.items()):
        print(f"  {label:<10} ${value:>10.2f}")
    if services:
        print("")
        print(f"Usage by service ({(project.get('project') or {}).get('name', '?')}):")
        for name, value in services:
            print(f"  {name:<20} ${value:>10.2f}")
    print("")
    print(f"Usage so far:     ${current:.2f}")
    print(f"Estimated bill:   ${estimated:.2f}")
    if limit:
        hard = limit.get("hardLimit")
        print(f"Usage limit:      soft ${limit.get('softLimit')}, hard {'$' + str(hard) if hard is not None else 'none'}")
        if limit.get("isOverLimit"):
            print("WARNING: the workspace is over its usage limit")
    if over:
        print(f"WARNING: estimated bill ${estimated:.2f} exceeds the alert threshold ${threshold:.2f}")
        print("         check replicas, memory limits and egress; see docs/operations.md")
sys.exit(3 if over else 0)
PY

if ((rc == 3 && fail_over == 0)); then
  rc=0
fi
exit "${rc}"
