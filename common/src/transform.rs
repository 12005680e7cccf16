//! The transform every chunk goes through: an input user becomes a mapped record whose `digest`
//! is SHA-256 iterated `rounds` times. The mapper runs it; `saver verify` recomputes it to check
//! a sink. It is deterministic: the same input and rounds always give the same bytes.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Rounds of SHA-256 per object by default: about 27 CPU-seconds for 100 000 objects on the
/// project's 2-core machine (about 90 ns per SHA-256 with SHA extensions), so the job is visibly heavy.
pub const DEFAULT_ROUNDS: u32 = 3000;

/// One input object, as the course's mock API produces it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct InputUser<'a> {
    /// The user's id; must be a UUID.
    #[serde(borrow)]
    pub uuid: Cow<'a, str>,
    /// First name.
    #[serde(rename = "fn", borrow)]
    pub first_name: Cow<'a, str>,
    /// Last name.
    #[serde(rename = "ln", borrow)]
    pub last_name: Cow<'a, str>,
    /// Ids of the user's friends.
    #[serde(borrow)]
    pub friends: Vec<Cow<'a, str>>,
}

impl InputUser<'_> {
    /// Rules beyond the JSON shape: the id must be a UUID.
    pub fn check(&self) -> Result<(), String> {
        uuid::Uuid::try_parse(&self.uuid)
            .map(|_| ())
            .map_err(|e| format!("field `uuid` is not a UUID ({:?}: {e})", self.uuid))
    }
}

/// One output record.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub struct MappedUser {
    /// The input's `uuid`.
    pub id: String,
    /// `fn + " " + ln`.
    pub name: String,
    /// Number of friends.
    pub friends: u64,
    /// Lowercase hex of SHA-256 iterated `rounds` times, or "" for zero rounds.
    pub digest: String,
}

/// Parses and checks one input object.
pub fn parse_input(bytes: &[u8]) -> Result<InputUser<'_>, String> {
    let user: InputUser = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    user.check()?;
    Ok(user)
}

/// Maps one user: the CPU-heavy part of the pipeline.
pub fn transform(user: &InputUser<'_>, rounds: u32) -> MappedUser {
    let name = format!("{} {}", user.first_name, user.last_name);
    let digest = digest(&user.uuid, &name, rounds);
    MappedUser { id: user.uuid.to_string(), name, friends: user.friends.len() as u64, digest }
}

/// SHA-256 of `id:name`, then of each previous 32-byte digest, `rounds` times in all.
pub fn digest(id: &str, name: &str, rounds: u32) -> String {
    if rounds == 0 {
        return String::new();
    }
    let mut hasher = Sha256::new();
    hasher.update(id.as_bytes());
    hasher.update(b":");
    hasher.update(name.as_bytes());
    let mut current: [u8; 32] = hasher.finalize().into();
    for _ in 1..rounds {
        current = Sha256::digest(current).into();
    }
    let mut hex = String::with_capacity(64);
    for byte in current {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    // The expected digests in testdata/ were computed outside Rust:
    //   digest-1.txt:    printf 'abc:Ada Lovelace' | sha256sum
    //   digest-2.txt:    printf 'abc:Ada Lovelace' | sha256sum | xxd -r -p | sha256sum
    //   digest-1000.txt: the same with Python's hashlib, 1000 rounds

    #[test]
    fn zero_rounds_give_an_empty_digest() {
        assert_eq!(digest("abc", "Ada Lovelace", 0), "");
    }

    #[test]
    fn digest_matches_sha256sum() {
        assert_eq!(digest("abc", "Ada Lovelace", 1), include_str!("../testdata/digest-1.txt").trim());
        assert_eq!(digest("abc", "Ada Lovelace", 2), include_str!("../testdata/digest-2.txt").trim());
        assert_eq!(digest("abc", "Ada Lovelace", 1000), include_str!("../testdata/digest-1000.txt").trim());
    }

    #[test]
    fn transform_builds_name_and_counts_friends() {
        let input = parse_input(
            br#"{"uuid":"6f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11","fn":"Ada","ln":"Lovelace","friends":["x","y"]}"#,
        )
        .expect("valid");
        let out = transform(&input, 0);
        assert_eq!(out.name, "Ada Lovelace");
        assert_eq!(out.friends, 2);
        assert_eq!(out.id, "6f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11");
    }

    #[test]
    fn bad_inputs_are_errors_with_the_field_named() {
        assert!(parse_input(br#"{"uuid":"u","fn":"A","ln":"B","friends":[]}"#).unwrap_err().contains("uuid"));
        assert!(
            parse_input(br#"{"uuid":"6f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11","fn":1,"ln":"B","friends":[]}"#).is_err()
        );
        assert!(parse_input(br#"{"fn":"A","ln":"B","friends":[]}"#).unwrap_err().contains("uuid"));
    }
}
