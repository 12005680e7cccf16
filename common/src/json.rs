//! Strict JSON: the one definition of "a valid record" that every stage agrees on. RFC 8259
//! text in UTF-8, one value, and no escape that cannot become a Unicode string (a lone UTF-16
//! surrogate such as `"\ud800"` is grammatical but no Rust, Go or Java string can hold it).
//!
//! serde_json alone is not enough for this: when it skips a value it does not need (an unknown
//! field), it checks the grammar but neither the UTF-8 of the skipped strings nor their escapes,
//! so a raw 0xFF byte in an ignored field passed the fetcher's scan and then broke every mapper
//! that had to read the whole chunk.

use serde::de::IgnoredAny;

/// Why some bytes are not one strict JSON value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not UTF-8.
    #[error("invalid UTF-8 at byte {offset} of the record (byte 0x{byte:02X}); JSON text must be UTF-8")]
    Utf8 {
        /// Offset of the first bad byte within the record.
        offset: usize,
        /// The byte.
        byte: u8,
    },
    /// Not JSON, or more than one value.
    #[error("{0}")]
    Syntax(String),
    /// A `\u` escape that names half of a UTF-16 surrogate pair without its other half.
    #[error(
        "a lone UTF-16 surrogate escape (\\u{code:04x}) at byte {offset} of the record; it cannot be a Unicode string"
    )]
    LoneSurrogate {
        /// The escaped code unit.
        code: u16,
        /// Offset of its backslash.
        offset: usize,
    },
    /// Valid JSON, but not an object where an object is required.
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
}

/// Checks that `bytes` are exactly one strict JSON value (surrounding whitespace allowed).
pub fn check_value(bytes: &[u8]) -> Result<(), JsonError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let offset = e.valid_up_to();
        JsonError::Utf8 { offset, byte: bytes.get(offset).copied().unwrap_or(0) }
    })?;
    serde_json::from_str::<IgnoredAny>(text).map_err(|e| JsonError::Syntax(e.to_string()))?;
    // Escapes are rare in practice: only walk the strings when there is a backslash at all.
    if memchr_backslash(bytes) {
        check_escapes(bytes)?;
    }
    Ok(())
}

/// [`check_value`], and the value must be an object: what a record is.
pub fn check_object(bytes: &[u8]) -> Result<(), JsonError> {
    check_value(bytes)?;
    match bytes.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n')) {
        Some(b'{') => Ok(()),
        Some(b'[') => Err(JsonError::NotAnObject("an array")),
        Some(b'"') => Err(JsonError::NotAnObject("a string")),
        Some(b't' | b'f') => Err(JsonError::NotAnObject("a boolean")),
        Some(b'n') => Err(JsonError::NotAnObject("null")),
        _ => Err(JsonError::NotAnObject("a number")),
    }
}

/// `json` (one valid JSON value) without the whitespace outside its strings, so that it fits on
/// one line: a JSON Lines record, a line to a command, a line of the file sink. Borrowed when
/// there was nothing to remove (the usual case: compact JSON).
pub fn compact(json: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let trimmed = {
        let start = json.iter().position(|b| !is_ws(*b)).unwrap_or(json.len());
        let end = json.iter().rposition(|b| !is_ws(*b)).map_or(start, |e| e + 1);
        &json[start..end]
    };
    // Where the first whitespace outside a string is, if anywhere: usually nowhere.
    let mut strings = Strings::default();
    let Some(first) = trimmed.iter().position(|&b| strings.outside(b) && is_ws(b)) else {
        return std::borrow::Cow::Borrowed(trimmed);
    };
    let mut out = Vec::with_capacity(trimmed.len());
    out.extend_from_slice(&trimmed[..first]);
    // Whitespace outside strings changes nothing in `strings`: feeding `first` again is harmless.
    out.extend(trimmed[first..].iter().filter(|&&b| !(strings.outside(b) && is_ws(b))));
    std::borrow::Cow::Owned(out)
}

/// Where a byte-by-byte walk over valid JSON is: inside a string or outside every string. The
/// one copy of the walk that compacting, jq's input shape check and its `-0` marking share;
/// a string's quotes count as inside it, and `\"` does not end a string, `\\"` does.
#[derive(Debug, Default, Clone, Copy)]
pub struct Strings {
    in_string: bool,
    escaped: bool,
}

impl Strings {
    /// Takes the next byte; true when it is outside every string (structure, a number, a
    /// literal, whitespace between tokens).
    pub fn outside(&mut self, b: u8) -> bool {
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            false
        } else if b == b'"' {
            self.in_string = true;
            false
        } else {
            true
        }
    }
}

/// Why serialising one of chunkmill's own types cannot fail: they are derived structs and enums
/// whose maps have string or integer keys, whose values are plain data or [`serde_json::Value`],
/// and none has a hand-written `Serialize` that errors. Should one ever fail, that is a bug in
/// the type, and a loud panic naming it beats writing an empty message, record or fingerprint.
const OWN_TYPE: &str = "serialising one of chunkmill's own types to JSON cannot fail (derived \
    Serialize, string or integer map keys): if it did, the type has a bug";

/// `value` as compact JSON bytes. Only for chunkmill's own types: see [`OWN_TYPE`].
pub fn to_vec_own<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect(OWN_TYPE)
}

/// `value` as compact JSON text. Only for chunkmill's own types: see [`OWN_TYPE`].
pub fn to_string_own<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect(OWN_TYPE)
}

/// `value` as indented JSON text, for files people read. Only for chunkmill's own types.
pub fn to_string_pretty_own<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect(OWN_TYPE)
}

/// `value` as a [`serde_json::Value`]. Only for chunkmill's own types: see [`OWN_TYPE`].
pub fn to_value_own<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect(OWN_TYPE)
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn memchr_backslash(bytes: &[u8]) -> bool {
    bytes.contains(&b'\\')
}

/// The four hex digits at `at`, if there are four.
fn hex4(bytes: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(bytes.get(at..at + 4)?).ok()?;
    u16::from_str_radix(digits, 16).ok()
}

/// Walks the strings of grammatically valid JSON and checks every `\u` surrogate is paired.
fn check_escapes(bytes: &[u8]) -> Result<(), JsonError> {
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match (in_string, bytes[i]) {
            (false, b'"') => in_string = true,
            (true, b'"') => in_string = false,
            (true, b'\\') => {
                let start = i;
                if bytes.get(i + 1) == Some(&b'u') {
                    let code = hex4(bytes, i + 2).unwrap_or(0);
                    i += 6;
                    if (0xD800..0xDC00).contains(&code) {
                        let low = (bytes.get(i) == Some(&b'\\') && bytes.get(i + 1) == Some(&b'u'))
                            .then(|| hex4(bytes, i + 2))
                            .flatten();
                        match low {
                            Some(low) if (0xDC00..0xE000).contains(&low) => i += 6,
                            _ => return Err(JsonError::LoneSurrogate { code, offset: start }),
                        }
                    } else if (0xDC00..0xE000).contains(&code) {
                        return Err(JsonError::LoneSurrogate { code, offset: start });
                    }
                    continue;
                }
                i += 2;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_invalid_byte_in_any_field_is_refused_with_its_offset() {
        let record = b"{\"uuid\":\"0badc0de\",\"note\":\"\xff\"}";
        let err = check_object(record).unwrap_err();
        assert_eq!(err, JsonError::Utf8 { offset: 27, byte: 0xFF });
        assert!(err.to_string().contains("0xFF"), "{err}");
    }

    #[test]
    fn lone_surrogates_are_refused_and_pairs_and_escaped_backslashes_are_not() {
        assert!(matches!(check_object(br#"{"a":"\ud800"}"#), Err(JsonError::LoneSurrogate { code: 0xd800, .. })));
        assert!(matches!(check_object(br#"{"a":"x\udc00"}"#), Err(JsonError::LoneSurrogate { code: 0xdc00, .. })));
        assert!(matches!(check_object(br#"{"a":"\ud800\u0041"}"#), Err(JsonError::LoneSurrogate { .. })));
        assert_eq!(check_object(br#"{"a":"\ud83d\ude00 \u00e9 \\ud800 \"\\"}"#), Ok(()));
        assert_eq!(check_object(br#"{"\\":"\\u","b":"\u0000"}"#), Ok(()));
    }

    #[test]
    fn compacting_removes_whitespace_outside_strings_only() {
        assert_eq!(&*compact(b" {\"a b\": [1, \"x \\\" y\"],\n \"c\":\t2} "), b"{\"a b\":[1,\"x \\\" y\"],\"c\":2}");
        assert!(matches!(compact(b"{\"a\":1}"), std::borrow::Cow::Borrowed(_)));
        assert!(matches!(compact(b"{\"name\":\"Ada Lovelace\"}"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn the_string_walk_sees_quotes_escapes_and_backslashes_as_inside() {
        let json = br#"{"a\"b":["x\\", -0 ,"\\\""],"c":1}"#;
        let mut strings = Strings::default();
        let outside: Vec<u8> = json.iter().copied().filter(|&b| strings.outside(b)).collect();
        assert_eq!(outside, b"{:[, -0 ,],:1}");
    }

    #[test]
    fn our_own_types_serialise_as_serde_json_would() {
        #[derive(serde::Serialize)]
        struct Own<'a> {
            run: &'a str,
            chunks: std::collections::BTreeMap<u32, bool>,
        }
        let own = Own { run: "r1", chunks: [(7, true)].into() };
        assert_eq!(to_vec_own(&own), br#"{"run":"r1","chunks":{"7":true}}"#);
        assert_eq!(to_string_own(&own), r#"{"run":"r1","chunks":{"7":true}}"#);
        assert_eq!(to_value_own(&own), serde_json::json!({"run": "r1", "chunks": {"7": true}}));
        assert!(to_string_pretty_own(&own).contains("\n  \"run\": \"r1\""));
    }

    #[test]
    #[should_panic(expected = "serialising one of chunkmill's own types to JSON cannot fail")]
    fn a_type_that_cannot_serialise_panics_loudly_instead_of_giving_empty_bytes() {
        // A map with non-string keys is the one way a derived type can fail in serde_json.
        let bad: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        to_vec_own(&bad);
    }

    #[test]
    fn grammar_and_shape_errors_are_reported() {
        assert!(matches!(check_object(br#"{"a":01}"#), Err(JsonError::Syntax(_))));
        assert!(matches!(check_object(b"{\"a\":\"x\x01\"}"), Err(JsonError::Syntax(_))));
        assert!(matches!(check_object(br#"{"a":1} {"b":2}"#), Err(JsonError::Syntax(_))));
        assert_eq!(check_object(b"[1]"), Err(JsonError::NotAnObject("an array")));
        assert_eq!(check_object(b"  7 "), Err(JsonError::NotAnObject("a number")));
        assert_eq!(check_value(b" [1, \"\xc3\xa9\"] "), Ok(()));
    }
}
