//! The two batching tasks behind every save: the writer saves whatever results have queued as
//! one batch (group commit: one round of fsyncs, or one transaction per pooled connection), and
//! the acker sends whatever saved chunks have queued to the fetcher in one request. While one
//! batch is in flight the next gathers, so syncs, commits and round trips per chunk fall as load
//! rises.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use common::backoff::Backoff;
use common::protocol::{self, Ack, AckReply, AckRequest, AckVerdict, VERSION};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::task::TaskTracker;

use crate::decoded::Decoded;
use crate::metrics::SaverMetrics;
use crate::sink::{SaveOutcome, Sink, SinkError};

/// Most chunks saved with one round of syncs.
pub const WRITE_BATCH: usize = 128;
/// Most acks in one request.
pub const ACK_BATCH: usize = 256;

/// A result waiting to be saved, and who waits for the outcome.
pub type WriteSlot = (Arc<Decoded>, oneshot::Sender<Result<SaveOutcome, SinkError>>);
/// A saved chunk waiting to be acknowledged, and who waits for the verdict (`None`: the fetcher
/// did not answer).
pub type AckSlot = (Ack, oneshot::Sender<Option<AckVerdict>>);

/// Saves queued results in batches until the queue closes. A database sink commits several
/// batches at once, one per pooled connection.
pub async fn writer(sink: Sink, mut queue: mpsc::Receiver<WriteSlot>, metrics: SaverMetrics) {
    let slots = Arc::new(Semaphore::new(sink.parallel_batches()));
    let tracker = TaskTracker::new();
    loop {
        // Wait for a free slot before gathering, so the batch takes everything that queued meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        if queue.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            break;
        }
        let (results, waiters): (Vec<Arc<Decoded>>, Vec<_>) = batch.into_iter().unzip();
        let sink = sink.clone();
        let metrics = metrics.clone();
        tracker.spawn(async move {
            let started = std::time::Instant::now();
            let outcomes = sink.save_batch(results).await;
            let took = started.elapsed().as_secs_f64();
            for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
                metrics.write.observe(took);
                let _ = waiter.send(outcome);
            }
            drop(slot);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Who the acker is and where it sends.
pub struct AckerConfig {
    /// The NATS connection.
    pub client: Client,
    /// The fetcher's ack subject.
    pub subject: String,
    /// This saver's instance name.
    pub saver: String,
    /// The sink's identity.
    pub sink: String,
}

/// Sends saved chunks to the fetcher in batches and hands each waiting task its verdict, until
/// the queue closes. Up to 3 attempts per batch; then `None` (the mapper resends, we ack again).
pub async fn acker(config: AckerConfig, mut queue: mpsc::Receiver<AckSlot>) {
    // Spans batches: one warning per outage, and delays that start over only after a success.
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_millis(800));
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while queue.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let (acks, waiters): (Vec<Ack>, Vec<_>) = batch.drain(..).unzip();
        let body =
            protocol::encode(&AckRequest { v: VERSION, saver: config.saver.clone(), sink: config.sink.clone(), acks });
        let mut verdicts = None;
        for _ in 0..3 {
            let request = async_nats::Request::new().payload(body.clone()).timeout(Some(Duration::from_secs(5)));
            match config.client.send_request(config.subject.clone(), request).await {
                Ok(message) => match protocol::decode::<AckReply>(&message.payload) {
                    Ok(reply) if reply.verdicts.len() == waiters.len() => {
                        verdicts = Some(reply.verdicts);
                        break;
                    }
                    Ok(_) => tracing::warn!("the fetcher's ack reply has the wrong number of verdicts; retrying"),
                    Err(e) => tracing::warn!("unreadable ack reply: {e}; retrying"),
                },
                Err(e) => {
                    if backoff.first_failure() {
                        tracing::warn!("acknowledging to the fetcher failed ({e}); retrying");
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        if verdicts.is_some() {
            backoff.reset();
        }
        match verdicts {
            Some(verdicts) => {
                for (waiter, verdict) in waiters.into_iter().zip(verdicts) {
                    let _ = waiter.send(Some(verdict));
                }
            }
            None => {
                for waiter in waiters {
                    let _ = waiter.send(None);
                }
            }
        }
    }
}
