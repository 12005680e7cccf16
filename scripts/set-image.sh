#!/usr/bin/env bash
# Points every manifest at one build: rewrites deploy/components/image/kustomization.yaml (the
# one place the Deployments and the Jobs take their image from; `git diff` shows the change).
#
#   scripts/set-image.sh --name registry.example.com/me/chunkmill --tag 0.1.0-1a2b3c4d5e6f \
#                        --pull-policy IfNotPresent
#   scripts/set-image.sh --digest sha256:<64 hex>
#   scripts/set-image.sh --pull-secret chunkmill-registry
#
# --name   the repository the image was pushed to (default: keep; the manifests' own name is
#          ghcr.io/chunkmill/chunkmill)
# --tag    the tag: per commit, <version>-<12 hex digits> (deploy/README.md, step 1)
# --digest sha256:... (optional): what the tag pointed at when pushed; wins over the tag
# --pull-policy Always or IfNotPresent (IfNotPresent only with a per-commit tag or a digest;
#          tests/deploy_cli.rs enforces it)
# --pull-secret the Secret (type kubernetes.io/dockerconfigjson) with a private registry's
#          credentials: every Deployment's and Job's pods name it in imagePullSecrets
set -euo pipefail
cd "$(dirname "$0")/.."
file=deploy/components/image/kustomization.yaml
name= tag= digest= policy= secret=
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --digest) digest=$2; shift 2 ;;
    --pull-policy) policy=$2; shift 2 ;;
    --pull-secret) secret=$2; shift 2 ;;
    *) echo "set-image: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
case "$policy" in ""|Always|IfNotPresent) ;; *) echo "set-image: --pull-policy is Always or IfNotPresent" >&2; exit 2 ;; esac
case "$digest" in ""|sha256:????????????????????????????????????????????????????????????????) ;;
  *) echo "set-image: --digest is sha256: and 64 hex digits" >&2; exit 2 ;; esac
NAME=$name TAG=$tag DIGEST=$digest POLICY=$policy SECRET=$secret python3 - "$file" <<'PY'
import os, re, sys
path = sys.argv[1]
text = open(path).read()
head, sep, rest = text.partition("images:\n")
block, sep2, tail = rest.partition("\n\n")
entry = dict(re.findall(r"^\s+-?\s*(name|newName|newTag|digest):\s*\"?([^\"\n]*)\"?$", block, re.M))
if os.environ["NAME"]:
    entry["newName"] = os.environ["NAME"]
if os.environ["TAG"]:
    entry["newTag"] = os.environ["TAG"]
if os.environ["DIGEST"]:
    entry["digest"] = os.environ["DIGEST"]
lines = [f"  - name: {entry['name']}"]
lines += [f"    {k}: \"{entry[k]}\"" for k in ("newName", "newTag", "digest") if entry.get(k)]
text = head + sep + "\n".join(lines) + sep2 + tail
if os.environ["POLICY"]:
    text = re.sub(r"(imagePullPolicy, value: )\w+", r"\g<1>" + os.environ["POLICY"], text)
if os.environ["SECRET"]:
    pull = "{op: add, path: /spec/template/spec/imagePullSecrets, value: [{name: %s}]}" % os.environ["SECRET"]
    text = re.sub(r"\n      - \{op: add, path: /spec/template/spec/imagePullSecrets[^\n]*", "", text)
    text = re.sub(r"(\n      - \{op: add, path: /spec/template/spec/containers/0/imagePullPolicy[^\n]*)",
                  r"\g<1>\n      - " + pull.replace("\\", "\\\\"), text)
open(path, "w").write(text)
print(f"{path}: " + ", ".join(f"{k} {v}" for k, v in entry.items()) +
      (f", imagePullPolicy {os.environ['POLICY']}" if os.environ["POLICY"] else "") +
      (f", imagePullSecrets {os.environ['SECRET']}" if os.environ["SECRET"] else ""))
PY
