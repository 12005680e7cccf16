//! Text that came over the network, made safe to log: control characters escaped (a newline in
//! a mapper's name cannot forge a log line), length capped (a malformed message cannot make one
//! warning 200 kB long), and repeated warnings rate-limited per subject (a garbage flood cannot
//! fill the disk with logs: one line per subject per interval, with a count).

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

/// The longest a quoted piece of network text gets in a log line, in bytes (before escaping).
pub const MAX_QUOTED: usize = 200;

/// Displays `text` with control characters escaped (`\n`, `\u{1b}`...) and cut after `max`
/// bytes (at a character boundary) with a note of the full length.
pub struct Escaped<'a> {
    text: &'a str,
    max: usize,
}

/// [`Escaped`] with the default cap, [`MAX_QUOTED`].
pub fn escaped(text: &str) -> Escaped<'_> {
    Escaped { text, max: MAX_QUOTED }
}

/// [`Escaped`] with a cap of `max` bytes.
pub fn escaped_max(text: &str, max: usize) -> Escaped<'_> {
    Escaped { text, max }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut end = self.text.len().min(self.max);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        for c in self.text[..end].chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        if end < self.text.len() {
            write!(f, "… ({} bytes in all)", self.text.len())?;
        }
        Ok(())
    }
}

/// Allows one log line per key per interval and counts the rest, so a flood of the same
/// complaint costs one line per interval, not one per message.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    keys: HashMap<String, (Instant, u64)>,
}

impl RateLimit {
    /// One line per key per `interval`.
    pub fn new(interval: Duration) -> Self {
        RateLimit { interval, keys: HashMap::new() }
    }

    /// `Some(n)` if a line for `key` may be logged now, `n` being how many were held back since
    /// the last one; `None` if it is to be held back (and is counted).
    pub fn allow(&mut self, key: &str, now: Instant) -> Option<u64> {
        // Keys are subjects and reasons: few. Bound them anyway, a flood could vary them.
        if self.keys.len() > 1024 && !self.keys.contains_key(key) {
            self.keys.retain(|_, (at, _)| now.duration_since(*at) < self.interval);
        }
        match self.keys.get_mut(key) {
            Some((at, held)) if now.duration_since(*at) < self.interval => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                self.keys.insert(key.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// The suffix for a rate-limited line: `""`, or ` (and N more like it in the last Ns)`.
pub fn held_back(count: u64, interval: Duration) -> String {
    if count == 0 {
        String::new()
    } else {
        format!(" (and {count} more like it in the last {} s)", interval.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_is_cut() {
        assert_eq!(escaped("m1\nINFO forged\r\x1b[31m").to_string(), "m1\\nINFO forged\\r\\u{1b}[31m");
        let long = "é".repeat(300);
        let shown = escaped(&long).to_string();
        assert!(shown.starts_with("éé") && shown.ends_with("(600 bytes in all)"), "{shown}");
        assert!(shown.len() < 230, "{}", shown.len());
        assert_eq!(escaped_max("abc", 2).to_string(), "ab… (3 bytes in all)");
    }

    #[test]
    fn one_line_per_key_per_interval_with_a_count_of_the_rest() {
        let mut limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.allow("a", t0), Some(0));
        assert_eq!(limit.allow("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.allow("a", t0 + Duration::from_secs(2)), None);
        assert_eq!(limit.allow("b", t0 + Duration::from_secs(2)), Some(0), "keys are apart");
        assert_eq!(limit.allow("a", t0 + Duration::from_secs(11)), Some(2));
        assert_eq!(held_back(2, Duration::from_secs(10)), " (and 2 more like it in the last 10 s)");
    }
}
