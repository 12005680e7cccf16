//! What a person watches with `kubectl logs -f`: a progress line every `--progress-interval`
//! (10 s) or every `--progress-step` percent (1 %) of the run, whichever comes first (at most one
//! a second), with the run id and every number as fields of the line in JSON logs; the rate and
//! the ETA (`3h25m`) over the last minute of progress, never since the process started (a
//! fetcher resumed at 90 % has done nothing yet, however many chunks it recovered); lease
//! expiries summed into one line per interval; "no mapper has asked for work for 30 s" when the
//! fleet is gone; and the summary at the end. On a terminal (a local run) a progress bar replaces
//! the lines.
//!
//! The parts with state ([`Rate`], [`Expiries`], [`Pace`]) are pure and take the time as an
//! argument, so they are tested without a clock.

use std::collections::{BTreeSet, VecDeque};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::ledger::Ledger;

/// How far back the rate looks: long enough to smooth over chunk-sized steps, short enough to
/// follow a fleet that grew or shrank.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Mappers silent this long make the fleet "gone": said once, then on every progress line.
pub(crate) const FLEET_GONE: Duration = Duration::from_secs(30);
/// The shortest gap between two progress lines, however fast the run.
const MIN_GAP: Duration = Duration::from_secs(1);
/// Chunks and mappers named in a lease-expiry line; the rest are counted.
const NAMED: usize = 8;

/// The progress milestone (0, 10, ... 90) that `finished` of `total` chunks has passed; 100 % is
/// not a milestone (the run's completion is announced instead).
pub(crate) fn milestone(finished: u64, total: u64) -> u32 {
    if total == 0 {
        return 0;
    }
    ((finished * 100 / total) as u32 / 10 * 10).min(90)
}

/// A duration for people: `42s`, `25m10s`, `3h25m`, `2d3h`.
pub(crate) fn human(duration: Duration) -> String {
    let s = duration.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// When progress lines are due: `--progress-interval` and `--progress-step`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// A line at least this often while the run is not complete.
    pub(crate) interval: Duration,
    /// And a line each time this many percent more of the run's chunks are finished (0: only
    /// by time).
    pub(crate) step_percent: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { interval: Duration::from_secs(10), step_percent: 1.0 }
    }
}

/// Decides when a progress line is due (pure: the caller gives the time and the percentage).
#[derive(Debug)]
pub(crate) struct Pace {
    settings: Settings,
    last: Option<(Instant, f64)>,
}

impl Pace {
    /// Nothing said yet.
    pub(crate) fn new(settings: Settings) -> Self {
        Pace { settings, last: None }
    }

    /// Whether a line is due at `now` with `percent` of the run finished; if so, it counts as
    /// said.
    pub(crate) fn due(&mut self, now: Instant, percent: f64) -> bool {
        let due = match self.last {
            None => true,
            Some((at, said)) => {
                let since = now.saturating_duration_since(at);
                let step = self.settings.step_percent > 0.0 && percent - said >= self.settings.step_percent;
                since >= self.settings.interval || (step && since >= MIN_GAP)
            }
        };
        if due {
            self.last = Some((now, percent));
        }
        due
    }
}

/// The rate of recent progress: objects done, sampled at most once a second, over the last
/// [`RATE_WINDOW`].
#[derive(Debug, Default)]
pub(crate) struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    /// Records that `done` objects are done at `now` (the first call is the baseline: what a
    /// resumed fetcher recovered counts as no progress).
    pub(crate) fn record(&mut self, now: Instant, done: u64) {
        if self.samples.back().is_some_and(|(at, _)| now.saturating_duration_since(*at) < MIN_GAP) {
            if let Some(last) = self.samples.back_mut() {
                last.1 = last.1.max(done);
            }
            return;
        }
        self.samples.push_back((now, done));
        // Keep one sample at or before the window's start, as the base of the rate.
        while self.samples.len() > 2 && self.samples[1].0 + RATE_WINDOW <= now {
            self.samples.pop_front();
        }
    }

    /// Objects a second from the oldest sample in the window to `now`: `None` until a second of
    /// samples exists, 0 when nothing moved.
    pub(crate) fn per_second(&self, now: Instant) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let span = now.saturating_duration_since(first.0).as_secs_f64();
        (span >= 1.0).then(|| last.1.saturating_sub(first.1) as f64 / span)
    }

    /// Seconds until `remaining` objects are done at the recent rate; `None` while it is unknown
    /// or zero.
    pub(crate) fn eta(&self, now: Instant, remaining: u64) -> Option<f64> {
        self.per_second(now).filter(|rate| *rate > 0.0).map(|rate| remaining as f64 / rate)
    }
}

/// Lease expiries since the last summary: how many, which chunks and whose leases.
#[derive(Debug, Default)]
pub(crate) struct Expiries {
    count: u64,
    chunks: Vec<u32>,
    mappers: BTreeSet<String>,
    last: Option<Instant>,
}

impl Expiries {
    /// A lease of `chunk` held by `mapper` expired.
    pub(crate) fn add(&mut self, chunk: u32, mapper: &str) {
        self.count += 1;
        if self.chunks.len() < NAMED {
            self.chunks.push(chunk);
        }
        if self.mappers.len() < NAMED {
            self.mappers.insert(mapper.to_string());
        }
    }

    /// The summary of the expiries since the last one, once `interval` has passed since then
    /// (the first at once).
    pub(crate) fn summary(&mut self, now: Instant, interval: Duration) -> Option<String> {
        if self.count == 0 || self.last.is_some_and(|at| now.saturating_duration_since(at) < interval) {
            return None;
        }
        let more = |shown: usize, all: u64| if all > shown as u64 { ", ..." } else { "" };
        let chunks: Vec<String> = self.chunks.iter().map(u32::to_string).collect();
        let mappers: Vec<&str> = self.mappers.iter().map(String::as_str).collect();
        let line = format!(
            "{} lease{} expired (chunks {}{}; held by {}{}); those chunks are handed out again",
            self.count,
            if self.count == 1 { "" } else { "s" },
            chunks.join(", "),
            more(chunks.len(), self.count),
            common::text::escaped(&mappers.join(", ")),
            if self.mappers.len() >= NAMED { ", ..." } else { "" },
        );
        *self = Expiries { last: Some(now), ..Expiries::default() };
        Some(line)
    }
}

/// One progress line's numbers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Line {
    /// Chunks done.
    pub(crate) done: u64,
    /// Chunks in the run.
    pub(crate) chunks: u64,
    /// Percent of the chunks finished (done or dead-lettered).
    pub(crate) percent: f64,
    /// Objects saved.
    pub(crate) objects_done: u64,
    /// Objects a second over the last minute, if known.
    pub(crate) rate: Option<f64>,
    /// Seconds to completion at that rate, if known.
    pub(crate) eta: Option<f64>,
    /// Chunks leased now.
    pub(crate) leased: u64,
    /// Leases granted for chunks leased before.
    pub(crate) re_leased: u64,
    /// Chunks dead-lettered.
    pub(crate) dead: u64,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.rate.map_or_else(|| "?".to_string(), |r| format!("{r:.0}"));
        let eta = self.eta.map_or_else(|| "?".to_string(), |e| human(Duration::from_secs_f64(e)));
        write!(
            f,
            "progress {}/{} chunks ({:.1}%), {} objects, {rate} objects/s, ETA {eta}, {} leased, {} re-leased, {} dead-lettered",
            self.done, self.chunks, self.percent, self.objects_done, self.leased, self.re_leased, self.dead
        )
    }
}

/// The progress of one run, as the fetcher reports it.
#[derive(Debug)]
pub(crate) struct Progress {
    started: Instant,
    total_objects: u64,
    pace: Pace,
    rate: Rate,
    expiries: Expiries,
    interval: Duration,
    /// When a mapper last asked for work (or the fetcher started serving), and whether the
    /// fleet's absence was said.
    asked: (Instant, bool),
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Starts the clock.
    pub(crate) fn new(total_objects: u64, settings: Settings) -> Self {
        let now = Instant::now();
        Progress {
            started: now,
            total_objects,
            pace: Pace::new(settings),
            rate: Rate::default(),
            expiries: Expiries::default(),
            interval: settings.interval,
            asked: (now, false),
            bar: None,
        }
    }

    /// Shows a progress bar over `chunks` instead of progress lines when stderr is a terminal and
    /// logs are for people (not `LOG_FORMAT=json`).
    pub(crate) fn with_bar_on_terminal(mut self, chunks: u64) -> Self {
        if std::io::stderr().is_terminal() && !common::telemetry::json_logs() {
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
    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }

    /// Time since start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Takes in the ledger's state at `now` (every tick).
    pub(crate) fn observe(&mut self, ledger: &Ledger, now: Instant) {
        self.rate.record(now, ledger.objects_done());
    }

    /// Objects a second over the last minute, if known.
    pub(crate) fn rate(&self, now: Instant) -> Option<f64> {
        self.rate.per_second(now)
    }

    /// Seconds to completion at the recent rate, if known.
    pub(crate) fn eta(&self, ledger: &Ledger, now: Instant) -> Option<f64> {
        self.rate.eta(now, self.total_objects.saturating_sub(ledger.objects_done()))
    }

    /// A mapper asked for work at `now`.
    pub(crate) fn asked(&mut self, now: Instant) {
        if self.asked.1 {
            tracing::info!("a mapper asks for work again");
        }
        self.asked = (now, false);
    }

    /// A lease of `chunk` held by `mapper` expired (summed into one line per interval).
    pub(crate) fn expired(&mut self, chunk: u32, mapper: &str) {
        self.expiries.add(chunk, mapper);
    }

    /// "no mapper has asked for work for 45s" once mappers have been silent for [`FLEET_GONE`].
    pub(crate) fn fleet_gone(&self, now: Instant) -> Option<String> {
        let silent = now.saturating_duration_since(self.asked.0);
        (silent >= FLEET_GONE).then(|| format!("no mapper has asked for work for {}", human(silent)))
    }

    /// What is due at `now` on a tick of an unfinished run: the expiry summary, the fleet's
    /// absence (once per lapse), and the progress line, each logged; `note` is appended to the
    /// line (e.g. that the mappers asking cannot run the job).
    pub(crate) fn tick(&mut self, run: &str, ledger: &Ledger, now: Instant, note: Option<&str>) {
        if let Some(line) = self.expiries.summary(now, self.interval) {
            tracing::warn!(run, "{line}");
        }
        let gone = self.fleet_gone(now);
        if let (Some(gone), false) = (&gone, self.asked.1) {
            self.asked.1 = true;
            tracing::warn!(run, "{gone}: are the mappers running and connected to this NATS?");
        }
        let note = [note.map(str::to_string), gone].into_iter().flatten().collect::<Vec<_>>().join("; ");
        self.report(run, ledger, now, false, Some(note.as_str()).filter(|n| !n.is_empty()));
    }

    /// Logs the progress line if it is due (or `force`d, for the last one).
    pub(crate) fn report(&mut self, run: &str, ledger: &Ledger, now: Instant, force: bool, note: Option<&str>) {
        let line = self.line(ledger, now);
        if let Some(bar) = &self.bar {
            bar.set_position(ledger.done() + ledger.dead());
            bar.set_message(format!("{line}{}", note.map(|n| format!("; {n}")).unwrap_or_default()));
            return;
        }
        if !self.pace.due(now, line.percent) && !force {
            return;
        }
        let note = note.map(|n| format!("; {n}")).unwrap_or_default();
        tracing::info!(
            run,
            chunks_done = line.done,
            chunks = line.chunks,
            percent = line.percent,
            objects_done = line.objects_done,
            objects_per_second = line.rate,
            eta_seconds = line.eta,
            leased = line.leased,
            re_leased = line.re_leased,
            dead_lettered = line.dead,
            "{line}{note}"
        );
    }

    /// The numbers of a progress line at `now`.
    pub(crate) fn line(&self, ledger: &Ledger, now: Instant) -> Line {
        let finished = ledger.done() + ledger.dead();
        Line {
            done: ledger.done(),
            chunks: ledger.len() as u64,
            percent: 100.0 * finished as f64 / (ledger.len().max(1)) as f64,
            objects_done: ledger.objects_done(),
            rate: self.rate(now),
            eta: self.eta(ledger, now),
            leased: ledger.leased() as u64,
            re_leased: ledger.stats().re_leases,
            dead: ledger.dead(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

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

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_secs(0)), "0s");
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(25 * 60 + 7)), "25m07s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 25 * 60 + 59)), "3h25m");
        assert_eq!(human(Duration::from_secs(2 * 86400 + 3 * 3600 + 10)), "2d3h");
    }

    #[test]
    fn a_line_is_due_every_interval_or_every_step_but_not_twice_a_second() {
        let start = Instant::now();
        let mut pace = Pace::new(Settings { interval: Duration::from_secs(10), step_percent: 1.0 });
        assert!(pace.due(start, 0.0), "the first line at once");
        assert!(!pace.due(at(start, 5), 0.5), "neither 10 s nor 1 % yet");
        assert!(pace.due(at(start, 6), 1.2), "1 % more");
        assert!(!pace.due(at(start, 6) + Duration::from_millis(500), 9.0), "at most one a second");
        assert!(pace.due(at(start, 16), 1.2), "10 s without progress");
        let mut by_time = Pace::new(Settings { interval: Duration::from_secs(10), step_percent: 0.0 });
        assert!(by_time.due(start, 0.0));
        assert!(!by_time.due(at(start, 9), 50.0), "step 0: by time only");
        assert!(by_time.due(at(start, 10), 50.0));
    }

    #[test]
    fn a_resumed_run_has_no_rate_until_it_makes_progress_of_its_own() {
        let start = Instant::now();
        let mut rate = Rate::default();
        rate.record(start, 90_000); // recovered from the ledger: not this process's progress
        assert_eq!(rate.per_second(start), None, "no second of samples yet");
        rate.record(at(start, 5), 90_000);
        assert_eq!(rate.per_second(at(start, 5)), Some(0.0), "nothing moved");
        assert_eq!(rate.eta(at(start, 5), 10_000), None, "no ETA at rate 0 (never `0s`)");
        rate.record(at(start, 10), 91_000);
        assert_eq!(rate.per_second(at(start, 10)), Some(100.0));
        assert_eq!(rate.eta(at(start, 10), 9_000), Some(90.0));
    }

    #[test]
    fn the_rate_follows_the_last_minute_not_the_whole_run() {
        let start = Instant::now();
        let mut rate = Rate::default();
        for s in 0..=120 {
            // 1000 objects a second for a minute, then 100 a second.
            let done = if s <= 60 { s * 1000 } else { 60_000 + (s - 60) * 100 };
            rate.record(at(start, s), done);
        }
        let now = at(start, 120);
        assert_eq!(rate.per_second(now), Some(100.0), "{:?}", rate.samples.front());
        assert!(rate.samples.len() <= 62, "samples are bounded: {}", rate.samples.len());
        // A stall lowers the rate as time passes without progress.
        assert!(rate.per_second(at(start, 150)).is_some_and(|r| r < 100.0));
    }

    #[test]
    fn samples_closer_than_a_second_are_merged() {
        let start = Instant::now();
        let mut rate = Rate::default();
        for ms in 0..1000 {
            rate.record(start + Duration::from_millis(ms), ms);
        }
        assert_eq!(rate.samples.len(), 1);
        assert_eq!(rate.samples[0].1, 999, "the latest count is kept");
    }

    #[test]
    fn expiries_are_summed_into_one_line_per_interval() {
        let start = Instant::now();
        let mut expiries = Expiries::default();
        assert_eq!(expiries.summary(start, Duration::from_secs(10)), None, "nothing expired");
        expiries.add(3, "mapper-a");
        let first = expiries.summary(start, Duration::from_secs(10)).expect("the first at once");
        assert!(first.starts_with("1 lease expired (chunks 3; held by mapper-a)"), "{first}");
        for chunk in 10..30 {
            expiries.add(chunk, if chunk % 2 == 0 { "mapper-b" } else { "mapper-c" });
        }
        assert_eq!(expiries.summary(at(start, 5), Duration::from_secs(10)), None, "within the interval");
        let line = expiries.summary(at(start, 10), Duration::from_secs(10)).expect("after it");
        assert!(
            line.starts_with(
                "20 leases expired (chunks 10, 11, 12, 13, 14, 15, 16, 17, ...; held by mapper-b, mapper-c)"
            ),
            "{line}"
        );
        assert_eq!(expiries.summary(at(start, 30), Duration::from_secs(10)), None, "none since");
    }

    #[test]
    fn the_fleet_is_gone_after_thirty_silent_seconds() {
        let mut progress = Progress::new(100, Settings::default());
        let start = progress.started;
        assert_eq!(progress.fleet_gone(at(start, 29)), None);
        assert_eq!(progress.fleet_gone(at(start, 45)).as_deref(), Some("no mapper has asked for work for 45s"));
        progress.asked(at(start, 50));
        assert_eq!(progress.fleet_gone(at(start, 60)), None);
        assert_eq!(
            progress.fleet_gone(at(start, 50 + 3 * 3600)).as_deref(),
            Some("no mapper has asked for work for 3h00m")
        );
    }
}
