#!/usr/bin/env bash
# End-to-end benchmark: the real binaries (release) around a real nats-server over the
# 100 000-object data set, at --rounds 0 and the default rounds, with 1, 2 and 4 mapper
# processes, side by side with the in-process ideal (same transform, same data, rayon on all
# cores in one process, no NATS, no files between steps). Durability stays on (fsync).
#
#   ./scripts/bench-e2e.sh                  # the full table
#   ROUNDS_LIST="0" MAPPERS_LIST="2" ./scripts/bench-e2e.sh
#   BIN=/path/to/other/target/release ./scripts/bench-e2e.sh    # another build, side by side
#   JOB="--transform jq --filter '{id: .uuid, n: (.friends | length)}'" ./scripts/bench-e2e.sh
#   STORE=s3 ./scripts/bench-e2e.sh          # the input from an S3 server (moto) on 127.0.0.1
#   COMPRESS=zst ./scripts/bench-e2e.sh      # the input compressed first (zst or gz)
#   CHUNK_SIZE=10 MAPPERS_LIST="50 200" MAPPER_THREADS=1 CONCURRENCY=2 ROUNDS_LIST=0 \
#     ./scripts/bench-e2e.sh                # the fetcher's ceiling: many mappers, small chunks
#   PROFILE=/tmp/prof ROUNDS_LIST=0 MAPPERS_LIST=2 ./scripts/bench-e2e.sh
#                                           # perf record -a -g of each run's whole machine,
#                                           # fetcher start to exit: /tmp/prof-r0-m2.data
#                                           # (the row's times then include perf's start and stop)
#   SAVER_ARGS="--commit-window 10ms" ./scripts/bench-e2e.sh   # flags added to the saver's
#
# JOB replaces --rounds with other job flags (the same for the fetcher and the ideal); the
# rounds column then reads "job".
#
# Columns: wall time of the run (fetcher start to exit, input scan included), the scan's share
# of it (the fetcher's --summary-json scan_seconds) and its rate in MB/s of records, objects/s, the
# ideal's time, efficiency = ideal / pipeline, re-leases (chunks handed out more than once),
# duplicate saves absorbed, CPU busy (the CPU time of the fetcher, mappers, saver and nats-server
# over the run, as a share of all cores' wall time), chunks/s (chunks leased, saved and acked per
# second), the fetcher's own CPU time and that of the mappers (together), the saver and
# nats-server, and peak RSS (VmHWM) of each service.
# CHUNK_SIZE sets the fetcher's --chunk-size (default 100); MAPPER_THREADS (each mapper's rayon
# threads; default: this machine's cores shared out among the mappers, at least one each, as a
# pod's CPU limit gives it on Kubernetes) and CONCURRENCY (chunks in hand per mapper) are passed
# to the mappers.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS_LIST=${ROUNDS_LIST:-"0 3000"}
MAPPERS_LIST=${MAPPERS_LIST:-"1 2 4"}
OBJECTS=${OBJECTS:-100000}
DATA=${DATA:-data/users.jsonl}
CONCURRENCY=${CONCURRENCY:-}
CHUNK_SIZE=${CHUNK_SIZE:-100}
JOB=${JOB:-}
[ -z "$JOB" ] || ROUNDS_LIST=job

ensure_nats_server
[ -x /usr/bin/time ] || { echo "bench-e2e.sh needs GNU time for peak memory: apt-get install time" >&2; exit 1; }
# BIN=DIR runs binaries built elsewhere (e.g. an older commit, for a side-by-side comparison).
if [ -z "${BIN:-}" ]; then
  cargo build --release --workspace --bins --examples --quiet
  BIN=target/release
fi
[ -s "$DATA" ] || $BIN/fetcher generate --objects "$OBJECTS" --output "$DATA" >/dev/null
objects=$(wc -l < "$DATA")
STORE=${STORE:-local}
COMPRESS=${COMPRESS:-}

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

port=$(free_port)
nats-server -a 127.0.0.1 -p "$port" >"$work/nats.log" 2>&1 &
pids+=($!)
export NATS_URL="nats://127.0.0.1:$port" METRICS_ADDR=127.0.0.1:0
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done

# The input as the fetcher reads it: the local file, or compressed, or put into an S3 server.
input="$DATA"
case "$COMPRESS" in
  "") ;;
  zst) input="$work/$(basename "$DATA").zst"; zstd -q -3 -o "$input" "$DATA" ;;
  gz) input="$work/$(basename "$DATA").gz"; gzip -c "$DATA" >"$input" ;;
  *) echo "COMPRESS must be zst or gz, not $COMPRESS" >&2; exit 2 ;;
esac
case "$STORE" in
  local) ;;
  s3)
    ensure_s3_server
    s3_port=$(free_port)
    moto_server -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$s3_port/" && break; sleep 0.1; done
    # moto takes unsigned requests until auth is enforced: enough to make the bucket and object.
    curl -sf -X PUT "http://127.0.0.1:$s3_port/bench" >/dev/null
    curl -sf -T "$input" "http://127.0.0.1:$s3_port/bench/$(basename "$input")" >/dev/null
    export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
      AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
    input="s3://bench/$(basename "$input")"
    ;;
  *) echo "STORE must be local or s3, not $STORE" >&2; exit 2 ;;
esac

hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
nats=${pids[0]}
hz=$(getconf CLK_TCK)

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(date -u +%F), commit $(git rev-parse --short HEAD), binaries in $BIN, input $input"
printf '| rounds | mappers | threads each | pipeline s | scan s | scan MB/s | objects/s | ideal s | efficiency | CPU busy | chunks/s | fetcher CPU s | mappers / saver / nats CPU s | re-leases | dup saves | fetcher MB | mapper MB (max) | saver MB |\n'
printf '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for rounds in $ROUNDS_LIST; do
  if [ -n "$JOB" ]; then eval "job=($JOB)"; else job=(--rounds "$rounds"); fi
  ideal=$($BIN/examples/ideal --input "$DATA" "${job[@]}" | sed -n 's/.*threads: \([0-9.]*\) s.*/\1/p')
  for mappers in $MAPPERS_LIST; do
    rm -rf "$work/out" "$work/state"
    $BIN/saver --out "$work/out" ${SAVER_ARGS:-} >"$work/saver.log" 2>&1 &
    saver=$!
    mpids=()
    threads=$(mapper_threads "$mappers")
    for i in $(seq "$mappers"); do
      $BIN/mapper --threads "$threads" ${CONCURRENCY:+--concurrency "$CONCURRENCY"} >"$work/mapper-$i.log" 2>&1 &
      mpids+=($!)
    done
    # Start timing once everyone is connected.
    for log in "$work/saver.log" $(for i in $(seq "$mappers"); do echo "$work/mapper-$i.log"; done); do
      for _ in $(seq 500); do grep -qs "connected to NATS" "$log" && break; sleep 0.01; done
    done
    start=$(now_ms)
    nats_before=$(ticks "$nats")
    # GNU time reports the fetcher's peak RSS at its exit; polling /proc would cost CPU the run
    # needs.
    profile=()
    [ -z "${PROFILE:-}" ] || profile=(perf record -a -g -F 999 -o "$PROFILE-r$rounds-m$mappers.data" --)
    /usr/bin/time -f "%M %U %S" -o "$work/fetcher.rss" \
      "${profile[@]}" $BIN/fetcher --input "$input" "${job[@]}" --chunk-size "$CHUNK_SIZE" --state-dir "$work/state" --exit-when-done \
      --summary-json "$work/summary.json" >"$work/fetcher.log" 2>&1 \
      || { echo "fetcher failed:"; tail "$work/fetcher.log"; exit 1; }
    ms=$(( $(now_ms) - start ))
    fetcher_mb=$(awk '{printf "%.1f", $1/1024}' "$work/fetcher.rss")
    cpu=$(awk -v hz="$hz" '{printf "%.0f", ($2 + $3) * hz}' "$work/fetcher.rss")
    fetcher_cpu=$(awk '{printf "%.2f", $2 + $3}' "$work/fetcher.rss")
    nats_ticks=$(( $(ticks "$nats") - nats_before ))
    saver_ticks=$(ticks "$saver")
    mapper_ticks=0
    for pid in "${mpids[@]}"; do mapper_ticks=$(( mapper_ticks + $(ticks "$pid") )); done
    cpu=$(( cpu + nats_ticks + saver_ticks + mapper_ticks ))
    # Where the CPU went: mappers (all), saver, nats-server, in seconds.
    split=$(cpu_split "$mapper_ticks" "$saver_ticks" "$nats_ticks")
    saver_mb=$(hwm "$saver")
    mapper_mb=0
    for pid in "${mpids[@]}"; do
      mb=$(hwm "$pid"); awk -v a="$mb" -v b="$mapper_mb" 'BEGIN{exit !(a>b)}' && mapper_mb=$mb
    done
    kill "${mpids[@]}" "$saver" 2>/dev/null; wait "${mpids[@]}" "$saver" 2>/dev/null || true
    summary=$(grep "chunks done" "$work/fetcher.log" | tail -1)
    releases=$(echo "$summary" | sed -n 's/.* \([0-9]*\) re-leases.*/\1/p')
    dups=$(grep -o "[0-9]* duplicates absorbed" "$work/saver.log" | cut -d' ' -f1)
    secs=$(awk -v ms="$ms" 'BEGIN{printf "%.3f", ms/1000}')
    scan=$(sed -n 's/.*"scan_seconds": *\([0-9.e-]*\).*/\1/p' "$work/summary.json")
    bytes=$(sed -n 's/.*"input_bytes": *\([0-9]*\).*/\1/p' "$work/summary.json")
    scan_rate=$(awk -v b="$bytes" -v s="$scan" 'BEGIN{printf "%.0f", b / 1e6 / (s > 0 ? s : 1e-6)}')
    scan=$(awk -v s="$scan" 'BEGIN{printf "%.3f", s}')
    busy=$(busy_share "$cpu" "$secs")
    chunks=$(( (objects + CHUNK_SIZE - 1) / CHUNK_SIZE ))
    printf '| %s | %s | %s | %s | %s | %s | %.0f | %s | %.1f%% | %s | %.0f | %s | %s | %s | %s | %s | %s | %s |\n' "$rounds" "$mappers" "$threads" "$secs" "$scan" "$scan_rate" \
      "$(awk -v n="$objects" -v s="$secs" 'BEGIN{print n/s}')" "$ideal" \
      "$(awk -v i="$ideal" -v s="$secs" 'BEGIN{print 100*i/s}')" "$busy" \
      "$(awk -v n="$chunks" -v s="$secs" 'BEGIN{print n/s}')" "$fetcher_cpu" "$split" "${releases:-?}" "${dups:-?}" \
      "$fetcher_mb" "$mapper_mb" "$saver_mb"
  done
done
