#!/usr/bin/env bash
# Dual-key rotation of ZKEB_MASTER_ENCRYPTION_KEY, JWT_SECRET and API_KEY_SALT on Railway.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: rotate-secrets.sh [--help] [--execute] [--service NAME] [--environment NAME]
                         [--secrets LIST] [PHASE]

Rotates secrets without downtime using the *_NEW variables the service
understands (DESIGN.md): while NAME_NEW is set the service accepts both values.
Dry run by default: prints every step and runs nothing; --execute runs them.
Secret values are generated with `openssl rand -base64 32`, passed to Railway on
stdin (never on a command line) and never printed.

Phases, run in this order (see docs/operations.md, "Rotating secrets"):
  plan      (default) print the whole procedure
  stage     generate new values, set NAME_NEW for each secret; the last set
            triggers a deploy. From now on:
              JWT_SECRET_NEW signs new device tokens, both secrets verify;
              API_KEY_SALT_NEW hashes API keys, both salts verify;
              ZKEB_MASTER_ENCRYPTION_KEY_NEW wraps new data keys, both unwrap.
  rewrap    run `zkeb keys rotate` inside the service (re-wraps every data key
            under the new master key, chunks are not rewritten), then
            `zkeb keys status`. Wait at least the device-token lifetime
            (15 min) before promoting.
  promote   copy each NAME_NEW value into NAME (read from Railway, not from
            this machine), then delete NAME_NEW. Each step leaves a consistent
            pair, so the deploys Railway triggers in between are safe.

Options:
  --execute            run the steps instead of printing them
  --service NAME       Railway service [RAILWAY_SERVICE or api-server]
  --environment NAME   Railway environment [RAILWAY_ENVIRONMENT or linked one]
  --secrets LIST       comma-separated subset of master,jwt,salt [all three]

Environment:
  ZKEB_REMOTE   command prefix that runs a command inside the service
                [railway ssh --service NAME --]
EOF
}

execute=0
phase="plan"
service="${RAILWAY_SERVICE:-api-server}"
environment="${RAILWAY_ENVIRONMENT:-}"
secrets_list="master,jwt,salt" # pragma: allowlist secret (names, not values)
while (($# > 0)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --execute) execute=1 ;;
    --dry-run) execute=0 ;;
    --service) service="${2:?--service needs a value}"; shift ;;
    --environment) environment="${2:?--environment needs a value}"; shift ;;
    --secrets) secrets_list="${2:?--secrets needs a value}"; shift ;;
    plan | stage | rewrap | promote) phase="$1" ;;
    *) echo "rotate-secrets: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

names=()
IFS=',' read -r -a requested <<<"${secrets_list}"
for item in "${requested[@]}"; do
  case "${item}" in
    master) names+=(ZKEB_MASTER_ENCRYPTION_KEY) ;;
    jwt) names+=(JWT_SECRET) ;;
    salt) names+=(API_KEY_SALT) ;;
    *) echo "rotate-secrets: unknown secret '${item}' (use master, jwt, salt)" >&2; exit 2 ;;
  esac
done
if ((${#names[@]} == 0)); then
  echo "rotate-secrets: --secrets selected nothing" >&2
  exit 2
fi

scope=(--service "${service}")
if [[ -n "${environment}" ]]; then
  scope+=(--environment "${environment}")
fi
read -r -a remote <<<"${ZKEB_REMOTE:-railway ssh ${scope[*]} --}"

# show ARGS...: print a command the way it would run.
show() {
  printf '  $'
  printf ' %q' "$@"
  printf '\n'
}

# set_from NAME SOURCE [FLAGS...]: set NAME from the output of the function SOURCE.
set_from() {
  local name="$1" source="$2"
  shift 2
  if ((execute)); then
    "${source}" | railway variable set "${name}" --stdin "${scope[@]}" "$@" >/dev/null
    echo "  set ${name}"
  else
    printf '  $ <%s> |' "${source}"
    show railway variable set "${name}" --stdin "${scope[@]}" "$@"
  fi
}

new_secret() {
  openssl rand -base64 32 | tr -d '\n'
}

phase_stage() {
  echo "stage: set the *_NEW variables (service ${service})"
  if ((execute)); then
    command -v openssl >/dev/null 2>&1 || { echo "rotate-secrets: openssl is required" >&2; exit 2; }
  fi
  local i last=$((${#names[@]} - 1))
  for i in "${!names[@]}"; do
    if ((i < last)); then
      set_from "${names[i]}_NEW" new_secret --skip-deploys
    else
      set_from "${names[i]}_NEW" new_secret
    fi
  done
  echo "  (the last variable triggers a deploy that knows both values)"
}

phase_rewrap() {
  local name wants_master=0
  for name in "${names[@]}"; do
    [[ "${name}" == ZKEB_MASTER_ENCRYPTION_KEY ]] && wants_master=1
  done
  if ((wants_master == 0)); then
    echo "rewrap: nothing to do (master key not selected)"
    return 0
  fi
  echo "rewrap: re-wrap data keys under ZKEB_MASTER_ENCRYPTION_KEY_NEW"
  if ((execute)); then
    "${remote[@]}" zkeb keys rotate
    "${remote[@]}" zkeb keys status
  else
    show "${remote[@]}" zkeb keys rotate
    show "${remote[@]}" zkeb keys status
  fi
}

# current_value NAME: print NAME's value as Railway stores it (used for NAME_NEW only).
current_value() {
  railway variable list "${scope[@]}" --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1], ""), end="")' "$1"
}

phase_promote() {
  echo "promote: make the *_NEW values primary, then drop *_NEW"
  local name value
  for name in "${names[@]}"; do
    if ((execute)); then
      value="$(current_value "${name}_NEW")"
      if [[ -z "${value}" ]]; then
        echo "rotate-secrets: ${name}_NEW is not set: run the stage phase first" >&2
        exit 1
      fi
      printf '%s' "${value}" | railway variable set "${name}" --stdin "${scope[@]}" --skip-deploys >/dev/null
      unset value
      echo "  set ${name} from ${name}_NEW"
    else
      printf '  $ <value of %s_NEW> |' "${name}"
      show railway variable set "${name}" --stdin "${scope[@]}" --skip-deploys
    fi
  done
  for name in "${names[@]}"; do
    if ((execute)); then
      railway variable delete "${name}_NEW" "${scope[@]}" >/dev/null
      echo "  deleted ${name}_NEW"
    else
      show railway variable delete "${name}_NEW" "${scope[@]}"
    fi
  done
  echo "  next rotation due: $(date -u -d '+90 days' '+%Y-%m-%d' 2>/dev/null || echo 'in 90 days')"
}

if ((execute)) && [[ "${phase}" == plan ]]; then
  echo "rotate-secrets: the plan phase only prints; run the phases one at a time with --execute" >&2
  exit 2
fi
if ((execute)); then
  command -v railway >/dev/null 2>&1 || { echo "rotate-secrets: railway CLI is required" >&2; exit 2; }
  echo "rotate-secrets: EXECUTING phase '${phase}' for ${names[*]}"
else
  echo "rotate-secrets: dry run (add --execute to run); phase '${phase}' for ${names[*]}"
fi

case "${phase}" in
  plan)
    phase_stage
    echo "  ...verify: scripts/smoke-test.sh against the service; wait for the deploy"
    phase_rewrap
    echo "  ...wait >= 15 minutes (device-token lifetime), check 'zkeb keys status'"
    phase_promote
    ;;
  stage) phase_stage ;;
  rewrap) phase_rewrap ;;
  promote) phase_promote ;;
  *) echo "rotate-secrets: unknown phase '${phase}'" >&2; exit 2 ;;
esac
