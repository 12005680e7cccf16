//! The progress line a person watches with `kubectl logs -f`: at most one a second, only when
//! something moved (or every 30 s while nothing does), and the summary at the end. On a terminal
//! (a local run) a progress bar replaces the lines.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::ledger::Ledger;

/// The progress milestone (0, 10, ... 90) that `finished` of `total` chunks has passed; 100 % is
/// not a milestone (the run's completion is announced instead).
pub fn milestone(finished: u64, total: u64) -> u32 {
    if total == 0 {
        return 0;
    }
    ((finished * 100 / total) as u32 / 10 * 10).min(90)
}

/// Remembers what was last reported, to rate-limit and to compute rates.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    total_objects: u64,
    last_line: Option<Instant>,
    last_done: u64,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Starts the clock.
    pub fn new(total_objects: u64) -> Self {
        Progress { started: Instant::now(), total_objects, last_line: None, last_done: u64::MAX, bar: None }
    }

    /// Shows a progress bar over `chunks` instead of progress lines when stderr is a terminal and
    /// logs are for people (not `LOG_FORMAT=json`).
    pub fn with_bar_on_terminal(mut self, chunks: u64) -> Self {
        let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
        if std::io::stderr().is_terminal() && !json {
            let bar = ProgressBar::new(chunks);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {pos}/{len} chunks ({percent}%) {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            self.bar = Some(bar);
        }
        self
    }

    /// Removes the bar (before the summary is logged).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
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

    /// The progress line, if one is due (or `force`d, for the last one); `note` is appended
    /// (e.g. that the mappers asking cannot run the job).
    pub fn line(&mut self, ledger: &Ledger, now: Instant, force: bool, note: Option<&str>) -> Option<String> {
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
        let note = note.map(|n| format!("; {n}")).unwrap_or_default();
        if let Some(bar) = &self.bar {
            bar.set_position(ledger.done() + ledger.dead());
            bar.set_message(format!(
                "{objects} objects, {rate:.0}/s, ETA {eta}, {} leased, {} re-leased{note}",
                ledger.leased(),
                stats.re_leases
            ));
            return None;
        }
        Some(format!(
            "progress {}/{} chunks ({:.1}%), {} objects, {:.0} objects/s, ETA {eta}, {} leased, {} re-leased, {} dead-lettered{note}",
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

#[cfg(test)]
mod tests {
    use super::milestone;

    #[test]
    fn milestones_are_tens_below_a_hundred() {
        assert_eq!(milestone(0, 200), 0);
        assert_eq!(milestone(19, 200), 0);
        assert_eq!(milestone(20, 200), 10);
        assert_eq!(milestone(199, 200), 90);
        assert_eq!(milestone(200, 200), 90, "100 % is the completion, not a milestone");
        assert_eq!(milestone(1, 3), 30, "a small run jumps straight to the highest milestone passed");
        assert_eq!(milestone(0, 0), 0);
    }
}
