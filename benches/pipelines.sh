#!/usr/bin/env bash
# Pipelines and fragments, on one machine, release build. Prints:
#  1. the point query through the gateway on an in-process pipeline vs on a remote
#     pipeline (another `tidemark serve` over Arrow Flight), p50 with pgbench -M prepared,
#     the ratio and the extra time per query, next to a loopback round trip
#     (a `SELECT 1` through pgwire, which costs the same kind of hop);
#  2. the fan-out aggregate (every shard) with 1, 2 and 4 in-process pipelines of one
#     slot each (the scaling curve on this machine's cores).
# Not part of the tests.
#
#   bash benches/pipelines.sh                    # 2 million rows, 10 s per pgbench run
#   ROWS=500000 DURATION=5 bash benches/pipelines.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-2000000}
DURATION=${DURATION:-10}
WORK=${WORK:-/tmp/tidemark-bench-pipelines}
BASE_PORT=${BASE_PORT:-56430}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tidemark/target}"
command -v pgbench >/dev/null || { apt-get update -qq && apt-get install -y -qq postgresql-contrib; }

if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="$CARGO_TARGET_DIR/release/tidemark"
fi

PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

rm -rf "$WORK" && mkdir -p "$WORK"
now_ms() { date +%s%3N; }
wait_pg() { for _ in $(seq 1 300); do psql -X -h 127.0.0.1 -p "$1" -U tidemark tidemark -c 'SELECT 1' >/dev/null 2>&1 && return; sleep 0.2; done; echo "node on $1 did not start"; exit 1; }
stop_all() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
psql_q() { psql -X -q -A -t -h 127.0.0.1 -p "$1" -U tidemark tidemark -c "$2"; }
p50() { # pgbench per-transaction log -> p50 latency in ms
  cat "$1"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {printf "%.3f", a[int(NR*0.5)+1]/1000}'
}
bench_point() { # port label -> p50 ms
  local dir="$WORK/pgbench-$2"; mkdir -p "$dir"
  (cd "$dir" && pgbench -n -M prepared -f "$WORK/point.sql" -T "$DURATION" -c 1 -l -h 127.0.0.1 -p "$1" -U tidemark tidemark >"$dir/out.txt" 2>&1)
  p50 "$dir"
}
median_ms() { # port sql runs -> median wall ms through psql
  local t=()
  for _ in $(seq 1 "$3"); do
    local a b; a=$(now_ms); psql_q "$1" "$2" >/dev/null; b=$(now_ms); t+=($((b - a)))
  done
  printf '%s\n' "${t[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

echo "== generating $ROWS rows and loading them"
"$BIN" gen --out "$WORK/usage.parquet" --rows "$ROWS" --end 2026-01-31T00:00:00Z --seed 42 2>&1 | tail -1
P1=$BASE_PORT
"$BIN" serve --data-dir "$WORK/n1" --listen "127.0.0.1:$P1" --pipelines 1 >"$WORK/n1.log" 2>&1 & PIDS+=($!)
wait_pg "$P1"
"$BIN" ingest --url "postgres://tidemark@127.0.0.1:$P1/tidemark" "$WORK/usage.parquet" 2>&1 | tail -1
stop_all

cat > "$WORK/point.sql" <<'SQL'
\set e random(0, 9999)
SELECT sum(quantity) FROM usage WHERE entity_id = 'acct-' || lpad(:e::text, 5, '0') AND service = 'storage' AND operation = 'GetObject' AND event_time >= '2026-01-20 00:00:00' AND event_time < '2026-01-21 00:00:00';
SQL
echo "SELECT 1;" > "$WORK/one.sql"

echo "== point query: in-process pipeline vs remote pipeline"
# Local: the data's own node, one in-process pipeline.
"$BIN" serve --data-dir "$WORK/n1" --listen "127.0.0.1:$P1" --pipelines 1 >"$WORK/n1.log" 2>&1 & PIDS+=($!)
wait_pg "$P1"
LOCAL=$(bench_point "$P1" local)
mkdir -p "$WORK/pgbench-one" && (cd "$WORK/pgbench-one" && pgbench -n -M prepared -f "$WORK/one.sql" -T "$DURATION" -c 1 -l -h 127.0.0.1 -p "$P1" -U tidemark tidemark >/dev/null 2>&1)
ONE=$(p50 "$WORK/pgbench-one")
stop_all
# Remote: the same node as a gateway without pipelines; a second node runs the fragment.
P2=$((BASE_PORT + 1)); I2=$((BASE_PORT + 2))
"$BIN" serve --data-dir "$WORK/n2" --listen "127.0.0.1:$P2" --node-id 2 --internal-addr "127.0.0.1:$I2" \
  --pipelines 1 --segment-store-read-only --object-store-url "file://$WORK/n1/segments" >"$WORK/n2.log" 2>&1 & PIDS+=($!)
wait_pg "$P2"
"$BIN" serve --data-dir "$WORK/n1" --listen "127.0.0.1:$P1" --pipelines 0 --peers "2=127.0.0.1:$I2" --peer-pipelines 1 >"$WORK/n1.log" 2>&1 & PIDS+=($!)
wait_pg "$P1"
REMOTE=$(bench_point "$P1" remote)
stop_all

echo "== fan-out aggregate (all shards) with N in-process pipelines of one slot each"
AGG="SELECT service, date_trunc('day', event_time) AS day, sum(quantity), count(*) FROM usage GROUP BY 1, 2"
declare -A FAN
for n in 1 2 4; do
  TIDEMARK_PIPELINE_SLOTS=1 "$BIN" serve --data-dir "$WORK/n1" --listen "127.0.0.1:$P1" --pipelines "$n" >"$WORK/n1.log" 2>&1 & PIDS+=($!)
  wait_pg "$P1"
  psql_q "$P1" "$AGG" >/dev/null   # warm the caches
  FAN[$n]=$(median_ms "$P1" "$AGG" 5)
  stop_all
done

echo
echo "| | value | ratio |"
echo "|---|---|---|"
echo "| point query p50, in-process pipeline | ${LOCAL} ms | |"
echo "| point query p50, remote pipeline (Flight, loopback) | ${REMOTE} ms | $(awk -v a="$REMOTE" -v b="$LOCAL" 'BEGIN{printf "%.2fx in-process", a/b}') |"
echo "| extra time of the remote hop | $(awk -v a="$REMOTE" -v b="$LOCAL" 'BEGIN{printf "%.3f ms", a-b}') | |"
echo "| SELECT 1 through pgwire p50 (a loopback round trip with a server behind it) | ${ONE} ms | |"
for n in 1 2 4; do
  echo "| fan-out aggregate, $n pipeline(s) x 1 slot, median of 5 | ${FAN[$n]} ms | $(awk -v a="${FAN[1]}" -v b="${FAN[$n]}" 'BEGIN{printf "%.2fx speed-up", a/b}') |"
done
