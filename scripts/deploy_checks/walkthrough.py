"""deploy/README.md read from an empty namespace's point of view: every shell command of the
walk-through (Prerequisites and the numbered steps), in order, run against a model of the
namespace and of the images (built, pushed to the user's registry, loaded into the nodes, and
what scripts/set-image.sh points the manifests at: a user can pull what is deployed). Each command that applies objects must find what those objects need (their
ServiceAccount, claims, ConfigMaps and Secrets that are not optional, the CRDs of custom kinds)
already there or applied with them, and each command that names an object (`deploy/fetcher`,
`job/chunkmill-verify`, a pod) must find it. A Job found by label (`kubectl wait job -l ...`)
is refused: labels also match the earlier Jobs that the TTL keeps.

Objects outside the namespace (other namespaces, cluster-wide) are not modelled, except the CRDs
that Helm charts install.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Callable

import yaml

# The image name the manifests carry: the project's own registry, where a user cannot push.
PROJECT_REGISTRY = "ghcr.io/chunkmill/"

# Kinds whose objects need a CRD, and the Helm chart that installs it.
CRD_GROUPS = {"monitoring.coreos.com": "prometheus-community/kube-prometheus-stack", "keda.sh": "kedacore/keda"}
SHORT = {"deploy": "Deployment", "deployment": "Deployment", "job": "Job", "statefulset": "StatefulSet",
         "sts": "StatefulSet", "svc": "Service", "service": "Service", "pod": "Pod", "hpa": "HorizontalPodAutoscaler",
         "pvc": "PersistentVolumeClaim", "secret": "Secret", "configmap": "ConfigMap", "cm": "ConfigMap"}


def shell_blocks(readme: str) -> list[tuple[str, str]]:
    """(section, block) for every ```sh block of the walk-through sections."""
    out = []
    section = ""
    in_block = False
    lines: list[str] = []
    for line in readme.splitlines():
        if not in_block and line.startswith("## "):
            section = line[3:].strip()
        if not in_block and line.strip() in ("```sh", "```bash"):
            in_block, lines = True, []
        elif in_block and line.strip() == "```":
            in_block = False
            if section == "Prerequisites" or re.match(r"^\d+\.", section):
                out.append((section, "\n".join(lines)))
        elif in_block:
            lines.append(line)
    return out


def commands(block: str) -> list[tuple[list[str], str | None]]:
    """Commands of a block as argv lists (comments dropped, continuations joined, `for x in a b;
    do ...; done` unrolled), each with the text of its here-document, if any."""
    raw = block.splitlines()
    joined: list[tuple[str, str | None]] = []
    i = 0
    while i < len(raw):
        line = raw[i]
        while line.endswith("\\") and i + 1 < len(raw):
            i += 1
            line = line[:-1] + " " + raw[i].strip()
        heredoc = None
        m = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if m:
            body = []
            i += 1
            while i < len(raw) and raw[i].strip() != m.group(1):
                body.append(raw[i])
                i += 1
            heredoc = "\n".join(body)
            line = line[:m.start()]
        joined.append((line, heredoc))
        i += 1
    out: list[tuple[list[str], str | None]] = []
    loop: tuple[str, list[str], list[tuple[str, str | None]]] | None = None
    for line, heredoc in joined:
        text = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not text:
            continue
        m = re.match(r"^for (\w+) in ([^;]+); do$", text)
        if m:
            loop = (m.group(1), m.group(2).split(), [])
            continue
        if loop and text == "done":
            var, values, body = loop
            loop = None
            for v in values:
                for t, h in body:
                    out += [(argv, h) for argv in split(t.replace("$" + var, v))]
            continue
        if loop:
            loop[2].append((text, heredoc))
            continue
        out += [(argv, heredoc) for argv in split(text)]
    return out


def split(text: str) -> list[list[str]]:
    """A line's commands: `a && b`, `a; b` and the first command of a pipe; `&` dropped."""
    out = []
    for part in re.split(r"\s*(?:&&|;|\|\|)\s*", text):
        part = part.split("|")[0].strip().rstrip("&").strip()
        if part:
            try:
                out.append(shlex.split(part))
            except ValueError:
                out.append(part.split())
    return out


class Namespace:
    """What exists in the walk-through's namespace (kind, name), and the installed CRD groups."""

    def __init__(self, root: Path, render: Callable[[Path], list[dict]], fail: Callable[[str], None]) -> None:
        self.root = root
        self.render = render
        self.fail = fail
        self.objects: set[tuple[str, str]] = set()
        self.crds: set[str] = set()
        self.namespace: str | None = None
        # Images: built, pushed to a registry, loaded into the cluster's nodes; and what
        # scripts/set-image.sh points the manifests at (name, tag, pull policy).
        self.built: set[str] = set()
        self.pushed: set[str] = set()
        self.loaded: set[str] = set()
        self.image: dict[str, str] = {}

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self.objects

    def run(self, where: str, argv: list[str], heredoc: str | None) -> None:
        if not argv:
            return
        if argv[0] == "helm":
            self.helm(where, argv)
        elif argv[0] == "kubectl":
            self.kubectl(where, argv[1:], heredoc)
        elif argv[0] in ("docker", "kind", "k3d", "minikube") or argv[0].endswith("set-image.sh"):
            self.images(where, argv)

    def images(self, where: str, argv: list[str]) -> None:
        """docker build/buildx build/push, kind load docker-image, k3d image import, minikube image
        load, scripts/set-image.sh: what exists where, and what the manifests will run."""
        words = [a for a in argv if not a.startswith("-")]
        if argv[0] == "docker" and "build" in argv[1:3]:
            tags = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-t", "--tag")]
            self.built |= set(tags)
            if "--push" in argv:
                self.push(where, argv, tags)
        elif argv[0] == "docker" and argv[1:2] == ["push"]:
            for t in argv[2:]:
                if t not in self.built:
                    self.fail(f"{where}: `{' '.join(argv)}` pushes {t}, which the walk-through did not build")
            self.push(where, argv, argv[2:])
        elif words[:3] == ["kind", "load", "docker-image"] or words[:3] in (["k3d", "image", "import"], ["minikube", "image", "load"]):
            for t in words[3:]:
                if t not in self.built:
                    self.fail(f"{where}: `{' '.join(argv)}` loads {t}, which the walk-through did not build")
                self.loaded.add(t)
        elif argv[0].endswith("set-image.sh"):
            for key in ("name", "tag", "digest", "pull-policy"):
                value = flag(argv, f"--{key}")
                if value:
                    self.image[key] = value

    def push(self, where: str, argv: list[str], tags: list[str]) -> None:
        for t in tags:
            if t.startswith(PROJECT_REGISTRY):
                self.fail(f"{where}: `{' '.join(argv)}` pushes to {PROJECT_REGISTRY}, the project's registry, where "
                          "a user cannot push: push to your own ($REGISTRY)")
            self.pushed.add(t)

    def check_images(self, where: str, command: str, objs: list[dict]) -> None:
        """Every container of ours runs an image the walk-through pushed to a registry or loaded
        into the nodes, after scripts/set-image.sh; a loaded-only image with a pull policy that
        does not pull when the node has it."""
        for o in objs:
            spec = ((o.get("spec") or {}).get("template") or {}).get("spec") or (o.get("spec") if o.get("kind") == "Pod" else {}) or {}
            for c in spec.get("containers") or []:
                image = str(c.get("image", ""))
                if not image.startswith(PROJECT_REGISTRY):
                    continue
                name = self.image.get("name") or image.rsplit(":", 1)[0]
                tag = self.image.get("tag") or image.rsplit(":", 1)[-1]
                policy = self.image.get("pull-policy") or c.get("imagePullPolicy", "IfNotPresent")
                ref = f"{name}:{tag}"
                if ref in self.pushed:
                    continue
                if ref in self.loaded:
                    if policy == "Always":
                        self.fail(f"{where}: `{command}`: {o['kind']}/{o['metadata']['name']} runs {ref}, which was only "
                                  "loaded into the nodes, with imagePullPolicy Always: the kubelet pulls it from a registry "
                                  "that does not have it (set-image.sh --pull-policy IfNotPresent)")
                    continue
                self.fail(f"{where}: `{command}`: {o['kind']}/{o['metadata']['name']} runs {ref}, which the walk-through "
                          "neither pushed to a registry nor loaded into the cluster: nobody can pull it")

    def helm(self, where: str, argv: list[str]) -> None:
        args = [a for a in argv[1:] if a != "--install"]
        if not args or args[0] not in ("install", "upgrade"):
            return
        version = flag(args, "--version")
        if not version:
            self.fail(f"{where}: `{' '.join(argv)}` has no --version: a chart's next release may change or drop "
                      "the values these files set")
        pos = [a for i, a in enumerate(args[1:], 1) if not a.startswith("-") and not args[i - 1] in ("-f", "--values", "--namespace", "-n", "--set", "--version")]
        if len(pos) < 2:
            return
        release, chart = pos[0], pos[1]
        for group, c in CRD_GROUPS.items():
            if c == chart:
                self.crds.add(group)
        if chart != "nats/nats":
            return
        vendored = nats_chart_version(self.root)
        if version and version != vendored:
            self.fail(f"{where}: `{' '.join(argv)}` installs chart {version}, but deploy/nats/values*.yaml were checked "
                      f"against the vendored chart {vendored} (scripts/deploy_checks/vendor/README.md)")
        values: dict = {}
        for i, a in enumerate(args):
            if a in ("-f", "--values") and i + 1 < len(args):
                path = self.root / args[i + 1]
                if not path.exists():
                    self.fail(f"{where}: `{' '.join(argv)}`: {args[i + 1]} does not exist")
                    continue
                values = merge(values, yaml.safe_load(open(path)) or {})
        for name, spec in ((values.get("container") or {}).get("env") or {}).items():
            ref = ((spec or {}).get("valueFrom") or {}).get("secretKeyRef") if isinstance(spec, dict) else None
            if ref and not ref.get("optional") and not self.has("Secret", ref["name"]):
                self.fail(f"{where}: `helm install {release}` with these values needs Secret/{ref['name']} "
                          f"(container.env {name}), which does not exist yet: the NATS pods would not start")
        self.objects |= {("StatefulSet", release), ("Service", release), ("Pod", f"{release}-0")}
        if (values.get("natsBox") or {}).get("enabled", True):
            self.objects.add(("Deployment", f"{release}-box"))

    def kubectl(self, where: str, args: list[str], heredoc: str | None) -> None:
        ns = flag(args, "-n") or flag(args, "--namespace")
        if ns and ns != self.namespace:
            return  # another namespace (monitoring): not modelled
        verb = args[0] if args else ""
        if verb == "create" and args[1:2] == ["namespace"]:
            return
        if verb == "config":
            return
        if verb == "create" and args[1:2] == ["secret"]:
            self.objects.add(("Secret", args[3]))
            return
        if verb in ("apply", "create") and ("-f" in args or "-k" in args):
            objs: list[dict] = []
            for i, a in enumerate(args):
                if a == "-f" and i + 1 < len(args):
                    if args[i + 1] == "-":
                        objs += [o for o in yaml.safe_load_all(heredoc or "") if o]
                    elif not (self.root / args[i + 1]).exists():
                        self.fail(f"{where}: `kubectl {' '.join(args)}`: {args[i + 1]} does not exist")
                    else:
                        objs += [o for o in yaml.safe_load_all(open(self.root / args[i + 1])) if o]
                elif a == "-k" and i + 1 < len(args):
                    if not (self.root / args[i + 1] / "kustomization.yaml").exists():
                        self.fail(f"{where}: `kubectl {' '.join(args)}`: {args[i + 1]} is not a kustomization")
                    else:
                        objs += self.render(self.root / args[i + 1])
            self.apply(where, f"kubectl {' '.join(args)}", objs)
            return
        if verb == "delete":
            if "-k" in args:
                d = flag(args, "-k")
                if d and (self.root / d / "kustomization.yaml").exists():
                    for o in self.render(self.root / d):
                        self.objects.discard((o["kind"], o["metadata"]["name"]))
                return
            names = [a for a in args[1:] if not a.startswith("-")]
            if len(names) >= 2 and names[0] in SHORT:
                for n in names[1:]:
                    self.objects.discard((SHORT[names[0]], n))
            elif names and "/" in names[0]:
                k, n = names[0].split("/", 1)
                self.objects.discard((SHORT.get(k, k), n))
            return
        # Everything else only names objects: they must exist.
        if verb in ("wait", "logs") and ("-l" in args or any(a.startswith("--selector") for a in args)):
            sel = flag(args, "-l") or ""
            if (verb == "wait" and "job" in args) or re.search(r"name=(generate|verify)\b", sel):
                self.fail(f"{where}: `kubectl {' '.join(args)}` finds Jobs by label, which also matches "
                          "earlier Jobs kept by their TTL: name the Job (job/NAME)")
        for a in args[1:]:
            m = re.match(r"^(\w+)/([a-z0-9][a-z0-9.-]*)$", a)
            if m and m.group(1) in SHORT and not self.has(SHORT[m.group(1)], m.group(2)):
                self.fail(f"{where}: `kubectl {' '.join(args)}`: {a} does not exist at this point of the walk-through")
        if verb == "cp":
            for a in args[1:]:
                m = re.match(r"^([a-z0-9][a-z0-9.-]*):/", a)
                if m and not self.has("Pod", m.group(1)):
                    self.fail(f"{where}: `kubectl cp`: pod {m.group(1)} does not exist at this point")

    def apply(self, where: str, command: str, objs: list[dict]) -> None:
        self.check_images(where, command, objs)
        incoming = {(o.get("kind"), (o.get("metadata") or {}).get("name")) for o in objs}
        have = self.objects | incoming
        for o in objs:
            md = o.get("metadata") or {}
            what = f"{o.get('kind')}/{md.get('name') or md.get('generateName', '') + '*'}"
            group = str(o.get("apiVersion", "")).split("/")[0]
            if group in CRD_GROUPS and group not in self.crds:
                self.fail(f"{where}: `{command}`: {what} needs the {group} CRDs (helm install ... "
                          f"{CRD_GROUPS[group]}), not installed at this point")
            for kind, name in needs(o):
                if (kind, name) not in have:
                    self.fail(f"{where}: `{command}`: {what} needs {kind}/{name}, which does not exist at this "
                              "point and is not applied with it")
        self.objects = have


def needs(o: dict) -> list[tuple[str, str]]:
    """What a workload cannot start without: its ServiceAccount, claims, and the ConfigMaps and
    Secrets it uses that are not optional."""
    kind = o.get("kind")
    spec = o.get("spec") or {}
    if kind == "Pod":
        ps = spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        ps = (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        ps = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    else:
        return []
    out = []
    for secret in ps.get("imagePullSecrets") or []:
        out.append(("Secret", secret["name"]))
    sa = ps.get("serviceAccountName")
    if sa and sa != "default":
        out.append(("ServiceAccount", sa))
    for v in ps.get("volumes") or []:
        if "persistentVolumeClaim" in v:
            out.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
        if "secret" in v and not v["secret"].get("optional"):
            out.append(("Secret", v["secret"]["secretName"]))
        if "configMap" in v and not v["configMap"].get("optional"):
            out.append(("ConfigMap", v["configMap"]["name"]))
    for c in [*(ps.get("initContainers") or []), *(ps.get("containers") or [])]:
        for e in c.get("envFrom") or []:
            for k, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                ref = e.get(key)
                if ref and not ref.get("optional"):
                    out.append((k, ref["name"]))
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            for k, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                ref = vf.get(key)
                if ref and not ref.get("optional"):
                    out.append((k, ref["name"]))
    return out


def nats_chart_version(root: Path) -> str:
    """The NATS chart version whose values.yaml is vendored (vendor/README.md says which)."""
    text = (root / "scripts" / "deploy_checks" / "vendor" / "README.md").read_text()
    m = re.search(r"`nats-chart/values.yaml`[^|]*\|[^|]*\(chart (\d+\.\d+\.\d+)", text)
    return m.group(1) if m else "?"


def rotation(root: Path, render: Callable[[Path], list[dict]], fail: Callable[[str], None]) -> int:
    """deploy/README.md's recipe for rotating a NATS password restarts what reads the passwords:
    the NATS servers (their environment, set at start), nats-box, and every Deployment that
    mounts a chunkmill-nats-* Secret (read when it connects). Returns the restarts it names."""
    readme = (root / "deploy" / "README.md").read_text()
    at = readme.find("Rotating a NATS password")
    block = re.search(r"```sh\n(.*?)```", readme[at:], re.S) if at >= 0 else None
    if not block:
        fail("deploy/README.md: no recipe for rotating a NATS password (a ```sh block after \"Rotating a NATS password\")")
        return 0
    restarted = set()
    for argv, _ in commands(block.group(1)):
        if argv[:3] == ["kubectl", "rollout", "restart"]:
            restarted |= {a for a in argv[3:] if "/" in a}
    needed = {"statefulset/my-nats", "deploy/my-nats-box"}
    for o in render(root / "deploy" / "overlays" / "broadcaster"):
        spec = ((o.get("spec") or {}).get("template") or {}).get("spec") or {}
        if o.get("kind") == "Deployment" and any(
                str((v.get("secret") or {}).get("secretName", "")).startswith("chunkmill-nats-") for v in spec.get("volumes") or []):
            needed.add(f"deploy/{o['metadata']['name']}")
    for n in sorted(needed - restarted):
        fail(f"deploy/README.md, rotating a NATS password: nothing restarts {n}, which keeps the old password")
    return len(restarted)


def merge(a: dict, b: dict) -> dict:
    """Helm's merge of values files: maps deep, everything else replaced."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def walk(root: Path, render: Callable[[Path], list[dict]], fail: Callable[[str], None]) -> int:
    """Runs the walk-through of root/deploy/README.md; returns the number of commands run."""
    readme = (root / "deploy" / "README.md").read_text()
    ns = Namespace(root, render, fail)
    n = 0
    for section, block in shell_blocks(readme):
        for argv, heredoc in commands(block):
            if argv[:3] == ["kubectl", "create", "namespace"] and len(argv) > 3:
                ns.namespace = argv[3]
            n += 1
            ns.run(f"deploy/README.md, {section}", argv, heredoc)
    return n
