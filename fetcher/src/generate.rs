//! The data generator, deterministic (same seed, same bytes): the course's mock users
//! (`--kind users`; friendships are symmetric and only between users of the same 100-object
//! block, each pair with probability 3/50, as the course's mock API does), or shop orders
//! (`--kind orders`: a data set that is not users, for jq and command jobs).

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use transform::digest::InputUser;

const FIRST_NAMES: &[&str] = &[
    "Ada",
    "Alan",
    "Barbara",
    "Brian",
    "Claude",
    "Dennis",
    "Donald",
    "Edsger",
    "Frances",
    "Grace",
    "Guido",
    "Hedy",
    "Ivan",
    "Jean",
    "John",
    "Ken",
    "Leslie",
    "Linus",
    "Margaret",
    "Niklaus",
    "Radia",
    "Richard",
    "Robin",
    "Shafi",
    "Sophie",
    "Tim",
    "Tony",
    "Vint",
    "Whitfield",
    "Yukihiro",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace",
    "Turing",
    "Liskov",
    "Kernighan",
    "Shannon",
    "Ritchie",
    "Knuth",
    "Dijkstra",
    "Allen",
    "Hopper",
    "Rossum",
    "Lamarr",
    "Sutherland",
    "Sammet",
    "Backus",
    "Thompson",
    "Lamport",
    "Torvalds",
    "Hamilton",
    "Wirth",
    "Perlman",
    "Stallman",
    "Milner",
    "Goldwasser",
    "Wilson",
    "Berners-Lee",
    "Hoare",
    "Cerf",
    "Diffie",
    "Matsumoto",
];

/// Users per friendship block.
pub const BLOCK: usize = 100;

/// splitmix64: tiny, fast, and its output never changes with a dependency upgrade, which is what
/// "same seed, byte-identical file" needs. Also the chaos test's fault schedule.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Layout of the generated file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One object per line (what the fetcher reads fastest).
    Jsonl,
    /// One JSON array.
    Array,
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// The course's users (`uuid`, `fn`, `ln`, `friends`): the digest job's data.
    Users,
    /// Shop orders (`order_id`, `customer`, `items` with `sku`, `qty`, `price`, `created`).
    Orders,
}

/// Writes `objects` objects of `kind` generated from `seed` to `output`: into a temporary file
/// beside it, fsynced, then renamed, so a generator killed half-way never leaves a shorter file
/// behind that would look like a new data set.
pub fn generate(kind: Kind, objects: u64, seed: u64, format: OutputFormat, output: &Path) -> std::io::Result<()> {
    let dir = match output.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => {
            std::fs::create_dir_all(parent)?;
            parent.to_path_buf()
        }
        None => std::path::PathBuf::from("."),
    };
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        match kind {
            Kind::Users => write_users(objects, seed, format, &mut out)?,
            Kind::Orders => write_orders(objects, seed, format, &mut out)?,
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, output)?;
        File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

const SKUS: &[&str] = &["kb-101", "ms-202", "mn-303", "hd-404", "ssd-505", "cbl-606", "cam-707", "mic-808"];

/// Writes shop orders: 1 to 5 items each, prices in cents, a customer id, a creation time.
pub fn write_orders(objects: u64, seed: u64, format: OutputFormat, out: &mut impl Write) -> std::io::Result<()> {
    let mut rng = SplitMix64(seed);
    if format == OutputFormat::Array {
        out.write_all(b"[\n")?;
    }
    for n in 0..objects {
        let items: Vec<serde_json::Value> = (0..1 + rng.below(5))
            .map(|_| {
                serde_json::json!({
                    "sku": SKUS[rng.below(SKUS.len() as u64) as usize],
                    "qty": 1 + rng.below(4),
                    "price": 199 + rng.below(20_000),
                })
            })
            .collect();
        let country = ["FI", "SE", "DE", "FR", "JP"][rng.below(5) as usize];
        let order = serde_json::json!({
            "order_id": format!("o-{seed}-{n:09}"),
            "customer": {"id": format!("c-{:06}", rng.below(50_000)), "country": country},
            "items": items,
            "created": 1_764_000_000 + n * 7,
        });
        if format == OutputFormat::Array && n > 0 {
            out.write_all(b",\n")?;
        }
        serde_json::to_writer(&mut *out, &order)?;
        if format == OutputFormat::Jsonl {
            out.write_all(b"\n")?;
        }
    }
    if format == OutputFormat::Array {
        out.write_all(b"\n]\n")?;
    }
    Ok(())
}

/// Writes the users to any writer (the file generator and the benchmarks use it).
pub fn write_users(objects: u64, seed: u64, format: OutputFormat, out: &mut impl Write) -> std::io::Result<()> {
    let mut rng = SplitMix64(seed);
    if format == OutputFormat::Array {
        out.write_all(b"[\n")?;
    }
    let mut written = 0u64;
    while written < objects {
        let size = (objects - written).min(BLOCK as u64) as usize;
        let ids: Vec<String> = (0..size)
            .map(|_| {
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
                bytes[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
                uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
            })
            .collect();
        let mut friends: Vec<Vec<usize>> = vec![Vec::new(); size];
        for i in 0..size {
            for j in i + 1..size {
                if rng.below(50) < 3 {
                    friends[i].push(j);
                    friends[j].push(i);
                }
            }
        }
        for i in 0..size {
            let user = InputUser {
                uuid: Cow::Borrowed(&ids[i]),
                first_name: Cow::Borrowed(FIRST_NAMES[rng.below(FIRST_NAMES.len() as u64) as usize]),
                last_name: Cow::Borrowed(LAST_NAMES[rng.below(LAST_NAMES.len() as u64) as usize]),
                friends: friends[i].iter().map(|&j| Cow::Borrowed(ids[j].as_str())).collect(),
            };
            if format == OutputFormat::Array && written > 0 {
                out.write_all(b",\n")?;
            }
            serde_json::to_writer(&mut *out, &user)?;
            if format == OutputFormat::Jsonl {
                out.write_all(b"\n")?;
            }
            written += 1;
        }
    }
    if format == OutputFormat::Array {
        out.write_all(b"\n]\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(objects: u64, seed: u64) -> Vec<u8> {
        let mut out = Vec::new();
        write_users(objects, seed, OutputFormat::Jsonl, &mut out).expect("in memory");
        out
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        assert_eq!(users(250, 7), users(250, 7));
        assert_ne!(users(250, 7), users(250, 8));
    }

    #[test]
    fn friendships_are_symmetric_within_a_block_at_about_3_in_50() {
        let data = users(1000, 1);
        let parsed: Vec<InputUser> = data
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("valid"))
            .collect();
        assert_eq!(parsed.len(), 1000);
        let position: std::collections::HashMap<&str, usize> =
            parsed.iter().enumerate().map(|(i, u)| (u.uuid.as_ref(), i)).collect();
        let mut pairs = 0usize;
        for (i, user) in parsed.iter().enumerate() {
            for friend in &user.friends {
                let j = position[friend.as_ref()];
                assert_eq!(i / BLOCK, j / BLOCK, "friends across blocks");
                assert!(parsed[j].friends.iter().any(|f| f == &user.uuid), "asymmetric friendship");
                pairs += 1;
            }
        }
        // 10 blocks × 4950 pairs × 3/50 ≈ 2970 friendships, each counted from both sides.
        let friendships = pairs / 2;
        assert!((2600..3350).contains(&friendships), "{friendships} friendships");
        assert!(parsed.iter().all(|u| u.check().is_ok()));
    }

    #[test]
    fn orders_are_objects_with_unique_ids_and_items() {
        let mut out = Vec::new();
        write_orders(500, 2, OutputFormat::Jsonl, &mut out).expect("in memory");
        let orders: Vec<serde_json::Value> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("valid"))
            .collect();
        let ids: std::collections::HashSet<&str> = orders.iter().map(|o| o["order_id"].as_str().expect("id")).collect();
        assert_eq!(ids.len(), 500);
        assert!(orders.iter().all(|o| (1..=5).contains(&o["items"].as_array().expect("items").len())));
    }

    #[test]
    fn a_generated_file_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = dir.path().join("users.jsonl");
        generate(Kind::Users, 300, 1, OutputFormat::Jsonl, &output).expect("generate");
        assert_eq!(std::fs::read(&output).expect("file"), users(300, 1));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("list").flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file stays behind");
    }

    #[test]
    fn array_output_holds_the_same_users() {
        let mut array = Vec::new();
        write_users(120, 3, OutputFormat::Array, &mut array).expect("in memory");
        let from_array: Vec<InputUser> = serde_json::from_slice(&array).expect("valid array");
        let lines = users(120, 3);
        let from_lines: Vec<InputUser> = lines
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("valid"))
            .collect();
        assert_eq!(from_array, from_lines);
    }
}
