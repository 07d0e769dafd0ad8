#!/usr/bin/env bash
# How long a replica that lost its data directory takes to catch up: 3 replicated
# tidemark processes on 127.0.0.1-3, ROWS generated rows ingested through node 1 (and
# counted on every node), then node 3 is killed (SIGKILL), its data directory deleted,
# and it is restarted; the time until it answers the full count and every one of its
# shard groups has applied what node 1's has is printed, with the size of its segment
# store once caught up (its own files: each replica writes its own segments).
#
#   benches/catch_up.sh [BIN]            (default: target/release/tidemark)
#   ROWS=5000000 benches/catch_up.sh target/release/tidemark
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/tidemark}"
ROWS="${ROWS:-2000000}"
PORT="${PORT:-55533}"
WORK="$(mktemp -d)"
declare -A PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

start() {
  local i=$1 peers
  peers=$(for j in 1 2 3; do [ "$j" != "$i" ] && echo -n "$j=127.0.0.$j:$((PORT + 100)),"; done; true)
  TIDEMARK_LOG=warn "$BIN" serve --data-dir "$WORK/n$i" --listen "127.0.0.$i:$PORT" --node-id "$i" \
    --internal-addr "127.0.0.$i:$((PORT + 100))" --peers "${peers%,}" > "$WORK/n$i.log" 2>&1 &
  PIDS[$i]=$!
}
q() { psql -h "127.0.0.$1" -p "$PORT" -U tidemark -d tidemark -XAtc "$2" 2>/dev/null || true; }
wait_for() { # node, query, expected, seconds
  local deadline=$((SECONDS + $4))
  while [ "$(q "$1" "$2")" != "$3" ]; do
    if [ $SECONDS -ge $deadline ]; then echo "node $1: '$2' is '$(q "$1" "$2")', not '$3', after $4 s" >&2; exit 1; fi
    sleep 0.2
  done
}

"$BIN" gen --out "$WORK/usage.parquet" --rows "$ROWS" --end 2026-01-31T00:00:00Z --seed 7 2>&1 | tail -1
WANT=$(python3 -c "import duckdb,sys; print(duckdb.connect().execute(\"select count(distinct record_id) from read_parquet('$WORK/usage.parquet')\").fetchall()[0][0])")
for i in 1 2 3; do start "$i"; done
for i in 1 2 3; do wait_for "$i" "select count(*) from system.replicas where leader is null" 0 120; done
t=$(date +%s.%N)
"$BIN" ingest --url "postgres://tidemark@127.0.0.1:$PORT/tidemark" "$WORK/usage.parquet" > /dev/null
for i in 1 2 3; do wait_for "$i" "select count(*) from usage" "$WANT" 300; done
echo "ingested $WANT rows into 3 replicas in $(python3 -c "import time; print(f'{time.time() - $t:.1f}')") s"
# Let the groups flush and snapshot, so the lost replica comes back from snapshots.
sleep 5
kill -9 "${PIDS[3]}"; wait "${PIDS[3]}" 2>/dev/null || true
rm -rf "$WORK/n3"
t=$(date +%s.%N)
start 3
wait_for 3 "select count(*) from usage" "$WANT" 600
applied="select string_agg(shard || ':' || applied_index, ',' order by shard) from system.replicas"
deadline=$((SECONDS + 120))
while [ "$(q 3 "$applied")" != "$(q 1 "$applied")" ]; do
  [ $SECONDS -ge $deadline ] && { echo "node 3 did not reach node 1's applied indexes" >&2; exit 1; }
  sleep 0.2
done
secs=$(python3 -c "import time; print(f'{time.time() - $t:.1f}')")
bytes=$(du -sb "$WORK/n3/segments" | cut -f1)
snapshots=$(q 1 "select count(*) from system.replicas where purged_index is not null")
echo "node 3 caught up from an empty directory in $secs s (restart included): $WANT rows, $((bytes / 1048576)) MiB of segments; $snapshots of node 1's groups had purged their logs (catch-up by snapshot there)"
