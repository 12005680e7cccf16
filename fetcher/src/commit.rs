//! The commit of a run whose sink needs one (the object store's: its saved chunks become the
//! run's result only once a saver writes the parts, the manifest and `_SUCCESS`).
//!
//! A saver says so on every ack (`AckRequest.commit`); the fetcher records that in its ledger
//! (`c`) before it answers, so a restarted fetcher knows too. Once every chunk is done or dead,
//! the fetcher asks the savers (`<prefix>.commit`, their queue group) until one answers
//! `committed`, records that (`C`), and only then counts the run complete: `--exit-when-done`
//! exits after `_SUCCESS` is durable. A fetcher restarted on a complete run that is not
//! committed asks again; the saver's commit plan makes a repeated commit write the same parts.
//!
//! [`CommitState`] is the pure state; [`ask`] is the background task that asks.

use std::time::Duration;

use async_nats::Client;
use common::backoff::Backoff;
use common::protocol::{self, CommitReply, CommitRequest, CommitStatus};
use tokio_util::sync::CancellationToken;

/// Where the run's commit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CommitState {
    /// The savers' acks said the sink commits runs (recorded durably).
    needed: bool,
    /// A request task is running.
    asking: bool,
    /// A saver answered `committed`, not yet recorded durably.
    answered: bool,
    /// `committed` is recorded durably.
    committed: bool,
}

/// What the server should do about the commit now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitStep {
    /// Nothing (no commit needed, one is being asked for, or it is done).
    Nothing,
    /// Start asking the savers.
    Ask,
    /// Record `committed` in the ledger (retried until it is durable).
    Record,
}

impl CommitState {
    /// The state a ledger recovered: whether a commit was needed, and whether it was recorded.
    pub(crate) fn recovered(needed: bool, committed: bool) -> Self {
        CommitState { needed, committed, ..CommitState::default() }
    }

    /// Whether the commit is needed and not recorded yet as needed (an ack asks for it).
    pub(crate) fn needs_recording(&self, ack_says_commit: bool) -> bool {
        ack_says_commit && !self.needed
    }

    /// The `c` entry is durable.
    pub(crate) fn recorded_needed(&mut self) {
        self.needed = true;
    }

    /// Whether the run is settled as far as the commit goes: no commit needed, or it is durable.
    pub(crate) fn settled(&self) -> bool {
        !self.needed || self.committed
    }

    /// Whether the run is complete but waits for its commit (for status and progress).
    pub(crate) fn committing(&self, chunks_complete: bool) -> bool {
        chunks_complete && !self.settled()
    }

    /// The next step, given whether every chunk is done or dead.
    pub(crate) fn step(&self, chunks_complete: bool) -> CommitStep {
        if !chunks_complete || self.settled() {
            CommitStep::Nothing
        } else if self.answered {
            CommitStep::Record
        } else if self.asking {
            CommitStep::Nothing
        } else {
            CommitStep::Ask
        }
    }

    /// A request task was started.
    pub(crate) fn asked(&mut self) {
        self.asking = true;
    }

    /// A saver answered `committed`: the task ended.
    pub(crate) fn answered(&mut self) {
        self.asking = false;
        self.answered = true;
    }

    /// The `C` entry is durable: the run is committed.
    pub(crate) fn recorded_committed(&mut self) {
        self.answered = false;
        self.committed = true;
    }
}

/// How long one commit request waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the savers to commit (`request` on `subject`) until one answers `committed`, with the
/// shared backoff while the answer is `committing`, `failed`, `wrong_sink` or none comes; then
/// reports on `done`. Stops quietly on `stop`.
pub(crate) async fn ask(
    client: Client,
    subject: String,
    request: CommitRequest,
    done: tokio::sync::mpsc::UnboundedSender<()>,
    stop: CancellationToken,
) {
    let body = protocol::encode(&request);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut last_failure = String::new();
    loop {
        let asked = async_nats::Request::new().payload(body.clone()).timeout(Some(ANSWER_TIMEOUT));
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            answer = client.send_request(subject.clone(), asked) => answer,
        };
        let failure = match answer.map(|m| protocol::decode::<CommitReply>(&m.payload)) {
            Ok(Ok(CommitReply { status: CommitStatus::Committed, .. })) => {
                let _ = done.send(());
                return;
            }
            Ok(Ok(CommitReply { status: CommitStatus::Committing, .. })) => String::new(),
            Ok(Ok(CommitReply { status: CommitStatus::WrongSink, .. })) => {
                format!("a saver on {subject} saves into another sink than run {}'s ({})", request.run, request.sink)
            }
            Ok(Ok(CommitReply { status: CommitStatus::Failed, error, .. })) => {
                format!("a saver could not commit run {}: {}", request.run, error.unwrap_or_default())
            }
            Ok(Err(e)) => format!("a saver's answer on {subject} is malformed: {e}"),
            Err(e) => {
                format!("no saver answered the commit request on {subject} ({e}); start a saver with the run's --sink")
            }
        };
        if !failure.is_empty() && failure != last_failure {
            tracing::warn!(run = %request.run, "{failure}; asking again");
            last_failure = failure;
        }
        if !backoff.wait(&stop).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_without_a_commit_is_settled_and_never_asks() {
        let state = CommitState::default();
        assert!(state.settled());
        assert_eq!(state.step(true), CommitStep::Nothing);
        assert!(!state.committing(true));
        assert!(!state.needs_recording(false));
    }

    #[test]
    fn a_commit_is_asked_for_once_the_chunks_are_complete_then_recorded_then_settled() {
        let mut state = CommitState::default();
        assert!(state.needs_recording(true));
        state.recorded_needed();
        assert!(!state.needs_recording(true), "recorded once");
        assert_eq!(state.step(false), CommitStep::Nothing, "not before every chunk is done or dead");
        assert!(!state.settled() && state.committing(true) && !state.committing(false));
        assert_eq!(state.step(true), CommitStep::Ask);
        state.asked();
        assert_eq!(state.step(true), CommitStep::Nothing, "one request task at a time");
        state.answered();
        assert!(!state.settled(), "an answer is not durable until recorded");
        assert_eq!(state.step(true), CommitStep::Record);
        state.recorded_committed();
        assert!(state.settled());
        assert_eq!(state.step(true), CommitStep::Nothing);
    }

    #[test]
    fn a_recovered_run_that_needed_a_commit_asks_again_unless_it_was_recorded() {
        assert_eq!(CommitState::recovered(true, false).step(true), CommitStep::Ask);
        assert_eq!(CommitState::recovered(true, true).step(true), CommitStep::Nothing);
        assert!(CommitState::recovered(true, true).settled());
    }
}
