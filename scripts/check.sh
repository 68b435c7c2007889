#!/usr/bin/env bash
# The one entry point for every check: formatting, lints (clippy --all-targets also type-checks the
# benchmarks), every test of every crate, the fuzz corpora and a short fuzz smoke run (scripts/fuzz.sh), and
# the conformance tests with the real Azure SDKs. The PostgreSQL tests run on a throwaway cluster that
# scripts/pg.sh installs (postgresql-15 from Debian's packages, if missing) and starts on loopback.
# CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Rust toolchain components the checks need (present on the project machines; installed if missing).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== fuzz/ (its own workspace): cargo fmt --check, clippy -D warnings on stable"
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
(cd fuzz && cargo clippy --no-default-features --all-targets --locked -- -D warnings)

echo "== Mosquitto (the hub-adapter tests' broker): installed if missing"
./scripts/mosquitto.sh

echo "== PostgreSQL: a throwaway cluster on loopback for the store and replica tests (scripts/pg.sh)"
pg_env=$(./scripts/pg.sh start)
eval "export $(echo "$pg_env" | grep '^DPS_TEST_POSTGRES_URL=')"
pg_dir=$(echo "$pg_env" | sed -n 's/^DPS_TEST_POSTGRES_DIR=//p')
trap 'rm -f "$log"; ./scripts/pg.sh stop "$pg_dir"' EXIT

echo "== cargo test (all crates; the PostgreSQL tests on that cluster)"
cargo test --workspace --locked 2>&1 | tee "$log"
rust_passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($i ~ /^passed;?$/) s += $(i-1) } END { print s + 0 }' "$log")
rust_failed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($i ~ /^failed;?$/) s += $(i-1) } END { print s + 0 }' "$log")

echo "== fuzz: every corpus replayed on stable, then a smoke run of every target (libFuzzer, nightly)"
./scripts/fuzz.sh --replay
./scripts/fuzz.sh --smoke

echo "== conformance: the real Azure Python and Node SDKs against dps-server"
./scripts/conformance.sh 2>&1 | tee "$log"
conf_line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
conf_passed=$(echo "$conf_line" | sed -E 's/^([0-9]+) passed, ([0-9]+) failed.*/\1/')
conf_failed=$(echo "$conf_line" | sed -E 's/^([0-9]+) passed, ([0-9]+) failed.*/\2/')

echo "== summary: Rust $rust_passed passed, $rust_failed failed; conformance $conf_passed passed, $conf_failed failed"
echo "$((rust_passed + conf_passed)) passed, $((rust_failed + conf_failed)) failed"
