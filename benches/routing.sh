#!/usr/bin/env bash
# Routing policies on one real node, release build: replays generated traces
# (`tidemark gen-trace`) once per policy and prints, per scenario and policy, the
# replay's latency percentiles, the share over the objective, the spread of fragments
# over pipelines (max/mean and coefficient of variation, from system.pipelines) and the
# pipeline-seconds used. Scenarios: (a) daily cycle with a surge, (b) a hot entity,
# (c) one pipeline slowed by 20 ms per fragment from 10 s on (fault_slow_pipeline);
# (a) and (b) once more with hot-shard copies (`hot_shards = reactive`, a decision per
# second: a fresh node has no forecast history for the predictive mode to use).
# Then the same comparison in simulation at 1,000 pipelines (`tidemark simulate`):
# once with its defaults, once with the service time measured in the real runs above
# (the balancer's estimate in system.pipelines, median over the fault-free runs) and
# their objective, and once with 8 gateways. (d) scaling on the real node with a
# forecaster trained on the trace's earlier days: see run_scaling below. Not part of
# the tests.
#
#   bash benches/routing.sh                       # 1M rows, 40 s traces
#   ROWS=300000 TRACE_S=20 bash benches/routing.sh
#   SKIP_ROUTING=1 SKIP_SIM=1 bash benches/routing.sh   # (d) on the real node only
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
TRACE_S=${TRACE_S:-40}
PEAK=${PEAK:-400}
CLIENTS=${CLIENTS:-16}
SLO_MS=${SLO_MS:-20}
PIPELINES=${PIPELINES:-4}
WORK=${WORK:-/tmp/tidemark-bench-routing}
PORT=${PORT:-56530}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tidemark/target}"
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="$CARGO_TARGET_DIR/release/tidemark"
fi
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT
rm -rf "$WORK" && mkdir -p "$WORK"
URL="postgres://tidemark@127.0.0.1:$PORT/tidemark"
wait_pg() { for _ in $(seq 1 300); do psql -X -h 127.0.0.1 -p "$PORT" -U tidemark tidemark -c 'SELECT 1' >/dev/null 2>&1 && return; sleep 0.2; done; echo "node did not start"; exit 1; }
psql_q() { psql -X -q -A -t -F ' ' -h 127.0.0.1 -p "$PORT" -U tidemark tidemark -c "$1"; }
start() { # extra env assignments...
  env "$@" TIDEMARK_PIPELINES="$PIPELINES" "$BIN" serve --data-dir "$WORK/node" --listen "127.0.0.1:$PORT" >"$WORK/node.log" 2>&1 &
  PID=$!
  wait_pg
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; }

echo "== $ROWS generated rows, $PIPELINES pipelines, traces of $TRACE_S s peaking at $PEAK q/s, $CLIENTS clients, objective $SLO_MS ms"
"$BIN" gen --out "$WORK/usage.parquet" --rows "$ROWS" --end 2026-01-31T00:00:00Z --seed 42 2>&1 | tail -1
start
"$BIN" ingest --url "$URL" "$WORK/usage.parquet" 2>&1 | tail -1
stop
cp -a "$WORK/node" "$WORK/node.ingested"
for s in surge hot none; do
  "$BIN" gen-trace --out "$WORK/$s.csv" --duration-s "$TRACE_S" --peak-rate "$PEAK" --scenario "$s" --start 2026-01-20T00:00:00Z --seed 7 | tail -1
done

run() { # scenario-label trace policy [env...]
  local label=$1 trace=$2 policy=$3; shift 3
  start "$@"
  local before; before=$(psql_q "SELECT string_agg(completed::text, ',' ORDER BY pipeline) FROM system.pipelines")
  local out; out=$("$BIN" replay --trace "$WORK/$trace.csv" --url "$URL" --clients "$CLIENTS" --routing-policy "$policy" --slo-ms "$SLO_MS" 2>/dev/null)
  local after; after=$(psql_q "SELECT string_agg(completed::text, ',' ORDER BY pipeline) FROM system.pipelines")
  if [ $# -eq 0 ]; then
    psql_q "SELECT median(service_us) FROM system.pipelines WHERE local AND service_us IS NOT NULL" >>"$WORK/service_us.txt"
    echo "$out" | sed -n 's/.*p50 \([0-9.]*\) ms.*/\1/p' | head -1 >>"$WORK/p50_ms.txt"
  fi
  stop
  python3 - "$label" "$policy" "$before" "$after" "$PIPELINES" "$TRACE_S" "$out" <<'PY'
import re, statistics, sys
label, policy, before, after, pipes, secs, out = sys.argv[1:]
b = [int(x) for x in before.split(',')]; a = [int(x) for x in after.split(',')]
d = [y - x for x, y in zip(b, a)]
mean = statistics.mean(d) if d else 0
cv = statistics.pstdev(d) / mean if mean else 0
lat = dict(re.findall(r'(p50|p99\.9|p99) ([\d.]+) ms', out))
over = re.search(r'\(([\d.]+)%\)', out).group(1)
sent = re.search(r'sent (\d+), ok (\d+), failed (\d+), unknown (\d+)', out).groups()
print(f"{label:<22} {policy:<16} {sent[1]:>7} ok {sent[2]:>3} failed {lat.get('p50','-'):>7} {lat.get('p99','-'):>8} {lat.get('p99.9','-'):>8} {over:>8}% {max(d)/mean if mean else 0:>6.2f} {cv:>6.3f} {int(pipes)*float(secs):>6.0f}")
PY
}
if [ "${SKIP_ROUTING:-0}" != 1 ]; then
echo
echo "scenario               policy                ok   failed  p50 ms   p99 ms  p99.9 ms  over obj  max/mean  CV  pipeline-s"
HOT=(TIDEMARK_HOT_SHARDS=reactive TIDEMARK_AUTOSCALE_INTERVAL_MS=1000)
for policy in round_robin least_in_flight power_of_two predictive; do run "(a) surge" surge "$policy"; done
run "(a) + reactive copies" surge least_in_flight "${HOT[@]}"
for policy in round_robin least_in_flight power_of_two predictive; do run "(b) hot entity" hot "$policy"; done
run "(b) + reactive copies" hot least_in_flight "${HOT[@]}"
for policy in round_robin least_in_flight power_of_two predictive; do
  run "(c) slow pipeline" none "$policy" TIDEMARK_FAULT_SLOW_PIPELINE=n1.p1 TIDEMARK_FAULT_SLOW_MS=20 TIDEMARK_FAULT_SLOW_AFTER_SECS=10
done
fi

# (d) Scaling on the real node: a trace of DAYS compressed days (the daily cycle, no
# scenario), replayed against a node whose clock runs 86,400 / TRACE_S times as fast,
# so each trace day is one day of the node's clock and its forecaster learns the cycle
# from the query log over the first DAYS-1 days (the training replay); the last day is
# replayed and measured alone. Fixed: D_PIPELINES pipelines throughout. Reactive and
# predictive: the autoscaler between 1 and D_PIPELINES pipelines, a decision every
# DECIDE_MS, forecasts refitted every second. Pipeline-seconds of the last day come
# from sampling the placed pipelines (about every 0.25 s, integrated over the samples'
# own times). Each run starts from a copy of the
# ingested data directory (no query history).
DAYS=${DAYS:-4}
# The fleet of (d): the fixed one, and the autoscaler's ceiling.
D_PIPELINES=${D_PIPELINES:-$PIPELINES}
# Each fragment holds its slot FRAGMENT_MS longer (fault_fragment_ms): point queries
# alone need a fraction of one pipeline at these rates, so without it there is nothing
# to scale; with it a pipeline of 2 slots serves about 2,000 / (FRAGMENT_MS + 0.3)
# fragments a second.
FRAGMENT_MS=${FRAGMENT_MS:-10}
# The objective of (d): the routing objective plus that added work per fragment.
D_SLO_MS=${D_SLO_MS:-$((SLO_MS + FRAGMENT_MS))}
DECIDE_MS=${DECIDE_MS:-500}
run_scaling() { # mode: fixed, reactive, predictive, or predictive+copies (hot-shard copies too)
  local label=$1 mode=${1%+copies} dir="$WORK/node-d"
  rm -rf "$dir" && cp -a "$WORK/node.ingested" "$dir"
  local scale; scale=$(python3 -c "print(86400 / $TRACE_S)")
  if [ "$mode" != fixed ]; then
    printf 'autoscale = "%s"\nautoscale_interval_ms = %s\nautoscale_pipelines_min = 1\nautoscale_pipelines_max = %s\nforecast_interval_secs = 1\n' \
      "$mode" "$DECIDE_MS" "$D_PIPELINES" >"$WORK/scale.toml"
  else
    printf 'forecast_interval_secs = 1\n' >"$WORK/scale.toml"
  fi
  # With copies: hot shards get more replicas than the map's, from the shard forecasts.
  [ "$label" != "$mode" ] && printf 'hot_shards = "%s"\n' "$mode" >>"$WORK/scale.toml"
  local start_pipes=$D_PIPELINES
  [ "$mode" != fixed ] && start_pipes=1
  TIDEMARK_FAULT_FRAGMENT_MS=$FRAGMENT_MS TIDEMARK_PIPELINES=$start_pipes "$BIN" serve --config "$WORK/scale.toml" --data-dir "$dir" --listen "127.0.0.1:$PORT" \
    --time-scale "$scale" --clock-start 2026-01-20T00:00:00Z >"$WORK/node-d.log" 2>&1 &
  PID=$!
  wait_pg
  "$BIN" replay --trace "$WORK/daily-train.csv" --url "$URL" --clients "$CLIENTS" --slo-ms "$D_SLO_MS" >/dev/null 2>&1
  ( while kill -0 "$PID" 2>/dev/null; do n=$(psql_q "SELECT count(*) FROM system.pipelines WHERE local AND shard_replicas > 0" 2>/dev/null) && echo "$(date +%s.%N) $n"; sleep 0.25; done ) >"$WORK/placed.txt" &
  local sampler=$!
  local out; out=$("$BIN" replay --trace "$WORK/daily-last.csv" --url "$URL" --clients "$CLIENTS" --slo-ms "$D_SLO_MS" 2>/dev/null)
  kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
  local decisions; decisions=$(psql_q "SELECT count(*) FILTER (WHERE action <> 'none'), count(*) FILTER (WHERE reason LIKE 'forecast%') FROM system.scaling_decisions" 2>/dev/null || echo "- -")
  stop
  python3 - "$label" "$D_PIPELINES" "$TRACE_S" "$WORK/placed.txt" "$decisions" "$out" <<'PY'
import re, sys
mode, pipes, secs, placed, decisions, out = sys.argv[1:]
lat = dict(re.findall(r'(p50|p99\.9|p99) ([\d.]+) ms', out))
over = re.search(r'\(([\d.]+)%\)', out).group(1)
sent = re.search(r'sent (\d+), ok (\d+), failed (\d+), unknown (\d+)', out).groups()
xs = [tuple(map(float, l.split())) for l in open(placed) if len(l.split()) == 2]
# Each sample holds until the next; the span is the samples' (about the day's), and
# the fixed fleet's share is D_PIPELINES over the same span.
ps = sum(n * (t2 - t1) for (t1, n), (t2, _) in zip(xs, xs[1:]))
span = xs[-1][0] - xs[0][0] if len(xs) > 1 else 0.0
print(f"{mode:<18} {sent[1]:>7} ok {sent[2]:>3} failed {lat.get('p50','-'):>7} {lat.get('p99','-'):>8} {lat.get('p99.9','-'):>8} {over:>8}% {ps:>8.1f} {ps / max(1e-9, int(pipes) * span):>6.2f}   {decisions}")
PY
}
if [ "${SKIP_SCALING:-0}" != 1 ]; then
  "$BIN" gen-trace --out "$WORK/daily.csv" --duration-s "$TRACE_S" --days "$DAYS" --peak-rate "$PEAK" --scenario none --start 2026-01-20T00:00:00Z --seed 11 | tail -1
  python3 - "$WORK/daily.csv" "$TRACE_S" "$DAYS" <<'PY'
import csv, sys
from datetime import datetime
path, day_s, days = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rows = list(csv.reader(open(path)))
head, body = rows[0], rows[1:]
def secs(v):
    return datetime.fromisoformat(v.replace('Z', '+00:00')).timestamp()
start = datetime.fromisoformat('2026-01-20T00:00:00+00:00').timestamp()
cut = start + day_s * (days - 1)
for name, keep in (("train", lambda r: secs(r[0]) < cut), ("last", lambda r: secs(r[0]) >= cut)):
    with open(path.replace('.csv', f'-{name}.csv'), 'w', newline='') as f:
        w = csv.writer(f); w.writerow(head); w.writerows(r for r in body if keep(r))
PY
  echo
  echo "== (d) scaling on the real node: $DAYS days of $TRACE_S s (the last one measured), node clock x$(python3 -c "print(round(86400 / $TRACE_S))"), 1 to $D_PIPELINES pipelines, $FRAGMENT_MS ms more per fragment, objective $D_SLO_MS ms"
  echo "scaling       ok       failed  p50 ms   p99 ms  p99.9 ms  over obj  pipeline-s  of fixed   changes, forecast-driven decisions"
  for mode in ${D_MODES:-fixed reactive predictive predictive+copies}; do run_scaling "$mode"; done
fi

[ "${SKIP_SIM:-0}" = 1 ] && exit 0
echo
echo "== simulation: 1,000 pipelines, 1 million entities"
"$BIN" simulate
# Calibration: a fragment's service time (slot to end) is the median of the balancer's
# estimates; what a query spends outside its fragment's slot (wire, planning, routing)
# is the replays' median p50 minus that, so the simulated objective is the real one
# less that overhead; the simulated day shrinks with the service time so the number
# of simulated queries stays that of the default run (arrivals scale as 1/service).
read -r SERVICE_MS SIM_SLO_MS SIM_DURATION_S < <(python3 - "$WORK/service_us.txt" "$WORK/p50_ms.txt" "$SLO_MS" <<'PY'
import statistics, sys
med = lambda f: statistics.median(float(x) for x in open(f).read().split() if x.strip())
service_ms = med(sys.argv[1]) / 1000
overhead_ms = max(0.0, med(sys.argv[2]) - service_ms)
print(f"{service_ms:.3f} {float(sys.argv[3]) - overhead_ms:.2f} {10 * service_ms / 20:.4f}")
PY
)
echo
echo "== simulation calibrated from the real runs: service $SERVICE_MS ms (median of the balancer's estimates), objective $SIM_SLO_MS ms ($SLO_MS ms less the replays' median p50 outside the fragment), $SIM_DURATION_S s simulated"
"$BIN" simulate --service-ms "$SERVICE_MS" --slo-ms "$SIM_SLO_MS" --duration-s "$SIM_DURATION_S"
echo
echo "== simulation: the same with 8 gateways (each sees only its own requests)"
"$BIN" simulate --gateways 8
