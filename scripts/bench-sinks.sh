#!/usr/bin/env bash
# The sinks side by side: the real binaries (release) around a real nats-server over the same
# data set, 2 mappers, one saver writing into each sink in turn, at each of ROUNDS_LIST. Every row
# starts from an empty sink and a fresh ledger; its wall time runs from the fetcher's start to its
# exit, which for the object-store sink comes after the run's commit (_SUCCESS).
#
#   ./scripts/bench-sinks.sh                       # file, S3 JSON Lines, zstd, Parquet, PostgreSQL
#   SINKS="file s3-jsonl" ROUNDS_LIST=0 ./scripts/bench-sinks.sh
#   OBJECTS=10000000 DATA=/tmp/users-10m.jsonl SINKS="dir-jsonl dir-parquet" ROUNDS_LIST=0 \
#     ./scripts/bench-sinks.sh                     # the saver's peak memory over a large run
#   STEPS=1 ./scripts/bench-sinks.sh               # also each commit's steps, from the saver's log
#
# Sinks: file (--out DIR), s3-jsonl, s3-zstd, s3-parquet (--sink s3://... on moto, the S3 stand-in
# of the tests, on 127.0.0.1; Parquet with zstd), dir-jsonl, dir-parquet (the object-store sink's
# file:///DIR/ form: the same code without moto, whose memory holds every object), postgres (a
# server of its own on a free port, trust authentication, a fresh database per row).
#
# Columns: wall time, objects/s, the wall time as a share of the file sink's in the same rounds
# (a row before the file sink's shows "-"), the commit's own time as the saver logs it ("run ...
# committed ... in N s"; object-store sinks only), the saver's CPU time, its peak RSS (VmHWM), and
# the CPU time of the S3 stand-in (moto, a Python server on the same cores as the mappers: a
# real store's work is not on this machine) or of PostgreSQL (its processes' total) in the row.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS_LIST=${ROUNDS_LIST:-"0 3000"}
SINKS=${SINKS:-"file s3-jsonl s3-zstd s3-parquet postgres"}
OBJECTS=${OBJECTS:-100000}
DATA=${DATA:-data/users.jsonl}
MAPPERS=${MAPPERS:-2}

ensure_nats_server
if [ -z "${BIN:-}" ]; then
  cargo build --release --workspace --bins --examples --quiet
  BIN=target/release
fi
[ -s "$DATA" ] || $BIN/fetcher generate --objects "$OBJECTS" --output "$DATA" >/dev/null
objects=$(wc -l < "$DATA")

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -z "${pg_data:-}" ] || runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

port=$(free_port)
nats-server -a 127.0.0.1 -p "$port" >"$work/nats.log" 2>&1 &
pids+=($!)
export NATS_URL="nats://127.0.0.1:$port" METRICS_ADDR=127.0.0.1:0
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done

case " $SINKS " in *" s3-"*)
  ensure_s3_server
  s3_port=$(free_port)
  moto_server -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
  moto=$!
  pids+=($moto)
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$s3_port/" && break; sleep 0.1; done
  curl -sf -X PUT "http://127.0.0.1:$s3_port/bench" >/dev/null
  export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
  ;;
esac

case " $SINKS " in *" postgres "*)
  ensure_postgres
  pg_bin=${PG_BIN_DIR:-$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")}
  pg_data="$work/pg"
  pg_port=$(free_port)
  mkdir -p "$pg_data" && chown postgres "$pg_data" "$work"
  runuser -u postgres -- "$pg_bin/initdb" -D "$pg_data" -U chunkmill --auth=trust >/dev/null
  runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_data" -o "-p $pg_port -k $pg_data -c listen_addresses=127.0.0.1" \
    -l "$work/pg.log" -w start >/dev/null
  ;;
esac

# The saver's flags for sink $1 in row $2 (a fresh prefix, directory or database per row).
sink_args() {
  case "$1" in
    file) echo "--out $work/out-$2" ;;
    s3-jsonl) echo "--sink s3://bench/$2/" ;;
    s3-zstd) echo "--sink s3://bench/$2/ --compression zstd" ;;
    s3-parquet) echo "--sink s3://bench/$2/ --format parquet --compression zstd" ;;
    dir-jsonl) mkdir -p "$work/dir-$2"; echo "--sink file://$work/dir-$2/" ;;
    dir-parquet) mkdir -p "$work/dir-$2"; echo "--sink file://$work/dir-$2/ --format parquet --compression zstd" ;;
    postgres)
      "$pg_bin/psql" -q -h 127.0.0.1 -p "$pg_port" -U chunkmill -d postgres -c "CREATE DATABASE \"$2\"" >/dev/null
      echo "--sink postgres://chunkmill@127.0.0.1:$pg_port/$2" ;;
    *) echo "unknown sink $1 (file, s3-jsonl, s3-zstd, s3-parquet, dir-jsonl, dir-parquet, postgres)" >&2; exit 2 ;;
  esac
}

# CPU ticks of the store behind sink $1 so far: moto's for s3-*, PostgreSQL's processes' for
# postgres (the postmaster and its live processes, plus what its exited children used), 0 else.
store_ticks() {
  case "$1" in
    s3-*) ticks "$moto" ;;
    postgres)
      local main total=0
      main=$(head -1 "$pg_data/postmaster.pid")
      for pid in "$main" $(pgrep -P "$main"); do total=$(( total + $(ticks "$pid") )); done
      echo $(( total + $(awk '{print $16 + $17}' "/proc/$main/stat") )) ;;
    *) echo 0 ;;
  esac
}
hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
hz=$(getconf CLK_TCK)

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(date -u +%F), commit $(git rev-parse --short HEAD), binaries in $BIN, $objects objects from $DATA, $MAPPERS mappers, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '| rounds | sink | wall s | objects/s | of the file sink | commit s | saver CPU s | saver MB | store CPU s |\n'
printf '|---:|---|---:|---:|---:|---:|---:|---:|---:|\n'
row=0
for rounds in $ROUNDS_LIST; do
  file_secs=""
  for sink in $SINKS; do
    row=$((row + 1))
    name="r$rounds-$sink-$row"
    # shellcheck disable=SC2046 # the flags are words
    $BIN/saver $(sink_args "$sink" "b$row") >"$work/saver.log" 2>&1 &
    saver=$!
    mpids=()
    threads=$(mapper_threads "$MAPPERS")
    for i in $(seq "$MAPPERS"); do
      $BIN/mapper --threads "$threads" >"$work/mapper-$i.log" 2>&1 &
      mpids+=($!)
    done
    for log in "$work/saver.log" $(for i in $(seq "$MAPPERS"); do echo "$work/mapper-$i.log"; done); do
      for _ in $(seq 1000); do grep -qs "connected to NATS" "$log" && break; sleep 0.01; done
    done
    grep -qs "connected to NATS" "$work/saver.log" || { echo "the saver for $sink did not start:"; tail "$work/saver.log"; exit 1; }
    store_before=$(store_ticks "$sink")
    start=$(now_ms)
    $BIN/fetcher --input "$DATA" --rounds "$rounds" --state-dir "$work/state-$name" --exit-when-done \
      >"$work/fetcher.log" 2>&1 || { echo "fetcher failed ($sink):"; tail "$work/fetcher.log"; tail "$work/saver.log"; exit 1; }
    ms=$(( $(now_ms) - start ))
    store_cpu=$(awk -v t="$(( $(store_ticks "$sink") - store_before ))" -v hz="$hz" 'BEGIN{printf "%.2f", t / hz}')
    saver_cpu=$(awk -v hz="$hz" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$saver/stat")
    saver_mb=$(hwm "$saver")
    kill "${mpids[@]}" "$saver" 2>/dev/null; wait "${mpids[@]}" "$saver" 2>/dev/null || true
    secs=$(awk -v ms="$ms" 'BEGIN{printf "%.2f", ms/1000}')
    [ "$sink" = file ] && file_secs=$secs
    share=$(awk -v s="$secs" -v f="$file_secs" 'BEGIN{if (f == "") print "-"; else printf "%.0f %%", 100*s/f}')
    commit=$(sed -n 's/.* committed into .* in \([0-9.]*\) s.*/\1/p' "$work/saver.log" | tail -1)
    printf '| %s | %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "$rounds" "$sink" "$secs" \
      "$(awk -v n="$objects" -v s="$secs" 'BEGIN{print n/s}')" "$share" "${commit:--}" "$saver_cpu" "$saver_mb" "$store_cpu"
    [ -z "${STEPS:-}" ] || grep -h 'commit steps' "$work/saver.log" | sed 's/^.*commit steps/  commit steps/' >&2 || true
    rm -rf "$work/out-b$row" "$work/dir-b$row" "$work/state-$name"
  done
done
