#!/usr/bin/env bash
# Copies Scalar's standalone bundle, at the version package-lock.json pins, into the Python package.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/scalar/vendor.sh [--check]

The API reference page (/schema/scalar) loads Scalar from the Python package, never
from a CDN. This script fetches the @scalar/api-reference tarball at the version that
scripts/scalar/package-lock.json pins (npm pack, from the configured npm registry),
refuses it unless its sha512 equals the lock's "integrity", and writes its
dist/browser/standalone.js gzipped to src/zkeb/core/static/scalar/api-reference.js.gz
(the server sends those bytes to clients that accept gzip and decompresses them for
the others), recording the bundle's SHA-256 in scripts/scalar/api-reference.js.sha256
(which the test suite checks offline, with the version banner inside the bundle).

  --check   write nothing: exit 1 unless the committed file decompresses byte for byte
            to the bundle the pinned tarball ships

To upgrade: change the version in package.json, run
  npm install --package-lock-only --ignore-scripts --prefix scripts/scalar
then this script, and commit the three files. Needs node, npm, tar, gzip, sha256sum, openssl.
EOF
}

check=false
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --check) check=true ;;
  "") ;;
  *) usage >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${ROOT}"
LOCK="scripts/scalar/package-lock.json"
NAME="api-reference.js"
TARGET="src/zkeb/core/static/scalar/${NAME}.gz"
DIGEST="scripts/scalar/api-reference.js.sha256"
PACKAGE="@scalar/api-reference"

read -r version integrity < <(node -e '
  const entry = require(process.argv[1]).packages["node_modules/" + process.argv[2]];
  if (!entry || !entry.version || !entry.integrity) { process.exit(1); }
  console.log(entry.version + " " + entry.integrity);
' "${ROOT}/${LOCK}" "${PACKAGE}") || { echo "${LOCK} pins no ${PACKAGE} with an integrity" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
tarball="$(cd "${work}" && npm pack "${PACKAGE}@${version}" --silent --ignore-scripts)"
actual="sha512-$(openssl dgst -sha512 -binary "${work}/${tarball}" | base64 -w0)"
if [[ "${actual}" != "${integrity}" ]]; then
  echo "${PACKAGE}@${version}: the tarball's integrity ${actual} is not the lock's ${integrity}" >&2
  exit 1
fi
tar -xzf "${work}/${tarball}" -C "${work}" package/dist/browser/standalone.js
bundle="${work}/package/dist/browser/standalone.js"
if ! grep -qF "${PACKAGE}@${version}" "${bundle}"; then
  echo "${PACKAGE}@${version}: the bundle does not carry its version banner" >&2
  exit 1
fi

if "${check}"; then
  if gzip -dc "${TARGET}" 2>/dev/null | cmp -s "${bundle}" -; then
    echo "ok: ${TARGET} is ${PACKAGE}@${version}'s dist/browser/standalone.js, gzipped"
    exit 0
  fi
  echo "${TARGET} differs from ${PACKAGE}@${version}'s bundle: run scripts/scalar/vendor.sh" >&2
  exit 1
fi
mkdir -p "$(dirname "${TARGET}")"
# -n: no name or time stamp in the header, so the same bundle always gives the same file.
gzip -9 -n -c "${bundle}" >"${TARGET}"
chmod 0644 "${TARGET}"
printf '%s  %s\n' "$(sha256sum <"${bundle}" | cut -d' ' -f1)" "${NAME}" >"${DIGEST}"
echo "wrote ${TARGET} (${PACKAGE}@${version}) and ${DIGEST}"
