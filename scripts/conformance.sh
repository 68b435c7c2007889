#!/usr/bin/env bash
# Conformance: the real, unmodified Azure IoT Python and Node SDKs against the `dps-server` binary.
# Builds the server, installs the SDKs (scripts/install-conformance-deps.sh), runs the pytest suite
# (conformance/python) and the `node --test` suite (conformance/node), and prints a final line
# "N passed, M failed" summing both. Exits non-zero on any failure.
#
# The test servers bind fixed ports on loopback addresses (127.0.0.10-19 for Python, 127.0.0.20-29 for Node,
# ports 443 and 8883 because the SDKs hard-code them), so this needs root or CAP_NET_BIND_SERVICE.
# Environment: DPS_SERVER_BIN (use this binary, skip nothing else), DPS_CONFORMANCE_KEEP=1 (keep server data
# dirs and logs), CONFORMANCE_SUITE_TIMEOUT (seconds per suite, default 420).
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
suite_timeout="${CONFORMANCE_SUITE_TIMEOUT:-420}"

echo "== conformance: cargo build -p dps-server"
cargo build -p dps-server --locked || { echo "0 passed, 1 failed"; exit 1; }

echo "== conformance: dependencies"
"$root/scripts/install-conformance-deps.sh" || { echo "0 passed, 1 failed"; exit 1; }

if [ -z "${DPS_SERVER_BIN:-}" ]; then
  target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
  export DPS_SERVER_BIN="$target_dir/debug/dps-server"
fi
echo "== conformance: server binary $DPS_SERVER_BIN"

results="$(mktemp -d)"
trap 'rm -rf "$results"' EXIT

echo "== conformance: Python (azure-iot-device) — pytest"
(cd "$root/conformance/python" &&
  timeout --kill-after=20 "$suite_timeout" .venv/bin/python -m pytest -v \
    --junitxml="$results/pytest.xml")
py_rc=$?

echo "== conformance: Node (azure-iot-provisioning-*) — node --test"
(cd "$root/conformance/node" &&
  timeout --kill-after=20 "$suite_timeout" node --test \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$results/node.tap" \
    test/*.test.js)
node_rc=$?

# Counts: pytest from its JUnit XML, node from the TAP summary ("# pass N", "# fail N", "# cancelled N").
read -r py_pass py_fail < <(python3 - "$results/pytest.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print(0, 0)
    sys.exit()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
total = sum(int(s.get("tests", 0)) for s in suites)
failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(total - failed - skipped, failed)
EOF
)
node_pass="$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$results/node.tap" 2>/dev/null | tail -1)"
node_fail="$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$results/node.tap" 2>/dev/null | tail -1)"
node_cancelled="$(sed -n 's/^# cancelled \([0-9]*\)$/\1/p' "$results/node.tap" 2>/dev/null | tail -1)"
node_pass="${node_pass:-0}"
node_fail=$((${node_fail:-0} + ${node_cancelled:-0}))

# A suite that exited non-zero without reporting a failure (crash, timeout, server not stopping) is a failure.
if [ "$py_rc" -ne 0 ] && [ "$py_fail" -eq 0 ]; then
  echo "pytest exited with $py_rc"
  py_fail=1
fi
if [ "$node_rc" -ne 0 ] && [ "$node_fail" -eq 0 ]; then
  echo "node --test exited with $node_rc"
  node_fail=1
fi

echo "== conformance: Python $py_pass passed, $py_fail failed; Node $node_pass passed, $node_fail failed"
passed=$((py_pass + node_pass))
failed=$((py_fail + node_fail))
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
