#!/usr/bin/env bash
# Installs what the conformance suites (conformance/) need, and nothing else. Idempotent: a second run with
# unchanged pins does no network access.
#   - Python: a venv at conformance/python/.venv with the pins of conformance/python/requirements.txt
#     (azure-iot-device 2.x, pytest, cryptography for conformance/pki.py), from PyPI.
#   - Node: `npm ci` in conformance/node from the committed package.json + package-lock.json (Azure IoT
#     provisioning device/transport/security (symmetric key, X.509)/service SDKs), from the npm registry.
# apt-get is used only when python3-venv or node/npm are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

log() { echo "== install-conformance-deps: $*"; }

apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-conformance-deps: $* missing and apt-get unavailable; install it and re-run" >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  log "apt-get install $*"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

hash_of() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

# --- Python -------------------------------------------------------------------------------------------------
py_dir="$root/conformance/python"
venv="$py_dir/.venv"
if ! command -v python3 >/dev/null 2>&1; then
  apt_install python3 python3-venv
fi
want="$(hash_of "$py_dir/requirements.txt")"
stamp="$venv/.conformance-stamp"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "python venv up to date ($venv)"
else
  if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      apt_install python3-venv
      python3 -m venv "$venv"
    fi
  fi
  log "pip install -r conformance/python/requirements.txt"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$py_dir/requirements.txt"
  echo "$want" >"$stamp"
fi

# --- Node ---------------------------------------------------------------------------------------------------
node_dir="$root/conformance/node"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 18 || (a === 18 && b >= 15) ? 0 : 1)'; then
  echo "install-conformance-deps: node $(node --version) is too old; the suite needs node >= 18.15 (node --test reporters)" >&2
  exit 1
fi
want="$(hash_of "$node_dir/package.json" "$node_dir/package-lock.json")"
stamp="$node_dir/node_modules/.conformance-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "node_modules up to date ($node_dir/node_modules)"
else
  log "npm ci in conformance/node"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" >"$stamp"
fi
log "done"
