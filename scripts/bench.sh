#!/usr/bin/env bash
# Runs the criterion benchmarks and prints a table of medians as ratios to the floor measured in the same
# run (floor/hmac_json_round_trip). With --write, replaces the generated table in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf target/criterion
cargo bench -p dps-core --bench engine --locked
python3 scripts/bench_table.py "$@"
