//! Test hooks: crash points of the object-store sink, reached on purpose by tests/object_sink.rs.
//!
//! `CHUNKMILL_TEST_ABORT_AT=<point>:<n>` in a saver's environment makes it abort (as a SIGKILL
//! would leave the store: nothing flushed, nothing cleaned up) the `n`-th time it reaches
//! `<point>`. Never set it outside tests; a value that does not parse is ignored, as an unset
//! one is (the hook must not change a production saver's behaviour whatever its environment).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Where a saver can be made to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Point {
    /// A staged batch's data object is written, its index not: the chunks are not saved.
    StagedData,
    /// A staged batch's index is written (its chunks are saved), no acknowledgement sent.
    StagedIndex,
    /// A committed part's upload is started and written to, not finished: nothing visible.
    MidUpload,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::StagedData => "staged-data",
            Point::StagedIndex => "staged-index",
            Point::MidUpload => "mid-upload",
        }
    }
}

/// `<point>:<n>` parsed.
fn parse(value: &str) -> Option<(&str, usize)> {
    let (point, n) = value.trim().split_once(':')?;
    Some((point, n.parse().ok().filter(|&n| n > 0)?))
}

/// Aborts the process if this is the configured point's n-th passage.
pub(crate) fn reached(point: Point) {
    static CONFIG: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static PASSED: AtomicUsize = AtomicUsize::new(0);
    let config = CONFIG.get_or_init(|| {
        let value = std::env::var("CHUNKMILL_TEST_ABORT_AT").ok()?;
        parse(&value).map(|(point, n)| (point.to_string(), n))
    });
    let Some((wanted, n)) = config else { return };
    if wanted != point.name() {
        return;
    }
    if PASSED.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        tracing::error!("test hook CHUNKMILL_TEST_ABORT_AT={wanted}:{n}: aborting at {}", point.name());
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_and_a_positive_count_parse_and_anything_else_is_no_hook() {
        assert_eq!(parse("staged-index:2"), Some(("staged-index", 2)));
        assert_eq!(parse(" mid-upload:1\n"), Some(("mid-upload", 1)));
        assert_eq!(parse("staged-data:0"), None);
        assert_eq!(parse("staged-data"), None);
        assert_eq!(parse("staged-data:x"), None);
    }
}
