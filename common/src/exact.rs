//! JSON values exactly as their text says: a number as written (never through a double), every
//! member of an object in order, a repeated key included. serde_json's `Value` rounds numbers to
//! `f64` and keeps the last of repeated keys, so a comparison through it calls
//! `0.1000000000000000000001` and `0.1` equal, and `{"a":"forged","a":1}` and `{"a":1}` too:
//! `saver verify` compares with [`Value::same`] instead, after the sink's own documented
//! normalisation (none for numbers in the file sink; PostgreSQL's `jsonb` rules next to its sink).
//!
//! [`Decimal`] is a number's exact value, for the comparisons jq makes (`1 == 1.0`) and for the
//! normal forms a sink gives numbers.

use std::borrow::Cow;

/// How deep [`parse`] goes before it refuses a value (the transforms refuse deeper ones first).
pub const MAX_DEPTH: usize = 512;

/// A JSON value with its numbers' text and its objects' members as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number: its text as written (`1E2`, `1.50`, `-0`).
    Number(Cow<'a, str>),
    /// A string, its escapes decoded.
    String(Cow<'a, str>),
    /// An array.
    Array(Vec<Value<'a>>),
    /// An object: every member in order, a repeated key as often as it is written.
    Object(Vec<(Cow<'a, str>, Value<'a>)>),
}

/// Why some bytes are not one JSON value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a JSON value at byte {offset}: {what}")]
pub struct ParseError {
    /// Where, from the start of the text.
    pub offset: usize,
    /// What was wrong there.
    pub what: &'static str,
}

/// Parses one JSON value (RFC 8259, surrounding whitespace allowed), borrowing from `bytes`
/// where it can.
pub fn parse(bytes: &[u8]) -> Result<Value<'_>, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ParseError { offset: e.valid_up_to(), what: "invalid UTF-8" })?;
    let mut parser = Parser { text, at: 0 };
    let value = parser.value(0)?;
    parser.skip_ws();
    if parser.at != text.len() {
        return Err(parser.error("text after the value"));
    }
    Ok(value)
}

impl Value<'_> {
    /// Whether `self` and `other` are the same value: numbers by their text, strings by their
    /// decoded text, arrays in order, objects by their members whatever their order, except
    /// that the members of one repeated key keep theirs (`{"a":1,"a":2}` is not
    /// `{"a":2,"a":1}`, nor `{"a":2}`).
    pub fn same(&self, other: &Value<'_>) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Number(a), Value::Number(b)) | (Value::String(a), Value::String(b)) => a == b,
            (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same(y)),
            (Value::Object(a), Value::Object(b)) => {
                if a.len() != b.len() {
                    return false;
                }
                let (a, b) = (by_key(a), by_key(b));
                a.iter().zip(&b).all(|((ka, va), (kb, vb))| ka == kb && va.same(vb))
            }
            _ => false,
        }
    }

    /// The value as jq and PostgreSQL's `jsonb` read it: of a repeated key, the last member
    /// stays (where the first one was written), in every object it holds.
    pub fn last_wins(self) -> Self {
        match self {
            Value::Array(items) => Value::Array(items.into_iter().map(Value::last_wins).collect()),
            Value::Object(members) => {
                let mut kept: Vec<(Cow<'_, str>, Value<'_>)> = Vec::with_capacity(members.len());
                for (key, value) in members {
                    let value = value.last_wins();
                    match kept.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => slot.1 = value,
                        None => kept.push((key, value)),
                    }
                }
                Value::Object(kept)
            }
            other => other,
        }
    }
}

/// An object's members sorted by key, the members of a repeated key in their written order.
fn by_key<'v, 'a>(members: &'v [(Cow<'a, str>, Value<'a>)]) -> Vec<&'v (Cow<'a, str>, Value<'a>)> {
    let mut sorted: Vec<_> = members.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, what: &'static str) -> ParseError {
        ParseError { offset: self.at, what }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.at += 1;
        }
    }

    fn literal(&mut self, word: &'static str, value: Value<'a>) -> Result<Value<'a>, ParseError> {
        if self.text[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(value)
        } else {
            Err(self.error("not a JSON value"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deep"));
        }
        self.skip_ws();
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("not a JSON value")),
            None => Err(self.error("the text ends where a value should be")),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value<'a>, ParseError> {
        self.at += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("expected , or ] in an array")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value<'a>, ParseError> {
        self.at += 1;
        let mut members = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a key in an object"));
            }
            let key = self.string()?;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.error("expected : after a key"));
            }
            self.at += 1;
            members.push((key, self.value(depth + 1)?));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.error("expected , or } in an object")),
            }
        }
    }

    fn number(&mut self) -> Result<Value<'a>, ParseError> {
        let start = self.at;
        let bytes = self.text.as_bytes();
        let digits = |at: &mut usize| {
            let from = *at;
            while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            *at - from
        };
        let mut at = start + usize::from(bytes[start] == b'-');
        match (bytes.get(at), digits(&mut at)) {
            (Some(b'0'), n) if n > 1 => return Err(ParseError { offset: start, what: "a number with a leading zero" }),
            (_, 0) => return Err(ParseError { offset: at, what: "a number without digits" }),
            _ => {}
        }
        if bytes.get(at) == Some(&b'.') {
            at += 1;
            if digits(&mut at) == 0 {
                return Err(ParseError { offset: at, what: "a number without digits after its point" });
            }
        }
        if matches!(bytes.get(at), Some(b'e' | b'E')) {
            at += 1;
            if matches!(bytes.get(at), Some(b'+' | b'-')) {
                at += 1;
            }
            if digits(&mut at) == 0 {
                return Err(ParseError { offset: at, what: "a number without digits in its exponent" });
            }
        }
        self.at = at;
        Ok(Value::Number(Cow::Borrowed(&self.text[start..at])))
    }

    /// A string at `"`, its escapes decoded (borrowed when it has none).
    fn string(&mut self) -> Result<Cow<'a, str>, ParseError> {
        self.at += 1;
        let start = self.at;
        let bytes = self.text.as_bytes();
        while let Some(&b) = bytes.get(self.at) {
            match b {
                b'"' => {
                    self.at += 1;
                    return Ok(Cow::Borrowed(&self.text[start..self.at - 1]));
                }
                b'\\' => return self.escaped(start).map(Cow::Owned),
                0..=0x1F => return Err(self.error("a control character in a string")),
                _ => self.at += 1,
            }
        }
        Err(self.error("a string without its closing quote"))
    }

    /// The rest of a string that has escapes, from `start`; `self.at` is at the first `\`.
    fn escaped(&mut self, start: usize) -> Result<String, ParseError> {
        let mut out = String::from(&self.text[start..self.at]);
        loop {
            let rest = &self.text[self.at..];
            let plain = rest.find(['"', '\\']).ok_or_else(|| self.error("a string without its closing quote"))?;
            if rest[..plain].bytes().any(|b| b < 0x20) {
                return Err(self.error("a control character in a string"));
            }
            out.push_str(&rest[..plain]);
            self.at += plain;
            if self.peek() == Some(b'"') {
                self.at += 1;
                return Ok(out);
            }
            self.at += 1;
            let c = match self.peek() {
                Some(b'"') => '"',
                Some(b'\\') => '\\',
                Some(b'/') => '/',
                Some(b'b') => '\u{8}',
                Some(b'f') => '\u{c}',
                Some(b'n') => '\n',
                Some(b'r') => '\r',
                Some(b't') => '\t',
                Some(b'u') => {
                    out.push(self.unicode()?);
                    continue;
                }
                _ => return Err(self.error("an unknown escape in a string")),
            };
            self.at += 1;
            out.push(c);
        }
    }

    /// `\uXXXX` (a surrogate pair as two), `self.at` at the `u`.
    fn unicode(&mut self) -> Result<char, ParseError> {
        let text = self.text;
        let hex = |at: usize| {
            let digits = text.get(at..at + 4).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
            u32::from_str_radix(digits, 16).ok()
        };
        let high = hex(self.at + 1).ok_or_else(|| self.error("a \\u escape without four hex digits"))?;
        self.at += 5;
        let code = if (0xD800..0xDC00).contains(&high) {
            let low = self.text[self.at..].starts_with("\\u").then(|| hex(self.at + 2)).flatten();
            match low {
                Some(low) if (0xDC00..0xE000).contains(&low) => {
                    self.at += 6;
                    0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                }
                _ => return Err(self.error("a lone UTF-16 surrogate escape")),
            }
        } else {
            high
        };
        char::from_u32(code).ok_or_else(|| self.error("a lone UTF-16 surrogate escape"))
    }
}

/// A JSON number's exact value, `±digits × 10^exponent`, as written: `1.50` is `150 × 10^-2`
/// (its trailing zero kept), `1E2` is `1 × 10^2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decimal {
    /// Written with a minus sign.
    pub negative: bool,
    /// Its digits, without leading zeros: empty for zero.
    pub digits: String,
    /// The power of ten of its last digit.
    pub exponent: i64,
}

impl Decimal {
    /// The exact value of JSON number text; `None` if it is not one, or its exponent is beyond
    /// ±10^17 (no JSON tool reads such a number as a number).
    pub fn parse(text: &str) -> Option<Decimal> {
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
            Some(at) => (&unsigned[..at], parse_exponent(&unsigned[at + 1..])?),
            None => (unsigned, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: String = int.chars().chain(frac.chars()).skip_while(|c| *c == '0').collect();
        let exponent = exponent.checked_sub(i64::try_from(frac.len()).ok()?)?;
        Some(Decimal { negative, digits, exponent })
    }

    /// Whether it is zero (`0`, `-0.00`, `0e5`).
    pub fn is_zero(&self) -> bool {
        self.digits.is_empty()
    }

    /// The value's one JSON text, the same for every way of writing it (`1`, `1.0`, `10e-1`,
    /// `0.1e1` all give `1`; `-0` gives `0`): jq's equality of numbers, exact. Plain digits
    /// within 30 places of the point, else `D.DDDe±N`.
    pub fn canonical(&self) -> String {
        if self.is_zero() {
            return "0".into();
        }
        let digits = self.digits.trim_end_matches('0');
        let exponent = self.exponent + (self.digits.len() - digits.len()) as i64;
        let sign = if self.negative { "-" } else { "" };
        let n = digits.len() as i64;
        if (0..=30).contains(&exponent) && n + exponent <= 60 {
            format!("{sign}{digits}{}", "0".repeat(exponent as usize))
        } else if (-30..0).contains(&exponent) {
            let point = n + exponent;
            if point > 0 {
                format!("{sign}{}.{}", &digits[..point as usize], &digits[point as usize..])
            } else {
                format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
            }
        } else {
            let (first, rest) = digits.split_at(1);
            let point = if rest.is_empty() { String::new() } else { format!(".{rest}") };
            format!("{sign}{first}{point}e{}", exponent + n - 1)
        }
    }
}

/// An exponent's text (`+10`, `-3`, `0007`) as a number, if within ±10^17.
fn parse_exponent(text: &str) -> Option<i64> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let digits = digits.trim_start_matches('0');
    if digits.len() > 17 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: i64 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &str, b: &str) -> bool {
        parse(a.as_bytes()).expect("a").same(&parse(b.as_bytes()).expect("b"))
    }

    #[test]
    fn numbers_are_compared_exactly_as_written_never_as_doubles() {
        assert!(!same("0.1000000000000000000001", "0.1"));
        assert!(!same("18446744073709551617", "18446744073709551616"));
        assert!(!same("2", "2.0") && !same("1E2", "100"));
        assert!(same(r#"{"n":[1.50, 18446744073709551617]}"#, r#"{ "n" : [1.50,18446744073709551617] }"#));
    }

    #[test]
    fn objects_compare_in_any_key_order_but_with_every_repeated_key_in_its_order() {
        assert!(same(r#"{"a":1,"b":2}"#, r#"{"b":2,"a":1}"#));
        assert!(!same(r#"{"k":"forged","k":"real"}"#, r#"{"k":"real"}"#));
        assert!(!same(r#"{"a":1,"a":2}"#, r#"{"a":2,"a":1}"#));
        assert!(same(r#"{"a":1,"b":0,"a":2}"#, r#"{"b":0,"a":1,"a":2}"#));
        assert!(same(r#""\u0041\n""#, "\"A\\n\""), "strings by their decoded text");
    }

    #[test]
    fn the_last_of_repeated_keys_wins_at_every_depth() {
        let value = parse(br#"{"a":"forged","b":[{"c":1,"c":2}],"a":"real"}"#).expect("parses").last_wins();
        assert!(value.same(&parse(br#"{"a":"real","b":[{"c":2}]}"#).expect("parses")), "{value:?}");
    }

    #[test]
    fn text_that_is_not_one_json_value_is_refused_with_its_offset() {
        for bad in ["", "01", "1.", "-", "1e", "[1,]", "{\"a\"1}", "\"\\ud800\"", "\"a\u{1}\"", "1 2", "tru", "\"\\x\""]
        {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?} parsed");
        }
        assert_eq!(parse(b"[1, x]").unwrap_err().offset, 4);
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert_eq!(parse(deep.as_bytes()).unwrap_err().what, "nested too deep");
        assert_eq!(parse("\"\\ud83d\\ude00\"".as_bytes()), Ok(Value::String("😀".into())));
    }

    #[test]
    fn every_way_of_writing_a_number_has_one_canonical_text() {
        let canonical = |text: &str| Decimal::parse(text).expect(text).canonical();
        for (texts, want) in [
            (&["1", "1.0", "10e-1", "0.1e1", "1.000E0"][..], "1"),
            (&["0", "-0", "0.00", "0e99", "-0.0E-5"][..], "0"),
            (&["100", "1e2", "1E+2", "0.001e5"][..], "100"),
            (&["-1.5", "-15e-1", "-0.15E1"][..], "-1.5"),
            (&["1e400", "10e399"][..], "1e400"),
            (&["0.000001", "1e-6"][..], "0.000001"),
            (&["123456789012345678901234567890.50"][..], "123456789012345678901234567890.5"),
            (&["1.5e40", "15E39"][..], "1.5e40"),
        ] {
            for text in texts {
                assert_eq!(canonical(text), want, "{text}");
            }
        }
        assert_ne!(canonical("100000000000000000001"), canonical("100000000000000000000"));
        assert_eq!(Decimal::parse("1.50"), Some(Decimal { negative: false, digits: "150".into(), exponent: -2 }));
        assert_eq!(Decimal::parse("1e100000000000000000"), None);
    }
}
