#!/usr/bin/env bash
# Instruction counts per registration (valgrind/callgrind, user space), server process alone against the
# load generator's bare baseline process, HTTPS and MQTT, answering early and last. Each figure is the
# difference between a run of SMALL and one of LARGE devices divided by (LARGE - SMALL), so start-up
# (key generation, schema, jitter-entropy seeding) cancels. Stable to about ±0.5 % between runs, unlike
# wall clock on a shared machine. Prints a markdown table; see BENCHMARKS.md.
#
# Usage: ./scripts/instructions.sh [SMALL LARGE]   (default 200 800; takes about 3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL="${1:-200}"
LARGE="${2:-800}"

if ! command -v valgrind >/dev/null 2>&1; then
  echo "== installing valgrind (Debian package)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq valgrind >/dev/null; fi
fi

cargo build --release --locked -p dps-server -p dps-loadgen >/dev/null
bin="$PWD/target/release"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The server under callgrind, started by the load generator's --spawn-server (the environment is inherited).
cat > "$work/server.sh" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file="\$CG_OUT" --dump-instr=no "$bin/dps-server" "\$@"
EOF
chmod +x "$work/server.sh"

total() { grep -m1 '^summary:' "$1" | awk '{print $2}'; }

server_run() { # mode early devices -> callgrind file
  local out="$work/server-$1-$2-$3"
  CG_OUT="$out" "$bin/dps-loadgen" bench --spawn-server --server-bin "$work/server.sh" \
    --server-timeout-secs 180 --devices "$3" --concurrency 16 --rounds 1 --modes "$1" \
    --server-respond-early "$2" --no-baseline --no-verify --quiet >/dev/null 2>&1
  echo "$out"
}

baseline_run() { # mode devices -> callgrind file
  local out="$work/baseline-$1-$2" ready="$work/ready-$1-$2.json"
  mkfifo "$work/stdin-$1-$2"
  sleep 600 > "$work/stdin-$1-$2" &
  local hold=$!
  valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no "$bin/dps-loadgen" baseline-server \
    --bind 127.0.0.31 --id-scope 0ne00000A11 --registration-id "loadgen-$1-000000" --threads 2 --client-auth \
    --ready-file "$ready" < "$work/stdin-$1-$2" 2>/dev/null &
  local vg=$!
  for _ in $(seq 1 300); do [ -f "$ready" ] && break; sleep 0.2; done
  python3 - "$ready" "$work/ca-$1-$2.pem" > "$work/ports-$1-$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
open(sys.argv[2], "w").write(d["ca_pem"])
print(d["https"].rsplit(":", 1)[1], d["mqtt"].rsplit(":", 1)[1])
PY
  local https_port mqtt_port
  read -r https_port mqtt_port < "$work/ports-$1-$2"
  "$bin/dps-loadgen" run --host 127.0.0.31 --https-port "$https_port" --mqtt-port "$mqtt_port" \
    --ca "$work/ca-$1-$2.pem" --id-scope 0ne00000A11 --group-key "$(printf 'k%.0s' $(seq 32) | base64)" \
    --prefix loadgen --devices "$2" --concurrency 16 --mode "$1" --ignore-retry-after --quiet >/dev/null 2>&1
  kill "$hold"; wait "$vg" || true
  echo "$out"
}

per_registration() { # small-file large-file
  echo $(( ($(total "$2") - $(total "$1")) / (LARGE - SMALL) ))
}

echo "Instruction counts per registration (callgrind, user space; $SMALL and $LARGE devices, 16 in flight)"
echo "on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'):"
echo
echo "| per registration | HTTPS | MQTT |"
echo "|---|---:|---:|"
declare -A base
row="| baseline process (bare rustls + hyper / MQTT codec, fixed replies, client certificate requested) |"
for mode in https mqtt; do
  base[$mode]=$(per_registration "$(baseline_run "$mode" "$SMALL")" "$(baseline_run "$mode" "$LARGE")")
  row="$row $(printf "%'d" "${base[$mode]}") |"
done
echo "$row"
for early in true false; do
  label=$([ "$early" = true ] && echo "dps-server, answering early (default)" || echo "dps-server, answering last")
  row="| $label |"
  for mode in https mqtt; do
    n=$(per_registration "$(server_run "$mode" "$early" "$SMALL")" "$(server_run "$mode" "$early" "$LARGE")")
    ratio=$(python3 -c "print(f'{${base[$mode]} / $n:.2f}')")
    row="$row $(printf "%'d" "$n") (ratio $ratio) |"
  done
  echo "$row"
done
