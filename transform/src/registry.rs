//! Which transforms a process can run, and building one from a spec. A mapper's registry is
//! what it offers when it asks for work (its capabilities); `saver verify` recomputes through the
//! same registry, so a mapper and verify can never disagree on what a transform does.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::command::{CommandOptions, CommandSpec, CommandTransform};
use crate::digest::DigestTransform;
use crate::jq::{JqOptions, JqTransform};
use crate::{Transform, TransformSpec};

/// Builds a user's Rust transform from its parameters (`--transform-params`, JSON).
pub type Factory = Arc<dyn Fn(&serde_json::Value) -> Result<Arc<dyn Transform>, String> + Send + Sync>;

/// Why a transform cannot be built here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// This process does not offer it.
    #[error("this process cannot run `{capability}`; it offers: {offered}")]
    NotOffered {
        /// What the spec needs.
        capability: String,
        /// What this registry offers.
        offered: String,
    },
    /// The spec is invalid (a jq program that does not compile, bad parameters).
    #[error("{0}")]
    Invalid(String),
    /// It could not start (a command's program cannot be run).
    #[error("{0}")]
    Start(String),
}

/// The transforms one process can run.
#[derive(Clone, Default)]
pub struct Registry {
    custom: BTreeMap<String, Factory>,
    commands: BTreeMap<String, CommandSpec>,
    command_options: CommandOptions,
    jq_options: JqOptions,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("capabilities", &self.capabilities()).finish()
    }
}

impl Registry {
    /// The built-in kinds: digest and jq.
    pub fn builtin() -> Self {
        Registry::default()
    }

    /// Adds a Rust transform under `name` (the fetcher's `--transform NAME`).
    pub fn with(
        mut self,
        name: &str,
        factory: impl Fn(&serde_json::Value) -> Result<Arc<dyn Transform>, String> + Send + Sync + 'static,
    ) -> Self {
        self.custom.insert(name.to_string(), Arc::new(factory));
        self
    }

    /// Adds a program the operator allows (the mapper's `--command NAME=PROGRAM ARGS`).
    pub fn with_command(mut self, command: CommandSpec) -> Self {
        self.commands.insert(command.name.clone(), command);
        self
    }

    /// How command children are run (pool size, per-object timeout, retries).
    pub fn with_command_options(mut self, options: CommandOptions) -> Self {
        self.command_options = options;
        self
    }

    /// How jq programs are run (time and memory limits per object, how sandboxes start).
    pub fn with_jq_options(mut self, options: JqOptions) -> Self {
        self.jq_options = options;
        self
    }

    /// What a mapper with this registry can run: `digest`, `jq`, `command:<name>`..., and the
    /// names of its Rust transforms.
    pub fn capabilities(&self) -> Vec<String> {
        let mut all = vec!["digest".to_string(), "jq".to_string()];
        all.extend(self.commands.keys().map(|name| format!("command:{name}")));
        all.extend(self.custom.keys().cloned());
        all
    }

    /// Whether this registry can run `spec`.
    pub fn offers(&self, spec: &TransformSpec) -> bool {
        self.capabilities().contains(&spec.capability())
    }

    /// Builds the transform `spec` names: starts a jq program's first sandbox (which compiles
    /// it), starts a command's children.
    pub fn build(&self, spec: &TransformSpec) -> Result<Arc<dyn Transform>, BuildError> {
        let not_offered =
            || BuildError::NotOffered { capability: spec.capability(), offered: self.capabilities().join(", ") };
        Ok(match spec {
            TransformSpec::Digest { rounds } => Arc::new(DigestTransform { rounds: *rounds }),
            TransformSpec::Jq { filter } => Arc::new(JqTransform::start(filter, &self.jq_options)?),
            TransformSpec::Command { name } => {
                let command = self.commands.get(name).ok_or_else(not_offered)?;
                Arc::new(CommandTransform::start(command, &self.command_options).map_err(BuildError::Start)?)
            }
            TransformSpec::Custom { name, params } => {
                let factory = self.custom.get(name).ok_or_else(not_offered)?;
                factory(params).map_err(BuildError::Invalid)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_name_every_kind_and_build_refuses_what_is_not_offered() {
        let registry = Registry::builtin()
            .with_command("resize=python3 resize.py".parse().unwrap())
            .with("shout", |_| Err("not needed here".into()));
        assert_eq!(registry.capabilities(), vec!["digest", "jq", "command:resize", "shout"]);
        let err = Registry::builtin().build(&TransformSpec::Command { name: "resize".into() }).err().unwrap();
        assert!(err.to_string().contains("cannot run `command:resize`"), "{err}");
        assert!(Registry::builtin().build(&TransformSpec::Digest { rounds: 1 }).is_ok());
    }
}
