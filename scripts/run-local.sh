#!/usr/bin/env bash
# Runs the whole chunkmill job on this machine: a real nats-server (installed if missing), the
# data set (generated if missing), one fetcher, MAPPERS mappers and one saver, then `saver verify`.
#
#   ./scripts/run-local.sh                 # 100 000 objects, default rounds, 2 mappers
#   ROUNDS=0 MAPPERS=4 ./scripts/run-local.sh
#
# Settings (environment): OBJECTS (100000), ROUNDS (the fetcher's default), MAPPERS (2),
# CHUNK_SIZE (100), DATA (data/users.jsonl), OUT (out/). JOB holds other job flags for the
# fetcher and verify, e.g. JOB="--transform jq --filter .items" DATA=data/orders.jsonl KIND=orders.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

OBJECTS=${OBJECTS:-100000}
MAPPERS=${MAPPERS:-2}
CHUNK_SIZE=${CHUNK_SIZE:-100}
DATA=${DATA:-data/users.jsonl}
OUT=${OUT:-out}

ensure_nats_server
echo "building release binaries..." >&2
cargo build --release --workspace --bins --quiet
BIN=target/release
# The job is the fetcher's (mappers learn it); verify takes the same flags.
job=()
[ -n "${ROUNDS:-}" ] && job=(--rounds "$ROUNDS")
# shellcheck disable=SC2206 # JOB is word-split on purpose: it holds flags.
[ -n "${JOB:-}" ] && job+=(${JOB})
KIND=${KIND:-users}

if [ ! -s "$DATA" ]; then
  $BIN/fetcher generate --kind "$KIND" --objects "$OBJECTS" --output "$DATA"
fi

work=$(mktemp -d)
# Every local run starts from scratch: a fresh ledger and an empty sink, so its wall time is the
# whole job's. (A run is identified by the input, the chunk size and the job.)
rm -rf "$OUT"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

port=$(free_port)
nats-server -a 127.0.0.1 -p "$port" >"$work/nats.log" 2>&1 &
pids+=($!)
export NATS_URL="nats://127.0.0.1:$port"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done

echo "nats-server on $NATS_URL; logs of the other services in $work" >&2
# Metrics: fetcher on :9101, saver on :9103, mapper i on :911i (all on 127.0.0.1).
echo "live status page during the run: http://127.0.0.1:9101/" >&2
METRICS_ADDR=127.0.0.1:9103 $BIN/saver --out "$OUT" >"$work/saver.log" 2>&1 &
pids+=($!)
threads=$(mapper_threads "$MAPPERS")
for i in $(seq "$MAPPERS"); do
  METRICS_ADDR=127.0.0.1:$((9110 + i)) $BIN/mapper --instance "mapper-$i" --threads "$threads" \
    --command "enrich=python3 examples/commands/enrich.py" >"$work/mapper-$i.log" 2>&1 &
  pids+=($!)
done
start=$(date +%s%N)
METRICS_ADDR=127.0.0.1:9101 $BIN/fetcher --input "$DATA" --chunk-size "$CHUNK_SIZE" --exit-when-done \
  --state-dir "$work/state" "${job[@]}"
end=$(date +%s%N)
ms=$(( (end - start) / 1000000 ))
printf 'wall time of the run: %d.%03d s (%s mappers, job: %s)\n' $((ms / 1000)) $((ms % 1000)) "$MAPPERS" "${job[*]:-default}"
$BIN/saver verify --input "$DATA" --out "$OUT" "${job[@]}" --chunk-size "$CHUNK_SIZE"
