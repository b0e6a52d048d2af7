#!/usr/bin/env bash
# Check and unit-test the Prometheus alerting rules (deploy/prometheus/alerts.yml) with promtool.
# Installs promtool (Debian's `prometheus` package) when it is missing and apt-get is available.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--help" ]]; then
  echo "usage: scripts/check-alerts.sh   # promtool check rules + promtool test rules on deploy/prometheus"
  exit 0
fi

if ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool is not installed and apt-get is unavailable; install Prometheus' promtool" >&2
    exit 1
  fi
fi

promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts.test.yml)
