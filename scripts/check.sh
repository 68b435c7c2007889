#!/usr/bin/env bash
# The one entry point for every check: formatting, lints, and every test of every crate.
# CI (.ci/run) calls exactly this; so should you before pushing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Rust toolchain components the checks need (present on the project machines; installed if missing).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (all crates)"
cargo test --workspace --locked

echo "== conformance: the real Azure Python and Node SDKs against dps-server"
./scripts/conformance.sh

echo "== benchmarks compile (run them with scripts/bench.sh)"
cargo bench --workspace --locked --no-run
