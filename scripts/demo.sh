#!/usr/bin/env bash
# Sets up and runs the main job: the reference server `dps-server` on its embedded SQLite store in
# ./demo-data, listening on 127.0.0.2 (HTTPS 443, MQTT 8883, admin/metrics 9090); an enrollment group created
# through the service API with the admin CLI; a demo device provisioned end to end over a real TLS
# connection with the project's own device client (honouring Retry-After). The server then keeps running in
# the foreground until Ctrl-C; with --once it is stopped (gracefully) right away.
#
# Usage: scripts/demo.sh [--once] [REGISTRATION_ID]
# Environment: DEMO_DATA (./demo-data), DEMO_HOST (127.0.0.2), DEMO_HTTPS_PORT (443), DEMO_MQTT_PORT (8883),
#              DEMO_ADMIN_PORT (9090). Ports below 1024 need root or CAP_NET_BIND_SERVICE.
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
registration_id=demo-device-001
for arg in "$@"; do
  case "$arg" in
    --once) once=true ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "demo.sh: unknown option $arg" >&2; exit 2 ;;
    *) registration_id="$arg" ;;
  esac
done

data="${DEMO_DATA:-demo-data}"
host="${DEMO_HOST:-127.0.0.2}"
https_port="${DEMO_HTTPS_PORT:-443}"
mqtt_port="${DEMO_MQTT_PORT:-8883}"
admin_port="${DEMO_ADMIN_PORT:-9090}"
id_scope=0ne00DE0001
group=demo-group

echo "== building dps-server"
cargo build --locked -q -p dps-server
bin="${CARGO_TARGET_DIR:-target}/debug/dps-server"

mkdir -p "$data"
cat > "$data/dps-server.toml" <<EOF
# Written by scripts/demo.sh on every run.
id_scope = "$id_scope"
service_host_name = "localhost"
device_host_name = "$host"
data_dir = "$data"
retry_after_secs = 2
[listen]
https = "$host:$https_port"
mqtt = "$host:$mqtt_port"
admin = "$host:$admin_port"
[tls]
subject_alt_names = ["localhost", "127.0.0.1", "$host"]
[[linked_hubs]]
host_name = "demo-hub-1.localhost"
[[linked_hubs]]
host_name = "demo-hub-2.localhost"
EOF

echo "== starting dps-server (config $data/dps-server.toml)"
rm -f "$data/ready.json"
set -m # the server gets its own process group: Ctrl-C reaches this script, which stops the server once
"$bin" run --config "$data/dps-server.toml" &
server=$!
set +m

stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" || true
  fi
}
trap stop_server EXIT

for _ in $(seq 1 600); do
  [ -f "$data/ready.json" ] && break
  if ! kill -0 "$server" 2>/dev/null; then
    trap - EXIT
    wait "$server" || true
    echo "demo.sh: dps-server did not start (see above; binding port $https_port may need root)" >&2
    exit 1
  fi
  sleep 0.1
done
[ -f "$data/ready.json" ] || { echo "demo.sh: dps-server not ready after 60 s" >&2; exit 1; }

echo
echo "== enrollment group '$group' (service API, admin CLI)"
if ! "$bin" group show --data-dir "$data" --group-id "$group" >/dev/null 2>&1; then
  "$bin" group create --data-dir "$data" --group-id "$group" \
    --initial-twin-tags '{"demo": true}' --initial-twin-properties '{"telemetryInterval": 30}' >/dev/null
  echo "created enrollment group '$group'"
else
  echo "enrollment group '$group' already exists"
fi
group_json="$("$bin" group show --data-dir "$data" --group-id "$group" --show-keys)"
group_key="$(printf '%s\n' "$group_json" | sed -n 's/.*"primaryKey": *"\([^"]*\)".*/\1/p' | head -n 1)"
[ -n "$group_key" ] || { echo "demo.sh: the group has no primary key" >&2; exit 1; }

echo
echo "== provisioning '$registration_id' over HTTPS ($host:$https_port) with a key derived from the group key"
"$bin" provision-device --registration-id "$registration_id" --group-key "$group_key" \
  --id-scope "$id_scope" --host "$host" --port "$https_port" --ca "$data/tls/ca.pem"

echo
echo "== registration state (service API)"
"$bin" registration show --data-dir "$data" --registration-id "$registration_id"

if $once; then
  echo
  echo "== --once: stopping dps-server"
  trap - EXIT
  kill -TERM "$server"
  wait "$server"
  exit $?
fi

echo
echo "dps-server keeps running on https://$host:$https_port (metrics: http://$host:$admin_port/metrics)."
echo "Press Ctrl-C to stop it."
trap - EXIT
trap 'kill -TERM "$server" 2>/dev/null || true' INT TERM
wait "$server" || true # returns early when the trap fires
status=0
wait "$server" || status=$? # the server's own exit status, once its graceful shutdown is done
exit "$status"
