#!/usr/bin/env bash
# Idle cost of the shard groups: 3 tidemark processes on 127.0.0.1-3 with SHARDS shard
# groups each (every group spanning the 3 nodes), no client traffic. After WARM seconds,
# for SECS seconds: each process's CPU time (from /proc/PID/stat) and the bytes sent on
# the loopback interface (all of loopback: run it on an otherwise quiet machine).
#
#   benches/raft_idle.sh [BIN]          (default: target/release/tidemark)
#   SHARDS=64 SECS=20 benches/raft_idle.sh target/debug/tidemark
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/tidemark}"
SHARDS="${SHARDS:-64}"
SECS="${SECS:-20}"
WARM="${WARM:-5}"
BASE="${BASE:-56000}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

peers() { local me=$1 out=""; for j in 1 2 3; do [ "$j" = "$me" ] || out="$out${out:+,}$j=127.0.0.$j:$((BASE + 10 + j))"; done; echo "$out"; }
for i in 1 2 3; do
  TIDEMARK_SHARD_COUNT="$SHARDS" TIDEMARK_LOG=warn "$BIN" serve --data-dir "$WORK/n$i" --listen "127.0.0.$i:$((BASE + i))" \
    --node-id "$i" --internal-addr "127.0.0.$i:$((BASE + 10 + i))" --peers "$(peers $i)" --pipelines 1 --peer-pipelines 1 \
    > "$WORK/n$i.log" 2>&1 &
  PIDS+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 1 600); do
    if psql -h "127.0.0.$i" -p "$((BASE + i))" -U tidemark -d tidemark -Atc "select 1" > /dev/null 2>&1; then break; fi
    sleep 0.1
  done
done
leaders=$(psql -h 127.0.0.1 -p "$((BASE + 1))" -U tidemark -d tidemark -Atc \
  "select count(*) filter (where leader is not null) || ' of ' || count(*) from system.replicas")
sleep "$WARM"
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A c0
for p in "${PIDS[@]}"; do c0[$p]=$(cpu "$p"); done
b0=$(cat /sys/class/net/lo/statistics/tx_bytes)
p0=$(cat /sys/class/net/lo/statistics/tx_packets)
sleep "$SECS"
b1=$(cat /sys/class/net/lo/statistics/tx_bytes)
p1=$(cat /sys/class/net/lo/statistics/tx_packets)
echo "shard groups per node: $SHARDS (with a leader, seen from node 1: $leaders); idle for ${SECS} s after ${WARM} s"
total=0
for i in 0 1 2; do
  p=${PIDS[$i]}
  c=$(( $(cpu "$p") - ${c0[$p]} ))
  total=$((total + c))
  awk -v n=$((i + 1)) -v c="$c" -v t="$ticks" -v s="$SECS" 'BEGIN { printf "node %d: %.1f%% of one core\n", n, 100 * c / t / s }'
done
awk -v c="$total" -v t="$ticks" -v s="$SECS" -v b=$((b1 - b0)) -v k=$((p1 - p0)) \
  'BEGIN { printf "all 3: %.1f%% of one core; loopback %.1f KiB/s, %.0f packets/s\n", 100 * c / t / s, b / 1024 / s, k / s }'
