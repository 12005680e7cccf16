//! The input scan's duplicate-id check, in bounded memory. Ids are kept as 128-bit hashes, in a
//! hash map while they fit the memory budget (duplicates are then known at once, as each record
//! is read); past the budget every hash is spilled to partition files on disk (the fetcher's
//! state directory) and the duplicates are found after the scan, one partition at a time, by
//! sorting. Memory is then the budget, plus one partition while it is sorted (1/256th of the
//! spilled hashes), plus 4 MiB of write buffers: a 10 M-object input is checked in the same
//! memory as a 1 M-object one.
//!
//! The scan must cut the same chunks whichever way a duplicate was found (a restarted fetcher
//! with another budget resumes the same run), so duplicates found after the scan make it scan
//! again, told where they are ([`Known`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Partition files once the budget is passed.
const PARTITIONS: usize = 256;
/// One spilled entry: hash (16 bytes), order (8), line (8).
const ENTRY: usize = 32;
/// Bytes of one bucket of the map (a 24-byte entry and a control byte).
const BUCKET: usize = 25;

/// The most ids the map may hold within `budget` bytes: the map's buckets are a power of two,
/// 7/8 of them usable, and growing to the next size holds the old table beside the new one
/// (1.5 times the new size), so the largest table that fits with that transient is chosen and
/// never grown past.
fn max_in_memory(budget: usize) -> usize {
    let mut buckets = 8usize;
    while (buckets * 2).saturating_mul(BUCKET * 3 / 2) <= budget {
        buckets *= 2;
    }
    buckets / 8 * 7
}

/// Duplicates the check found: each duplicate's byte offset -> the line of the id's first
/// occurrence. Offsets and lines are the caller's, unique across the whole input (the scan
/// counts both over its objects one after the other, and maps a line back to its object).
pub type Known = HashMap<u64, u64>;

/// Why the check could not use its spill directory.
#[derive(Debug, thiserror::Error)]
#[error("the duplicate-id check cannot {action} {path}: {source}; make room there, or raise the check's memory budget")]
pub struct SpillError {
    action: &'static str,
    path: PathBuf,
    source: io::Error,
}

/// The check's state during one scan.
pub struct DupCheck {
    seen: HashMap<u128, u64>,
    max_in_memory: usize,
    spill_dir: PathBuf,
    spill: Option<Spill>,
    /// Duplicates found so far (in memory: at once; spilled: after [`DupCheck::finish`]).
    found: Known,
}

struct Spill {
    dir: PathBuf,
    files: Vec<BufWriter<File>>,
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn partition(hash: u128) -> usize {
    (hash >> 120) as usize % PARTITIONS
}

impl DupCheck {
    /// A check holding at most `budget` bytes of hashes in memory, spilling under `spill_dir`.
    pub fn new(budget: usize, spill_dir: &Path) -> Self {
        DupCheck {
            seen: HashMap::new(),
            max_in_memory: max_in_memory(budget),
            spill_dir: spill_dir.to_path_buf(),
            spill: None,
            found: Known::new(),
        }
    }

    /// Records the id hash `hash` of the accepted record at `offset` (on `line`). `Some(first)`:
    /// a duplicate of the record on line `first`, known at once; the record must be refused and
    /// is not recorded. `None`: not a duplicate as far as is known now.
    pub fn insert(&mut self, hash: u128, offset: u64, line: u64) -> Result<Option<u64>, SpillError> {
        if self.spill.is_none() {
            if let Some(&first) = self.seen.get(&hash) {
                self.found.insert(offset, first);
                return Ok(Some(first));
            }
            if self.seen.len() < self.max_in_memory {
                self.seen.insert(hash, line);
                return Ok(None);
            }
            self.start_spilling()?;
        }
        self.spilled(hash, offset, line)?;
        Ok(None)
    }

    /// Moves the map to the partition files: from now on every hash goes there. The map's
    /// entries come first in every partition (order 0): they precede all that follows.
    fn start_spilling(&mut self) -> Result<(), SpillError> {
        let dir = self.spill_dir.join(format!(".dup-check-{}", uuid::Uuid::new_v4().simple()));
        let err = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| SpillError { action, path, source }
        };
        std::fs::create_dir_all(&dir).map_err(err("create", &dir))?;
        let mut files = Vec::with_capacity(PARTITIONS);
        for p in 0..PARTITIONS {
            let path = dir.join(format!("{p:03}"));
            files.push(BufWriter::with_capacity(16 << 10, File::create(&path).map_err(err("create", &path))?));
        }
        self.spill = Some(Spill { dir, files });
        for (hash, line) in std::mem::take(&mut self.seen) {
            self.spilled(hash, 0, line)?;
        }
        Ok(())
    }

    fn spilled(&mut self, hash: u128, order: u64, line: u64) -> Result<(), SpillError> {
        let Some(spill) = self.spill.as_mut() else { return Ok(()) };
        let p = partition(hash);
        let mut entry = [0u8; ENTRY];
        entry[..16].copy_from_slice(&hash.to_le_bytes());
        entry[16..24].copy_from_slice(&order.to_le_bytes());
        entry[24..].copy_from_slice(&line.to_le_bytes());
        spill.files[p].write_all(&entry).map_err(|source| SpillError {
            action: "write to",
            path: spill.dir.join(format!("{p:03}")),
            source,
        })
    }

    /// Whether hashes went to disk: then duplicates beyond those reported at once are only
    /// known after [`DupCheck::finish`].
    pub fn spilled_any(&self) -> bool {
        self.spill.is_some()
    }

    /// Ends the check: every duplicate (byte offset -> line of the first occurrence), and
    /// whether some were found only now, after the scan (then the scan must run again with
    /// them known). The spill files are removed.
    pub fn finish(mut self) -> Result<(Known, bool), SpillError> {
        let Some(mut spill) = self.spill.take() else { return Ok((self.found, false)) };
        let mut late = false;
        for p in 0..PARTITIONS {
            let path = spill.dir.join(format!("{p:03}"));
            let err = |action| {
                let path = path.clone();
                move |source| SpillError { action, path, source }
            };
            spill.files[p].flush().map_err(err("write to"))?;
            let mut bytes = Vec::new();
            BufReader::new(File::open(&path).map_err(err("read"))?).read_to_end(&mut bytes).map_err(err("read"))?;
            let mut entries: Vec<(u128, u64, u64)> = bytes
                .chunks_exact(ENTRY)
                .map(|e| {
                    let word = |r: std::ops::Range<usize>| u64::from_le_bytes(e[r].try_into().unwrap_or_default());
                    (u128::from_le_bytes(e[..16].try_into().unwrap_or_default()), word(16..24), word(24..32))
                })
                .collect();
            drop(bytes);
            entries.sort_unstable_by_key(|&(hash, order, _)| (hash, order));
            for group in entries.chunk_by(|a, b| a.0 == b.0) {
                let first = group[0].2;
                for &(_, offset, _) in &group[1..] {
                    self.found.insert(offset, first);
                    late = true;
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        Ok((self.found, late))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(budget_entries: usize, ids: &[u128]) -> (Vec<Option<u64>>, Known, bool, bool) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut check = DupCheck::new(0, dir.path());
        check.max_in_memory = budget_entries;
        let at_once = ids
            .iter()
            .enumerate()
            .map(|(i, id)| check.insert(*id, 10 * (i as u64 + 1), i as u64 + 1).expect("insert"))
            .collect();
        let spilled = check.spilled_any();
        let (known, late) = check.finish().expect("finish");
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
        assert!(left.is_empty(), "spill files are removed");
        (at_once, known, late, spilled)
    }

    #[test]
    fn the_map_with_its_growth_stays_within_the_budget() {
        for budget in [0usize, 1000, 64 << 20, 1 << 30] {
            let ids = max_in_memory(budget);
            let buckets = (ids / 7 * 8).next_power_of_two();
            assert!(buckets * BUCKET * 3 / 2 <= budget.max(8 * BUCKET * 3 / 2), "{budget}: {ids} ids");
        }
        assert_eq!(max_in_memory(64 << 20), 917_504, "64 MiB holds about 0.9 M ids");
    }

    #[test]
    fn within_the_budget_duplicates_are_known_at_once() {
        let (at_once, known, late, spilled) = check(100, &[1, 2, 1, 3, 2, 1]);
        assert_eq!(at_once, vec![None, None, Some(1), None, Some(2), Some(1)]);
        assert!(!late && !spilled);
        assert_eq!(known, Known::from([(30, 1), (50, 2), (60, 1)]));
    }

    #[test]
    fn past_the_budget_the_same_duplicates_are_found_after_the_scan() {
        // Ids spread over partitions (top byte) and repeated before and after the spill.
        let ids: Vec<u128> = [1u128, 2, 1, 3, 2, 1, 4, 3].iter().map(|i| i << 120 | i).collect();
        let (at_once, known, late, spilled) = check(2, &ids);
        assert!(spilled && late);
        // Before the spill (two ids fit) the third record is known at once.
        assert_eq!(at_once[..3], [None, None, Some(1)]);
        assert_eq!(known, Known::from([(30, 1), (50, 2), (60, 1), (80, 4)]));
    }

    #[test]
    fn past_the_budget_without_duplicates_nothing_is_late() {
        let ids: Vec<u128> = (0..1000u128).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)).collect();
        let (at_once, known, late, spilled) = check(10, &ids);
        assert!(spilled && !late && known.is_empty());
        assert!(at_once.iter().all(Option::is_none));
    }
}
