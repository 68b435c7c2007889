#!/usr/bin/env bash
# Installs the MQTT broker the hub-adapter tests run against: Debian's Mosquitto (2.0, with its
# dynamic-security plugin mosquitto_dynamic_security.so) and mosquitto-clients (mosquitto_ctrl, which
# writes the plugin's initial configuration). The tests start their own broker on a free loopback port;
# this script starts none. Called by scripts/check.sh; idempotent.
set -euo pipefail

plugin_present() {
  for p in /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so \
           /usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so \
           /usr/lib/mosquitto_dynamic_security.so; do
    [ -e "$p" ] && return 0
  done
  return 1
}

if [ -x /usr/sbin/mosquitto ] && command -v mosquitto_ctrl >/dev/null 2>&1 && plugin_present; then
  echo "mosquitto: $(/usr/sbin/mosquitto -h 2>/dev/null | head -n 1)"
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients
# The package enables a system broker on port 1883; the tests do not use it.
if command -v systemctl >/dev/null 2>&1; then "${sudo_cmd[@]}" systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi
plugin_present || { echo "mosquitto installed, but mosquitto_dynamic_security.so was not found" >&2; exit 1; }
echo "mosquitto: $(/usr/sbin/mosquitto -h 2>/dev/null | head -n 1)"
