//! The PostgreSQL sink's place among the sinks: `--sink postgres://USER@HOST:PORT/DATABASE`
//! with its password from `--pg-password-file` or `--pg-password` ([`PgArgs`]), opened for
//! writing as a [`PgSink`] (a pool of `--pg-pool` connections) and read back by run
//! ([`super::reader`]).

use std::path::PathBuf;
use std::sync::Arc;

use common::config::Secret;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::reader::PgReader;
use super::{is_postgres_url, redacted, PgOptions, PgSink};
use crate::decoded::Decoded;
use crate::sink::{ReadError, SaveOutcome, Sink, SinkConfig, SinkContext, SinkError, SinkKind, SinkReader, SinkWriter};

/// The PostgreSQL sink's own flags (flattened into the saver's and verify's sink flags).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PgArgs {
    /// File holding the PostgreSQL password (a mounted Secret).
    #[arg(long, env = "SAVER_PG_PASSWORD_FILE")]
    pub pg_password_file: Option<PathBuf>,

    /// PostgreSQL password (prefer --pg-password-file: environment variables are easy to leak).
    #[arg(long, env = "SAVER_PG_PASSWORD", hide_env_values = true)]
    pub pg_password: Option<Secret>,
}

impl PgArgs {
    /// The password to use, if any: the file's (trimmed, as every secret file), else `--pg-password`.
    pub fn password(&self) -> Result<Option<Secret>, common::config::SecretFileError> {
        Secret::resolve(self.pg_password.as_ref(), self.pg_password_file.as_deref(), "SAVER_PG_PASSWORD_FILE")
    }
}

/// The PostgreSQL sink, as [`crate::sink::SINKS`] lists it.
pub(crate) struct PgKind;

/// The one [`PgKind`].
pub(crate) const POSTGRES: PgKind = PgKind;

impl SinkKind for PgKind {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn usage(&self) -> &'static str {
        "a postgres://USER@HOST:PORT/DATABASE URL"
    }

    fn accepts(&self, sink: &str) -> bool {
        is_postgres_url(sink)
    }

    fn redacted(&self, sink: &str) -> String {
        redacted(sink)
    }

    fn configure(&self, sink: &str, context: &SinkContext<'_>) -> Result<Box<dyn SinkConfig>, SinkError> {
        Ok(Box::new(PgOptions {
            url: sink.to_string(),
            password: context.args.postgres.password()?,
            pool_size: context.pool_size,
            saver: context.saver.to_string(),
        }))
    }
}

impl SinkConfig for PgOptions {
    fn open<'a>(&'a self, shutdown: &'a CancellationToken) -> BoxFuture<'a, Result<Option<Sink>, SinkError>> {
        Box::pin(async move { Ok(PgSink::connect(self.clone(), shutdown).await?.map(Sink::new)) })
    }

    fn reader(&self, run: &str) -> Result<Box<dyn SinkReader>, ReadError> {
        let password = self.password.as_ref().map(Secret::expose);
        Ok(Box::new(PgReader::connect(&self.url, password, run)?))
    }
}

impl SinkWriter for PgSink {
    fn save_batch(&self, results: Vec<Arc<Decoded>>) -> BoxFuture<'_, Vec<Result<SaveOutcome, SinkError>>> {
        Box::pin(async move { PgSink::save_batch(self, &results).await })
    }

    fn id(&self) -> &str {
        PgSink::id(self)
    }

    /// One batch per pooled connection.
    fn parallel_batches(&self) -> usize {
        self.connections()
    }

    fn describe(&self) -> String {
        format!("PostgreSQL {}", self.target())
    }
}
