#!/usr/bin/env bash
# Side by side, on the same generated data: Tidemark, PostgreSQL 15 (btree index on
# (entity_id, event_time), primary key on record_id) and DuckDB (in-process, Python).
# Prints p50/p99 latency and throughput of the point query (pgbench, -M prepared, 1 and
# 16 clients), the full-table aggregate, and Parquet/CSV ingestion rows per second, with
# ratios. Not part of the tests.
#
#   bash benches/compare.sh                 # 5 million rows, 20 s per point-query run
#   ROWS=500000 DURATION=5 bash benches/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-5000000}
DURATION=${DURATION:-20}
WORK=${WORK:-/tmp/tidemark-bench}
PG_PORT=${PG_PORT:-55432}
TM_PORT=${TM_PORT:-55433}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tidemark/target}"

PGBIN=/usr/lib/postgresql/15/bin
if [ ! -x "$PGBIN/postgres" ]; then
  apt-get update -qq && apt-get install -y -qq postgresql-15 postgresql-contrib
fi
python3 -c 'import duckdb' 2>/dev/null || python3 -m pip install --quiet 'duckdb==2.0.1'

if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="$CARGO_TARGET_DIR/release/tidemark"
fi

PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  if [ -d "$WORK/pg" ]; then runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

rm -rf "$WORK" && mkdir -p "$WORK" && chmod 777 "$WORK"
echo "== generating $ROWS rows"
"$BIN" gen --out "$WORK/usage.parquet" --rows "$ROWS" --end 2026-01-31T00:00:00Z --seed 42 2>&1 | tail -1
python3 - "$WORK" <<'PY'
import duckdb, sys
w = sys.argv[1]
duckdb.sql(f"COPY (SELECT * FROM read_parquet('{w}/usage.parquet')) TO '{w}/usage.csv' (HEADER, DELIMITER ',')")
PY
chmod 644 "$WORK/usage.csv"

now_ms() { date +%s%3N; }

echo "== PostgreSQL 15"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" -A trust -U postgres >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" \
  -o "-p $PG_PORT -c shared_buffers=2GB -c max_connections=64 -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK" start >/dev/null
PSQL_PG=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres)
"${PSQL_PG[@]}" -c "CREATE TABLE usage (record_id text PRIMARY KEY, entity_id text NOT NULL, service text NOT NULL,
  operation text NOT NULL, usage_type text NOT NULL, region text, quantity numeric(38,6) NOT NULL,
  event_time timestamp NOT NULL, ingest_time timestamp NOT NULL)"
"${PSQL_PG[@]}" -c "CREATE INDEX usage_entity_time ON usage (entity_id, event_time)"
t0=$(now_ms)
"${PSQL_PG[@]}" -c "\\copy usage FROM '$WORK/usage.csv' WITH (FORMAT csv, HEADER)"
t1=$(now_ms)
PG_INGEST_MS=$((t1 - t0))
"${PSQL_PG[@]}" -c "VACUUM ANALYZE usage"
# Let PostgreSQL write out its dirty pages now, not during Tidemark's ingestion.
"${PSQL_PG[@]}" -c "CHECKPOINT"
sync

echo "== Tidemark"
"$BIN" serve --data-dir "$WORK/tm" --listen "127.0.0.1:$TM_PORT" >"$WORK/tm.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do psql -X -h 127.0.0.1 -p "$TM_PORT" -U tidemark tidemark -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.2; done
t0=$(now_ms)
"$BIN" ingest --url "postgres://tidemark@127.0.0.1:$TM_PORT/tidemark" "$WORK/usage.parquet" 2>&1 | tail -1
t1=$(now_ms)
TM_INGEST_MS=$((t1 - t0))

cat > "$WORK/point.sql" <<'SQL'
\set e random(0, 9999)
SELECT sum(quantity) FROM usage WHERE entity_id = 'acct-' || lpad(:e::text, 5, '0') AND service = 'storage' AND operation = 'GetObject' AND event_time >= '2026-01-20 00:00:00' AND event_time < '2026-01-21 00:00:00';
SQL
cat > "$WORK/agg.sql" <<'SQL'
SELECT service, date_trunc('day', event_time) AS day, sum(quantity) FROM usage GROUP BY 1, 2;
SQL

# run NAME PORT USER DB SCRIPT CLIENTS (duration-based) -> per-transaction log
run_pgbench() {
  local name=$1 port=$2 user=$3 db=$4 script=$5 clients=$6 mode=$7
  local dir="$WORK/log-$name"
  mkdir -p "$dir" && chmod 777 "$dir"
  (cd "$dir" && pgbench -n -M prepared -h 127.0.0.1 -p "$port" -U "$user" "$db" -f "$script" \
      -c "$clients" -j "$(( clients < 2 ? 1 : 2 ))" $mode -l --log-prefix=tx >/dev/null 2>"$dir/stderr" \
      || { echo "pgbench $name failed:"; cat "$dir/stderr"; exit 1; })
}

echo "== point query, aggregate"
for sys in pg tm; do
  if [ $sys = pg ]; then port=$PG_PORT; user=postgres; db=postgres; else port=$TM_PORT; user=tidemark; db=tidemark; fi
  run_pgbench "$sys-point-1" $port $user $db "$WORK/point.sql" 1 "-T $DURATION"
  run_pgbench "$sys-point-16" $port $user $db "$WORK/point.sql" 16 "-T $DURATION"
  run_pgbench "$sys-agg" $port $user $db "$WORK/agg.sql" 1 "-t 5"
done

python3 - "$WORK" "$ROWS" "$PG_INGEST_MS" "$TM_INGEST_MS" "$DURATION" <<'PY'
import duckdb, glob, statistics, sys, time
work, rows, pg_ms, tm_ms, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

def lat(name):
    us = []
    for f in glob.glob(f"{work}/log-{name}/tx*"):
        for line in open(f):
            p = line.split()
            us.append(int(p[2]))
    us.sort()
    if not us:
        raise SystemExit(f"no transactions logged for {name}")
    pct = lambda q: us[min(len(us) - 1, int(q * len(us)))] / 1000.0
    return pct(0.5), pct(0.99), len(us)

# DuckDB in the same run: load, aggregate, point query (one client).
con = duckdb.connect()
t = time.time(); con.execute(f"CREATE TABLE usage AS SELECT * FROM read_parquet('{work}/usage.parquet')"); duck_ingest = time.time() - t
aggs = []
for _ in range(5):
    t = time.time(); con.execute("SELECT service, date_trunc('day', event_time) AS day, sum(quantity) FROM usage GROUP BY 1, 2").fetchall(); aggs.append((time.time() - t) * 1000)
import random
random.seed(1)
pts = []
q = "SELECT sum(quantity) FROM usage WHERE entity_id = $1 AND service = 'storage' AND operation = 'GetObject' AND event_time >= TIMESTAMP '2026-01-20' AND event_time < TIMESTAMP '2026-01-21'"
end = time.time() + min(duration, 10)
while time.time() < end:
    e = 'acct-%05d' % random.randint(0, 9999)
    t = time.time(); con.execute(q, [e]).fetchall(); pts.append((time.time() - t) * 1000)
pts.sort()

res = {}
for sysname in ("pg", "tm"):
    res[sysname] = {k: lat(f"{sysname}-{k}") for k in ("point-1", "point-16", "agg")}

def row(label, pg, tm, duck=None, unit="ms", lower_better=True):
    # Ratios > 1 always mean Tidemark is better.
    ratio, how = ((pg / tm), "PG/Tidemark") if lower_better else ((tm / pg), "Tidemark/PG")
    d = f"{duck:10.2f}" if duck is not None else f"{'-':>10}"
    dr = ""
    if duck is not None:
        dr = f"  DuckDB/Tidemark = {duck / tm:5.2f}x" if lower_better else f"  Tidemark/DuckDB = {tm / duck:5.2f}x"
    print(f"{label:<34} {pg:12.2f} {tm:12.2f} {d}   {unit:<6} {how} = {ratio:6.2f}x{dr}")

print()
print(f"rows: {rows}; point-query runs: {duration:.0f} s each; pgbench -M prepared")
print(f"{'':<34} {'PG 15':>12} {'Tidemark':>12} {'DuckDB':>10}")
for c in ("1", "16"):
    pg, tm = res["pg"][f"point-{c}"], res["tm"][f"point-{c}"]
    duck50 = pts[len(pts)//2] if c == "1" else None
    duck99 = pts[int(0.99*len(pts))] if c == "1" else None
    row(f"point p50, {c} client(s)", pg[0], tm[0], duck50)
    row(f"point p99, {c} client(s)", pg[1], tm[1], duck99)
    row(f"point throughput, {c} client(s)", pg[2]/duration, tm[2]/duration, (len(pts)/min(duration,10)) if c == "1" else None, "q/s", lower_better=False)
pg, tm = res["pg"]["agg"], res["tm"]["agg"]
row("full aggregate (median of 5)", pg[0], tm[0], statistics.median(aggs))
row("ingestion", rows/(pg_ms/1000), rows/(tm_ms/1000), rows/duck_ingest, "rows/s", lower_better=False)
print("(every ratio > 1 means Tidemark is better; DuckDB runs in-process, without a network hop)")
PY
