//! What PostgreSQL's `jsonb` does to a value the sink stores (PostgreSQL documentation, "JSON
//! Types", 8.14): it keeps the value, not its text. Of a repeated key only the last member stays;
//! key order and whitespace are not kept (verify's comparison ignores both anyway); strings are
//! kept decoded; a number becomes a `numeric`, read as `numeric_in` reads text: its exponent is
//! applied (`1E2` is `100`, `1.5e+10` is `15000000000`), the digits after the point as written
//! stay, trailing zeros included (`1.50`, and `1.230e-5` is `0.00001230`), and zero has no sign
//! (`-0` is `0`, `-0.0` is `0.0`). A number beyond `numeric`'s range (131 072 digits before the
//! point, 16 383 after) is refused by the server, and the saver dead-letters its object.
//!
//! `saver verify` puts every expected value through [`normalise`] before comparing it with
//! `doc::text` as read back; `tests/postgres.rs` checks these rules against a real server.

use std::borrow::Cow;

use common::exact::{Decimal, Value};

/// Digits `numeric` holds before the point.
const MAX_INTEGER_DIGITS: i64 = 131_072;
/// Digits `numeric` holds after the point.
const MAX_SCALE: i64 = 16_383;

/// `value` as `jsonb` keeps it; `None` if PostgreSQL refuses it (a number out of `numeric`'s
/// range).
pub fn normalise(value: Value<'_>) -> Option<Value<'_>> {
    numbers(value.last_wins())
}

fn numbers(value: Value<'_>) -> Option<Value<'_>> {
    Some(match value {
        Value::Number(text) => Value::Number(Cow::Owned(numeric_text(&text)?)),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers).collect::<Option<_>>()?),
        Value::Object(members) => {
            Value::Object(members.into_iter().map(|(key, value)| Some((key, numbers(value)?))).collect::<Option<_>>()?)
        }
        other => other,
    })
}

/// A JSON number's text as `numeric` prints it once `jsonb` stored it; `None` if it is not a
/// number `numeric` can hold.
pub fn numeric_text(number: &str) -> Option<String> {
    let Decimal { negative, digits, exponent } = Decimal::parse(number)?;
    let scale = (-exponent).max(0);
    let integer_digits = digits.len() as i64 + exponent;
    if scale > MAX_SCALE || integer_digits > MAX_INTEGER_DIGITS {
        return None;
    }
    let sign = if negative && !digits.is_empty() { "-" } else { "" };
    if exponent >= 0 {
        let integer = if digits.is_empty() { "0".to_string() } else { digits + &"0".repeat(exponent as usize) };
        return Some(format!("{sign}{integer}"));
    }
    // Enough leading zeros for one digit before the point.
    let scale = scale as usize;
    let padded = format!("{}{digits}", "0".repeat((scale + 1).saturating_sub(digits.len())));
    let (integer, fraction) = padded.split_at(padded.len() - scale);
    Some(format!("{sign}{integer}.{fraction}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_take_the_form_numeric_prints() {
        for (json, numeric) in [
            ("1E2", "100"),
            ("1.5e+10", "15000000000"),
            ("1.50", "1.50"),
            ("1.230e-5", "0.00001230"),
            ("1.50e1", "15.0"),
            ("100e-2", "1.00"),
            ("-0", "0"),
            ("-0.0", "0.0"),
            ("0.000", "0.000"),
            ("0.0e5", "0"),
            ("-12.5E-1", "-1.25"),
            ("0.05", "0.05"),
            ("18446744073709551617", "18446744073709551617"),
        ] {
            assert_eq!(numeric_text(json).as_deref(), Some(numeric), "{json}");
        }
        assert_eq!(numeric_text("1e400").map(|t| t.len()), Some(401));
        assert_eq!(numeric_text("1e200000"), None);
        assert_eq!(numeric_text("1e-20000"), None);
    }

    #[test]
    fn repeated_keys_keep_their_last_member_at_every_depth() {
        let value = common::exact::parse(br#"{"a":"forged","a":[{"n":1E2,"n":2}]}"#).expect("JSON");
        let kept = normalise(value).expect("storable");
        assert!(kept.same(&common::exact::parse(br#"{"a": [{"n": 2}]}"#).expect("JSON")), "{kept:?}");
    }
}
