//! One run of a PostgreSQL sink read back for `saver verify`: its chunk records, output rows and
//! dead-letter rows, a range of chunks per query (bounded memory for a run of any size), and the
//! chunk records that do not match their rows. Values come back as `doc::text`, as `jsonb` keeps
//! them ([`super::jsonb::normalise`] is what verify applies to the values it expects). Verify is
//! blocking: the reader has a one-thread runtime of its own for the client.

use std::collections::BTreeMap;

use common::protocol::{Cause, DeadObject};
use futures::StreamExt;
use tokio_postgres::types::ToSql;

use super::{describe, error_text, parse};
use crate::sink::{Normalise, ReadError, SinkReader, StoredChunk, StoredChunks, StoredValues, Unaccounted};

/// Chunks read from the database at once.
const CHUNKS_PER_QUERY: usize = 200;

/// A database error while reading, with its causes: a TLS refusal says why only there.
fn pg_error(target: &str, action: &str, e: &tokio_postgres::Error) -> ReadError {
    let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| error_text(e));
    ReadError::Database(format!("PostgreSQL {target}: cannot {action}: {detail}"))
}

/// One run's rows in a PostgreSQL sink, with the connection that reads them.
pub(crate) struct PgReader {
    /// Dropped (closing the connection) before the runtime finishes the connection's task.
    client: Option<tokio_postgres::Client>,
    connection: Option<tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>>,
    runtime: tokio::runtime::Runtime,
    run: String,
    target: String,
}

impl Drop for PgReader {
    fn drop(&mut self) {
        drop(self.client.take());
        if let Some(connection) = self.connection.take() {
            let _ = self.runtime.block_on(connection);
        }
    }
}

impl PgReader {
    /// Connects to the database at `url` (with `password`, if given) to read run `run`.
    pub(crate) fn connect(url: &str, password: Option<&str>, run: &str) -> Result<Self, ReadError> {
        let pg = parse(url, password).map_err(|e| ReadError::Database(e.to_string()))?;
        let target = describe(&pg.config);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ReadError::Database(format!("cannot start an async runtime: {e}")))?;
        let (client, connection) =
            runtime.block_on(pg.config.connect(pg.tls.clone())).map_err(|e| pg_error(&target, "connect", &e))?;
        let connection = runtime.spawn(connection);
        Ok(PgReader { client: Some(client), connection: Some(connection), runtime, run: run.to_string(), target })
    }

    fn client(&self) -> &tokio_postgres::Client {
        self.client.as_ref().expect("the client is only taken when the reader is dropped")
    }

    fn error(&self, action: &'static str) -> impl Fn(tokio_postgres::Error) -> ReadError + '_ {
        move |e| pg_error(&self.target, action, &e)
    }

    /// The chunk records of chunks `params` covers, each an empty [`StoredChunk`].
    async fn chunk_records(&self, params: &[&(dyn ToSql + Sync); 3]) -> Result<StoredChunks, ReadError> {
        let read = self.error("read chunkmill_chunks");
        let mut stored = StoredChunks::default();
        let rows = self
            .client()
            .query("SELECT chunk FROM chunkmill_chunks WHERE run = $1 AND chunk >= $2 AND chunk < $3", params)
            .await
            .map_err(&read)?;
        for row in rows {
            let chunk: i64 = row.try_get(0).map_err(&read)?;
            let values = StoredValues::ByObject(BTreeMap::new());
            stored.chunks.insert(chunk as u64, StoredChunk { values, dead: vec![], duplicates: 0 });
        }
        Ok(stored)
    }

    /// The output rows of the chunks `params` covers, into `stored`; a row without a chunk
    /// record breaks the one-transaction-per-chunk invariant.
    async fn outputs(&self, params: &[&(dyn ToSql + Sync); 3], stored: &mut StoredChunks) -> Result<(), ReadError> {
        let read = self.error("read chunkmill_outputs");
        let rows = self
            .client()
            .query_raw(
                "SELECT chunk, idx, out, doc::text FROM chunkmill_outputs WHERE run = $1 AND chunk >= $2 AND chunk < $3 ORDER BY chunk, idx, out",
                params.iter().copied(),
            )
            .await
            .map_err(&read)?;
        futures::pin_mut!(rows);
        while let Some(row) = rows.next().await {
            let row = row.map_err(&read)?;
            let (chunk, idx): (i64, i32) = (row.try_get(0).map_err(&read)?, row.try_get(1).map_err(&read)?);
            let doc: String = row.try_get(3).map_err(&read)?;
            match stored.chunks.get_mut(&(chunk as u64)).map(|s| &mut s.values) {
                Some(StoredValues::ByObject(map)) => map.entry(idx as u32).or_default().push(doc.into_bytes()),
                _ => stored.unaccounted.mismatched_chunks += 1,
            }
        }
        Ok(())
    }

    /// The dead-letter rows of the chunks `params` covers, into `stored`.
    async fn dead(&self, params: &[&(dyn ToSql + Sync); 3], stored: &mut StoredChunks) -> Result<(), ReadError> {
        let read = self.error("read chunkmill_dead_objects");
        let rows = self
            .client()
            .query(
                "SELECT chunk, idx, id, error, cause, line FROM chunkmill_dead_objects WHERE run = $1 AND chunk >= $2 AND chunk < $3",
                params,
            )
            .await
            .map_err(&read)?;
        for row in rows {
            let chunk: i64 = row.try_get(0).map_err(&read)?;
            let index: i32 = row.try_get(1).map_err(&read)?;
            let cause: String = row.try_get(4).map_err(&read)?;
            let line: Option<i64> = row.try_get(5).map_err(&read)?;
            let entry = DeadObject {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                id: row.try_get(2).map_err(&read)?,
                cause: serde_json::from_value(serde_json::Value::String(cause)).unwrap_or(Cause::Transform),
                error: row.try_get(3).map_err(&read)?,
                line: line.and_then(|l| u64::try_from(l).ok()),
            };
            match stored.chunks.get_mut(&(chunk as u64)) {
                Some(s) => s.dead.push(entry),
                None => stored.unaccounted.dead += 1,
            }
        }
        Ok(())
    }
}

impl SinkReader for PgReader {
    fn location(&self) -> String {
        format!("{} run {}", self.target, self.run)
    }

    fn normalise(&self) -> Normalise {
        std::sync::Arc::new(super::jsonb::normalise)
    }

    fn chunks_per_read(&self) -> usize {
        CHUNKS_PER_QUERY
    }

    fn read(&self, range: std::ops::Range<usize>) -> Result<StoredChunks, ReadError> {
        let (first, last) = (range.start as i64, range.end as i64);
        let params: [&(dyn ToSql + Sync); 3] = [&self.run, &first, &last];
        self.runtime.block_on(async {
            let mut stored = self.chunk_records(&params).await?;
            self.outputs(&params, &mut stored).await?;
            self.dead(&params, &mut stored).await?;
            Ok(stored)
        })
    }

    /// Chunk records whose output count differs from the rows saved under them: a chunk record
    /// promises its rows.
    fn rest(&self, _chunks: usize) -> Result<Unaccounted, ReadError> {
        let mismatched: i64 = self
            .runtime
            .block_on(self.client().query_one(
                "SELECT count(*) FROM chunkmill_chunks c
                 LEFT JOIN (SELECT chunk, count(*) AS n FROM chunkmill_outputs WHERE run = $1 GROUP BY chunk) o USING (chunk)
                 WHERE c.run = $1 AND c.outputs <> coalesce(o.n, 0)",
                &[&self.run],
            ))
            .and_then(|row| row.try_get(0))
            .map_err(self.error("compare chunk records with rows"))?;
        Ok(Unaccounted { mismatched_chunks: u64::try_from(mismatched).unwrap_or(0), ..Unaccounted::default() })
    }
}
