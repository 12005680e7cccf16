//! The job as data: what a run does to its objects ([`TransformSpec`]) and how its records are
//! identified ([`IdField`]). The fetcher owns it and tells mappers; its [`Job::fingerprint`] is
//! part of the run id, so changing the filter or the rounds makes a new run, and every result of
//! a run comes from one spec. [`JobArgs`] is the command line for it, shared by `fetcher` and
//! `saver verify` so both always mean the same job.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a run does to each object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TransformSpec {
    /// The course's users data through SHA-256 iterated `rounds` times ([`crate::digest`]).
    Digest {
        /// SHA-256 rounds per object (0: no digest).
        rounds: u32,
    },
    /// A jq program ([`crate::jq`]).
    Jq {
        /// The program's text.
        filter: String,
    },
    /// A program the mappers' operators registered under `name` ([`crate::command`]).
    Command {
        /// The registered name.
        name: String,
    },
    /// A Rust transform compiled into the mappers under `name` (`mapper::run_with`).
    Custom {
        /// The registered name.
        name: String,
        /// Its parameters (any JSON), passed to its factory.
        #[serde(default)]
        params: serde_json::Value,
    },
}

impl TransformSpec {
    /// What a mapper must offer to run this: `digest`, `jq`, `command:<name>` or `<name>`.
    pub fn capability(&self) -> String {
        match self {
            TransformSpec::Digest { .. } => "digest".into(),
            TransformSpec::Jq { .. } => "jq".into(),
            TransformSpec::Command { name } => format!("command:{name}"),
            TransformSpec::Custom { name, .. } => name.clone(),
        }
    }

    /// For people: `digest (3000 rounds)`, `jq '.a | .b'`, `command resize`, `custom mine`.
    pub fn describe(&self) -> String {
        match self {
            TransformSpec::Digest { rounds } => format!("digest ({rounds} rounds)"),
            TransformSpec::Jq { filter } => {
                let one_line: String = filter.split_whitespace().collect::<Vec<_>>().join(" ");
                let shown = common::text::escaped_max(&one_line, 80);
                format!("jq '{shown}'")
            }
            TransformSpec::Command { name } => format!("command {}", common::text::escaped(name)),
            TransformSpec::Custom { name, .. } => format!("custom {}", common::text::escaped(name)),
        }
    }

    /// Whether `saver verify` can recompute it (its outputs are a function of its input): all
    /// but commands, which may not be deterministic; verify checks those for completeness.
    pub fn deterministic(&self) -> bool {
        !matches!(self, TransformSpec::Command { .. })
    }
}

/// Where a record's id is: a path of object keys, `.order_id`, `.customer.id`, `."order id"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdField {
    keys: Vec<String>,
}

/// Why some text is not an id field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{path}` is not a supported id path ({why}): write a path of object keys, .order_id or .customer.id, a key other than letters, digits and _ in quotes (.\"order id\"); array indexes, pipes and other jq are not supported"
)]
pub struct IdFieldError {
    /// The text, escaped for a log line.
    path: String,
    /// What is wrong in it.
    why: &'static str,
}

impl TryFrom<String> for IdField {
    type Error = IdFieldError;
    fn try_from(text: String) -> Result<Self, IdFieldError> {
        text.parse()
    }
}

impl From<IdField> for String {
    fn from(field: IdField) -> String {
        field.to_string()
    }
}

/// A key jq reads after a dot without quotes: letters, digits and `_`, not starting with a digit.
fn is_identifier(key: &str) -> bool {
    key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The key at the start of `rest` (an identifier, or a quoted JSON string) and what follows it.
fn next_key(rest: &str) -> Result<(String, &str), &'static str> {
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut escaped = false;
        let end = quoted
            .char_indices()
            .find(|&(_, c)| {
                let closes = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            })
            .map(|(at, _)| at)
            .ok_or("a quoted key without its closing quote")?;
        let key =
            serde_json::from_str::<String>(&rest[..end + 2]).map_err(|_| "a quoted key that is not a JSON string")?;
        return Ok((key, &quoted[end + 1..]));
    }
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
    match &rest[..end] {
        "" => Err("a key is missing"),
        key if !is_identifier(key) => Err("a key starts with a digit"),
        key => Ok((key.to_string(), &rest[end..])),
    }
}

impl std::str::FromStr for IdField {
    type Err = IdFieldError;
    fn from_str(text: &str) -> Result<Self, IdFieldError> {
        let error = |why| IdFieldError { path: common::text::escaped(text).to_string(), why };
        let path = text.trim();
        let mut rest = path.strip_prefix('.').unwrap_or(path);
        let mut keys = Vec::new();
        loop {
            let (key, after) = next_key(rest).map_err(error)?;
            keys.push(key);
            if after.is_empty() {
                return Ok(IdField { keys });
            }
            rest = after.strip_prefix('.').ok_or_else(|| error("only a dot may follow a key"))?;
        }
    }
}

impl std::fmt::Display for IdField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for key in &self.keys {
            if is_identifier(key) {
                write!(f, ".{key}")?;
            } else {
                let quoted = serde_json::to_string(key).expect("a string always serialises");
                write!(f, ".{quoted}")?;
            }
        }
        Ok(())
    }
}

impl IdField {
    /// The id of `record` (strict JSON of one object) as the protocol sends it: a string as it
    /// is, a number or a boolean as its JSON text; `None` when the path leads nowhere or to null,
    /// an array or an object. Of a repeated key, the last counts, as in jq.
    pub fn extract(&self, record: &[u8]) -> Option<String> {
        let value = self.value(record)?;
        let text = std::str::from_utf8(value).ok()?;
        match text.as_bytes().first()? {
            b'"' => serde_json::from_str::<String>(text).ok(),
            b'{' | b'[' | b'n' => None,
            _ => Some(text.to_string()),
        }
    }

    /// The id of `record` as jq compares it, for the duplicate-id check: its JSON text with its
    /// type (`"1"` is not `1`), a number in its one canonical form (`1`, `1.0` and `10e-1` are
    /// one id, as `1 == 1.0` in jq). `None` when it has no id, as [`IdField::extract`].
    pub fn key(&self, record: &[u8]) -> Option<String> {
        let value = self.value(record)?;
        let text = std::str::from_utf8(value).ok()?;
        match text.as_bytes().first()? {
            b'"' => serde_json::from_str::<String>(text)
                .ok()
                .map(|id| serde_json::to_string(&id).expect("a string always serialises")),
            b'{' | b'[' | b'n' => None,
            b't' | b'f' => Some(text.to_string()),
            _ => Some(common::exact::Decimal::parse(text).map_or_else(|| text.to_string(), |d| d.canonical())),
        }
    }

    /// The raw value at the path in `record`.
    fn value<'r>(&self, record: &'r [u8]) -> Option<&'r [u8]> {
        let mut value = record;
        for key in &self.keys {
            value = member(value, key)?;
        }
        Some(value)
    }
}

/// The raw value of `key` in the JSON object `object`, borrowed from it, without building a map.
fn member<'a>(object: &'a [u8], key: &str) -> Option<&'a [u8]> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
    use serde_json::value::RawValue;
    struct Find<'k>(&'k str);
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = Option<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            // Of a repeated key the last counts, as in jq and PostgreSQL's jsonb.
            while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if name == self.0 {
                    found = Some(map.next_value::<&'de RawValue>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(object);
    let raw = de.deserialize_map(Find(key)).ok()??;
    Some(raw.get().as_bytes())
}

/// A run's job: its transform and its record identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// What each object becomes.
    pub transform: TransformSpec,
    /// Where a record's id is, if it has one: the duplicate-id check of the scan and the
    /// PostgreSQL sink use it. Without it a record's identity is its position.
    #[serde(default)]
    pub id_field: Option<IdField>,
}

impl Job {
    /// 16 hex digits that name this job: SHA-256 of its canonical JSON (the struct's field
    /// order, object keys of custom parameters sorted), so the same job always has the same
    /// fingerprint and any change makes another.
    pub fn fingerprint(&self) -> String {
        let canonical = common::json::to_vec_own(self);
        let digest = Sha256::digest(&canonical);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// For people: the transform, and the id field if any.
    pub fn describe(&self) -> String {
        match &self.id_field {
            Some(field) => format!("{}, ids at {field}", self.transform.describe()),
            None => self.transform.describe(),
        }
    }
}

/// The job on the command line (`fetcher` and `saver verify` take the same flags).
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// A job file (YAML): the job and the run's settings in one file that the fetcher and
    /// `saver verify` both read, its keys the flags' names with `_` (input, chunk_size,
    /// transform, rounds, filter, id_field, max_attempts, sink, out, ...; README.md, "The job
    /// file"). A flag or environment variable given as well overrides the file's value.
    #[arg(long = "job", env = "FETCHER_JOB", value_name = "FILE")]
    pub job_file: Option<PathBuf>,

    /// What to do to each object: `digest` (the users demo), `jq` (with --filter), `command`
    /// (with --command: a program the mappers registered), or the name of a Rust transform
    /// compiled into the mappers.
    #[arg(long, env = "FETCHER_TRANSFORM", default_value = "digest")]
    pub transform: String,

    /// digest: SHA-256 rounds per object (0: no digest, pure pipeline overhead).
    #[arg(long, env = "FETCHER_ROUNDS", default_value_t = crate::digest::DEFAULT_ROUNDS)]
    pub rounds: u32,

    /// jq: the program.
    #[arg(long, env = "FETCHER_FILTER", conflicts_with = "filter_file")]
    pub filter: Option<String>,

    /// jq: a file holding the program (a ConfigMap on Kubernetes).
    #[arg(long, env = "FETCHER_FILTER_FILE")]
    pub filter_file: Option<PathBuf>,

    /// command: the name under which the mappers registered the program (mapper --command
    /// NAME=PROGRAM); the fetcher names a command, it never supplies one.
    #[arg(long = "command", env = "FETCHER_COMMAND")]
    pub command_name: Option<String>,

    /// A Rust transform's parameters, as JSON.
    #[arg(long, env = "FETCHER_TRANSFORM_PARAMS")]
    pub transform_params: Option<String>,

    /// The path of a record's id, e.g. .order_id: checked for duplicates by the scan, and the
    /// key of the PostgreSQL sink's rows. The digest job uses .uuid unless told otherwise.
    #[arg(long, env = "FETCHER_ID_FIELD")]
    pub id_field: Option<String>,
}

impl Default for JobArgs {
    fn default() -> Self {
        JobArgs {
            job_file: None,
            transform: "digest".into(),
            rounds: crate::digest::DEFAULT_ROUNDS,
            filter: None,
            filter_file: None,
            command_name: None,
            transform_params: None,
            id_field: None,
        }
    }
}

/// Why the job flags do not make a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A flag is missing or does not fit the transform.
    #[error("{0}")]
    Flags(String),
    /// The filter file cannot be read.
    #[error("cannot read the jq filter file {path}: {source}")]
    FilterFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl JobArgs {
    /// The digest job at `rounds` (tests and tools).
    pub fn digest(rounds: u32) -> Self {
        JobArgs { rounds, ..Default::default() }
    }

    /// A jq job (tests and tools).
    pub fn jq(filter: &str) -> Self {
        JobArgs { transform: "jq".into(), filter: Some(filter.into()), ..Default::default() }
    }

    /// The job these flags describe.
    pub fn job(&self) -> Result<Job, JobError> {
        let flags = |message: String| JobError::Flags(message);
        let transform = match self.transform.as_str() {
            "digest" => TransformSpec::Digest { rounds: self.rounds },
            "jq" => {
                let filter = match (&self.filter, &self.filter_file) {
                    (Some(filter), _) => filter.clone(),
                    (None, Some(path)) => std::fs::read_to_string(path)
                        .map_err(|source| JobError::FilterFile { path: path.clone(), source })?,
                    (None, None) => {
                        return Err(flags(
                            "--transform jq needs the program: --filter 'PROGRAM' or --filter-file FILE".into(),
                        ))
                    }
                };
                TransformSpec::Jq { filter }
            }
            "command" => {
                let name = self.command_name.clone().ok_or_else(|| {
                    flags("--transform command needs --command NAME, a program the mappers registered with mapper --command NAME=PROGRAM".into())
                })?;
                TransformSpec::Command { name }
            }
            "" => return Err(flags("--transform is empty".into())),
            name => {
                let params = match &self.transform_params {
                    Some(text) => {
                        serde_json::from_str(text).map_err(|e| flags(format!("--transform-params is not JSON: {e}")))?
                    }
                    None => serde_json::Value::Null,
                };
                TransformSpec::Custom { name: name.to_string(), params }
            }
        };
        if (self.filter.is_some() || self.filter_file.is_some()) && !matches!(transform, TransformSpec::Jq { .. }) {
            return Err(flags("--filter and --filter-file belong to --transform jq".into()));
        }
        if self.command_name.is_some() && !matches!(transform, TransformSpec::Command { .. }) {
            return Err(flags("--command NAME belongs to --transform command".into()));
        }
        let id_field = match (&self.id_field, &transform) {
            (Some(path), _) if path.is_empty() => None,
            (Some(path), _) => {
                Some(path.parse().map_err(|e: IdFieldError| flags(format!("--id-field (FETCHER_ID_FIELD): {e}")))?)
            }
            (None, TransformSpec::Digest { .. }) => Some(IdField { keys: vec!["uuid".into()] }),
            (None, _) => None,
        };
        Ok(Job { transform, id_field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_change_of_the_job_changes_its_fingerprint() {
        let digest = |rounds| JobArgs::digest(rounds).job().unwrap().fingerprint();
        assert_eq!(digest(3000), digest(3000));
        assert_ne!(digest(3000), digest(300));
        let jq = |filter| JobArgs::jq(filter).job().unwrap().fingerprint();
        assert_ne!(jq(".a"), jq(".b"));
        assert_eq!(jq(".a").len(), 16);
        let mut with_id = JobArgs::jq(".a");
        with_id.id_field = Some(".id".into());
        assert_ne!(with_id.job().unwrap().fingerprint(), jq(".a"));
    }

    #[test]
    fn flags_make_the_documented_jobs_and_refuse_what_does_not_fit() {
        let digest = JobArgs::default().job().unwrap();
        assert_eq!(digest.transform, TransformSpec::Digest { rounds: 3000 });
        assert_eq!(digest.id_field.unwrap().to_string(), ".uuid");
        assert!(JobArgs { transform: "jq".into(), ..Default::default() }.job().is_err());
        let command =
            JobArgs { transform: "command".into(), command_name: Some("resize".into()), ..Default::default() };
        assert_eq!(command.job().unwrap().transform.capability(), "command:resize");
        let stray = JobArgs { filter: Some(".a".into()), ..Default::default() };
        assert!(stray.job().unwrap_err().to_string().contains("--transform jq"));
        let custom =
            JobArgs { transform: "shout".into(), transform_params: Some("{\"x\":1}".into()), ..Default::default() };
        assert_eq!(custom.job().unwrap().transform.capability(), "shout");
    }

    #[test]
    fn ids_are_read_along_their_path() {
        let field: IdField = ".customer.id".parse().unwrap();
        assert_eq!(field.extract(br#"{"customer":{"id":"c-1","x":[1]},"id":9}"#).as_deref(), Some("c-1"));
        assert_eq!(field.extract(br#"{"customer":{"id":42}}"#).as_deref(), Some("42"));
        assert_eq!(field.extract(br#"{"customer":{"name":"x"}}"#), None);
        assert_eq!(field.extract(br#"{"customer":{"id":null}}"#), None);
        let plain: IdField = "order_id".parse().unwrap();
        assert_eq!(plain.extract(br#"{"order_id":"o\u002d7"}"#).as_deref(), Some("o-7"));
        assert!(".a..b".parse::<IdField>().is_err());
    }

    #[test]
    fn id_paths_jq_reads_otherwise_are_refused_at_start_naming_the_flag_and_what_is_supported() {
        for path in [".a[0]", ".a[", ".a | .b", ".a.1b", ".", ".a.", ".a b", ".\"a", ".a-b", ".a\"b\""] {
            let args = JobArgs { id_field: Some(path.into()), ..JobArgs::jq(".") };
            let error = args.job().expect_err(path).to_string();
            assert!(error.starts_with("--id-field (FETCHER_ID_FIELD): "), "{path}: {error}");
            assert!(error.contains(".customer.id") && error.contains("not supported"), "{path}: {error}");
        }
        let quoted: IdField = r#".order."id no.""#.parse().expect("a quoted key");
        assert_eq!(quoted.keys, ["order", "id no."]);
        assert_eq!(quoted.to_string(), r#".order."id no.""#, "the normal form quotes it again");
        assert_eq!(quoted.extract(br#"{"order":{"id no.":7}}"#).as_deref(), Some("7"));
        assert_eq!("_a.B9".parse::<IdField>().expect("plain keys").to_string(), "._a.B9");
        assert_eq!(r#"."plain""#.parse::<IdField>().expect("quoted").to_string(), ".plain");
    }

    #[test]
    fn ids_are_compared_with_their_json_type_and_numbers_as_jq_compares_them() {
        let field: IdField = ".id".parse().expect("a path");
        let key = |record: &str| field.key(record.as_bytes()).expect("an id");
        assert_ne!(key(r#"{"id":1}"#), key(r#"{"id":"1"}"#));
        assert_ne!(key(r#"{"id":true}"#), key(r#"{"id":"true"}"#));
        assert_eq!(key(r#"{"id":1}"#), key(r#"{"id":1.0}"#));
        assert_eq!(key(r#"{"id":100}"#), key(r#"{"id":1E2}"#));
        assert_ne!(key(r#"{"id":100000000000000000001}"#), key(r#"{"id":100000000000000000000}"#));
        assert_eq!(key(r#"{"id":"o\u002d7"}"#), key(r#"{"id":"o-7"}"#));
        assert_eq!(field.key(br#"{"id":null}"#), None);
        assert_eq!(field.extract(br#"{"id":1.0}"#).as_deref(), Some("1.0"), "sent as written");
    }

    #[test]
    fn of_a_repeated_key_the_last_is_the_id_as_in_jq() {
        let field: IdField = ".c.id".parse().expect("a path");
        let record = br#"{"c":{"id":"first","id":"last"}}"#;
        assert_eq!(field.extract(record).as_deref(), Some("last"));
        assert_eq!(field.key(record).as_deref(), Some(r#""last""#));
        assert_eq!(field.extract(br#"{"c":{"id":1},"c":{"id":2}}"#).as_deref(), Some("2"));
    }
}
