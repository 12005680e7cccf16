//! The transformers: take queued chunks in order, run the job's transform on the rayon pool
//! ([`on_rayon`], never on tokio's thread) and start each result's delivery.

use std::sync::Arc;

use common::protocol::{LeaseRef, ReleaseReason};
use common::text::escaped;
use tokio::sync::mpsc;

use crate::deliver::{deliver, finish, Deliveries};
use crate::lease::{give_back, lost, release};
use crate::work;
use crate::{InHand, Shared};

/// Chunks transformed at once: one more than fits the pool, so the next chunk is decoded and
/// queued while the pool works.
pub(crate) const TRANSFORMERS: usize = 2;

/// Takes chunks from the queue in order, transforms each on the rayon pool, and starts its
/// delivery. After shutdown it hands back what is still queued.
pub(crate) async fn transformer(
    shared: Arc<Shared>,
    chunks: Arc<tokio::sync::Mutex<mpsc::Receiver<InHand>>>,
    deliveries: Deliveries,
) {
    loop {
        let next = chunks.lock().await.recv().await;
        let Some(in_hand) = next else { return };
        let lease = LeaseRef { chunk: in_hand.head.chunk, lease: in_hand.head.lease };
        if shared.hard_stop.is_cancelled() {
            give_back(&shared, lease, ReleaseReason::Shutdown, "shutting down before transforming it".into()).await;
            continue;
        }
        if !shared.still_ours(&lease) {
            lost(&shared, lease);
            continue;
        }
        match work::transform_chunk(&shared, in_hand).await {
            work::Transformed::Deliver { body, objects, permit } => {
                // Wait for room among the results in flight (keeping this chunk's room until
                // then, so a slow saver slows the asking), then free the chunk's room: the
                // pump asks for the next one while this result travels.
                let Ok(in_flight) = deliveries.room.clone().acquire_owned().await else { return };
                drop(permit);
                let shared = shared.clone();
                deliveries.tasks.spawn(async move {
                    let outcome = deliver(&shared, lease, body).await;
                    finish(&shared, lease, objects, outcome).await;
                    drop(in_flight);
                });
            }
            work::Transformed::Probed(permit) => {
                shared.drop_lease(&lease);
                release(&shared, lease, ReleaseReason::Probed, "probe finished".into()).await;
                drop(permit);
            }
            work::Transformed::GiveBack(reason, error, permit) => {
                if reason == ReleaseReason::Failed {
                    shared.metrics.failures.with_label_values(&["chunk"]).inc();
                    tracing::error!(chunk = lease.chunk.0, "chunk {} failed: {}", lease.chunk, escaped(&error));
                }
                give_back(&shared, lease, reason, error).await;
                drop(permit);
            }
        }
    }
}

/// Runs `f` on the rayon pool and awaits its result without blocking tokio. A panic inside `f`
/// becomes an error (rayon would otherwise abort the process).
pub(crate) async fn on_rayon<T: Send + 'static>(
    pool: &rayon::ThreadPool,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    pool.spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err("the transform panicked".to_string()));
        let _ = tx.send(outcome);
    });
    rx.await.unwrap_or_else(|_| Err("the transform thread went away".to_string()))
}
