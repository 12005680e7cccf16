//! The single-fetcher lock of `--ledger kv`: the key `fetcher` in the JetStream key-value bucket
//! `<bucket>-lock`, whose entries expire `--lock-ttl` after their last write. The holder rewrites
//! it every third of that, each time with the revision it last wrote (compare-and-set).
//!
//! The value is `<instance> #<incarnation>`: a restarted fetcher with the same instance name (a
//! pod restarted in place) takes the lock over at once, but a refresh succeeds only for the very
//! process that wrote it, so an old process that was cut off cannot mistake a successor of the
//! same name for itself.
//!
//! What a refresh that fails means is decided by reading the lock again ([`LockKeeper`]):
//! - our own value (an earlier write whose answer was lost): carry on with its revision;
//! - no value (it expired while NATS was unreachable for longer than the TTL): create it again;
//!   if nobody wrote the bucket in between (the new revision is the next one), carry on, else
//!   another fetcher may have held it and advanced the ledger meanwhile, so stop;
//! - another fetcher's value: stop at once.
//!
//! While the lock is not known to be held (its last successful write is older than the TTL),
//! [`LockStatus::held`] is false and the fetcher answers nothing and reports not-ready; a lost
//! lock cancels [`LockStatus::lost`] and the fetcher exits. So two fetchers never serve at once:
//! the other can take the key only after it expired on the server, which is after our deadline.
//!
//! A fetcher that stops (SIGTERM, or its run complete) deletes the lock at the revision it last
//! wrote ([`LockStatus::wait_released`]), so a successor takes it at once instead of after the
//! TTL; and a fetcher that finds the lock held by another waits for it ([`take`], not ready
//! meanwhile) instead of exiting, which under Kubernetes would be a crash loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store};
use common::sync::lock;
use tokio_util::sync::CancellationToken;

/// The key of the lock in its bucket.
const KEY: &str = "fetcher";

/// How often a fetcher waiting for the lock reads it.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// What the serving loop needs to know about the lock.
#[derive(Debug)]
pub(crate) struct LockStatus {
    held_until: Mutex<Instant>,
    lost: CancellationToken,
    why: Mutex<String>,
    /// Cancelled when the fetcher stops: the keeper deletes the lock and ends.
    release: CancellationToken,
    /// The keeper has ended (the lock released, or lost).
    ended: AtomicBool,
    ended_notify: tokio::sync::Notify,
}

impl LockStatus {
    /// True while the last successful write of the lock is younger than its TTL.
    pub(crate) fn held(&self, now: Instant) -> bool {
        !self.lost.is_cancelled() && now < *lock(&self.held_until, "run lock expiry")
    }

    /// Cancelled when the lock is lost for good.
    pub(crate) fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Why it was lost.
    pub(crate) fn why(&self) -> String {
        lock(&self.why, "run lock loss reason").clone()
    }

    /// Waits up to `timeout` until the keeper has released the lock (asked for when the
    /// [`LockKeeper`] is dropped) or ended otherwise, so that the process does not exit first.
    pub(crate) async fn wait_released(&self, timeout: Duration) {
        self.release.cancel();
        let ended = async {
            while !self.ended.load(Ordering::Acquire) {
                let notified = self.ended_notify.notified();
                if self.ended.load(Ordering::Acquire) {
                    break;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, ended).await;
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.ended_notify.notify_waiters();
    }

    fn refreshed(&self, until: Instant) {
        *lock(&self.held_until, "run lock expiry") = until;
    }

    fn lose(&self, why: String) {
        tracing::error!("{why}");
        *lock(&self.why, "run lock loss reason") = why;
        self.lost.cancel();
    }
}

/// Why the lock could not be taken.
#[derive(Debug)]
pub(crate) enum TakeError {
    /// The fetcher was stopped while it waited for another fetcher's lock.
    Stopped {
        /// The holder's instance name.
        holder: String,
    },
    /// JetStream did not answer as expected.
    JetStream(String),
}

/// The value a process writes: its instance name and this process's incarnation.
fn value(owner: &str, incarnation: &str) -> String {
    format!("{owner} #{incarnation}")
}

/// The instance name in a lock value.
fn instance_of(value: &str) -> &str {
    value.rsplit_once(" #").map_or(value, |(instance, _)| instance)
}

/// What one attempt to take the lock found.
enum Attempt {
    /// Taken, at this revision.
    Taken(u64),
    /// Another fetcher holds it.
    Held(String),
}

/// One attempt to take the lock as `owner` with the value `mine`.
async fn attempt(lock: &Store, owner: &str, mine: &str) -> Result<Attempt, TakeError> {
    let js = |e: &dyn std::fmt::Display| TakeError::JetStream(e.to_string());
    match lock.create(KEY, mine.to_string().into()).await {
        Ok(revision) => Ok(Attempt::Taken(revision)),
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
            let entry = lock.entry(KEY).await.map_err(|e| js(&e))?;
            let holder = entry.as_ref().map(|e| String::from_utf8_lossy(&e.value).to_string()).unwrap_or_default();
            match entry {
                Some(entry) if instance_of(&holder) == owner => Ok(Attempt::Taken(
                    lock.update(KEY, mine.to_string().into(), entry.revision).await.map_err(|e| js(&e))?,
                )),
                // Deleted or expired between the two reads: try again.
                Some(entry) if entry.operation != Operation::Put => Ok(Attempt::Held(String::new())),
                _ => Ok(Attempt::Held(instance_of(&holder).to_string())),
            }
        }
        Err(e) => Err(js(&e)),
    }
}

/// Takes the lock as `owner` (see the module docs), waiting while another fetcher holds it
/// (saying so once) until it is released or expires, or `shutdown`; keeps it in a background
/// task until the returned keeper is dropped, which releases it.
pub(crate) async fn take(
    lock: Store,
    bucket: String,
    owner: &str,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Result<LockKeeper, TakeError> {
    let mine = value(owner, &uuid::Uuid::new_v4().simple().to_string());
    let mut said = String::new();
    let (revision, sent) = loop {
        let sent = Instant::now();
        match attempt(&lock, owner, &mine).await? {
            Attempt::Taken(revision) => break (revision, sent),
            Attempt::Held(holder) => {
                if !holder.is_empty() && holder != said {
                    tracing::warn!(
                        "waiting for the fetcher lock in {bucket}, held by {holder}: another fetcher serves this pipeline; this one takes over when it stops or its lock expires ({ttl:?} after its last refresh)"
                    );
                    said = holder;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(TakeError::Stopped { holder: said }),
                    _ = tokio::time::sleep(WAIT_POLL) => {}
                }
            }
        }
    };
    if !said.is_empty() {
        tracing::info!("took the fetcher lock in {bucket} (it was held by {said})");
    }
    let status = Arc::new(LockStatus {
        held_until: Mutex::new(sent + ttl),
        lost: CancellationToken::new(),
        why: Mutex::new(String::new()),
        release: CancellationToken::new(),
        ended: AtomicBool::new(false),
        ended_notify: tokio::sync::Notify::new(),
    });
    let keeper = Keeper { lock, bucket, mine, revision, ttl, status: status.clone() };
    let task = tokio::spawn(keeper.run());
    Ok(LockKeeper { status, task })
}

/// Keeps the lock while it lives; dropped, it asks its task to release (delete) the lock, which
/// [`LockStatus::wait_released`] waits for. (A process killed outright leaves the lock to expire
/// by its TTL.)
pub(crate) struct LockKeeper {
    status: Arc<LockStatus>,
    #[allow(dead_code)] // detached on drop: it finishes the release on its own
    task: tokio::task::JoinHandle<()>,
}

impl LockKeeper {
    /// The lock's status, for the serving loop.
    pub(crate) fn status(&self) -> Arc<LockStatus> {
        self.status.clone()
    }
}

impl Drop for LockKeeper {
    fn drop(&mut self) {
        self.status.release.cancel();
    }
}

struct Keeper {
    lock: Store,
    bucket: String,
    mine: String,
    revision: u64,
    ttl: Duration,
    status: Arc<LockStatus>,
}

/// What reading the lock again after a failed refresh found.
enum Found {
    /// Our value, at this revision: carry on.
    Ours(u64),
    /// It had expired; we created it again at this revision, the next one.
    Retaken(u64),
    /// Lost: stop.
    Lost(String),
    /// NATS or JetStream did not answer: try again soon.
    Unreachable(String),
}

impl Keeper {
    async fn run(self) {
        let status = self.status.clone();
        self.keep().await;
        status.end();
    }

    /// Deletes the lock if it is still ours (at the revision we last wrote), so a successor
    /// takes it at once.
    async fn release(&self) {
        match self.lock.delete_expect_revision(KEY, Some(self.revision)).await {
            Ok(()) => tracing::info!("released the fetcher lock in {}", self.bucket),
            Err(e) => tracing::warn!(
                "could not release the fetcher lock in {} ({e}); it expires {:?} after its last refresh",
                self.bucket,
                self.ttl
            ),
        }
    }

    async fn keep(mut self) {
        let mut period = self.ttl / 3;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = self.status.release.cancelled() => return self.release().await,
                _ = tokio::time::sleep(period) => {}
            }
            let sent = Instant::now();
            let found = match self.lock.update(KEY, self.mine.clone().into(), self.revision).await {
                Ok(revision) => Found::Ours(revision),
                Err(e) => self.reread(&e.to_string()).await,
            };
            match found {
                Found::Ours(revision) | Found::Retaken(revision) => {
                    if matches!(found, Found::Retaken(_)) {
                        tracing::warn!(
                            "the fetcher lock in {} had expired (NATS was unreachable for longer than --lock-ttl, {:?}); nobody took it meanwhile, so this fetcher took it again and serves on",
                            self.bucket,
                            self.ttl
                        );
                    } else if failing {
                        tracing::info!("the fetcher lock in {} is refreshed again", self.bucket);
                    }
                    self.revision = revision;
                    self.status.refreshed(sent + self.ttl);
                    failing = false;
                    period = self.ttl / 3;
                }
                Found::Lost(why) => {
                    self.status.lose(why);
                    return;
                }
                Found::Unreachable(e) => {
                    if !failing {
                        tracing::warn!(
                            "cannot refresh the fetcher lock in {} ({e}); if it stays so for {:?}, this fetcher stops serving until it holds the lock again",
                            self.bucket,
                            self.ttl
                        );
                        failing = true;
                    }
                    period = Duration::from_millis(500).min(self.ttl / 3);
                }
            }
        }
    }

    /// Reads the lock after a refresh failed with `error` (see the module docs).
    async fn reread(&self, error: &str) -> Found {
        for _ in 0..3 {
            let entry = match self.lock.entry(KEY).await {
                Ok(entry) => entry,
                Err(e) => return Found::Unreachable(format!("{error}; reading it: {e}")),
            };
            match entry {
                Some(entry) if entry.operation == Operation::Put => {
                    let holder = String::from_utf8_lossy(&entry.value).to_string();
                    if holder == self.mine {
                        return Found::Ours(entry.revision);
                    }
                    return Found::Lost(format!(
                        "the fetcher lock in {} is now held by {}: another fetcher serves this pipeline; this one stops",
                        self.bucket,
                        instance_of(&holder)
                    ));
                }
                _ => match self.lock.create(KEY, self.mine.clone().into()).await {
                    Ok(revision) if revision == self.revision + 1 => return Found::Retaken(revision),
                    Ok(_) => {
                        return Found::Lost(format!(
                            "the fetcher lock in {} expired and was written by someone else before this fetcher could take it again; another fetcher may have advanced the ledger meanwhile, so this one stops (a restart re-reads the ledger)",
                            self.bucket
                        ))
                    }
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Found::Unreachable(format!("{error}; taking it again: {e}")),
                },
            }
        }
        Found::Unreachable(format!("{error}; the lock kept changing while being read"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instance_name_is_read_back_from_a_value() {
        assert_eq!(instance_of(&value("fetcher-0", "abc")), "fetcher-0");
        assert_eq!(instance_of("old-style-owner"), "old-style-owner");
        assert_eq!(instance_of(&value("a #b", "c")), "a #b");
    }
}
