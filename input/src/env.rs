//! The settings that reach the stores: each store's standard environment (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`, read the way `object_store`'s `from_env` builders read them), plus a `*_FILE`
//! variant of every secret (`AWS_SECRET_ACCESS_KEY_FILE=/run/secrets/key`: the file is read and
//! trimmed), as Kubernetes Secrets mounted as files and Docker secrets want.
//!
//! An [`Env`] is a snapshot, so tests pass their own without touching the process environment.
//! Its `Debug` shows variable names only: a value never reaches a log.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::SourceError;

/// The variables that hold secrets, each of which may instead be given as `NAME_FILE`.
pub const SECRET_VARIABLES: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_BEARER_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_CLIENT_SECRET",
];

/// A snapshot of environment variables.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The process's environment (non-UTF-8 variables are left out, as `from_env` does).
    pub fn process() -> Self {
        Env {
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }

    /// No variables at all.
    pub fn empty() -> Self {
        Env::default()
    }

    /// Exactly these variables.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Env { vars: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    /// This environment with `name` set to `value`.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// This environment without `name`.
    pub fn without(mut self, name: &str) -> Self {
        self.vars.remove(name);
        self
    }

    /// A variable's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Every variable whose name starts with `prefix`, in name order.
    pub(crate) fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.vars.iter().filter(move |(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// This environment with every `SECRET_FILE` read into `SECRET` (trimmed) and removed.
    /// Setting both `SECRET` and `SECRET_FILE` is an error, as is an unreadable or empty file;
    /// the messages name the variable and the file, never the content.
    pub(crate) fn resolve_files(&self) -> Result<Env, SourceError> {
        let mut resolved = self.clone();
        for name in SECRET_VARIABLES {
            let file_var = format!("{name}_FILE");
            let Some(path) = self.get(&file_var) else { continue };
            if self.get(name).is_some() {
                return Err(SourceError::Config {
                    setting: file_var,
                    problem: format!("both {name} and {name}_FILE are set; keep one of them"),
                });
            }
            let text = std::fs::read_to_string(path).map_err(|e| SourceError::Config {
                setting: file_var.clone(),
                problem: format!("cannot read the file {path} ({e}); mount the secret there or fix the path"),
            })?;
            let value = text.trim();
            if value.is_empty() {
                return Err(SourceError::Config {
                    setting: file_var,
                    problem: format!("the file {path} is empty; it must hold the value of {name}"),
                });
            }
            resolved.vars.remove(&file_var);
            resolved.vars.insert((*name).to_string(), value.to_string());
        }
        Ok(resolved)
    }
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Env").field("names", &self.vars.keys().collect::<Vec<_>>()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn a_secret_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "  s3cr3t-value\n").expect("write secret");
        let env =
            Env::empty().with("AWS_SECRET_ACCESS_KEY_FILE", path.to_string_lossy()).with("AWS_REGION", "eu-west-1");
        let resolved = env.resolve_files().expect("resolve");
        assert_eq!(resolved.get("AWS_SECRET_ACCESS_KEY"), Some("s3cr3t-value"));
        assert_eq!(resolved.get("AWS_SECRET_ACCESS_KEY_FILE"), None);
        assert_eq!(resolved.get("AWS_REGION"), Some("eu-west-1"));
    }

    #[test]
    fn bad_secret_files_are_named_without_their_content() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let missing = dir.path().join("missing");
        for (env, needle) in [
            (Env::empty().with("AWS_ACCESS_KEY_ID_FILE", empty.to_string_lossy()), "is empty"),
            (Env::empty().with("AZURE_CLIENT_SECRET_FILE", missing.to_string_lossy()), "cannot read the file"),
            (
                Env::empty()
                    .with("AWS_SESSION_TOKEN_FILE", empty.to_string_lossy())
                    .with("AWS_SESSION_TOKEN", "tok-xyz"),
                "both",
            ),
        ] {
            let error = env.resolve_files().expect_err(needle);
            assert_eq!(error.kind(), ErrorKind::Config);
            let text = error.to_string();
            assert!(text.contains(needle) && text.contains("_FILE"), "{text}");
            assert!(!text.contains("tok-xyz"), "{text}");
        }
    }

    #[test]
    fn debug_shows_names_not_values() {
        let env = Env::empty().with("AWS_SECRET_ACCESS_KEY", "very-secret");
        let shown = format!("{env:?}");
        assert!(shown.contains("AWS_SECRET_ACCESS_KEY") && !shown.contains("very-secret"), "{shown}");
    }
}
