#!/usr/bin/env bash
# Ingestion throughput of one or more tidemark binaries, side by side in one run, each
# on a fresh one-node data directory on loopback:
#   bulk   `tidemark ingest` of one generated Parquet file (large statements: segments)
#   again  the same file once more (every record already stored: 0 added)
#   small  many small COPY FROM STDIN statements over several connections (the write
#          buffer path: one log append per statement and shard)
# Each phase's answer is checked (row counts in the table, rows reported added) before
# its speed is printed, and every figure is given as a ratio to the first binary.
#
#   benches/ingest.sh [BIN ...]          (default: target/release/tidemark)
#   ROWS=2000000 SMALL_STATEMENTS=4000 SMALL_ROWS=100 CLIENTS=8 benches/ingest.sh old/tidemark new/tidemark
#   NODES_LIST="1 3" benches/ingest.sh BIN    (one node, then 3 replicated nodes on
#                                             127.0.0.1-3: replication factor 1 vs 3)
#
# With several nodes the bulk ingest goes through node 1, the small statements' clients
# are spread over the nodes, and every node's count is checked (waiting, at most 60 s,
# for its replicas to apply what the others acknowledged).
#
# Needs psycopg 3 and duckdb (pip install 'psycopg[binary]' duckdb). Everything goes to 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${ROWS:-2000000}"
SMALL_STATEMENTS="${SMALL_STATEMENTS:-4000}"
SMALL_ROWS="${SMALL_ROWS:-100}"
CLIENTS="${CLIENTS:-8}"
PORT="${PORT:-55433}"
if [ "$#" -eq 0 ]; then set -- "${CARGO_TARGET_DIR:-target}/release/tidemark"; fi
WORK="$(mktemp -d)"
PID=""
cleanup() { for p in $PID; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

"$1" gen --out "$WORK/usage.parquet" --rows "$ROWS" --end 2026-01-31T00:00:00Z --seed 42 2>&1 | tail -1

results="$WORK/results.tsv"
for BIN in "$@"; do
for N in ${NODES_LIST:-1}; do
  PID=""
  URLS=""
  for i in $(seq 1 "$N"); do
    DATA="$WORK/data$i"
    rm -rf "$DATA"
    if [ "$N" -eq 1 ]; then
      "$BIN" serve --data-dir "$DATA" --listen "127.0.0.1:$PORT" > "$WORK/serve$i.log" 2>&1 &
    else
      peers=$(for j in $(seq 1 "$N"); do [ "$j" != "$i" ] && echo -n "$j=127.0.0.$j:$((PORT + 100)),"; done; true)
      "$BIN" serve --data-dir "$DATA" --listen "127.0.0.$i:$PORT" --node-id "$i" --internal-addr "127.0.0.$i:$((PORT + 100))" \
        --peers "${peers%,}" > "$WORK/serve$i.log" 2>&1 &
    fi
    PID="$PID $!"
    URLS="$URLS,postgres://tidemark@127.0.0.$i:$PORT/tidemark"
  done
  for i in $(seq 1 "$N"); do
    for _ in $(seq 1 600); do
      if [ "$(psql -h "127.0.0.$i" -p "$PORT" -U tidemark -d tidemark -Atc "select count(*) from system.replicas where leader is null" 2>/dev/null)" = "0" ]; then break; fi
      sleep 0.1
    done
  done
  python3 - "$BIN" "${URLS#,}" "$WORK/usage.parquet" "$ROWS" "$SMALL_STATEMENTS" "$SMALL_ROWS" "$CLIENTS" "$N" >> "$results" <<'EOF'
import subprocess, sys, threading, time
import duckdb, psycopg

bin_, urls, parquet, rows, statements, per, clients, nodes = sys.argv[1], sys.argv[2].split(","), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
# The file's own row count (every generated record id is distinct), read by DuckDB.
rows = duckdb.connect().execute(f"select count(distinct record_id) from read_parquet('{parquet}')").fetchall()[0][0]
url = urls[0]
conns = [psycopg.connect(u, autocommit=True) for u in urls]
conn = conns[0]
count = lambda: conn.execute("select count(*) from usage").fetchone()[0]

def every_node_counts(want):
    # Node 1 saw its own writes; the others apply what was acknowledged elsewhere.
    for k, c in enumerate(conns):
        deadline = time.time() + 60
        while True:
            got = c.execute("select count(*) from usage").fetchone()[0]
            if got == want:
                break
            assert time.time() < deadline, f"{bin_}: node {k + 1} counts {got} rows of {want}"
            time.sleep(0.2)

def ingest():
    t = time.time()
    out = subprocess.run([bin_, "ingest", "--url", url, parquet], capture_output=True, text=True, check=True)
    return time.time() - t, out.stdout + out.stderr

bulk_s, out = ingest()
stored = count()
assert stored == rows, f"{bin_}: {stored} rows stored of {rows}: {out}"
every_node_counts(rows)
again_s, out = ingest()
assert count() == rows, f"{bin_}: re-ingesting changed the count"

def client(k, n, errors):
    c = psycopg.connect(urls[k % len(urls)], autocommit=True)
    for s in range(n):
        lines = "record_id,entity_id,service,operation,usage_type,quantity,event_time\n" + "".join(
            f"small-{k}-{s}-{i},acct-{(k * 7919 + s * 31 + i) % 5000},storage,GetObject,Requests,1,2026-01-20 {i % 24:02}:00:00\n"
            for i in range(per)
        )
        with c.cursor() as cur:
            with cur.copy("COPY usage FROM STDIN WITH (FORMAT csv, HEADER)") as cp:
                cp.write(lines)
            if cur.rowcount != per:
                errors.append(f"statement {k}/{s} reported {cur.rowcount}")
    c.close()

errors = []
each = statements // clients
t = time.time()
threads = [threading.Thread(target=client, args=(k, each, errors)) for k in range(clients)]
for th in threads:
    th.start()
for th in threads:
    th.join()
small_s = time.time() - t
assert not errors, errors[:3]
small_rows = each * clients * per
every_node_counts(rows + small_rows)
label = bin_ if nodes == 1 else f"{bin_} ({nodes} nodes)"
print(f"{label}\t{rows / bulk_s:.0f}\t{rows / again_s:.0f}\t{small_rows / small_s:.0f}\t{each * clients / small_s:.0f}")
EOF
  for p in $PID; do kill "$p"; wait "$p" 2>/dev/null || true; done; PID=""
done
done

python3 - "$results" "$ROWS" "$SMALL_STATEMENTS" "$SMALL_ROWS" "$CLIENTS" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print(f"\nrows={sys.argv[2]}, small: {sys.argv[3]} statements x {sys.argv[4]} rows over {sys.argv[5]} connections")
print(f"| binary | bulk rows/s | re-ingest rows/s | small rows/s | small statements/s |")
print("|---|---|---|---|---|")
base = [float(x) for x in rows[0][1:]]
for r in rows:
    vals = [float(x) for x in r[1:]]
    cells = [f"{v:,.0f}" + ("" if r is rows[0] else f" ({v / b:.2f}x)") for v, b in zip(vals, base)]
    print(f"| {r[0]} | " + " | ".join(cells) + " |")
EOF
