#!/usr/bin/env bash
# Builds one coverage-guided fuzz target with libFuzzer and runs it for a bounded time.
#   fuzz/run.sh wire 60            # the start-up and message decoder (small build)
#   fuzz/run.sh sql 600            # SQL against a whole node (a full instrumented build)
# Inputs that grow coverage go to fuzz/corpus/<target> (not committed); the committed
# seeds are read from fuzz/seeds/<target>, and every crash the fuzzer finds is written
# to fuzz/regressions/<target>: commit it with the fix, and the tests replay it.
# Works on the stable toolchain (the flags are cargo-fuzz's, without a sanitizer);
# `cargo fuzz run <target>` with cargo-fuzz installed runs the same targets.
set -euo pipefail
cd "$(dirname "$0")"
target="${1:?target: wire or sql}"
seconds="${2:-60}"
shift 2 || true
features=()
[ "$target" = sql ] && features=(--features engine)
triple="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/tidemark/target}/fuzz}"
# --target keeps these flags off build scripts and proc-macros (host code).
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
cargo build --locked --release --target "$triple" --bin "$target" "${features[@]}"
mkdir -p "corpus/$target" "regressions/$target"
bin="$CARGO_TARGET_DIR/$triple/release/$target"
# -timeout: one input running longer than this is a hang (a finding); -rss_limit_mb
# bounds the process; -print_final_stats prints the executions run.
"$bin" "corpus/$target" "seeds/$target" \
  -max_total_time="$seconds" -timeout=120 -rss_limit_mb=4096 -max_len=65536 \
  -artifact_prefix="regressions/$target/" -print_final_stats=1 "$@"
