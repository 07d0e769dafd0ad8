#!/usr/bin/env bash
# Side by side, on the same generated data: Tidemark, PostgreSQL 15 (btree index on
# (entity_id, event_time), primary key on record_id) and DuckDB (in-process, Python).
# Prints p50/p99 latency and throughput of the point query (pgbench, -M prepared, 1 and
# 16 clients, two forms, 1-day and 7-day windows, Zipf-popular entities), the full-table aggregate, and Parquet/CSV ingestion rows per second, with
# ratios; a sample of point-query answers is compared between the two servers before
# anything is timed. Not part of the tests.
#
#   bash benches/compare.sh                 # 5 million rows, 20 s per point-query run
#   ROWS=500000 DURATION=5 bash benches/compare.sh
#   (a smoke run on little data: MIN_CHECKED_WITH_ROWS=1, fewer sampled answers have rows)
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
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip install --quiet 'psycopg[binary]==3.2.9'

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

# The same file through the other two ways in, each into a fresh node of its own (a
# second load into the first node would only find every record id present already):
# server-side `COPY usage FROM 'file.parquet'` and psql's `\copy ... FORMAT csv`.
# Each is checked: the node must hold exactly the file's rows afterwards.
tm_copy() {
  local name=$1 port=$2 sql=$3
  mkdir -p "$WORK/tm-$name/import"
  [ "$name" = parquet ] && cp "$WORK/usage.parquet" "$WORK/tm-$name/import/usage.parquet"
  "$BIN" serve --data-dir "$WORK/tm-$name" --listen "127.0.0.1:$port" >"$WORK/tm-$name.log" 2>&1 &
  local pid=$!
  PIDS+=($pid)
  for _ in $(seq 1 100); do psql -X -h 127.0.0.1 -p "$port" -U tidemark tidemark -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.2; done
  local t0 t1 n
  t0=$(now_ms)
  psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U tidemark tidemark -c "$sql" >/dev/null || { kill "$pid"; return 1; }
  t1=$(now_ms)
  n=$(psql -X -At -h 127.0.0.1 -p "$port" -U tidemark tidemark -c 'SELECT count(*) FROM usage')
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if [ "$n" != "$ROWS_IN_FILE" ]; then echo "COPY ($name) stored $n rows of $ROWS_IN_FILE" >&2; return 1; fi
  echo $((t1 - t0))
}
ROWS_IN_FILE=$(psql -X -At -h 127.0.0.1 -p "$TM_PORT" -U tidemark tidemark -c 'SELECT count(*) FROM usage')
TM_COPY_PARQUET_MS=$(tm_copy parquet $((TM_PORT + 1)) "COPY usage FROM 'import/usage.parquet'")
TM_COPY_CSV_MS=$(tm_copy csv $((TM_PORT + 2)) "\\copy usage FROM '$WORK/usage.csv' WITH (FORMAT csv, HEADER)")
echo "tidemark ingest ${TM_INGEST_MS} ms, COPY FROM parquet ${TM_COPY_PARQUET_MS} ms, \\copy csv ${TM_COPY_CSV_MS} ms ($ROWS_IN_FILE rows)"

# Point queries, two forms, each over a 1-day and a 7-day window ending 2026-01-21:
# - expr: entities drawn Zipf(1.1) over the 10,000 entities, the key built in SQL
#   ('acct-' || lpad(:e::text, 5, '0')), literal times;
# - plain: `entity_id = $1 AND service = $2 AND event_time >= $3 AND event_time < $4`,
#   every value sent as untyped text as pgbench -M prepared sends them (dates like
#   2026-01-20): POINT_ENTITIES entities (one script each, `-D` variables), weighted by
#   Zipf(1.1) over their rank.
POINT_ENTITIES=${POINT_ENTITIES:-100}
declare -A LO=([1d]='2026-01-20' [7d]='2026-01-14')
HI='2026-01-21'
for w in 1d 7d; do
  cat > "$WORK/point-expr-$w.sql" <<SQL
\set e random_zipfian(0, 9999, 1.1)
SELECT sum(quantity) FROM usage WHERE entity_id = 'acct-' || lpad(:e::text, 5, '0') AND service = 'storage' AND operation = 'GetObject' AND event_time >= '${LO[$w]} 00:00:00' AND event_time < '$HI 00:00:00';
SQL
done
python3 - "$WORK" "$POINT_ENTITIES" <<'PY'
import random, sys
work, n = sys.argv[1], int(sys.argv[2])
random.seed(7)
ents = random.sample(range(10000), n)
args = []
for k, e in enumerate(ents):
    w = max(1, round(1000 / (k + 1) ** 1.1))
    with open(f"{work}/plain-{k}.sql", "w") as f:
        f.write(f"SELECT sum(quantity) FROM usage WHERE entity_id = :e{k} AND service = :svc AND event_time >= :lo AND event_time < :hi;\n")
    args.append(f"-f {work}/plain-{k}.sql@{w} -D e{k}=acct-{e:05d}")
open(f"{work}/plain.args", "w").write(" ".join(args))
open(f"{work}/plain.entities", "w").write(" ".join(f"acct-{e:05d}" for e in ents))
PY
cat > "$WORK/agg.sql" <<'SQL'
SELECT service, date_trunc('day', event_time) AS day, sum(quantity) FROM usage GROUP BY 1, 2;
SQL

# run NAME PORT USER DB CLIENTS MODE SCRIPT-ARGS... (duration- or count-based) -> per-transaction log
run_pgbench() {
  local name=$1 port=$2 user=$3 db=$4 clients=$5 mode=$6
  shift 6
  local dir="$WORK/log-$name"
  mkdir -p "$dir" && chmod 777 "$dir"
  (cd "$dir" && pgbench -n -M prepared -h 127.0.0.1 -p "$port" -U "$user" "$db" "$@" \
      -c "$clients" -j "$(( clients < 2 ? 1 : 2 ))" $mode -l --log-prefix=tx >/dev/null 2>"$dir/stderr" \
      || { echo "pgbench $name failed:"; cat "$dir/stderr"; exit 1; })
}

# Answers first: a sample of point queries (both forms' shapes, both windows, the
# plain form's entities and Zipf-drawn ones) must give the same sums on both servers,
# else nothing is timed.
echo "== checking answers"
python3 - "$WORK" "$PG_PORT" "$TM_PORT" "$HI" "${LO[1d]}" "${LO[7d]}" <<'PY'
import psycopg, random, sys
work, pg_port, tm_port, hi, lo1, lo7 = sys.argv[1:]
ents = open(f"{work}/plain.entities").read().split()
random.seed(3)
ents = ents[:10] + ["acct-%05d" % random.randint(0, 9999) for _ in range(10)]
pg = psycopg.connect(f"host=127.0.0.1 port={pg_port} user=postgres dbname=postgres", autocommit=True)
tm = psycopg.connect(f"host=127.0.0.1 port={tm_port} user=tidemark dbname=tidemark", autocommit=True)
plain = "SELECT sum(quantity)::text FROM usage WHERE entity_id = %s AND service = %s AND event_time >= %s AND event_time < %s"
expr = "SELECT sum(quantity)::text FROM usage WHERE entity_id = 'acct-' || lpad(%s::text, 5, '0') AND service = 'storage' AND operation = 'GetObject' AND event_time >= %s::timestamp AND event_time < %s::timestamp"
checked = nonnull = 0
for e in ents:
    for lo in (lo1, lo7):
        for sql, args in ((plain, (e, "storage", lo, hi)), (expr, (str(int(e[5:])), lo, hi))):
            a = pg.execute(sql, args).fetchone()[0]
            b = tm.execute(sql, args).fetchone()[0]
            norm = lambda v: None if v is None else format(__import__("decimal").Decimal(v).normalize(), "f")
            if norm(a) != norm(b):
                raise SystemExit(f"answers differ for {sql % args}: PostgreSQL {a}, Tidemark {b}")
            checked += 1
            nonnull += a is not None
if nonnull < int(__import__("os").environ.get("MIN_CHECKED_WITH_ROWS", "10")):
    raise SystemExit(f"only {nonnull} of {checked} sampled point queries found rows: the sample checks too little")
print(f"{checked} point queries give the same sums on both ({nonnull} with rows)")
PY

echo "== point query, aggregate"
for sys in pg tm; do
  if [ $sys = pg ]; then port=$PG_PORT; user=postgres; db=postgres; else port=$TM_PORT; user=tidemark; db=tidemark; fi
  for w in 1d 7d; do
    for c in 1 16; do
      run_pgbench "$sys-expr-$w-$c" $port $user $db $c "-T $DURATION" -f "$WORK/point-expr-$w.sql"
      # shellcheck disable=SC2046
      run_pgbench "$sys-plain-$w-$c" $port $user $db $c "-T $DURATION" $(cat "$WORK/plain.args") -D svc=storage -D lo="${LO[$w]}" -D hi="$HI"
    done
  done
  run_pgbench "$sys-agg" $port $user $db 1 "-t 5" -f "$WORK/agg.sql"
done

python3 - "$WORK" "$ROWS_IN_FILE" "$PG_INGEST_MS" "$TM_INGEST_MS" "$DURATION" "$TM_COPY_PARQUET_MS" "$TM_COPY_CSV_MS" <<'PY'
import duckdb, glob, statistics, sys, time
work, rows, pg_ms, tm_ms, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
copy_parquet_ms, copy_csv_ms = int(sys.argv[6]), int(sys.argv[7])

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
names = [f"{f}-{w}-{c}" for f in ("expr", "plain") for w in ("1d", "7d") for c in ("1", "16")] + ["agg"]
for sysname in ("pg", "tm"):
    res[sysname] = {k: lat(f"{sysname}-{k}") for k in names}

def row(label, pg, tm, duck=None, unit="ms", lower_better=True):
    # Ratios > 1 always mean Tidemark is better.
    ratio, how = ((pg / tm), "PG/Tidemark") if lower_better else ((tm / pg), "Tidemark/PG")
    d = f"{duck:10.2f}" if duck is not None else f"{'-':>10}"
    dr = ""
    if duck is not None:
        dr = f"  DuckDB/Tidemark = {duck / tm:5.2f}x" if lower_better else f"  Tidemark/DuckDB = {tm / duck:5.2f}x"
    print(f"{label:<44} {pg:12.2f} {tm:12.2f} {d}   {unit:<6} {how} = {ratio:6.2f}x{dr}")

print()
print(f"rows: {rows}; point-query runs: {duration:.0f} s each; pgbench -M prepared; entities Zipf(1.1)")
print(f"{'':<44} {'PG 15':>12} {'Tidemark':>12} {'DuckDB':>10}")
for f in ("expr", "plain"):
    for w in ("1d", "7d"):
        for c in ("1", "16"):
            pg, tm = res["pg"][f"{f}-{w}-{c}"], res["tm"][f"{f}-{w}-{c}"]
            one = c == "1" and f == "expr" and w == "1d"
            duck50 = pts[len(pts)//2] if one else None
            duck99 = pts[int(0.99*len(pts))] if one else None
            row(f"point {f} {w} p50, {c} client(s)", pg[0], tm[0], duck50)
            row(f"point {f} {w} p99, {c} client(s)", pg[1], tm[1], duck99)
            row(f"point {f} {w} throughput, {c} client(s)", pg[2]/duration, tm[2]/duration, (len(pts)/min(duration,10)) if one else None, "q/s", lower_better=False)
pg, tm = res["pg"]["agg"], res["tm"]["agg"]
row("full aggregate (median of 5)", pg[0], tm[0], statistics.median(aggs))
row("ingestion: tidemark ingest (Parquet)", rows/(pg_ms/1000), rows/(tm_ms/1000), rows/duck_ingest, "rows/s", lower_better=False)
row("ingestion: COPY FROM 'file.parquet'", rows/(pg_ms/1000), rows/(copy_parquet_ms/1000), rows/duck_ingest, "rows/s", lower_better=False)
row("ingestion: \\copy FORMAT csv", rows/(pg_ms/1000), rows/(copy_csv_ms/1000), None, "rows/s", lower_better=False)
print("(PG's ingestion is \\copy of the CSV file; DuckDB's is CREATE TABLE AS read_parquet of the Parquet file)")
print("(every ratio > 1 means Tidemark is better; DuckDB runs in-process, without a network hop, its point query on uniform entities)")
PY
