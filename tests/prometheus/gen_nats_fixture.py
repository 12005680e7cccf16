#!/usr/bin/env python3
"""Regenerates nats-exporter-metrics.txt: the metric names prometheus-nats-exporter emits when run
the way the NATS Helm chart runs it (prom-exporter-container.yaml in nats-io/k8s:
`-connz -routez -subz -varz -prefix=nats -use_internal_server_id [-jsz=all] [-leafz] [-gatewayz]`).

How the exporter names metrics (collector/*.go):
- varz, subsz, routez (collector.go, newNatsCollector/objectToMetrics): generic. It GETs the
  server's /<endpoint> JSON and makes one gauge per JSON number, named
  <prefix>_<endpoint>_<json path joined by "_">, with "/" replaced by "_" and "__" collapsed
  (fqName); nested objects are flattened, arrays and booleans are ignored; strings only for the
  keys server_id, server_name, version, domain, leader, name, start, config_load_time (a time
  becomes a gauge of its epoch seconds, anything else a `value` label on a gauge of 1); the fqns in
  skipFQN (leaf, cluster_tls_timeout, cluster_cluster_port, cluster_auth_timeout, gateway_*, ...)
  are dropped. So these names depend on the nats-server version: this script runs the real
  nats-server on PATH and applies that algorithm to its JSON.
- connz (connz.go): fixed names prometheus.BuildFQName(system, "connz", ...) from
  createConnzCollector (the detailed ones need -connz_detailed, which the chart does not pass).
- jsz (jsz.go): fixed names BuildFQName(system, "<server|account|stream|consumer>", ...), with
  system = the prefix (getSystem), so `nats_stream_total_messages`, not `nats_jetstream_...`.

Usage: gen_nats_fixture.py --exporter-git DIR [--commit REF] > nats-exporter-metrics.txt
(DIR: a git directory of github.com/nats-io/prometheus-nats-exporter.)
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

LABEL_KEYS = {"server_id", "server_name", "version", "domain", "leader", "name", "start",
              "config_load_time"}
SKIP_FQN = {"leaf", "trusted_operators_claim", "cluster_tls_timeout", "cluster_cluster_port",
            "cluster_auth_timeout", "gateway_port", "gateway_auth_timeout", "gateway_tls_timeout",
            "gateway_connect_retries"}
# The endpoints the chart's exporter polls: each shows up in varz's http_req_stats once polled.
POLLED = ["/varz", "/connz", "/subsz", "/routez", "/jsz"]


def fq_name(name, prefix):
    path = list(prefix) + [name]
    fqn = "_".join(path).replace("/", "_").strip("_")
    while "__" in fqn:
        fqn = fqn.replace("__", "_")
    return fqn


def object_to_metrics(obj, out, prefix=()):
    """Port of NATSCollector.objectToMetrics: the fqns (without namespace/subsystem)."""
    for k, v in obj.items():
        fqn = fq_name(k, prefix)
        if fqn in SKIP_FQN:
            continue
        if isinstance(v, bool):
            continue  # Go's json gives bool, not float64: ignored
        if isinstance(v, (int, float)):
            out.add(fqn)
        elif isinstance(v, str):
            if k in LABEL_KEYS:
                out.add(fqn)
        elif isinstance(v, dict):
            object_to_metrics(v, out, tuple(prefix) + (k,))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def wait_http(url, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        try:
            return get(url)
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nats-server monitor {url} did not answer")


def scenario(tmp, name, servers, jetstream, cluster):
    """Starts `servers` nats-servers, returns the first one's varz/subsz/routez JSON."""
    ports = [(free_port(), free_port(), free_port()) for _ in range(servers)]
    procs = []
    try:
        for i, (cp, hp, rp) in enumerate(ports):
            conf = [f"port: {cp}", f"http: {hp}", f"server_name: {name}-{i}"]
            if jetstream:
                conf.append(f'jetstream {{ store_dir: "{tmp}/{name}-{i}" }}')
            if cluster:
                routes = ",".join(f'"nats://127.0.0.1:{p[2]}"' for p in ports)
                conf.append(f'cluster {{ name: {name}, listen: "127.0.0.1:{rp}", routes: [{routes}] }}')
            path = os.path.join(tmp, f"{name}-{i}.conf")
            with open(path, "w") as f:
                f.write("\n".join(conf) + "\n")
            procs.append(subprocess.Popen(["nats-server", "-c", path], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        base = f"http://127.0.0.1:{ports[0][1]}"
        wait_http(base + "/varz")
        if jetstream and cluster:
            end = time.time() + 20  # wait for a JetStream meta leader, so varz has jetstream.meta
            while time.time() < end and "leader" not in get(base + "/varz").get("jetstream", {}).get("meta", {}):
                time.sleep(0.3)
        for ep in POLLED:  # as the exporter would, so http_req_stats lists them
            try:
                get(base + ep)
            except OSError:
                pass
        return {ep: get(base + "/" + ep) for ep in ("varz", "subsz", "routez")}, \
            get(base + "/varz")["version"]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exporter-git", required=True)
    ap.add_argument("--commit", default="v0.20.1")
    ap.add_argument("--prefix", default="nats")
    a = ap.parse_args()

    def src(path):
        return subprocess.check_output(["git", "--git-dir", a.exporter_git, "show",
                                        f"{a.commit}:{path}"], text=True)
    sha = subprocess.check_output(["git", "--git-dir", a.exporter_git, "rev-parse",
                                   f"{a.commit}^{{commit}}"], text=True).strip()

    names = {}
    connz = src("collector/connz.go").split("func createConnzDetailedCollector")[0]
    for n in re.findall(r'BuildFQName\(system, connzEndpoint, "(\w+)"\)', connz):
        names[f"{a.prefix}_connz_{n}"] = "connz (connz.go createConnzCollector)"
    for sub, n in re.findall(r'BuildFQName\(system, "(\w+)", "(\w+)"\)', src("collector/jsz.go")):
        names[f"{a.prefix}_{sub}_{n}"] = "jsz=all (jsz.go; only with JetStream enabled)"

    tmp = tempfile.mkdtemp()
    versions = set()
    try:
        for label, servers, js, cl in [("plain", 1, False, False), ("jscluster", 2, True, True)]:
            resps, version = scenario(tmp, label, servers, js, cl)
            versions.add(version)
            for ep, body in resps.items():
                fqns = set()
                object_to_metrics(body, fqns)
                for fqn in fqns:
                    names.setdefault(f"{a.prefix}_{ep}_{fqn}",
                                     f"{ep} (collector.go objectToMetrics over /{ep} JSON)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"""# Metric names emitted by prometheus-nats-exporter as the NATS Helm chart runs it
# (nats-io/k8s helm/charts/nats/files/stateful-set/prom-exporter-container.yaml:
#  -connz -routez -subz -varz -prefix=nats -use_internal_server_id, -jsz=all when JetStream is on).
# Source: github.com/nats-io/prometheus-nats-exporter {a.commit} (commit {sha}; the chart's image
#   tag is 0.20.1; collector/ is unchanged on main at the time of writing),
#   files collector/collector.go (objectToMetrics, fqName, newPrometheusGaugeVec), collector/connz.go,
#   collector/jsz.go, exporter/exporter.go (InitializeCollectors), main.go (flags).
# Derivation: connz and jsz names are the literal BuildFQName(...) calls in connz.go
#   (createConnzCollector) and jsz.go, with system = prefix "nats". varz, subsz and routez names are
#   built at runtime from the server's JSON: prefix + "_" + endpoint + "_" + JSON path joined with
#   "_" (numbers; times and a few label strings; bools/arrays ignored; skipFQN dropped). They were
#   computed by tests/prometheus/gen_nats_fixture.py, a port of objectToMetrics, over the
#   /varz, /subsz and /routez JSON of real nats-server {", ".join(sorted(versions))} in two setups:
#   one plain server (chart default) and a 2-node cluster with JetStream (chart with
#   config.cluster and config.jetstream enabled). Union of both; one name per line.
# Regenerate: python3 tests/prometheus/gen_nats_fixture.py --exporter-git <git dir> > this file""")
    for n in sorted(names):
        print(n)


if __name__ == "__main__":
    sys.exit(main())
