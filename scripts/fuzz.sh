#!/usr/bin/env bash
# Fuzzing (see FUZZING.md).
#
#   ./scripts/fuzz.sh --smoke            every target for FUZZ_SMOKE_SECONDS (default 8) seconds
#   ./scripts/fuzz.sh --long N [T...]    N executions of every target (or of the targets named), one after
#                                        another on one core; FUZZ_MAX_SECONDS caps each run (default none)
#   ./scripts/fuzz.sh --replay           the seed and regression corpora through every target, on stable
#
# --smoke and --long use `cargo +nightly fuzz` (cargo-fuzz is installed from crates.io if missing). Without
# a nightly toolchain (or when cargo-fuzz cannot be installed) they fall back to --replay, which needs only
# stable: the target bodies are plain functions of the `dps-fuzz` library, so a stable `cargo test` runs
# every corpus file through them. A crash fails the script and leaves its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(sas_token https_route mqtt_username_topic mqtt_session wire_models query continuation x509_chain csr
  ca_upload engine_http)

usage() {
  sed -n '2,12p' "$0" >&2
  exit 2
}

replay() {
  echo "== fuzz corpora replayed on stable (cargo test in fuzz/)"
  (cd fuzz && cargo test --no-default-features --locked --test corpora -- --nocapture)
}

mode=${1:-}
case "$mode" in
  --smoke) ;;
  --long)
    runs=${2:-}
    [[ "$runs" =~ ^[0-9]+$ ]] || usage
    shift 2
    if (($# > 0)); then targets=("$@"); fi
    ;;
  --replay)
    replay
    exit 0
    ;;
  *) usage ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "== no nightly toolchain: libFuzzer needs one; replaying the corpora on stable instead"
  replay
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  if ! cargo install cargo-fuzz --locked; then
    echo "== cargo-fuzz could not be installed; replaying the corpora on stable instead"
    replay
    exit 0
  fi
fi

# Instrumented builds get a directory of their own, so they never invalidate the stable build. No
# sanitizer: every crate of the project forbids unsafe code, and without ASan a run is about twice as
# fast. Debug assertions (and overflow checks) are on.
fuzz_target_dir="${CARGO_TARGET_DIR:-$PWD/fuzz/target}/fuzz"
flags=(--sanitizer none --debug-assertions --target-dir "$fuzz_target_dir")
echo "== cargo +nightly fuzz build (${#targets[@]} targets)"
cargo +nightly fuzz build "${flags[@]}"

# New inputs go to a scratch corpus (fuzz/target is ignored by git); the committed seeds are read only.
work="$PWD/fuzz/target/corpus"
summary=()
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  if [[ "$mode" == --smoke ]]; then
    limits=(-max_total_time="${FUZZ_SMOKE_SECONDS:-8}")
  else
    limits=(-runs="$runs")
    if [[ -n "${FUZZ_MAX_SECONDS:-}" ]]; then limits+=(-max_total_time="$FUZZ_MAX_SECONDS"); fi
  fi
  log="$work/$t.log"
  echo "== fuzz $t ${limits[*]}"
  start=$(date +%s)
  if ! cargo +nightly fuzz run "${flags[@]}" "$t" "$work/$t" "fuzz/corpus/$t" -- \
    "${limits[@]}" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "== $t FAILED: the crashing input is in fuzz/artifacts/$t/ (log: $log)"
    exit 1
  fi
  secs=$(($(date +%s) - start))
  execs=$(awk '/^stat::number_of_executed_units:/ { print $2 }' "$log" | tail -n 1)
  rate=$(awk '/^stat::average_exec_per_sec:/ { print $2 }' "$log" | tail -n 1)
  corpus=$(grep -Eo 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n 1 | sed 's/corp: //')
  summary+=("$(printf '%-20s %12s execs %9s exec/s %5ss corpus %s' "$t" "${execs:-?}" "${rate:-?}" "$secs" "${corpus:-?}")")
done
echo "== fuzz summary (no crashes)"
printf '%s\n' "${summary[@]}"
