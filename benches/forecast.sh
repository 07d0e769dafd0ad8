#!/usr/bin/env bash
# Load forecaster on real series that ship inside packages: `taylor` (half-hourly
# electricity demand, PyPI package pmdarima) and `vic_elec` (hourly, crate
# augurs-testing). Rolling-origin next-day forecasts against weekly seasonal naive:
# MASE, WAPE, interval coverage, fit + predict time. Not part of the tests.
#
#   bash benches/forecast.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/tidemark-bench-forecast}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tidemark/target}"
mkdir -p "$WORK"
python3 -c 'import pmdarima' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pmdarima
python3 - "$WORK/taylor.csv" <<'PY'
import sys
from pmdarima.datasets import load_taylor
y = load_taylor()
with open(sys.argv[1], "w") as f:
    f.write("i,y\n")
    for i, v in enumerate(y):
        f.write(f"{i},{v}\n")
PY
# vic_elec ships inside the augurs-testing crate: fetch it with a throwaway manifest.
if [ ! -f "$WORK/vic_elec.csv" ]; then
  mkdir -p "$WORK/fetch/src" && echo 'fn main() {}' > "$WORK/fetch/src/main.rs"
  printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\naugurs-testing = "=0.4.0"\n' > "$WORK/fetch/Cargo.toml"
  (cd "$WORK/fetch" && cargo fetch --quiet)
  cp "$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*augurs-testing-0.4.0/data/vic_elec.csv' | head -1)" "$WORK/vic_elec.csv"
fi
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="$CARGO_TARGET_DIR/release/tidemark"
fi
"$BIN" forecast-eval --csv "$WORK/taylor.csv" --bucket-secs 1800
echo
"$BIN" forecast-eval --csv "$WORK/vic_elec.csv" --bucket-secs 3600
