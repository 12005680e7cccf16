//! `fetcher status`: how far the running fetcher is, asked over NATS (`<prefix>.status`, an
//! endpoint of the fetcher's NATS micro service). The running fetcher answers with a
//! [`Status`]; the command prints it for a person, or as JSON with `--json`. On Kubernetes,
//! `kubectl exec deploy/fetcher -- fetcher status` is the one-line answer to "how far is it".

use std::sync::Arc;
use std::time::Duration;

use common::config::NatsArgs;
use common::nats::ConnectionState;
use common::protocol::Subjects;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// What the running fetcher says about its run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Run id.
    pub run: String,
    /// The input as given (`--input`).
    pub input: String,
    /// The job's transform, as the start-up line describes it.
    pub transform: String,
    /// Chunks in the run, and by state.
    pub chunks: u64,
    /// Chunks saved and confirmed.
    pub done: u64,
    /// Chunks waiting for a mapper.
    pub pending: u64,
    /// Chunks leased to a mapper now.
    pub leased: u64,
    /// Chunks dead-lettered.
    pub dead: u64,
    /// Valid input objects, and those in done chunks.
    pub objects: u64,
    /// Objects in chunks done.
    pub objects_done: u64,
    /// Objects done per second since the run started (after the scan).
    pub objects_per_second: f64,
    /// Seconds left at the recent rate; absent before there is a rate, or when complete.
    pub eta_seconds: Option<f64>,
    /// Seconds since the run started (after the scan).
    pub elapsed_seconds: f64,
    /// Every chunk done or dead-lettered (and the run committed, when its sink needs a commit).
    pub complete: bool,
    /// Every chunk is done or dead-lettered and a saver is committing the run into its sink.
    #[serde(default)]
    pub committing: bool,
    /// The mappers that asked for work, by name.
    pub mappers: Vec<MapperStatus>,
    /// The latest chunks this fetcher dead-lettered (at most [`DEAD_LETTERS_SHOWN`], newest
    /// last), with their reasons; every dead letter is in the sink's dead-letter records.
    #[serde(default)]
    pub dead_letters: Vec<DeadLetterStatus>,
}

/// How many of the latest dead letters a status carries.
pub const DEAD_LETTERS_SHOWN: usize = 20;

/// A dead-lettered chunk, as the status shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetterStatus {
    /// The chunk.
    pub chunk: common::protocol::ChunkId,
    /// The input line of its first object (1-based).
    pub first_line: u64,
    /// Its objects.
    pub objects: u64,
    /// Why it was dead-lettered.
    pub reason: String,
}

/// One mapper, as the fetcher sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MapperStatus {
    /// Its name (`--instance`, else host and pid).
    pub name: String,
    /// Chunks it holds now.
    pub held: u64,
    /// Chunks of its leases that were saved and confirmed.
    pub done: u64,
    /// Of those, per second since it first asked.
    pub chunks_per_second: f64,
    /// Seconds since it last asked for work.
    pub last_seen_seconds: f64,
    /// Whether it offers the run's transform.
    pub able: bool,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let finished = self.done + self.dead;
        let percent = if self.chunks == 0 { 100.0 } else { 100.0 * finished as f64 / self.chunks as f64 };
        writeln!(f, "run {} on {} ({})", self.run, self.input, self.transform)?;
        let eta = match (self.complete, self.eta_seconds) {
            (true, _) => "complete".to_string(),
            (false, _) if self.committing => "committing".to_string(),
            (false, Some(eta)) => format!("ETA {eta:.0} s"),
            (false, None) => "ETA unknown".to_string(),
        };
        writeln!(
            f,
            "chunks: {}/{} done ({percent:.1}%), {} pending, {} leased, {} dead-lettered; {:.0} objects/s over {:.1} s, {eta}",
            self.done, self.chunks, self.pending, self.leased, self.dead, self.objects_per_second, self.elapsed_seconds
        )?;
        for d in &self.dead_letters {
            writeln!(f, "dead letter: chunk {} (line {}, {} objects): {}", d.chunk, d.first_line, d.objects, d.reason)?;
        }
        if self.mappers.is_empty() {
            return write!(f, "no mapper has asked for work");
        }
        write!(f, "{:<32} {:>6} {:>8} {:>9} {:>10}", "mapper", "held", "done", "chunks/s", "last seen")?;
        for m in &self.mappers {
            let name = if m.able { m.name.clone() } else { format!("{} (cannot run the job)", m.name) };
            write!(
                f,
                "\n{:<32} {:>6} {:>8} {:>9.1} {:>8.1} s",
                name, m.held, m.done, m.chunks_per_second, m.last_seen_seconds
            )?;
        }
        Ok(())
    }
}

/// Why `fetcher status` found no answer.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No NATS connection.
    #[error(transparent)]
    Connect(#[from] common::nats::ConnectError),
    /// No fetcher answered.
    #[error("no fetcher answered on {subject} within {timeout:?} ({reason}); is one running with this NATS_URL and --subject-prefix?")]
    NoAnswer {
        /// The status subject.
        subject: String,
        /// How long it waited.
        timeout: Duration,
        /// The request's error.
        reason: String,
    },
    /// The answer is not a status.
    #[error("the fetcher's answer on {subject} is not a status: {source}")]
    Malformed {
        /// The status subject.
        subject: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// Asks the running fetcher for its status, waiting at most `timeout` for NATS and the answer.
pub async fn request(nats: &NatsArgs, timeout: Duration) -> Result<Status, StatusError> {
    let subject = Subjects::new(&nats.subject_prefix).status;
    let no_answer = |reason: String| StatusError::NoAnswer { subject: subject.clone(), timeout, reason };
    let (give_up, state) = (CancellationToken::new(), Arc::new(ConnectionState::default()));
    let connecting = common::nats::connect(nats, "fetcher", "chunkmill-fetcher-status", &state, &give_up);
    let client = match tokio::time::timeout(timeout, connecting).await {
        Ok(client) => client?,
        Err(_) => return Err(no_answer("no NATS connection".into())),
    };
    let asked = async_nats::Request::new().payload(bytes::Bytes::new()).timeout(Some(timeout));
    let answer = client.send_request(subject.clone(), asked).await.map_err(|e| no_answer(e.to_string()))?;
    serde_json::from_slice(&answer.payload)
        .map_err(|source| StatusError::Malformed { subject: subject.clone(), source })
}
