//! The PostgreSQL sink: one `jsonb` row per output value in `chunkmill_outputs` (keyed by run,
//! chunk, object and output position, with the object's id when the job has an id field), one
//! row per saved chunk in `chunkmill_chunks`, one per dead object in `chunkmill_dead_objects`
//! (schema in `schema.sql`, version 2, applied at start-up; a version-1 database is migrated by
//! adding to it).
//!
//! A batch of chunks is saved in one transaction. It first *claims* its chunks by inserting their
//! `chunkmill_chunks` rows with `ON CONFLICT DO NOTHING RETURNING`: the rows returned are the
//! chunks this transaction owns; the others were saved before (or by a concurrent saver, whose
//! commit this insert waited for), so they are duplicates and nothing of theirs is written. Only
//! the claimed chunks' outputs are written, in the same transaction (binary COPY of the values as
//! they arrived; on an id another object of the run already holds, the batch is redone with an
//! INSERT that stores such rows with `id` NULL), so a chunk row exists if and only if all its
//! outputs do. Ids are text: two objects can hold one only without the fetcher's duplicate check,
//! or when their ids differ only in their JSON type (`1` and `"1"`, which jq tells apart). The caller acknowledges a chunk only after the commit returned.
//!
//! Concurrent savers cannot deadlock on each other: every batch claims its chunks in one order,
//! `(run, chunk)`, and a claim is the first row lock a transaction takes, so two transactions wait
//! for each other in one direction only. Output rows cannot conflict across chunks (the fetcher
//! refuses inputs with repeated ids). Deadlock and serialisation failures are retried anyway, and a
//! concurrent saver storing the same id text first makes the batch fail and be saved again.
//!
//! [`config`] is how `--sink postgres://...` opens it, [`reader`] how `saver verify` reads a run
//! back, [`jsonb`] what the database does to a value it stores.
//!
//! TLS follows libpq's `sslmode` (`disable`, `prefer` — the default —, `require`, `verify-ca`,
//! `verify-full`) and `sslrootcert` parameters of the connection string: see [`tls`]. A TLS
//! failure at start (untrusted certificate, wrong host name, server without TLS under `require`)
//! stops the saver, as a wrong password does; waiting would not fix it.

pub mod config;
pub mod jsonb;
pub(crate) mod reader;
mod tls;
mod url;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::backoff::Backoff;
use common::config::Secret;
use common::protocol::{Cause, ChunkId, DeadObject};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_util::sync::CancellationToken;

use super::{SaveOutcome, SinkError};
use crate::decoded::Decoded;
pub use config::PgArgs;
pub(crate) use config::POSTGRES;
pub use tls::{MakeTls, Roots, SslMode, TlsError, TlsOptions};
pub use url::{describe, is_postgres_url, parse, redacted, PgConfig, PgOptions};

/// The schema the sink writes to; applied idempotently at start-up.
pub const SCHEMA: &str = include_str!("schema.sql");

/// Serialises schema set-up between savers starting together (`CREATE TABLE IF NOT EXISTS` is not
/// safe to run concurrently in PostgreSQL). The bytes spell "chunkmil".
const SCHEMA_LOCK: i64 = 0x6368_756e_6b6d_696c;

/// The schema version this saver writes (`chunkmill_schema`).
const SCHEMA_VERSION: i32 = 2;

const CLAIM: &str = "INSERT INTO chunkmill_chunks (run, chunk, objects, dead, outputs, lease, attempt, mapper, saver, job) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int4[], $4::int4[], $5::int4[], $6::uuid[], $7::int4[], $8::text[], $9::text[], $10::text[]) \
     ON CONFLICT (run, chunk) DO NOTHING RETURNING run, chunk";

/// The outputs of a batch whose COPY met an id another object of the run holds: such a row is
/// stored with `id` NULL (the first holder keeps it), so no value is ever dropped for its id.
const OUTPUTS: &str = "INSERT INTO chunkmill_outputs (run, chunk, idx, out, id, doc) \
     SELECT t.run, t.chunk, t.idx, t.out, \
       CASE WHEN row_number() OVER (PARTITION BY t.run, t.id, t.out ORDER BY t.chunk, t.idx) > 1 \
         OR EXISTS (SELECT 1 FROM chunkmill_outputs o WHERE o.run = t.run AND o.id = t.id AND o.out = t.out) \
       THEN NULL ELSE t.id END, t.doc \
     FROM unnest($1::text[], $2::int8[], $3::int4[], $4::int4[], $5::text[], $6::jsonb[]) AS t(run, chunk, idx, out, id, doc)";

/// One output row, as [`OUTPUTS`] stores it.
const OUTPUT: &str = "INSERT INTO chunkmill_outputs (run, chunk, idx, out, id, doc) \
     SELECT $1::text, $2::int8, $3::int4, $4::int4, \
       CASE WHEN EXISTS (SELECT 1 FROM chunkmill_outputs o WHERE o.run = $1::text AND o.id = $5::text AND o.out = $4::int4) \
       THEN NULL ELSE $5::text END, $6::jsonb";

const DEAD: &str = "INSERT INTO chunkmill_dead_objects (run, chunk, idx, id, error, cause, line) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::int8[]) \
     ON CONFLICT (run, chunk, idx) DO NOTHING";

const RECOUNT: &str = "UPDATE chunkmill_chunks SET dead = $3, outputs = $4 WHERE run = $1 AND chunk = $2";

/// Transactions retried after a deadlock or serialisation failure before giving up on a batch.
const CONFLICT_RETRIES: u32 = 3;

/// A database failure, kept apart from [`SinkError`] so one failure can answer a whole batch.
#[derive(Debug, Clone)]
struct Failure {
    action: &'static str,
    detail: String,
    code: Option<SqlState>,
    /// The TLS handshake failed, or the server refused TLS that `sslmode` requires: what to do.
    /// Waiting does not help.
    tls: Option<&'static str>,
}

/// The TLS problems that no retry fixes, with what to do: the handshake refused (an untrusted
/// certificate, a wrong host name, no common protocol), or a server without TLS under `require`.
fn tls_problem(e: &tokio_postgres::Error) -> Option<&'static str> {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(match tls {
                // `Other`: the sink's own verifier refused the certificate (tls.rs).
                rustls::Error::InvalidCertificate(_) | rustls::Error::Other(_) => {
                    "the saver does not retry: fix sslrootcert or sslmode in SAVER_SINK, or the server's certificate"
                }
                _ => "the TLS handshake failed and the saver does not retry: check sslmode in SAVER_SINK and the server's ssl settings",
            });
        }
        if cause.to_string() == "server does not support TLS" {
            return Some(
                "the server has TLS turned off (ssl = off): turn it on in postgresql.conf, or use sslmode=prefer or disable in SAVER_SINK",
            );
        }
        source = cause.source();
    }
    None
}

impl Failure {
    fn new(action: &'static str, e: &tokio_postgres::Error) -> Self {
        let detail = error_text(e);
        // The server asks for a password the saver was not given: as fatal as a wrong one, and
        // fixed the same way (the client says so without a SQLSTATE).
        let code =
            e.code().cloned().or_else(|| detail.contains("password missing").then_some(SqlState::INVALID_PASSWORD));
        Failure { action, detail, code, tls: tls_problem(e) }
    }

    fn into_error(self, target: &str) -> SinkError {
        let hint = self.tls.unwrap_or_else(|| hint(self.code.as_ref()));
        SinkError::Postgres { target: target.to_string(), action: self.action, detail: self.detail, hint }
    }

    /// Waiting helps: the server is down, starting, or shutting down, or a race lost.
    fn transient(&self) -> bool {
        self.tls.is_none()
            && !matches!(
                &self.code,
                Some(c) if *c == SqlState::INVALID_PASSWORD
                    || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                    || *c == SqlState::INVALID_CATALOG_NAME
                    || *c == SqlState::INSUFFICIENT_PRIVILEGE
                    || *c == SqlState::FEATURE_NOT_SUPPORTED
            )
    }

    fn conflict(&self) -> bool {
        matches!(&self.code, Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE)
    }

    /// The database refuses a value: a data exception (class 22, e.g. 22021 for a NUL
    /// character in text) or a constraint the schema's owner added. Retrying cannot help; the
    /// object that carries it must be set aside.
    fn refuses_value(&self) -> bool {
        matches!(&self.code, Some(c) if c.code().starts_with("22")
            || *c == SqlState::CHECK_VIOLATION
            || *c == SqlState::NOT_NULL_VIOLATION)
    }

    /// The server is gone or going: every chunk of the batch would fail alone the same way.
    fn connection_lost(&self) -> bool {
        match &self.code {
            None => true,
            Some(c) => {
                c.code().starts_with("08")
                    || *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CRASH_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW
            }
        }
    }
}

/// Text PostgreSQL can hold: `text` refuses the NUL character, so a dead-letter reason or id
/// that carries one is stored with it escaped.
fn pg_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\\u0000"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// The server's message with its SQLSTATE, or the client error with its causes: tokio-postgres
/// displays a server error only as "db error".
pub(crate) fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; {detail}"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn hint(code: Option<&SqlState>) -> &'static str {
    match code {
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            "check the user in SAVER_SINK and the password in SAVER_PG_PASSWORD_FILE"
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => "create the database, or fix its name in SAVER_SINK",
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
            "grant the role CREATE and INSERT on the schema, or apply saver/src/sink/postgres/schema.sql as an owner"
        }
        Some(_) => "the saver retries; results stay unacknowledged until saved",
        None => "check that PostgreSQL is running and reachable; the saver retries meanwhile",
    }
}

fn pool_failure(action: &'static str, e: deadpool_postgres::PoolError) -> Failure {
    match e {
        deadpool_postgres::PoolError::Backend(e) => Failure::new(action, &e),
        other => Failure { action, detail: other.to_string(), code: None, tls: None },
    }
}

/// Saves chunks into PostgreSQL through a connection pool. Cheap to clone.
#[derive(Clone)]
pub struct PgSink {
    pool: Pool,
    target: Arc<str>,
    saver: Arc<str>,
    id: Arc<str>,
}

impl std::fmt::Debug for PgSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSink").field("target", &self.target).field("id", &self.id).finish()
    }
}

/// Opens a pool to the database: a connection that breaks (server restart) is dropped when it
/// is next taken and a new one is made.
fn pool(config: PgConfig, size: usize) -> Result<Pool, SinkError> {
    let target = describe(&config.config);
    let manager =
        Manager::from_config(config.config, config.tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(10)))
        .wait_timeout(Some(Duration::from_secs(30)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| SinkError::Config(format!("cannot make a connection pool for {target}: {e}")))
}

/// Creates the database `config` names, connecting to the server's `postgres` database as the
/// same role: a new user's first run should not stop at "database does not exist". A role that
/// may not create databases gets the exact command to run instead.
async fn create_database(pg: &PgConfig) -> Result<(), Failure> {
    let config = &pg.config;
    let user = config.get_user().unwrap_or("postgres");
    let name = config.get_dbname().unwrap_or(user);
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin
        .connect(pg.tls.clone())
        .await
        .map_err(|e| Failure::new("connect to the postgres database to create it", &e))?;
    let connection = tokio::spawn(connection);
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let created = client.batch_execute(&format!("CREATE DATABASE {quoted}")).await;
    drop(client);
    let _ = connection.await;
    match created {
        Ok(()) => {
            tracing::info!("created the database {name} (it did not exist)");
            Ok(())
        }
        // Another saver created it first.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(e) => {
            let mut failure = Failure::new("create the database", &e);
            failure.detail = format!(
                "the database {name} does not exist and role {user} cannot create it ({}); as a role that may, run: \
                 CREATE DATABASE {quoted} OWNER \"{}\";",
                failure.detail,
                user.replace('"', "\"\"")
            );
            // Fatal whatever the reason: the database is still missing.
            failure.code = Some(SqlState::INVALID_CATALOG_NAME);
            Err(failure)
        }
    }
}

/// A JSON value's text as a `jsonb` (or `json`) parameter or COPY field, without parsing it:
/// the value was checked when the result was decoded, and PostgreSQL checks it again.
#[derive(Debug, Clone, Copy)]
struct RawJson<'a>(&'a [u8]);

impl ToSql for RawJson<'_> {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]); // the jsonb wire format's version
        }
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

impl PgSink {
    /// Connects and applies the schema, waiting (with backoff) for a database that is not up yet;
    /// fails at once on a wrong password, a missing database, missing rights or a schema made by
    /// a newer chunkmill. `Ok(None)` if `shutdown` came first.
    pub async fn connect(options: PgOptions, shutdown: &CancellationToken) -> Result<Option<Self>, SinkError> {
        let config = parse(&options.url, options.password.as_ref().map(Secret::expose))?;
        let target: Arc<str> = describe(&config.config).into();
        tracing::info!("PostgreSQL {target}: {}", config.tls_options.summary());
        let pool = pool(config.clone(), options.pool_size)?;
        let mut sink = PgSink { pool, target, saver: options.saver.into(), id: Arc::from("") };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut created = false;
        loop {
            match sink.apply_schema().await {
                Ok(id) => {
                    sink.id = id.into();
                    return Ok(Some(sink));
                }
                Err(failure) if failure.code == Some(SqlState::INVALID_CATALOG_NAME) && !created => {
                    created = true;
                    create_database(&config).await.map_err(|f| f.into_error(&sink.target))?;
                }
                Err(failure) if !failure.transient() => return Err(failure.into_error(&sink.target)),
                Err(failure) => {
                    if backoff.first_failure() {
                        tracing::warn!("waiting for PostgreSQL: {}", failure.clone().into_error(&sink.target));
                    }
                    if !backoff.wait(shutdown).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// `postgres://user@host:port/database`, for logs.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The sink's identity (the row of `chunkmill_sink`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Batches this sink commits at once (its connections).
    pub fn connections(&self) -> usize {
        self.pool.status().max_size
    }

    /// Applies the schema (migrating a version-1 database by adding to it) and returns the
    /// sink's identity; refuses a database whose schema is newer than this saver's.
    async fn apply_schema(&self) -> Result<String, Failure> {
        let mut client = self.pool.get().await.map_err(|e| pool_failure("connect", e))?;
        let tx = client.transaction().await.map_err(|e| Failure::new("begin a transaction", &e))?;
        // `IF NOT EXISTS` on every start would log a NOTICE per table: not news.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await
            .map_err(|e| Failure::new("begin a transaction", &e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(|e| Failure::new("lock the schema", &e))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS chunkmill_schema (version integer NOT NULL, applied timestamptz NOT NULL DEFAULT now())")
            .await
            .map_err(|e| Failure::new("create the schema table", &e))?;
        let newest: Option<i32> = tx
            .query_one("SELECT max(version) FROM chunkmill_schema", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| Failure::new("read the schema version", &e))?;
        if let Some(version) = newest.filter(|v| *v > SCHEMA_VERSION) {
            return Err(Failure {
                action: "use the database",
                detail: format!(
                    "its chunkmill schema is version {version}, made by a newer chunkmill; this saver knows version {SCHEMA_VERSION} and leaves it untouched"
                ),
                code: Some(SqlState::FEATURE_NOT_SUPPORTED),
                tls: None,
            });
        }
        tx.batch_execute(SCHEMA).await.map_err(|e| Failure::new("create the tables", &e))?;
        let mine = format!("pg-{}", uuid::Uuid::new_v4().simple());
        tx.execute(
            "INSERT INTO chunkmill_sink (id) SELECT $1 WHERE NOT EXISTS (SELECT 1 FROM chunkmill_sink)",
            &[&mine],
        )
        .await
        .map_err(|e| Failure::new("record the sink's identity", &e))?;
        let id: String = tx
            .query_one("SELECT id FROM chunkmill_sink ORDER BY created, id LIMIT 1", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| Failure::new("read the sink's identity", &e))?;
        tx.commit().await.map_err(|e| Failure::new("commit the schema", &e))?;
        Ok(id)
    }

    /// Saves chunks in one transaction; one outcome per result, in order. Nothing is `Saved`
    /// before the commit returned. A batch the database refuses for a reason other than a lost
    /// connection is retried chunk by chunk, so one chunk cannot hold its neighbours hostage; a
    /// chunk refused alone for a value it cannot store is saved without the objects carrying it
    /// (see [`PgSink::salvage`]).
    pub async fn save_batch(&self, results: &[Arc<Decoded>]) -> Vec<Result<SaveOutcome, SinkError>> {
        let mut outcomes: Vec<Option<Result<SaveOutcome, SinkError>>> = (0..results.len()).map(|_| None).collect();
        // Refuse what the schema cannot hold, alone, so it cannot fail the rest of the batch.
        for (i, result) in results.iter().enumerate() {
            if let Err(problem) = representable(result) {
                outcomes[i] = Some(Err(SinkError::Invalid(problem)));
            }
        }
        // One lock order for every transaction: no deadlock between savers.
        let key = |r: &Decoded| (r.head.run.clone(), r.head.chunk);
        let mut order: Vec<usize> = (0..results.len()).filter(|&i| outcomes[i].is_none()).collect();
        order.sort_by_key(|&i| key(&results[i]));
        order.dedup_by(|later, first| key(&results[*later]) == key(&results[*first]));
        let batch: Vec<&Decoded> = order.iter().map(|&i| results[i].as_ref()).collect();
        let mut per_chunk: Vec<(usize, Result<SaveOutcome, Failure>)> = Vec::with_capacity(order.len());
        match self.write_retrying(&batch).await {
            Ok(claimed) => {
                for (&i, result) in order.iter().zip(&batch) {
                    per_chunk.push((i, Ok(claimed_outcome(&claimed, result))));
                }
            }
            Err(failure) if failure.connection_lost() => {
                for &i in &order {
                    per_chunk.push((i, Err(failure.clone())));
                }
            }
            Err(failure) => {
                if batch.len() > 1 {
                    tracing::warn!(
                        "PostgreSQL refused a batch of {} chunks ({}); saving them one by one",
                        batch.len(),
                        failure.detail
                    );
                }
                for (&i, result) in order.iter().zip(&batch) {
                    per_chunk.push((i, self.save_one(result).await));
                }
            }
        }
        for (i, outcome) in per_chunk {
            outcomes[i] = Some(outcome.map_err(|failure| failure.into_error(&self.target)));
        }
        // A later copy of a chunk in the same batch is a duplicate of the first.
        outcomes.into_iter().map(|o| o.unwrap_or(Ok(SaveOutcome::Duplicate))).collect()
    }

    /// One chunk in its own transaction; salvaged if the database refuses one of its values.
    async fn save_one(&self, result: &Decoded) -> Result<SaveOutcome, Failure> {
        match self.write_retrying(&[result]).await {
            Ok(claimed) => Ok(claimed_outcome(&claimed, result)),
            Err(failure) if failure.refuses_value() => self.salvage(result).await,
            Err(failure) => Err(failure),
        }
    }

    /// [`PgSink::write`], retried after deadlocks and serialisation failures, and redone with
    /// INSERT when COPY meets an id that is already saved.
    async fn write_retrying(&self, batch: &[&Decoded]) -> Result<HashSet<(String, ChunkId)>, Failure> {
        let mut attempt = 0;
        let mut copy = true;
        loop {
            match self.write(batch, copy).await {
                Err(failure) if failure.conflict() && attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    tracing::debug!("retrying a batch after: {}", failure.detail);
                }
                Err(failure) if copy && failure.code.as_ref() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    copy = false;
                    tracing::debug!("an id is already saved; redoing the batch with INSERT: {}", failure.detail);
                }
                other => return other,
            }
        }
    }

    /// Saves one chunk whose values the database refused as a whole: each object's values are
    /// inserted under a savepoint of their own, and the objects the database refuses are
    /// dead-lettered in `chunkmill_dead_objects` with its message, in the same transaction as the
    /// rest. The chunk record counts what was written. Deterministic: any saver would refuse the
    /// same objects.
    async fn salvage(&self, result: &Decoded) -> Result<SaveOutcome, Failure> {
        let mut client = self.pool.get().await.map_err(|e| pool_failure("connect", e))?;
        let mut tx = client.transaction().await.map_err(|e| Failure::new("begin a transaction", &e))?;
        if self.claim(&tx, &[result]).await?.is_empty() {
            return Ok(SaveOutcome::Duplicate);
        }
        let insert = tx.prepare_cached(OUTPUT).await.map_err(|e| Failure::new("prepare the output insert", &e))?;
        let dead_at: HashSet<u32> = result.dead.iter().map(|d| d.index).collect();
        let mut refused = Vec::new();
        let mut written = 0i32;
        let (run, chunk) = (&result.head.run, i64::from(result.head.chunk.0));
        for index in (0..result.objects()).filter(|i| !dead_at.contains(&(*i as u32))) {
            let savepoint = tx.savepoint("object").await.map_err(|e| Failure::new("set a savepoint", &e))?;
            let id = result.id_of(index).map(pg_text);
            let mut failed = None;
            let mut values = 0;
            for (out, value) in result.values_of(index).enumerate() {
                let (idx, out) = (index as i32, out as i32);
                let row: [&(dyn ToSql + Sync); 6] = [run, &chunk, &idx, &out, &id, &RawJson(value)];
                if let Err(e) = savepoint.execute(&insert, &row).await {
                    failed = Some(Failure::new("insert an output", &e));
                    break;
                }
                values += 1;
            }
            match failed {
                None => {
                    savepoint.commit().await.map_err(|e| Failure::new("release a savepoint", &e))?;
                    written += values;
                }
                Some(failure) if failure.refuses_value() => {
                    savepoint.rollback().await.map_err(|e| Failure::new("roll back a savepoint", &e))?;
                    tracing::warn!(
                        chunk = result.head.chunk.0,
                        "chunk {} of run {run}: PostgreSQL cannot store object {index}: {}; dead-lettering it",
                        result.head.chunk,
                        failure.detail
                    );
                    refused.push(DeadObject {
                        index: index as u32,
                        id: result.id_of(index).map(str::to_string),
                        cause: Cause::Sink,
                        error: format!("PostgreSQL cannot store this object: {}", failure.detail),
                        line: None,
                    });
                }
                Some(failure) => return Err(failure),
            }
        }
        let dead: Vec<DeadObject> = result.dead.iter().cloned().chain(refused.iter().cloned()).collect();
        self.insert_dead(&tx, run, result.head.chunk, &dead).await?;
        let counts: [&(dyn ToSql + Sync); 4] = [run, &chunk, &(dead.len() as i32), &written];
        tx.execute(RECOUNT, &counts).await.map_err(|e| Failure::new("count the chunk's rows", &e))?;
        tx.commit().await.map_err(|e| Failure::new("commit", &e))?;
        Ok(if refused.is_empty() { SaveOutcome::Saved } else { SaveOutcome::SavedRefusing(refused.len() as u64) })
    }

    /// Claims `batch`'s chunks (inserts their `chunkmill_chunks` rows unless present): the ones
    /// returned belong to this transaction, the others are duplicates.
    async fn claim(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        batch: &[&Decoded],
    ) -> Result<HashSet<(String, ChunkId)>, Failure> {
        let claim = tx.prepare_cached(CLAIM).await.map_err(|e| Failure::new("prepare the chunk claim", &e))?;
        let runs: Vec<&str> = batch.iter().map(|r| r.head.run.as_str()).collect();
        let chunks: Vec<i64> = batch.iter().map(|r| i64::from(r.head.chunk.0)).collect();
        let objects: Vec<i32> = batch.iter().map(|r| r.objects() as i32).collect();
        let dead: Vec<i32> = batch.iter().map(|r| r.dead.len() as i32).collect();
        let outputs: Vec<i32> = batch.iter().map(|r| r.value_count() as i32).collect();
        let leases: Vec<uuid::Uuid> = batch.iter().map(|r| r.head.lease).collect();
        let attempts: Vec<i32> = batch.iter().map(|r| r.head.attempt as i32).collect();
        let mappers: Vec<std::borrow::Cow<'_, str>> = batch.iter().map(|r| pg_text(&r.head.mapper)).collect();
        let savers: Vec<&str> = vec![&self.saver; batch.len()];
        let jobs: Vec<std::borrow::Cow<'_, str>> = batch.iter().map(|r| pg_text(&r.head.job)).collect();
        let rows = tx
            .query(&claim, &[&runs, &chunks, &objects, &dead, &outputs, &leases, &attempts, &mappers, &savers, &jobs])
            .await
            .map_err(|e| Failure::new("claim chunks", &e))?;
        let mut claimed = HashSet::with_capacity(rows.len());
        for row in &rows {
            let run: String = row.try_get(0).map_err(|e| Failure::new("read a claimed chunk", &e))?;
            let chunk: i64 = row.try_get(1).map_err(|e| Failure::new("read a claimed chunk", &e))?;
            // The claim returns the indexes this batch inserted, each from a ChunkId.
            if let Ok(chunk) = u32::try_from(chunk) {
                claimed.insert((run, ChunkId(chunk)));
            }
        }
        Ok(claimed)
    }

    /// Inserts a chunk's dead-lettered objects.
    async fn insert_dead(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        run: &str,
        chunk: ChunkId,
        dead: &[DeadObject],
    ) -> Result<(), Failure> {
        if dead.is_empty() {
            return Ok(());
        }
        let insert = tx.prepare_cached(DEAD).await.map_err(|e| Failure::new("prepare the dead-letter insert", &e))?;
        let runs = vec![run; dead.len()];
        let chunks = vec![i64::from(chunk.0); dead.len()];
        let indexes: Vec<i32> = dead.iter().map(|d| d.index as i32).collect();
        let ids: Vec<Option<std::borrow::Cow<'_, str>>> = dead.iter().map(|d| d.id.as_deref().map(pg_text)).collect();
        let errors: Vec<std::borrow::Cow<'_, str>> = dead.iter().map(|d| pg_text(&d.error)).collect();
        let causes: Vec<String> = dead.iter().map(|d| d.cause.name().to_string()).collect();
        let lines: Vec<Option<i64>> = dead.iter().map(|d| d.line.map(|l| l as i64)).collect();
        tx.execute(&insert, &[&runs, &chunks, &indexes, &ids, &errors, &causes, &lines])
            .await
            .map_err(|e| Failure::new("insert dead-lettered objects", &e))?;
        Ok(())
    }

    /// One transaction: claim the chunks, write the claimed ones' outputs and dead objects,
    /// commit. Returns the claimed chunks.
    async fn write(&self, batch: &[&Decoded], copy: bool) -> Result<HashSet<(String, ChunkId)>, Failure> {
        if batch.is_empty() {
            return Ok(HashSet::new());
        }
        let mut client = self.pool.get().await.map_err(|e| pool_failure("connect", e))?;
        let tx = client.transaction().await.map_err(|e| Failure::new("begin a transaction", &e))?;
        let claimed = self.claim(&tx, batch).await?;
        let mine: Vec<&Decoded> =
            batch.iter().copied().filter(|r| claimed.contains(&(r.head.run.clone(), r.head.chunk))).collect();
        let total: usize = mine.iter().map(|r| r.value_count()).sum();
        if total > 0 && copy {
            copy_outputs(&tx, &mine).await?;
        } else if total > 0 {
            insert_outputs(&tx, &mine, total).await?;
        }
        for result in &mine {
            self.insert_dead(&tx, &result.head.run, result.head.chunk, &result.dead).await?;
        }
        tx.commit().await.map_err(|e| Failure::new("commit", &e))?;
        Ok(claimed)
    }
}

/// Writes the outputs of `results` with one binary COPY, the fast path. COPY has no
/// ON CONFLICT: an id already held aborts the transaction with a unique violation, and the caller
/// retries with [`insert_outputs`].
async fn copy_outputs(tx: &deadpool_postgres::Transaction<'_>, results: &[&Decoded]) -> Result<(), Failure> {
    let sink = tx
        .copy_in("COPY chunkmill_outputs (run, chunk, idx, out, id, doc) FROM STDIN BINARY")
        .await
        .map_err(|e| Failure::new("start copying outputs", &e))?;
    let types = [Type::TEXT, Type::INT8, Type::INT4, Type::INT4, Type::TEXT, Type::JSONB];
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
    for result in results {
        let chunk = i64::from(result.head.chunk.0);
        for (index, out, value) in result.values() {
            let (idx, out) = (index as i32, out as i32);
            let id = result.id_of(index).map(pg_text);
            let row: [&(dyn ToSql + Sync); 6] = [&result.head.run, &chunk, &idx, &out, &id, &RawJson(value)];
            writer.as_mut().write(&row).await.map_err(|e| Failure::new("copy outputs", &e))?;
        }
    }
    writer.as_mut().finish().await.map_err(|e| Failure::new("copy outputs", &e))?;
    Ok(())
}

/// Writes the `total` outputs of `results` with one INSERT of arrays ([`OUTPUTS`]): a row whose
/// id another object of the run holds is stored with `id` NULL.
async fn insert_outputs(
    tx: &deadpool_postgres::Transaction<'_>,
    results: &[&Decoded],
    total: usize,
) -> Result<(), Failure> {
    let insert = tx.prepare_cached(OUTPUTS).await.map_err(|e| Failure::new("prepare the output insert", &e))?;
    let (mut runs, mut chunks, mut idxs, mut outs, mut ids, mut docs) = (
        Vec::with_capacity(total),
        Vec::with_capacity(total),
        Vec::with_capacity(total),
        Vec::with_capacity(total),
        Vec::with_capacity(total),
        Vec::with_capacity(total),
    );
    for result in results {
        for (index, out, value) in result.values() {
            runs.push(result.head.run.as_str());
            chunks.push(i64::from(result.head.chunk.0));
            idxs.push(index as i32);
            outs.push(out as i32);
            ids.push(result.id_of(index).map(pg_text));
            docs.push(RawJson(value));
        }
    }
    tx.execute(&insert, &[&runs, &chunks, &idxs, &outs, &ids, &docs])
        .await
        .map_err(|e| Failure::new("insert outputs", &e))?;
    // Only possible when the fetcher ran with --no-duplicate-check on an input with repeated
    // ids, or ids that differ only in their JSON type: every value is kept, findable by chunk
    // and index.
    tracing::warn!(
        "an id of a batch of {total} outputs is already held by another object of its run; such outputs are stored with id NULL"
    );
    Ok(())
}

/// Saved or duplicate, for a chunk of a committed batch.
fn claimed_outcome(claimed: &HashSet<(String, ChunkId)>, result: &Decoded) -> SaveOutcome {
    if claimed.contains(&(result.head.run.clone(), result.head.chunk)) {
        SaveOutcome::Saved
    } else {
        SaveOutcome::Duplicate
    }
}

/// Checks that a result fits the schema's integer columns (it has passed `validate`).
fn representable(result: &Decoded) -> Result<(), String> {
    let fits_i32 = |n: u64| i32::try_from(n).is_ok();
    if !fits_i32(result.objects() as u64)
        || !fits_i32(result.value_count() as u64)
        || !fits_i32(u64::from(result.head.attempt))
    {
        return Err(format!(
            "chunk {} of run {}: a count is too large for the database",
            result.head.chunk, result.head.run
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_refusals_are_fatal_and_keep_their_hint() {
        let refused = Failure {
            action: "connect",
            detail: "certificate verification failed".into(),
            code: None,
            tls: Some("fix sslrootcert"),
        };
        assert!(!refused.transient());
        assert!(refused.connection_lost(), "mid-run, the batch is answered as for a lost connection");
        assert!(refused.into_error("t").to_string().ends_with("; fix sslrootcert"));
    }

    #[test]
    fn wrong_credentials_are_fatal_and_outages_are_not() {
        let auth =
            Failure { action: "connect", detail: String::new(), code: Some(SqlState::INVALID_PASSWORD), tls: None };
        let down = Failure { action: "connect", detail: String::new(), code: None, tls: None };
        let starting =
            Failure { action: "connect", detail: String::new(), code: Some(SqlState::CANNOT_CONNECT_NOW), tls: None };
        let newer =
            Failure { action: "use", detail: String::new(), code: Some(SqlState::FEATURE_NOT_SUPPORTED), tls: None };
        assert!(!auth.transient() && !newer.transient());
        assert!(down.transient() && starting.transient());
        assert!(auth.into_error("t").to_string().contains("SAVER_PG_PASSWORD_FILE"));
    }
}
