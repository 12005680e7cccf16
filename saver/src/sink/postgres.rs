//! The PostgreSQL sink: one row per mapped object in `chunkmill_objects`, one row per saved chunk
//! in `chunkmill_chunks` (schema in `schema.sql`, applied at start-up).
//!
//! A batch of chunks is saved in one transaction. It first *claims* its chunks by inserting their
//! `chunkmill_chunks` rows with `ON CONFLICT DO NOTHING RETURNING`: the rows returned are the
//! chunks this transaction owns; the others were saved before (or by a concurrent saver, whose
//! commit this insert waited for), so they are duplicates and nothing of theirs is written. Only
//! the claimed chunks' objects are written, in the same transaction (binary COPY; on a repeated
//! id, possible only without the fetcher's duplicate check, the batch is redone with
//! `INSERT .. ON CONFLICT DO NOTHING`), so a chunk row exists if and only if all its objects do. The caller acknowledges a chunk only after the commit returned.
//!
//! Concurrent savers cannot deadlock on each other: every batch claims its chunks in one order,
//! `(run, chunk)`, and a claim is the first row lock a transaction takes, so two transactions wait
//! for each other in one direction only. Object rows cannot conflict across chunks (the fetcher
//! refuses inputs with repeated ids). Deadlock and serialisation failures are retried anyway.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use common::protocol::{ChunkResult, DeadObject};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::{SaveOutcome, SinkError};

/// The schema the sink writes to; applied idempotently at start-up.
pub const SCHEMA: &str = include_str!("schema.sql");

/// Serialises schema set-up between savers starting together (`CREATE TABLE IF NOT EXISTS` is not
/// safe to run concurrently in PostgreSQL). The bytes spell "chunkmil".
const SCHEMA_LOCK: i64 = 0x6368_756e_6b6d_696c;

const CLAIM: &str = "INSERT INTO chunkmill_chunks (run, chunk, objects, dead, lease, attempt, mapper, saver) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int4[], $4::int4[], $5::uuid[], $6::int4[], $7::text[], $8::text[]) \
     ON CONFLICT (run, chunk) DO NOTHING RETURNING run, chunk";

const OBJECTS: &str = "INSERT INTO chunkmill_objects (run, id, chunk, name, friends, digest) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[], $6::text[]) \
     ON CONFLICT (run, id) DO NOTHING";

const DEAD: &str = "INSERT INTO chunkmill_dead_objects (run, chunk, idx, id, error) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int4[], $4::text[], $5::text[]) \
     ON CONFLICT (run, chunk, idx) DO NOTHING";

/// Transactions retried after a deadlock or serialisation failure before giving up on a batch.
const CONFLICT_RETRIES: u32 = 3;

/// How to reach the database.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/database?...` (a password in it works but belongs in a file).
    pub url: String,
    /// The password, from `SAVER_PG_PASSWORD_FILE` or `SAVER_PG_PASSWORD`; overrides the URL's.
    pub password: Option<String>,
    /// Connections in the pool: batches committed concurrently by this saver.
    pub pool_size: usize,
    /// This saver's instance name, recorded with each chunk it commits.
    pub saver: String,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &redacted(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("saver", &self.saver)
            .finish()
    }
}

/// Parses a connection URL (or `key=value` string) and applies a separate password.
pub fn parse(url: &str, password: Option<&str>) -> Result<tokio_postgres::Config, SinkError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
        SinkError::Config(format!(
            "the PostgreSQL connection string ({}) is not valid: {e}; write postgres://USER@HOST:PORT/DATABASE",
            redacted(url)
        ))
    })?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(SinkError::Config(format!(
            "{}: sslmode=require, but this build connects to PostgreSQL without TLS; keep the database on a \
             trusted network and use sslmode=disable or prefer",
            describe(&config)
        )));
    }
    if let Some(password) = password {
        config.password(password);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_application_name().is_none() {
        config.application_name("chunkmill-saver");
    }
    Ok(config)
}

/// Where a configuration points, without its password: `postgres://user@host:port/database`.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config.get_ports().get(i).or(config.get_ports().first()).copied().unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or("?"),
        hosts.join(","),
        config.get_dbname().unwrap_or_else(|| config.get_user().unwrap_or("?"))
    )
}

/// A connection string for logs and `Debug`: [`describe`] when it parses, else a placeholder
/// (an unparsable string may hold a password anywhere).
pub fn redacted(url: &str) -> String {
    tokio_postgres::Config::from_str(url)
        .map(|c| describe(&c))
        .unwrap_or_else(|_| "<unparsable connection string>".into())
}

/// True for a `postgres://` or `postgresql://` URL.
pub fn is_postgres_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// A database failure, kept apart from [`SinkError`] so one failure can answer a whole batch.
#[derive(Debug, Clone)]
struct Failure {
    action: &'static str,
    detail: String,
    code: Option<SqlState>,
}

impl Failure {
    fn new(action: &'static str, e: &tokio_postgres::Error) -> Self {
        Failure { action, detail: error_text(e), code: e.code().cloned() }
    }

    fn into_error(self, target: &str) -> SinkError {
        let hint = hint(self.code.as_ref());
        SinkError::Postgres { target: target.to_string(), action: self.action, detail: self.detail, hint }
    }

    /// Waiting helps: the server is down, starting, or shutting down, or a race lost.
    fn transient(&self) -> bool {
        !matches!(
            &self.code,
            Some(c) if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *c == SqlState::INVALID_CATALOG_NAME
                || *c == SqlState::INSUFFICIENT_PRIVILEGE
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

const OBJECT: &str =
    "INSERT INTO chunkmill_objects (run, id, chunk, name, friends, digest) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (run, id) DO NOTHING";

const RECOUNT: &str = "UPDATE chunkmill_chunks SET objects = $3, dead = $4 WHERE run = $1 AND chunk = $2";

/// The server's message with its SQLSTATE, or the client error with its causes: tokio-postgres
/// displays a server error only as "db error".
fn error_text(e: &tokio_postgres::Error) -> String {
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
            "grant the role CREATE and INSERT on the schema, or apply saver/src/sink/schema.sql as an owner"
        }
        Some(_) => "the saver retries; results stay unacknowledged until saved",
        None => "check that PostgreSQL is running and reachable; the saver retries meanwhile",
    }
}

fn pool_failure(action: &'static str, e: deadpool_postgres::PoolError) -> Failure {
    match e {
        deadpool_postgres::PoolError::Backend(e) => Failure::new(action, &e),
        other => Failure { action, detail: other.to_string(), code: None },
    }
}

/// Saves chunks into PostgreSQL through a connection pool. Cheap to clone.
#[derive(Clone)]
pub struct PgSink {
    pool: Pool,
    target: Arc<str>,
    saver: Arc<str>,
}

impl std::fmt::Debug for PgSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSink").field("target", &self.target).finish()
    }
}

/// Opens a pool to the database: a connection that breaks (server restart) is dropped when it
/// is next taken and a new one is made.
fn pool(config: tokio_postgres::Config, size: usize) -> Result<Pool, SinkError> {
    let target = describe(&config);
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(10)))
        .wait_timeout(Some(Duration::from_secs(30)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| SinkError::Config(format!("cannot make a connection pool for {target}: {e}")))
}

impl PgSink {
    /// Connects and applies the schema, waiting (with backoff) for a database that is not up yet;
    /// fails at once on a wrong password, a missing database or missing rights. `Ok(None)` if
    /// `shutdown` came first.
    pub async fn connect(options: PgOptions, shutdown: &CancellationToken) -> Result<Option<Self>, SinkError> {
        let config = parse(&options.url, options.password.as_deref())?;
        let target: Arc<str> = describe(&config).into();
        let pool = pool(config, options.pool_size)?;
        let sink = PgSink { pool, target, saver: options.saver.into() };
        let mut delay = Duration::from_millis(200);
        let mut warned = false;
        loop {
            match sink.apply_schema().await {
                Ok(()) => return Ok(Some(sink)),
                Err(failure) if !failure.transient() => return Err(failure.into_error(&sink.target)),
                Err(failure) => {
                    if !warned {
                        tracing::warn!("waiting for PostgreSQL: {}", failure.clone().into_error(&sink.target));
                        warned = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// `postgres://user@host:port/database`, for logs.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Batches this sink commits at once (its connections).
    pub fn connections(&self) -> usize {
        self.pool.status().max_size
    }

    async fn apply_schema(&self) -> Result<(), Failure> {
        let mut client = self.pool.get().await.map_err(|e| pool_failure("connect", e))?;
        let tx = client.transaction().await.map_err(|e| Failure::new("begin a transaction", &e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(|e| Failure::new("lock the schema", &e))?;
        tx.batch_execute(SCHEMA).await.map_err(|e| Failure::new("create the tables", &e))?;
        tx.commit().await.map_err(|e| Failure::new("commit the schema", &e))
    }

    /// Saves chunks in one transaction; one outcome per result, in order. Nothing is `Saved`
    /// before the commit returned. A batch the database refuses for a reason other than a lost
    /// connection is retried chunk by chunk, so one chunk cannot hold its neighbours hostage; a
    /// chunk refused alone for a value it cannot store is saved without the objects carrying it
    /// (see [`PgSink::salvage`]).
    pub async fn save_batch(&self, results: &[Arc<ChunkResult>]) -> Vec<Result<SaveOutcome, SinkError>> {
        let mut outcomes: Vec<Option<Result<SaveOutcome, SinkError>>> = (0..results.len()).map(|_| None).collect();
        // Refuse what the schema cannot hold, alone, so it cannot fail the rest of the batch.
        for (i, result) in results.iter().enumerate() {
            if let Err(problem) = representable(result) {
                outcomes[i] = Some(Err(SinkError::Invalid(problem)));
            }
        }
        // One lock order for every transaction: no deadlock between savers.
        let mut order: Vec<usize> = (0..results.len()).filter(|&i| outcomes[i].is_none()).collect();
        order.sort_by(|&a, &b| (&results[a].run, results[a].chunk).cmp(&(&results[b].run, results[b].chunk)));
        order.dedup_by(|later, first| {
            results[*later].run == results[*first].run && results[*later].chunk == results[*first].chunk
        });
        let batch: Vec<&ChunkResult> = order.iter().map(|&i| results[i].as_ref()).collect();
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
    async fn save_one(&self, result: &ChunkResult) -> Result<SaveOutcome, Failure> {
        match self.write_retrying(&[result]).await {
            Ok(claimed) => Ok(claimed_outcome(&claimed, result)),
            Err(failure) if failure.refuses_value() => self.salvage(result).await,
            Err(failure) => Err(failure),
        }
    }

    /// [`PgSink::write`], retried after deadlocks and serialisation failures, and redone with
    /// INSERT when COPY meets an id that is already saved.
    async fn write_retrying(&self, batch: &[&ChunkResult]) -> Result<HashSet<(String, u64)>, Failure> {
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
                    tracing::debug!("an object id is already saved; redoing the batch with INSERT: {}", failure.detail);
                }
                other => return other,
            }
        }
    }

    /// Saves one chunk whose objects the database refused as a whole: each object is inserted
    /// under its own savepoint, and those the database refuses are dead-lettered in
    /// `chunkmill_dead_objects` with its message, in the same transaction as the rest. The chunk
    /// record counts what was written. Deterministic: any saver would refuse the same objects.
    async fn salvage(&self, result: &ChunkResult) -> Result<SaveOutcome, Failure> {
        let mut client = self.pool.get().await.map_err(|e| pool_failure("connect", e))?;
        let mut tx = client.transaction().await.map_err(|e| Failure::new("begin a transaction", &e))?;
        if self.claim(&tx, &[result]).await?.is_empty() {
            return Ok(SaveOutcome::Duplicate);
        }
        let insert = tx.prepare_cached(OBJECT).await.map_err(|e| Failure::new("prepare the object insert", &e))?;
        let dead_at: HashSet<u32> = result.dead.iter().map(|d| d.index).collect();
        let indexes = (0u32..).filter(|i| !dead_at.contains(i));
        let mut refused = Vec::new();
        let chunk = result.chunk as i64;
        for (record, index) in result.records.iter().zip(indexes) {
            let savepoint = tx.savepoint("object").await.map_err(|e| Failure::new("set a savepoint", &e))?;
            let friends = record.friends as i64;
            let row: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                [&result.run, &record.id, &chunk, &record.name, &friends, &record.digest];
            match savepoint.execute(&insert, &row).await {
                Ok(_) => savepoint.commit().await.map_err(|e| Failure::new("release a savepoint", &e))?,
                Err(e) => {
                    let failure = Failure::new("insert an object", &e);
                    if !failure.refuses_value() {
                        return Err(failure);
                    }
                    savepoint.rollback().await.map_err(|e| Failure::new("roll back a savepoint", &e))?;
                    tracing::warn!(
                        chunk = result.chunk,
                        "chunk {} of run {}: PostgreSQL cannot store object {index} ({}): {}; dead-lettering it",
                        result.chunk,
                        result.run,
                        record.id,
                        failure.detail
                    );
                    refused.push(DeadObject {
                        index,
                        id: Some(record.id.clone()),
                        error: format!("PostgreSQL cannot store this object: {}", failure.detail),
                    });
                }
            }
        }
        let dead: Vec<DeadObject> = result.dead.iter().cloned().chain(refused.iter().cloned()).collect();
        self.insert_dead(&tx, &result.run, result.chunk, &dead).await?;
        let counts: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&result.run, &chunk, &((result.records.len() - refused.len()) as i32), &(dead.len() as i32)];
        tx.execute(RECOUNT, &counts).await.map_err(|e| Failure::new("count the chunk's rows", &e))?;
        tx.commit().await.map_err(|e| Failure::new("commit", &e))?;
        Ok(if refused.is_empty() { SaveOutcome::Saved } else { SaveOutcome::SavedRefusing(refused.len() as u64) })
    }

    /// Claims `batch`'s chunks (inserts their `chunkmill_chunks` rows unless present): the ones
    /// returned belong to this transaction, the others are duplicates.
    async fn claim(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        batch: &[&ChunkResult],
    ) -> Result<HashSet<(String, u64)>, Failure> {
        let claim = tx.prepare_cached(CLAIM).await.map_err(|e| Failure::new("prepare the chunk claim", &e))?;
        let runs: Vec<&str> = batch.iter().map(|r| r.run.as_str()).collect();
        let chunks: Vec<i64> = batch.iter().map(|r| r.chunk as i64).collect();
        let objects: Vec<i32> = batch.iter().map(|r| r.records.len() as i32).collect();
        let dead: Vec<i32> = batch.iter().map(|r| r.dead.len() as i32).collect();
        let leases: Vec<uuid::Uuid> = batch.iter().map(|r| r.lease).collect();
        let attempts: Vec<i32> = batch.iter().map(|r| r.attempt as i32).collect();
        let mappers: Vec<std::borrow::Cow<'_, str>> = batch.iter().map(|r| pg_text(&r.mapper)).collect();
        let savers: Vec<&str> = vec![&self.saver; batch.len()];
        let rows = tx
            .query(&claim, &[&runs, &chunks, &objects, &dead, &leases, &attempts, &mappers, &savers])
            .await
            .map_err(|e| Failure::new("claim chunks", &e))?;
        let mut claimed = HashSet::with_capacity(rows.len());
        for row in &rows {
            let run: String = row.try_get(0).map_err(|e| Failure::new("read a claimed chunk", &e))?;
            let chunk: i64 = row.try_get(1).map_err(|e| Failure::new("read a claimed chunk", &e))?;
            claimed.insert((run, chunk as u64));
        }
        Ok(claimed)
    }

    /// Inserts a chunk's dead-lettered objects.
    async fn insert_dead(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        run: &str,
        chunk: u64,
        dead: &[DeadObject],
    ) -> Result<(), Failure> {
        if dead.is_empty() {
            return Ok(());
        }
        let insert = tx.prepare_cached(DEAD).await.map_err(|e| Failure::new("prepare the dead-letter insert", &e))?;
        let runs = vec![run; dead.len()];
        let chunks = vec![chunk as i64; dead.len()];
        let indexes: Vec<i32> = dead.iter().map(|d| d.index as i32).collect();
        let ids: Vec<Option<std::borrow::Cow<'_, str>>> = dead.iter().map(|d| d.id.as_deref().map(pg_text)).collect();
        let errors: Vec<std::borrow::Cow<'_, str>> = dead.iter().map(|d| pg_text(&d.error)).collect();
        tx.execute(&insert, &[&runs, &chunks, &indexes, &ids, &errors])
            .await
            .map_err(|e| Failure::new("insert dead-lettered objects", &e))?;
        Ok(())
    }

    /// One transaction: claim the chunks, write the claimed ones' objects, commit. Returns the
    /// claimed chunks.
    async fn write(&self, batch: &[&ChunkResult], copy: bool) -> Result<HashSet<(String, u64)>, Failure> {
        if batch.is_empty() {
            return Ok(HashSet::new());
        }
        let mut client = self.pool.get().await.map_err(|e| pool_failure("connect", e))?;
        let tx = client.transaction().await.map_err(|e| Failure::new("begin a transaction", &e))?;
        let claimed = self.claim(&tx, batch).await?;
        let mine: Vec<&ChunkResult> =
            batch.iter().copied().filter(|r| claimed.contains(&(r.run.clone(), r.chunk))).collect();
        let total: usize = mine.iter().map(|r| r.records.len()).sum();
        if total > 0 && copy {
            // COPY is the fast path, but it has no ON CONFLICT: a repeated id aborts the
            // transaction with a unique violation, and the caller retries with the INSERT path.
            let sink = tx
                .copy_in("COPY chunkmill_objects (run, id, chunk, name, friends, digest) FROM STDIN BINARY")
                .await
                .map_err(|e| Failure::new("start copying objects", &e))?;
            let types = [Type::TEXT, Type::TEXT, Type::INT8, Type::TEXT, Type::INT8, Type::TEXT];
            let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
            for result in &mine {
                let chunk = result.chunk as i64;
                for record in &result.records {
                    let friends = record.friends as i64;
                    writer
                        .as_mut()
                        .write(&[&result.run, &record.id, &chunk, &record.name, &friends, &record.digest])
                        .await
                        .map_err(|e| Failure::new("copy objects", &e))?;
                }
            }
            writer.as_mut().finish().await.map_err(|e| Failure::new("copy objects", &e))?;
        } else if total > 0 {
            let insert = tx.prepare_cached(OBJECTS).await.map_err(|e| Failure::new("prepare the object insert", &e))?;
            let mut runs = Vec::with_capacity(total);
            let mut ids = Vec::with_capacity(total);
            let mut chunks = Vec::with_capacity(total);
            let mut names = Vec::with_capacity(total);
            let mut friends = Vec::with_capacity(total);
            let mut digests = Vec::with_capacity(total);
            for result in &mine {
                for record in &result.records {
                    runs.push(result.run.as_str());
                    ids.push(record.id.as_str());
                    chunks.push(result.chunk as i64);
                    names.push(record.name.as_str());
                    friends.push(record.friends as i64);
                    digests.push(record.digest.as_str());
                }
            }
            let inserted = tx
                .execute(&insert, &[&runs, &ids, &chunks, &names, &friends, &digests])
                .await
                .map_err(|e| Failure::new("insert objects", &e))?;
            if inserted < total as u64 {
                // Only possible when the fetcher ran with --no-duplicate-check on an input with
                // repeated ids: the first copy stays, `verify` reports the rest as missing.
                tracing::warn!(
                    "{} of {total} objects were already saved under the same id by another chunk; kept the first copy",
                    total as u64 - inserted
                );
            }
        }
        for result in &mine {
            self.insert_dead(&tx, &result.run, result.chunk, &result.dead).await?;
        }
        tx.commit().await.map_err(|e| Failure::new("commit", &e))?;
        Ok(claimed)
    }
}

/// Saved or duplicate, for a chunk of a committed batch.
fn claimed_outcome(claimed: &HashSet<(String, u64)>, result: &ChunkResult) -> SaveOutcome {
    if claimed.contains(&(result.run.clone(), result.chunk)) {
        SaveOutcome::Saved
    } else {
        SaveOutcome::Duplicate
    }
}

/// Checks that a result fits the schema's integer columns (it has passed `validate`).
fn representable(result: &ChunkResult) -> Result<(), String> {
    let fits_i32 = |n: u64| i32::try_from(n).is_ok();
    if i64::try_from(result.chunk).is_err()
        || !fits_i32(result.records.len() as u64)
        || !fits_i32(result.dead.len() as u64)
        || !fits_i32(u64::from(result.attempt))
    {
        return Err(format!("chunk {} of run {}: a count is too large for the database", result.chunk, result.run));
    }
    if let Some(record) = result.records.iter().find(|r| i64::try_from(r.friends).is_err()) {
        return Err(format!(
            "chunk {} of run {}: object {} has {} friends, more than a bigint holds",
            result.chunk, result.run, record.id, record.friends
        ));
    }
    if let Some(dead) = result.dead.iter().find(|d| i32::try_from(d.index).is_err()) {
        return Err(format!(
            "chunk {} of run {}: dead object index {} is too large",
            result.chunk, result.run, dead.index
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_never_show_the_password() {
        let url = "postgres://chunkmill:s3cret@db.example:6543/pipeline?sslmode=disable";
        assert_eq!(redacted(url), "postgres://chunkmill@db.example:6543/pipeline");
        let config = parse(url, Some("other")).expect("parses");
        assert!(!describe(&config).contains("s3cret"));
        let options = PgOptions { url: url.into(), password: Some("other".into()), pool_size: 2, saver: "s".into() };
        let debug = format!("{options:?}");
        assert!(!debug.contains("s3cret") && !debug.contains("other"), "{debug}");
        assert_eq!(redacted("postgres://u:p@[::1"), "<unparsable connection string>");
    }

    #[test]
    fn requiring_tls_is_refused_at_start_not_retried() {
        let err = parse("postgres://u@h/db?sslmode=require", None).unwrap_err().to_string();
        assert!(err.contains("without TLS") && err.contains("postgres://u@h:5432/db"), "{err}");
    }

    #[test]
    fn a_separate_password_overrides_the_urls() {
        let config = parse("postgres://u:inline@h/db", Some("from-file")).expect("parses");
        assert_eq!(config.get_password(), Some(&b"from-file"[..]));
    }

    #[test]
    fn wrong_credentials_are_fatal_and_outages_are_not() {
        let auth = Failure { action: "connect", detail: String::new(), code: Some(SqlState::INVALID_PASSWORD) };
        let down = Failure { action: "connect", detail: String::new(), code: None };
        let starting = Failure { action: "connect", detail: String::new(), code: Some(SqlState::CANNOT_CONNECT_NOW) };
        assert!(!auth.transient());
        assert!(down.transient() && starting.transient());
        assert!(auth.into_error("t").to_string().contains("SAVER_PG_PASSWORD_FILE"));
    }

    #[test]
    fn unrepresentable_results_are_refused_by_name() {
        let result = ChunkResult {
            v: 1,
            run: "0123456789abcdef".into(),
            chunk: 7,
            lease: uuid::Uuid::nil(),
            attempt: 1,
            mapper: "m".into(),
            records: vec![common::transform::MappedUser {
                id: "big".into(),
                name: "A B".into(),
                friends: u64::MAX,
                digest: String::new(),
            }],
            dead: vec![],
        };
        let problem = representable(&result).unwrap_err();
        assert!(problem.contains("chunk 7") && problem.contains("big"), "{problem}");
    }
}
