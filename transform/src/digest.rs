//! The digest transform, for the course's users data: `{"uuid", "fn", "ln", "friends"}` becomes
//! `{"id", "name", "friends", "digest"}`, `digest` being SHA-256 iterated `rounds` times. It is
//! deterministic: the same input and rounds always give the same bytes. The users schema is its
//! own rule (other jobs take any JSON object), checked up front by the fetcher's scan through
//! [`Transform::check`].

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{ObjectError, Outputs, Transform};

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

/// The digest transform at a number of rounds.
#[derive(Debug, Clone, Copy)]
pub struct DigestTransform {
    /// SHA-256 rounds per object.
    pub rounds: u32,
}

impl Transform for DigestTransform {
    fn apply(&self, input: &[u8], out: &mut Outputs) -> Result<(), ObjectError> {
        let user = parse_input(input).map_err(ObjectError::refused)?;
        out.push(&transform(&user, self.rounds))
    }

    fn check(&self, input: &[u8]) -> Result<(), String> {
        parse_input(input).map(|_| ())
    }
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

#[cfg(test)]
mod transform_tests {
    use super::*;

    #[test]
    fn the_output_is_todays_record_in_its_key_order() {
        let input =
            br#"{"uuid":"c15c0289-ec2d-4a91-a7ec-8e65a18debbe","fn":"Linus","ln":"Cerf","friends":["a","b"],"x":1}"#;
        let mut out = Outputs::default();
        DigestTransform { rounds: 1 }.apply(input, &mut out).unwrap();
        let value = std::str::from_utf8(out.iter().next().unwrap()).unwrap().to_string();
        assert_eq!(
            value,
            r#"{"id":"c15c0289-ec2d-4a91-a7ec-8e65a18debbe","name":"Linus Cerf","friends":2,"digest":"81ebda13a0e8e6e6057d4e17e2eb170a62633c5c8fe07289fe8ac98f9388a995"}"#
        );
        let err = DigestTransform { rounds: 1 }.apply(br#"{"uuid":"nope"}"#, &mut out).unwrap_err();
        assert_eq!(err.cause, crate::Cause::Transform);
    }

    #[test]
    fn urn_prefixes_are_accepted_in_any_case() {
        for id in ["urn:uuid:6f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11", "URN:UUID:6F1C2F64-3B7E-4B8E-9A51-0C7D2B0C9D11"] {
            let input = format!(r#"{{"uuid":"{id}","fn":"A","ln":"B","friends":[]}}"#);
            assert!(DigestTransform { rounds: 0 }.check(input.as_bytes()).is_ok(), "{id}");
        }
    }
}
