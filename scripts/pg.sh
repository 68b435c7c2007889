#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on loopback, for the tests: installs PostgreSQL from Debian's packages when
# it is missing (as root), runs initdb in a temporary directory (password authentication, a random
# password), starts it on a free 127.0.0.1 port and stops it again.
#
#   scripts/pg.sh start          start a cluster; prints `DPS_TEST_POSTGRES_URL=postgres://…` and
#                                `DPS_TEST_POSTGRES_DIR=…` (eval-able lines)
#   scripts/pg.sh stop DIR       stop the cluster started in DIR and remove DIR
#   scripts/pg.sh serve PID      start a cluster, print the two lines, keep it up while process PID lives,
#                                then stop and remove it (what the tests do when DPS_TEST_POSTGRES_URL is
#                                not set: they need no server of their own)
#
# initdb refuses to run as root: as root the cluster runs as the `postgres` user of the Debian package.
set -euo pipefail

PG_MAJOR=${PG_MAJOR:-15}

log() { echo "pg.sh: $*" >&2; }

pg_bin() {
  local d
  for d in "/usr/lib/postgresql/$PG_MAJOR/bin" $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}

ensure_installed() {
  if pg_bin >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    log "PostgreSQL is not installed and this is not root: install postgresql-$PG_MAJOR (apt-get install postgresql-$PG_MAJOR)"
    exit 1
  fi
  log "installing postgresql-$PG_MAJOR from Debian's packages"
  # No default cluster on port 5432: the tests make their own.
  mkdir -p /etc/postgresql-common
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf
  fi
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    # apt may be busy (another install on the machine): wait for its lock rather than fail.
    if (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      -o DPkg::Lock::Timeout=120 "postgresql-$PG_MAJOR" >&2; then
      break
    fi
    log "apt-get install failed (attempt $i); retrying"
    sleep 5
  done
  pg_bin >/dev/null || { log "PostgreSQL is still not installed"; exit 1; }
}

# Runs a command as the cluster's owner.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000))
}

start() {
  ensure_installed
  local bin dir password port attempt
  bin=$(pg_bin)
  dir=$(mktemp -d /tmp/dps-pg.XXXXXX)
  chmod 0755 "$dir"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    chown postgres "$dir"
  fi
  password=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf '%s\n' "$password" >"$dir/pwfile"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/pwfile"
  as_owner "$bin/initdb" -D "$dir/data" -U dps --auth=scram-sha-256 --pwfile="$dir/pwfile" -E UTF8 \
    --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
  rm -f "$dir/pwfile"
  for attempt in 1 2 3 4 5; do
    port=$(free_port)
    if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=64MB" \
      start >/dev/null 2>&1; then
      echo "$port" >"$dir/port"
      echo "DPS_TEST_POSTGRES_URL=postgres://dps:$password@127.0.0.1:$port/postgres"
      echo "DPS_TEST_POSTGRES_DIR=$dir"
      return 0
    fi
    log "could not start on port $port (attempt $attempt)"
  done
  tail -n 20 "$dir/postgres.log" >&2 || true
  exit 1
}

stop() {
  local dir=$1 bin
  [ -d "$dir/data" ] || { rm -rf "$dir"; return 0; }
  bin=$(pg_bin)
  as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:?usage: pg.sh stop DIR}" ;;
  serve)
    parent=${2:?usage: pg.sh serve PID}
    out=$(start)
    echo "$out"
    dir=$(echo "$out" | sed -n 's/^DPS_TEST_POSTGRES_DIR=//p')
    trap 'stop "$dir"' EXIT
    trap 'exit 0' TERM INT HUP
    # stdout is the test process's pipe: close it so nothing waits on it.
    exec >/dev/null
    while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
    ;;
  *)
    echo "usage: $0 start | stop DIR | serve PID" >&2
    exit 2
    ;;
esac
