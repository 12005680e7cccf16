//! Which runs of objects a command's child is given, and which answers are kept: a pure state
//! machine, tested without processes.
//!
//! The line protocol has no correlation id: the child's k-th line is taken as the k-th object's
//! answer. A child that writes two lines for one object (or none) shifts every answer after it,
//! and nothing in the lines shows where. So a run's answers are kept only when the run is
//! *confirmed*: the child answered every object of the run with one valid line and wrote nothing
//! more (see `Worker::settle`). Any failure in a run (a crash, a timeout, a line that is not
//! JSON, an extra line) discards every answer of that run, and its objects are run again with a
//! fresh child:
//!
//! - when the child broke down at object `k` having answered the `k` objects before it (as an
//!   in-step child that crashes on a poison object does), `k` is the suspect: it runs alone
//!   first, then the objects before it, then those after it;
//! - when the suspect, alone, is answered (so it was not the cause: the child was out of step
//!   earlier), or when every object was answered but an extra line came, the run is cut in
//!   halves, each run on its own, down to the one object that breaks the contract.
//!
//! Only a run of one object counts as a try of that object; after `retries + 1` failed tries the
//! object is dead-lettered with the last failure's cause and message. An object is never
//! convicted by a run of several.

use std::collections::VecDeque;
use std::ops::Range;

use crate::{Cause, ObjectError, Outputs};

/// Why a run failed, as the child's breakdown is described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The cause for the object's dead-letter entry, if the run was that object alone.
    pub(crate) cause: Cause,
    /// The message for that entry.
    pub(crate) message: String,
}

/// What one run of objects through one child came to.
#[derive(Debug)]
pub(crate) enum RunOutcome {
    /// Every object answered with one valid line and nothing more came: one output per object.
    Confirmed(Vec<Outputs>),
    /// The child broke down after giving `answered` lines (all of the run's objects when the
    /// failure is a line too many).
    Failed {
        /// Lines the child gave for the run before it broke down.
        answered: usize,
        /// What went wrong.
        failure: Failure,
    },
}

/// A run still to do: a range of the chunk's objects, and whether it is being searched by
/// halves (its answers are known to have been shifted somewhere in it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    range: Range<usize>,
    halve: bool,
    /// Set on a suspect run alone: the run of the objects before it, which is searched by
    /// halves if the suspect turns out innocent.
    then_prefix: Option<Range<usize>>,
}

/// The runs of one slice of a chunk through one command, and the outcome per object.
#[derive(Debug)]
pub(crate) struct Plan {
    queue: VecDeque<Pending>,
    outcomes: Vec<Option<Result<Outputs, ObjectError>>>,
    /// Failed tries of each object alone.
    tries: Vec<u32>,
    retries: u32,
}

impl Plan {
    /// `objects` objects, each tried alone at most `retries + 1` times.
    pub(crate) fn new(objects: usize, retries: u32) -> Self {
        let mut queue = VecDeque::new();
        if objects > 0 {
            queue.push_back(Pending { range: 0..objects, halve: false, then_prefix: None });
        }
        Plan { queue, outcomes: vec![None; objects], tries: vec![0; objects], retries }
    }

    /// The next run to give a child, if any.
    pub(crate) fn next(&self) -> Option<Range<usize>> {
        self.queue.front().map(|pending| pending.range.clone())
    }

    /// Records what the run returned by [`Plan::next`] came to.
    pub(crate) fn record(&mut self, outcome: RunOutcome) {
        let pending = self.queue.pop_front().expect("record follows next, which returned a run");
        match outcome {
            RunOutcome::Confirmed(outputs) => {
                assert_eq!(outputs.len(), pending.range.len(), "a confirmed run has one output per object");
                for (slot, out) in self.outcomes[pending.range.clone()].iter_mut().zip(outputs) {
                    *slot = Some(Ok(out));
                }
                if let Some(prefix) = pending.then_prefix {
                    // The suspect is innocent: the shift happened before it.
                    self.mark_halving(&prefix);
                }
            }
            RunOutcome::Failed { answered, failure } => self.failed(pending, answered, failure),
        }
    }

    fn failed(&mut self, pending: Pending, answered: usize, failure: Failure) {
        let Range { start, end } = pending.range.clone();
        if end - start == 1 {
            self.tries[start] += 1;
            if self.tries[start] > self.retries {
                let message = format!("{}{}", failure.message, times(self.tries[start]));
                self.outcomes[start] = Some(Err(ObjectError { cause: failure.cause, message }));
            } else {
                // Tried again alone, first; a suspect keeps its hold on the prefix.
                self.queue.push_front(pending);
            }
            return;
        }
        let suspect = start + answered;
        let runs = if pending.halve || suspect >= end {
            let mid = start + (end - start) / 2;
            vec![halving(start..mid), halving(mid..end)]
        } else {
            let prefix = (suspect > start).then_some(start..suspect);
            let mut runs = vec![Pending { range: suspect..suspect + 1, halve: false, then_prefix: prefix.clone() }];
            runs.extend(prefix.map(|range| Pending { range, halve: false, then_prefix: None }));
            if suspect + 1 < end {
                runs.push(Pending { range: suspect + 1..end, halve: false, then_prefix: None });
            }
            runs
        };
        for run in runs.into_iter().rev() {
            self.queue.push_front(run);
        }
    }

    /// The queued run of `prefix` is to be searched by halves.
    fn mark_halving(&mut self, prefix: &Range<usize>) {
        if let Some(run) = self.queue.iter_mut().find(|p| p.range == *prefix) {
            run.halve = true;
        }
    }

    /// Whether every object has its outcome.
    #[cfg(test)]
    pub(crate) fn is_done(&self) -> bool {
        self.queue.is_empty()
    }

    /// Gives every object still without an outcome `error` (the command cannot go on).
    pub(crate) fn abandon(&mut self, error: &ObjectError) {
        self.queue.clear();
        for slot in self.outcomes.iter_mut().filter(|slot| slot.is_none()) {
            *slot = Some(Err(error.clone()));
        }
    }

    /// One outcome per object, in order.
    pub(crate) fn finish(self) -> Vec<Result<Outputs, ObjectError>> {
        self.outcomes
            .into_iter()
            .map(|slot| slot.expect("a finished plan gave every object an outcome (is_done or abandon)"))
            .collect()
    }
}

fn halving(range: Range<usize>) -> Pending {
    Pending { range, halve: true, then_prefix: None }
}

/// `, twice` or `, N times` after a failure that was tried more than once.
fn times(tries: u32) -> String {
    match tries {
        0 | 1 => String::new(),
        2 => ", twice".into(),
        n => format!(", {n} times"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crash() -> Failure {
        Failure { cause: Cause::Crash, message: "died".into() }
    }

    fn confirmed(range: &Range<usize>) -> RunOutcome {
        RunOutcome::Confirmed(
            range
                .clone()
                .map(|i| {
                    let mut out = Outputs::default();
                    out.push_json(i.to_string().as_bytes());
                    out
                })
                .collect(),
        )
    }

    /// Plays a plan against a child that fails as `fail` says for each run (None: confirmed),
    /// returning the runs it was given.
    fn play(plan: &mut Plan, mut fail: impl FnMut(&Range<usize>) -> Option<(usize, Failure)>) -> Vec<Range<usize>> {
        let mut runs = Vec::new();
        while let Some(range) = plan.next() {
            runs.push(range.clone());
            assert!(runs.len() < 200, "the plan does not end: {runs:?}");
            let outcome = match fail(&range) {
                None => confirmed(&range),
                Some((answered, failure)) => RunOutcome::Failed { answered, failure },
            };
            plan.record(outcome);
        }
        runs
    }

    fn values(outcomes: &[Result<Outputs, ObjectError>]) -> Vec<Option<String>> {
        outcomes
            .iter()
            .map(|o| o.as_ref().ok().map(|out| String::from_utf8(out.iter().next().unwrap().to_vec()).unwrap()))
            .collect()
    }

    #[test]
    fn a_run_without_failure_is_kept_as_one() {
        let mut plan = Plan::new(5, 1);
        assert_eq!(play(&mut plan, |_| None), vec![0..5]);
        let outcomes = plan.finish();
        assert_eq!(values(&outcomes), (0..5).map(|i| Some(i.to_string())).collect::<Vec<_>>());
    }

    #[test]
    fn a_poison_object_runs_alone_then_the_objects_around_it_are_run_again() {
        let mut plan = Plan::new(10, 1);
        // An in-step child dies on object 4, whatever run it is in.
        let runs = play(&mut plan, |r| r.contains(&4).then(|| (4 - r.start, crash())));
        assert_eq!(runs, vec![0..10, 4..5, 4..5, 0..4, 5..10]);
        let outcomes = plan.finish();
        let err = outcomes[4].as_ref().unwrap_err();
        assert_eq!((err.cause, err.message.as_str()), (Cause::Crash, "died, twice"));
        assert!(outcomes.iter().enumerate().all(|(i, o)| i == 4 || o.is_ok()));
    }

    #[test]
    fn an_extra_line_discards_the_whole_run_and_halves_find_the_object_that_wrote_it() {
        let mut plan = Plan::new(16, 1);
        let extra = Failure { cause: Cause::Transform, message: "two lines".into() };
        // Object 13 gets two lines: every run holding it answers all and then one more.
        let runs = play(&mut plan, |r| r.contains(&13).then(|| (r.len(), extra.clone())));
        assert_eq!(runs[0], 0..16);
        assert!(runs.contains(&(13..14)));
        let alone = runs.iter().filter(|r| **r == (13..14)).count();
        assert_eq!(alone, 2, "tried alone twice: {runs:?}");
        assert!(runs.len() <= 12, "bisection, not one object at a time: {runs:?}");
        let outcomes = plan.finish();
        assert_eq!(outcomes[13].as_ref().unwrap_err().message, "two lines, twice");
        assert!(outcomes.iter().enumerate().all(|(i, o)| i == 13 || o.is_ok()));
    }

    #[test]
    fn a_missing_line_shows_at_the_end_and_an_innocent_suspect_turns_the_search_to_halves() {
        let mut plan = Plan::new(32, 1);
        let timeout = Failure { cause: Cause::Timeout, message: "no answer".into() };
        // Object 5 gets no line: a run holding it answers one line short and then waits, so
        // the child seems to hang on the run's last object.
        let runs = play(&mut plan, |r| r.contains(&5).then(|| (r.len() - 1, timeout.clone())));
        assert_eq!(&runs[..3], &[0..32, 31..32, 0..31], "the last object alone first, innocent");
        assert!(runs.len() <= 16, "halves, not one object at a time: {runs:?}");
        let outcomes = plan.finish();
        assert_eq!(outcomes[5].as_ref().unwrap_err().cause, Cause::Timeout);
        assert!(outcomes.iter().enumerate().all(|(i, o)| i == 5 || o.is_ok()));
    }

    #[test]
    fn a_retry_that_succeeds_keeps_the_object() {
        let mut plan = Plan::new(3, 1);
        let mut failed_once = false;
        play(&mut plan, |r| {
            (r.contains(&1) && !failed_once).then(|| {
                failed_once = r.len() == 1;
                (1 - r.start, crash())
            })
        });
        assert!(plan.finish().iter().all(Result::is_ok));
    }

    #[test]
    fn without_retries_one_failure_alone_dead_letters() {
        let mut plan = Plan::new(3, 0);
        let runs = play(&mut plan, |r| r.contains(&1).then(|| (1 - r.start, crash())));
        assert_eq!(runs, vec![0..3, 1..2, 0..1, 2..3]);
        assert_eq!(plan.finish()[1].as_ref().unwrap_err().message, "died");
    }

    #[test]
    fn abandoning_gives_the_rest_the_error_and_keeps_what_was_confirmed() {
        let mut plan = Plan::new(4, 1);
        plan.record(RunOutcome::Failed { answered: 2, failure: crash() });
        assert_eq!(plan.next(), Some(2..3));
        plan.record(RunOutcome::Failed { answered: 0, failure: crash() });
        plan.record(confirmed(&(2..3)));
        assert_eq!(plan.next(), Some(0..2));
        plan.record(confirmed(&(0..2)));
        plan.abandon(&ObjectError { cause: Cause::Crash, message: "cannot restart".into() });
        assert!(plan.is_done());
        let outcomes = plan.finish();
        assert!(outcomes[..3].iter().all(Result::is_ok));
        assert_eq!(outcomes[3].as_ref().unwrap_err().message, "cannot restart");
    }
}
