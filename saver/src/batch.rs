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

/// Saves queued results in batches until the queue closes. A batch takes what queued while the
/// previous one was saved, and whatever comes within its window of its first result: at a
/// moderate rate that folds several chunks into one commit (two fsyncs, or one transaction, and
/// one ack request) instead of one each. The window is [`Pace::GAPS`] mean gaps between
/// results, at least [`Pace::LEAST`] and at most `most`: long enough to fold a few chunks at any
/// rate, and short enough that the last batch of a run waits only a few chunks' worth of time.
/// A database sink commits several batches at once, one per pooled connection.
pub async fn writer(sink: Sink, mut queue: mpsc::Receiver<WriteSlot>, metrics: SaverMetrics, most: Duration) {
    let slots = Arc::new(Semaphore::new(sink.parallel_batches()));
    let tracker = TaskTracker::new();
    let mut pace = Pace::default();
    loop {
        // Wait for a free slot before gathering, so the batch takes everything that queued meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        if queue.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            break;
        }
        gather(&mut queue, &mut batch, pace.window(most)).await;
        pace.observe(batch.len(), std::time::Instant::now(), most);
        let (results, waiters): (Vec<Arc<Decoded>>, Vec<_>) = batch.into_iter().unzip();
        let sink = sink.clone();
        let metrics = metrics.clone();
        metrics.batch.observe(results.len() as f64);
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

/// The mean time between results, measured over whole batches (from one batch's gathering to the
/// next's, divided by the results the later one took), as a moving average.
#[derive(Debug, Default)]
struct Pace {
    last: Option<std::time::Instant>,
    gap: Option<Duration>,
}

impl Pace {
    /// A batch waits for about this many more results.
    const GAPS: u32 = 8;

    /// A batch waits at least this long (or `most`, if shorter) once the pace is known: at a high
    /// rate a shorter wait would fold fewer chunks and cost more fsyncs than its tail saves.
    const LEAST: Duration = Duration::from_millis(10);

    /// How long the next batch waits for more: the least wait until two batches have shown the
    /// pace.
    fn window(&self, most: Duration) -> Duration {
        self.gap.map_or(Self::LEAST, |gap| gap.saturating_mul(Self::GAPS).max(Self::LEAST)).min(most)
    }

    /// A batch of `results` finished gathering at `now`. A gap longer than `most` counts as
    /// `most`, so that the pause between two runs does not keep the window long into the next.
    fn observe(&mut self, results: usize, now: std::time::Instant, most: Duration) {
        if let Some(last) = self.last {
            let gap = (now.saturating_duration_since(last) / results.max(1) as u32).min(most);
            self.gap = Some(match self.gap {
                None => gap,
                Some(mean) => (mean * 7 + gap * 3) / 10,
            });
        }
        self.last = Some(now);
    }
}

/// Adds to `batch` what comes within `window` from now, until it is full.
async fn gather(queue: &mut mpsc::Receiver<WriteSlot>, batch: &mut Vec<WriteSlot>, window: Duration) {
    let until = tokio::time::Instant::now() + window;
    while batch.len() < WRITE_BATCH {
        let room = WRITE_BATCH - batch.len();
        match tokio::time::timeout_at(until, queue.recv_many(batch, room)).await {
            Ok(n) if n > 0 => {}
            // The window is over, or the queue closed (what it holds is saved all the same).
            _ => break,
        }
    }
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
    /// Whether the sink needs runs committed once complete (said in every ack).
    pub commit: bool,
}

/// Sends saved chunks to the fetcher in batches and hands each waiting task its verdict, until
/// the queue closes. Up to 3 attempts per batch; then `None` (the mapper resends, we ack again).
pub async fn acker(config: AckerConfig, mut queue: mpsc::Receiver<AckSlot>) {
    // Spans batches: one warning per outage, and delays that start over only after a success.
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_millis(800));
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while queue.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let (acks, waiters): (Vec<Ack>, Vec<_>) = batch.drain(..).unzip();
        let body = protocol::encode(&AckRequest {
            v: VERSION,
            saver: config.saver.clone(),
            sink: config.sink.clone(),
            commit: config.commit,
            acks,
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use common::protocol::{self, ChunkId, ResultHead};

    fn slot(chunk: u32) -> WriteSlot {
        let head = ResultHead {
            run: "0123456789abcdef".into(),
            job: "00000000000000aa".into(),
            chunk: ChunkId(chunk),
            lease: uuid::Uuid::nil(),
            attempt: 1,
            mapper: "m".into(),
        };
        let body = protocol::encode_result(&head, std::iter::once(std::iter::once(&b"{}"[..])), None, &[]);
        (Arc::new(Decoded::decode(Bytes::from(body)).expect("valid")), oneshot::channel().0)
    }

    #[test]
    fn the_window_is_a_few_gaps_between_results_and_at_most_the_limit() {
        let most = Duration::from_millis(50);
        let mut pace = Pace::default();
        let start = std::time::Instant::now();
        // No pace known yet: the first batches wait the least.
        assert_eq!(pace.window(most), Pace::LEAST);
        pace.observe(1, start, most);
        assert_eq!(pace.window(most), Pace::LEAST);
        // 4 results a batch, a batch every 2 ms: a result every 0.5 ms; 8 of them are 4 ms,
        // less than the least wait.
        for i in 1..=20 {
            pace.observe(4, start + Duration::from_millis(2 * i), most);
        }
        assert_eq!(pace.window(most), Pace::LEAST);
        // A result every 3 ms: a window of 8 of them.
        for i in 1..=20 {
            pace.observe(1, start + Duration::from_millis(40 + 3 * i), most);
        }
        let window = pace.window(most);
        assert!(window > Duration::from_millis(23) && window <= Duration::from_millis(24), "{window:?}");
        // One result every 20 ms: 8 gaps would be 160 ms, the limit holds it at 50.
        for i in 1..=20 {
            pace.observe(1, start + Duration::from_millis(100 + 20 * i), most);
        }
        assert_eq!(pace.window(most), most);
        // A pause of a minute counts as the limit: a brisk pace after it shrinks the window soon.
        let resumed = start + Duration::from_secs(60);
        pace.observe(1, resumed, most);
        for i in 1..=15 {
            pace.observe(10, resumed + Duration::from_millis(i), most);
        }
        assert_eq!(pace.window(most), Pace::LEAST);
        // A limit below the least wait is the wait; no limit, no wait.
        assert_eq!(pace.window(Duration::from_millis(3)), Duration::from_millis(3));
        assert_eq!(pace.window(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_batch_takes_what_comes_within_its_window_and_a_full_one_does_not_wait() {
        let (tx, mut rx) = mpsc::channel(2 * WRITE_BATCH);
        tx.send(slot(0)).await.expect("queued");
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, WRITE_BATCH).await;
        // A result sent while the window is open joins the batch.
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            late.send(slot(1)).await.expect("queued");
        });
        // A window far longer than the 20 ms the late result takes, for a machine under load.
        gather(&mut rx, &mut batch, Duration::from_secs(1)).await;
        assert_eq!(batch.len(), 2);
        // A full batch does not wait out its window (an hour: the test would hang).
        for chunk in 2..(WRITE_BATCH as u32 + 12) {
            tx.send(slot(chunk)).await.expect("queued");
        }
        let mut full = Vec::new();
        rx.recv_many(&mut full, 1).await;
        gather(&mut rx, &mut full, Duration::from_secs(3600)).await;
        assert_eq!(full.len(), WRITE_BATCH);
        // Without a window, only what has queued (and the queue closing ends the wait too).
        drop(tx);
        let mut rest = Vec::new();
        gather(&mut rx, &mut rest, Duration::ZERO).await;
        assert_eq!(rest.len(), 10);
    }
}
