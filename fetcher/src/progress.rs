//! The progress line a person watches with `kubectl logs -f`: at most one a second, only when
//! something moved (or every 30 s while nothing does), and the summary at the end.

use std::time::{Duration, Instant};

use crate::ledger::Ledger;

/// Remembers what was last reported, to rate-limit and to compute rates.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    total_objects: u64,
    last_line: Option<Instant>,
    last_done: u64,
}

impl Progress {
    /// Starts the clock.
    pub fn new(total_objects: u64) -> Self {
        Progress { started: Instant::now(), total_objects, last_line: None, last_done: u64::MAX }
    }

    /// Time since start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Seconds to completion at the average rate so far, if anything is done yet.
    pub fn eta(&self, ledger: &Ledger, now: Instant) -> Option<f64> {
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let done = ledger.objects_done();
        (done > 0 && elapsed > 0.0).then(|| self.total_objects.saturating_sub(done) as f64 * elapsed / done as f64)
    }

    /// The progress line, if one is due (or `force`d, for the last one).
    pub fn line(&mut self, ledger: &Ledger, now: Instant, force: bool) -> Option<String> {
        let moved = ledger.done() + ledger.dead() != self.last_done;
        let due = match self.last_line {
            _ if force => true,
            None => true,
            Some(at) => {
                let since = now.duration_since(at);
                (moved && since >= Duration::from_secs(1)) || since >= Duration::from_secs(30)
            }
        };
        if !due {
            return None;
        }
        self.last_line = Some(now);
        self.last_done = ledger.done() + ledger.dead();
        let elapsed = now.duration_since(self.started).as_secs_f64().max(1e-3);
        let objects = ledger.objects_done();
        let rate = objects as f64 / elapsed;
        let eta = self.eta(ledger, now).map_or_else(|| "?".to_string(), |eta| format!("{eta:.0}s"));
        let total = ledger.len().max(1);
        let stats = ledger.stats();
        Some(format!(
            "progress {}/{} chunks ({:.1}%), {} objects, {:.0} objects/s, ETA {eta}, {} leased, {} re-leased, {} dead-lettered",
            ledger.done(),
            ledger.len(),
            100.0 * (ledger.done() + ledger.dead()) as f64 / total as f64,
            objects,
            rate,
            ledger.leased(),
            stats.re_leases,
            ledger.dead(),
        ))
    }
}
