#!/usr/bin/env bash
# The peer of issue 14, measured as scripts/bench-e2e.sh measures chunkmill: a straightforward
# JetStream work-queue pipeline (examples/jetstream_peer.rs) over the same 100 000-object data
# set, on the same machine, one table row per (rounds, mappers). Each row gets its own
# nats-server (JetStream on, a fresh store: not fsynced per message, JetStream's default) and a
# fresh output directory; the saver and the mappers are started and connected before the clock
# starts, which then runs from the peer fetcher's start (input scan included) to its exit, once
# the saver has reported every chunk saved.
#
#   ./scripts/bench-peer.sh
#   ROUNDS_LIST="0" MAPPERS_LIST="2" ./scripts/bench-peer.sh
#   BIN=/path/to/target/release ./scripts/bench-peer.sh      # binaries built elsewhere
#   KEEP=1 ./scripts/bench-peer.sh                           # keep the work directory (outputs, logs)
#
# Columns: wall time of the run, objects/s, CPU busy (the CPU time of the fetcher, mappers, saver
# and nats-server over the run, as a share of all cores' wall time), the fetcher's own CPU time and
# that of the mappers (together), the saver and nats-server, duplicate saves (results the saver
# found already saved), and the check of the output: chunk files and their lines (the row fails if
# they are not exactly one file per chunk and one line per object).
# MAPPER_THREADS (each mapper's rayon threads; default: this machine's cores shared out among the
# mappers, at least one each, as in bench-e2e.sh) and CHUNK_SIZE (default 100) apply as there.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS_LIST=${ROUNDS_LIST:-"0 300"}
MAPPERS_LIST=${MAPPERS_LIST:-"2 4"}
OBJECTS=${OBJECTS:-100000}
DATA=${DATA:-data/users.jsonl}
CHUNK_SIZE=${CHUNK_SIZE:-100}

ensure_nats_server
[ -x /usr/bin/time ] || { echo "bench-peer.sh needs GNU time for the fetcher's CPU time: apt-get install time" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then
  cargo build --release --example jetstream_peer --quiet
  BIN=target/release
fi
peer=$BIN/examples/jetstream_peer
[ -x "$peer" ] || { echo "no $peer: cargo build --release --example jetstream_peer" >&2; exit 1; }
if [ ! -s "$DATA" ]; then
  [ -x "$BIN/fetcher" ] || cargo build --release -p fetcher --bin fetcher --quiet
  "$BIN/fetcher" generate --objects "$OBJECTS" --output "$DATA" >/dev/null
fi
objects=$(wc -l < "$DATA")
chunks=$(( (objects + CHUNK_SIZE - 1) / CHUNK_SIZE ))

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT INT TERM

hz=$(getconf CLK_TCK)
failed=0

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(date -u +%F), $(nats-server --version), peer $peer, input $DATA"
printf '| rounds | mappers | threads each | pipeline s | objects/s | CPU busy | fetcher CPU s | mappers / saver / nats CPU s | dup saves | chunk files (lines) |\n'
printf '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for rounds in $ROUNDS_LIST; do
  for mappers in $MAPPERS_LIST; do
    row="$work/r$rounds-m$mappers"
    mkdir -p "$row/store"
    port=$(free_port)
    nats-server -js -sd "$row/store" -a 127.0.0.1 -p "$port" >"$row/nats.log" 2>&1 &
    nats=$!
    pids=("$nats")
    export NATS_URL="nats://127.0.0.1:$port"
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done

    "$peer" saver --out "$row/out" >"$row/saver.log" 2>&1 &
    saver=$!
    pids+=("$saver")
    mpids=()
    threads=$(mapper_threads "$mappers")
    for i in $(seq "$mappers"); do
      "$peer" mapper --threads "$threads" >"$row/mapper-$i.log" 2>&1 &
      mpids+=($!)
      pids+=($!)
    done
    # Start timing once everyone is connected (consumer created, pulling).
    for log in "$row/saver.log" $(for i in $(seq "$mappers"); do echo "$row/mapper-$i.log"; done); do
      for _ in $(seq 500); do grep -qs "connected to NATS" "$log" && break; sleep 0.01; done
      grep -qs "connected to NATS" "$log" || { echo "not connected: $log"; tail "$log"; exit 1; }
    done
    start=$(now_ms)
    nats_before=$(ticks "$nats")
    /usr/bin/time -f "%U %S" -o "$row/fetcher.time" \
      "$peer" fetcher --input "$DATA" --rounds "$rounds" --chunk-size "$CHUNK_SIZE" >"$row/fetcher.log" 2>&1 \
      || { echo "fetcher failed:"; tail "$row/fetcher.log"; exit 1; }
    ms=$(( $(now_ms) - start ))
    fetcher_ticks=$(awk -v hz="$hz" '{printf "%.0f", ($1 + $2) * hz}' "$row/fetcher.time")
    nats_ticks=$(( $(ticks "$nats") - nats_before ))
    saver_ticks=$(ticks "$saver")
    mapper_ticks=0
    for pid in "${mpids[@]}"; do mapper_ticks=$(( mapper_ticks + $(ticks "$pid") )); done
    kill "${mpids[@]}" "$saver" 2>/dev/null || true
    wait "${mpids[@]}" "$saver" 2>/dev/null || true
    kill "$nats" 2>/dev/null || true
    wait "$nats" 2>/dev/null || true
    pids=()

    cpu=$(( fetcher_ticks + nats_ticks + saver_ticks + mapper_ticks ))
    secs=$(awk -v ms="$ms" 'BEGIN{printf "%.3f", ms/1000}')
    busy=$(busy_share "$cpu" "$secs")
    split=$(cpu_split "$mapper_ticks" "$saver_ticks" "$nats_ticks")
    dups=$(grep -o "[0-9]* duplicates" "$row/saver.log" | cut -d' ' -f1)
    files=$(find "$row/out" -maxdepth 1 -name 'chunk-*.jsonl' | wc -l)
    lines=$(find "$row/out" -maxdepth 1 -name 'chunk-*.jsonl' -print0 | xargs -0 cat | wc -l)
    check="$files ($lines)"
    if [ "$files" -ne "$chunks" ] || [ "$lines" -ne "$objects" ]; then
      check="$check: WRONG, expected $chunks ($objects)"
      failed=1
    fi
    printf '| %s | %s | %s | %s | %.0f | %s | %.2f | %s | %s | %s |\n' "$rounds" "$mappers" "$threads" "$secs" \
      "$(awk -v n="$objects" -v s="$secs" 'BEGIN{print n/s}')" "$busy" \
      "$(awk -v t="$fetcher_ticks" -v hz="$hz" 'BEGIN{print t/hz}')" "$split" "${dups:-?}" "$check"
    [ -n "${KEEP:-}" ] || rm -rf "$row"
  done
done
exit "$failed"
