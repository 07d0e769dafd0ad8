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
# their objective, and once with 8 gateways. Not part of the tests.
#
#   bash benches/routing.sh                       # 1M rows, 40 s traces
#   ROWS=300000 TRACE_S=20 bash benches/routing.sh
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
