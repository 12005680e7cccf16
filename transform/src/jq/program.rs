//! One jq program, compiled with jaq (the jaq-core, jaq-std and jaq-json crates) and run on one
//! object at a time: what a jq sandbox does inside (see `super::sandbox`), and how the fetcher
//! checks a program before it starts (`Program::compile`).
//!
//! The program gets the jq language and none of the ways out of it (enforced at compile time: a
//! program that uses one does not compile, and the message says the function is not available
//! in chunkmill):
//!
//! - `env`, `$ENV`: the mapper's environment holds its NATS credentials;
//! - `input`, `inputs`, `input_filename`, `input_line_number`: a program sees one object at a
//!   time, there is nothing further to read;
//! - `include`, `import`: modules and data files would be read from the mapper's disk;
//! - `halt`, `halt_error`: they would stop the mapper (jaq exits the process); `error(...)`
//!   dead-letters the object instead;
//! - `now`, `localtime`, `strflocaltime`: the clock and the mapper's time zone (`TZ`,
//!   `/etc/localtime`) differ between mappers and runs, and `saver verify` recomputes jq jobs
//!   expecting the same outputs; `gmtime`, `mktime`, `strftime` and friends work in UTC.
//!
//! `debug` and `stderr` are harmless instead of refused: they pass their input through and print
//! nothing, since the mapper's stderr is its log and a line per object would drown it. jaq has
//! no `$__loc__`, so it is an undefined variable like any unknown name.
//!
//! Outputs are strict JSON on one line each (what every stage takes as a record), which jq's
//! data model does not guarantee, so the writer here maps what JSON cannot hold the way jq 1.7
//! prints it: NaN becomes `null`, ±Infinity becomes ±1.7976931348623157e+308 (the largest
//! finite double), and a string's invalid UTF-8 becomes U+FFFD. What jq has no equivalent for
//! (jaq's byte strings from `tobytes`, object keys that are not strings, nesting deeper than
//! [`MAX_DEPTH`]) makes the object's error instead of invalid JSON. A number read from the input
//! keeps its text, `-0` included (jaq reads it as the integer 0; it is read here as the decimal
//! `-0`, which jaq keeps as text). An input nested deeper than [`MAX_DEPTH`] is refused too,
//! before jaq reads it: jaq reads and drops values recursively.

use std::fmt::Write as _;
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};

use common::json::Strings;
use jaq_core::load::{self, Arena, File, Loader};
use jaq_core::{compile, data, Compiler, Ctx, Vars};
use jaq_json::{Num, Val};

use crate::ObjectError;

/// The longest a runtime error message gets, in bytes: jaq quotes the values it could not use,
/// and those can be whole objects.
pub const MAX_ERROR_BYTES: usize = 1000;

/// Most outputs one object may give: beyond this the program is taken to be an endless
/// generator (`repeat(.)`, `range(infinite)`) and the object is refused rather than the mapper
/// running out of memory.
pub const MAX_OUTPUTS: usize = 1_000_000;

/// Most bytes of output one object may give, for the same reason as [`MAX_OUTPUTS`].
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// Deepest nesting of arrays and objects in an input or an output. JSON readers refuse deeper
/// values (`serde_json::Value` stops at 128 levels), and jaq recurses on the depth of values.
pub const MAX_DEPTH: usize = 127;

/// The value type, and the data filters see: just the look-up table (no `inputs`).
type Data = data::JustLut<Val>;

/// jaq's native functions that chunkmill leaves out, and why (shown when a program uses one).
const UNAVAILABLE: &[(&str, &str)] = &[
    ("env", "it would read the mapper's environment, which holds its credentials; put what the program needs in the program text or the objects"),
    ("$ENV", "it would read the mapper's environment, which holds its credentials; put what the program needs in the program text or the objects"),
    ("input", "a program sees one object at a time and there is no further input to read; work on `.`"),
    ("inputs", "a program sees one object at a time and there is no further input to read; work on `.`"),
    ("input_filename", "objects do not come from files the program could name"),
    ("input_line_number", "objects do not come from files the program could name"),
    ("halt", "it would stop the mapper; use error(\"why\") to dead-letter the object"),
    ("halt_error", "it would stop the mapper; use error(\"why\") to dead-letter the object"),
    ("now", "the clock differs between mappers and runs, and saver verify recomputes jq jobs; put a fixed time in the program text"),
    ("localtime", "it reads the mapper's time zone, which differs between mappers; use gmtime"),
    ("strflocaltime", "it reads the mapper's time zone, which differs between mappers; use strftime (UTC)"),
    ("debug_empty", "it would write to the mapper's log; use debug, which passes its input through"),
    ("stderr_empty", "it would write to the mapper's log; use stderr, which passes its input through"),
];

/// Definitions of jaq-std replaced here: `halt` and `halt_error` are left out (they call
/// removed natives), `debug` and `stderr` become the identity.
const REPLACED_DEFS: &[&str] = &["halt", "halt_error", "debug", "stderr"];

/// `debug` and `stderr` keep jq's meaning for the data (they output their input) and print
/// nothing.
const HARMLESS_DEFS: &str = "def debug: .; def debug(msgs): .; def stderr: .;";

/// A compiled jq program.
///
/// The compiled filter owns everything it needs (jaq copies literals out of the program text
/// while compiling), so the arena and loader live only inside `Program::compile` and nothing
/// is leaked.
pub(crate) struct Program {
    filter: jaq_core::Filter<Data>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program").finish_non_exhaustive()
    }
}

/// The outputs of one object: compact strict JSON values, one after another, and where each
/// ends in `bytes`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Values {
    pub(crate) bytes: Vec<u8>,
    pub(crate) ends: Vec<usize>,
}

impl Program {
    /// Compiles `filter`, or says where and why it does not compile (`line:column`, what was
    /// expected, the offending text), so the fetcher can refuse the job at start.
    pub(crate) fn compile(filter: &str) -> Result<Self, String> {
        // jaq is not expected to panic on any program, but a mapper must not die on one.
        match catch_unwind(AssertUnwindSafe(|| compile_filter(filter))) {
            Ok(result) => result.map(|filter| Program { filter }),
            Err(_) => {
                Err("the jq program does not compile: jaq panicked on it (a jaq bug); simplify the program".into())
            }
        }
    }
}

fn compile_filter(program: &str) -> Result<jaq_core::Filter<Data>, String> {
    let harmless = load::parse(HARMLESS_DEFS, |p| p.defs()).unwrap_or_default();
    let defs = jaq_core::defs()
        .chain(jaq_std::defs().filter(|def| !REPLACED_DEFS.contains(&def.name)))
        .chain(harmless)
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs())
        .filter(|(name, _, _)| !UNAVAILABLE.iter().any(|(banned, _)| banned == name));

    let arena = Arena::default();
    // The default loader refuses `include` and `import` of modules ("module loading not
    // supported"): nothing is read from disk.
    let loader = Loader::new(defs);
    let modules = loader
        .load(&arena, File { code: program, path: () })
        .map_err(|errors| describe_load_errors(program, errors))?;
    // `import "file" as $data;` is not a module: the caller would have to read the file and
    // pass its value. Refuse it, or the variable would be unbound when the program runs.
    let mut imports = Vec::new();
    let _ = load::import(&modules, |import| {
        imports.push(format!("{} (import \"{}\")", position(program, import.path), common::text::escaped(import.path)));
        Ok(())
    });
    if !imports.is_empty() {
        return Err(format!(
            "the jq program does not compile: {}: data files cannot be imported in chunkmill (they would be read from the mapper's disk); put the data in the program text",
            imports.join("; ")
        ));
    }
    Compiler::default().with_funs(funs).compile(modules).map_err(|errors| describe_compile_errors(program, errors))
}

/// `line:column` of `part` in `program` (1-based, columns in characters) when `part` is a
/// slice of it, which is how jaq reports where an error is.
fn position(program: &str, part: &str) -> String {
    let start = program.as_ptr() as usize;
    let at = part.as_ptr() as usize;
    if at < start || at > start + program.len() {
        return "in jaq's standard library".into();
    }
    let offset = at - start;
    let before = program.get(..offset).unwrap_or(program);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

/// The line of `program` that `part` is on, to show with the error.
fn line_of(program: &str, part: &str) -> String {
    let start = program.as_ptr() as usize;
    let at = part.as_ptr() as usize;
    if at < start || at > start + program.len() {
        return String::new();
    }
    let offset = at - start;
    let (Some(before), Some(after)) = (program.get(..offset), program.get(offset..)) else { return String::new() };
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = after.find('\n').map_or(program.len(), |i| offset + i);
    let line = program.get(line_start..line_end).unwrap_or_default();
    format!(" in `{}`", common::text::escaped_max(line.trim(), 120))
}

/// What was found where something else was expected: the token, or the end of the program.
fn found(part: &str) -> String {
    if part.is_empty() {
        "the end of the program".into()
    } else {
        format!("`{}`", common::text::escaped_max(part, 40))
    }
}

fn describe_load_errors(program: &str, errors: load::Errors<&str, ()>) -> String {
    let mut all = Vec::new();
    for (_file, error) in errors {
        match error {
            load::Error::Io(imports) => {
                for (path, _why) in imports {
                    all.push(format!(
                        "{}: modules cannot be included or imported in chunkmill (they would be read from the mapper's disk; `{}`); put the definitions in the program",
                        position(program, path),
                        common::text::escaped(path)
                    ));
                }
            }
            load::Error::Lex(errors) => {
                for (expected, part) in errors {
                    let expected = match expected {
                        load::lex::Expect::Digit => "a digit".to_string(),
                        load::lex::Expect::Ident => "an identifier".to_string(),
                        load::lex::Expect::Delim(open) => {
                            let close = match open {
                                "(" => ")",
                                "[" => "]",
                                "{" => "}",
                                _ => "\"",
                            };
                            format!("`{close}` to close `{}`", common::text::escaped(open))
                        }
                        load::lex::Expect::Escape => "a string escape sequence".to_string(),
                        load::lex::Expect::Unicode => "4 hexadecimal digits of a \\u escape".to_string(),
                        load::lex::Expect::Token => "a token".to_string(),
                        _ => "something else".to_string(),
                    };
                    all.push(format!(
                        "{}: expected {expected}, found {}{}",
                        position(program, part),
                        found(part),
                        line_of(program, part)
                    ));
                }
            }
            load::Error::Parse(errors) => {
                for (expected, part) in errors {
                    all.push(format!(
                        "{}: expected {}, found {}{}",
                        position(program, part),
                        expected.as_str(),
                        found(part),
                        line_of(program, part)
                    ));
                }
            }
        }
    }
    format!("the jq program does not compile: {}", all.join("; "))
}

fn describe_compile_errors(program: &str, errors: compile::Errors<&str, ()>) -> String {
    let mut all = Vec::new();
    for (_file, undefined) in errors {
        for (name, what) in undefined {
            let at = position(program, name);
            let shown = common::text::escaped_max(name, 60);
            let message = match UNAVAILABLE.iter().find(|(banned, _)| *banned == name) {
                Some((_, why)) => format!("{at}: `{shown}` is not available in chunkmill: {why}"),
                None => match what {
                    compile::Undefined::Filter(arity) => format!("{at}: undefined filter `{shown}/{arity}`"),
                    other => format!("{at}: undefined {} `{shown}`", other.as_str()),
                },
            };
            all.push(message);
        }
    }
    format!("the jq program does not compile: {}", all.join("; "))
}

impl Program {
    /// Runs the program on one object (strict JSON bytes): its outputs, or why it has none.
    ///
    /// Per object, what remains after compiling once: parsing the input into jaq values (one
    /// allocation per string, array and object), running the filter, and writing its outputs
    /// to one buffer. Every value jaq made is dropped before this returns.
    pub(crate) fn run(&self, input: &[u8]) -> Result<Values, ObjectError> {
        let value = read_object(input)?;
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new([]));
        // Outputs are kept here until the program is done: an error after some outputs
        // refuses the whole object.
        let mut values = Values { bytes: Vec::with_capacity(input.len()), ends: Vec::new() };
        for result in self.filter.id.run((ctx, value)) {
            let value = result.map_err(runtime_error)?;
            write_value(&mut values.bytes, &value, 0).map_err(ObjectError::refused)?;
            values.ends.push(values.bytes.len());
            if values.ends.len() > MAX_OUTPUTS || values.bytes.len() > MAX_OUTPUT_BYTES {
                return Err(ObjectError::refused(format!(
                    "the jq program gave more than {MAX_OUTPUTS} outputs or {} MiB for this object; is it an endless generator such as repeat(.)? use limit(n; f) or first(f)",
                    MAX_OUTPUT_BYTES >> 20
                )));
            }
        }
        Ok(values)
    }
}

/// Reads one input object into a jaq value, refusing what jaq could not read safely.
fn read_object(input: &[u8]) -> Result<Val, ObjectError> {
    let shape = Shape::of(input);
    // jaq reads and drops values recursively: a record nested 100 000 deep would overflow the
    // stack.
    if shape.too_deep {
        return Err(ObjectError::refused(format!(
            "the object is nested more than {MAX_DEPTH} levels deep, more than jq reads in chunkmill"
        )));
    }
    let unreadable = |e: jaq_json::read::Error| ObjectError::refused(format!("jq cannot read the object: {e}"));
    // jaq reads the number `-0` as the integer 0, which it writes as `0`; a number read from
    // the input keeps its text (PROTOCOL §7.6), so each `-0` is read as the decimal `-0`, which
    // jaq keeps as text. jaq's reader takes any bytes in a string, so every `-0` is first
    // replaced by a string of bytes no valid UTF-8 input can hold, and that string by the number.
    if shape.negative_zero && std::str::from_utf8(input).is_ok() {
        let mut value = jaq_json::read::parse_single(&mark_negative_zeros(input)).map_err(unreadable)?;
        restore_negative_zeros(&mut value);
        return Ok(value);
    }
    jaq_json::read::parse_single(input).map_err(unreadable)
}

/// What [`read_object`] needs to know about an input before jaq reads it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Shape {
    /// Arrays and objects nest more than [`MAX_DEPTH`] levels deep.
    too_deep: bool,
    /// It holds the number `-0` (not `-0.0`, not `-0e1`: those are decimals jaq keeps as text).
    negative_zero: bool,
}

impl Shape {
    /// One pass over `json` (valid JSON), outside strings.
    fn of(json: &[u8]) -> Shape {
        let (mut shape, mut depth, mut strings) = (Shape::default(), 0usize, Strings::default());
        for (i, &b) in json.iter().enumerate() {
            if !strings.outside(b) {
                continue;
            }
            match b {
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        shape.too_deep = true;
                        return shape;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b'-' if is_negative_zero(json, i) => shape.negative_zero = true,
                _ => {}
            }
        }
        shape
    }
}

/// Whether the number at `json[at..]` (outside strings, starting with `-`) is exactly `-0`.
fn is_negative_zero(json: &[u8], at: usize) -> bool {
    json.get(at + 1) == Some(&b'0') && !matches!(json.get(at + 2), Some(b'0'..=b'9' | b'.' | b'e' | b'E'))
}

/// The string that stands in for `-0` while jaq reads an input: 0xFF is never in UTF-8, and
/// no escape sequence makes it, so no string of a valid input is these bytes.
const NEGATIVE_ZERO_MARK: &[u8] = b"\xff-0";

/// `json` with every number `-0` (outside strings) written as the string [`NEGATIVE_ZERO_MARK`].
fn mark_negative_zeros(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 16);
    let (mut strings, mut i) = (Strings::default(), 0);
    while let Some(&b) = json.get(i) {
        // The `0` skipped after a `-` is outside strings too: `strings` need not see it.
        if strings.outside(b) && b == b'-' && is_negative_zero(json, i) {
            out.push(b'"');
            out.extend_from_slice(NEGATIVE_ZERO_MARK);
            out.push(b'"');
            i += 2;
            continue;
        }
        out.push(b);
        i += 1;
    }
    out
}

/// Puts the decimal `-0` back where [`mark_negative_zeros`] left its mark (a value, never a
/// key: object keys are strings in the input).
fn restore_negative_zeros(value: &mut Val) {
    match value {
        Val::TStr(text) if text.as_ref().as_ref() == NEGATIVE_ZERO_MARK => {
            *value = Val::Num(Num::Dec(jaq_json::Rc::new("-0".to_string())));
        }
        Val::Arr(items) => jaq_json::Rc::make_mut(items).iter_mut().for_each(restore_negative_zeros),
        Val::Obj(members) => jaq_json::Rc::make_mut(members).values_mut().for_each(restore_negative_zeros),
        _ => {}
    }
}

/// The object's error for what stopped the program: jaq's message, capped.
fn runtime_error(exn: jaq_core::Exn<'_, Val>) -> ObjectError {
    let error = match exn.get_err() {
        Ok(error) => error,
        Err(other) => {
            // `halt` is not compiled in, and jaq's control flow never reaches the caller: if
            // it does, refuse the object rather than exit (which is what jaq's own helper
            // does on a halt).
            return ObjectError::refused(match other.get_halt() {
                Ok(code) => format!("the jq program halted (exit code {code})"),
                Err(_) => "the jq program stopped on jaq's internal control flow (a jaq bug)".to_string(),
            });
        }
    };
    let mut capped = Capped { text: String::new(), cut: false };
    let _ = write!(capped, "{error}");
    // `error("why")` is displayed as the JSON string "why": show its text, as jq does.
    let text = match serde_json::from_str::<String>(&capped.text) {
        Ok(message) if !capped.cut => message,
        _ => capped.text,
    };
    let mut message = common::text::escaped_max(&text, MAX_ERROR_BYTES).to_string();
    if capped.cut {
        message.push_str("… (cut)");
    }
    ObjectError::refused(message)
}

/// Keeps the first [`MAX_ERROR_BYTES`] of what is written and then stops the writer, so a
/// message quoting a huge value is never built in full.
struct Capped {
    text: String,
    cut: bool,
}

impl std::fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = MAX_ERROR_BYTES.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
            return Ok(());
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.text.push_str(&s[..end]);
        self.cut = true;
        Err(std::fmt::Error)
    }
}

/// Writes `value` as compact strict JSON, or says why it cannot be JSON.
fn write_value(out: &mut Vec<u8>, value: &Val, depth: usize) -> Result<(), String> {
    match value {
        Val::Null => out.extend_from_slice(b"null"),
        Val::Bool(true) => out.extend_from_slice(b"true"),
        Val::Bool(false) => out.extend_from_slice(b"false"),
        Val::Num(n) => write_number(out, n),
        Val::TStr(text) => write_string(out, text),
        Val::BStr(_) => {
            return Err("the jq program gave a byte string (from tobytes), which JSON cannot hold; turn it into text first, e.g. with @base64".into())
        }
        Val::Arr(items) => {
            if depth >= MAX_DEPTH {
                return Err(too_deep());
            }
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, depth + 1)?;
            }
            out.push(b']');
        }
        Val::Obj(members) => {
            if depth >= MAX_DEPTH {
                return Err(too_deep());
            }
            out.push(b'{');
            for (i, (key, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match key {
                    Val::TStr(text) => write_string(out, text),
                    other => {
                        let mut shown = Capped { text: String::new(), cut: false };
                        let _ = write!(shown, "{other}");
                        return Err(format!(
                            "the jq program gave an object whose key {} is not a string; JSON object keys must be strings: convert it with tostring",
                            common::text::escaped(&shown.text)
                        ));
                    }
                }
                out.push(b':');
                write_value(out, item, depth + 1)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn too_deep() -> String {
    format!("the jq program gave a value nested more than {MAX_DEPTH} levels deep, which strict JSON readers refuse")
}

/// What jq 1.7 prints for ±Infinity: the largest finite double.
const INFINITY_AS: &str = "1.7976931348623157e+308";

fn write_number(out: &mut Vec<u8>, n: &Num) {
    let float = |out: &mut Vec<u8>, x: f64| {
        if x.is_nan() {
            out.extend_from_slice(b"null");
        } else if x.is_infinite() {
            if x < 0.0 {
                out.push(b'-');
            }
            out.extend_from_slice(INFINITY_AS.as_bytes());
        } else {
            // jaq writes finite doubles with ryu: `1.5`, `1e300`, `-0.0`, all JSON numbers.
            let _ = write!(out, "{}", Num::Float(x));
        }
    };
    match n {
        // Writing to a Vec cannot fail.
        Num::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Num::BigInt(i) => {
            let _ = write!(out, "{i}");
        }
        Num::Float(x) => float(out, *x),
        // Decimals keep the text they were read as (an input's `9.99` stays `9.99`); that text
        // is a JSON number unless jaq read it from somewhere laxer, then go through a double.
        Num::Dec(text) if is_json_number(text) => out.extend_from_slice(text.as_bytes()),
        Num::Dec(text) => match text.parse::<f64>() {
            Ok(x) => float(out, x),
            Err(_) => out.extend_from_slice(b"null"),
        },
    }
}

/// RFC 8259's number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn is_json_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// Writes `bytes` (meant as UTF-8; invalid sequences become U+FFFD) as a JSON string.
fn write_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let text = text.as_bytes();
    out.push(b'"');
    let mut run = 0;
    for (i, &b) in text.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&text[run..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.extend_from_slice(escape);
        }
        run = i + 1;
    }
    out.extend_from_slice(&text[run..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cause;

    fn run(filter: &str, input: &str) -> Result<Vec<String>, ObjectError> {
        let values = Program::compile(filter).unwrap().run(input.as_bytes())?;
        let starts = std::iter::once(0).chain(values.ends.iter().copied());
        let values: Vec<String> = starts
            .zip(values.ends.iter().copied())
            .map(|(start, end)| String::from_utf8(values.bytes[start..end].to_vec()).unwrap())
            .collect();
        for value in &values {
            common::json::check_value(value.as_bytes()).unwrap_or_else(|e| panic!("{value}: {e}"));
            assert!(!value.contains('\n'), "{value}");
        }
        Ok(values)
    }

    #[test]
    fn a_filter_gives_zero_one_or_more_outputs_per_object() {
        let filter = "if .n == 0 then empty elif .n == 1 then .n else (.n, .n * 10) end";
        assert_eq!(run(filter, r#"{"n":0}"#).unwrap(), Vec::<String>::new());
        assert_eq!(run(filter, r#"{"n":1}"#).unwrap(), vec!["1"]);
        assert_eq!(run(filter, r#"{"n":2}"#).unwrap(), vec!["2", "20"]);
        assert_eq!(run("select(false)", "{}").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn an_order_becomes_its_total() {
        let filter = "{id: .order_id, total: ([.items[] | .qty * .price] | add)}";
        let order = r#"{"order_id": "o-1", "items": [{"sku": "a", "qty": 2, "price": 1.5}, {"sku": "b", "qty": 1, "price": 7}]}"#;
        assert_eq!(run(filter, order).unwrap(), vec![r#"{"id":"o-1","total":10.0}"#]);
    }

    #[test]
    fn outputs_are_compact_strict_json() {
        let input = r#"{"s": "tab\there \"q\" \\ é 😀 \u0001", "n": [1, 2.50, -0, 1e2, 12345678901234567890123]}"#;
        assert_eq!(
            run(".", input).unwrap(),
            vec![r#"{"s":"tab\there \"q\" \\ é 😀 \u0001","n":[1,2.50,-0,1e2,12345678901234567890123]}"#]
        );
        assert_eq!(
            run("[nan, infinite, -infinite, 0.1 + 0.2]", "{}").unwrap(),
            vec!["[null,1.7976931348623157e+308,-1.7976931348623157e+308,0.30000000000000004]"]
        );
        assert_eq!(run("[1, 2] | implode", "{}").unwrap(), vec!["\"\\u0001\\u0002\""]);
        // Invalid UTF-8 (a raw byte from implode) becomes U+FFFD.
        assert_eq!(run("[-255, 65] | implode", "{}").unwrap(), vec!["\"\u{fffd}A\""]);
        assert_eq!(run("\"\\u007f\\n\"", "{}").unwrap(), vec!["\"\u{7f}\\n\""]);
    }

    #[test]
    fn what_json_cannot_hold_is_the_objects_error_not_invalid_json() {
        let err = run("{(1): 2}", "{}").unwrap_err();
        assert!(err.message.contains("not a string"), "{err}");
        let err = run("\"a\" | tobytes", "{}").unwrap_err();
        assert!(err.message.contains("byte string"), "{err}");
        let err = run("reduce range(200) as $i (0; [.])", "{}").unwrap_err();
        assert!(err.message.contains("nested"), "{err}");
        let deep = run("reduce range(126) as $i (0; [.])", "{}").unwrap();
        assert_eq!(deep[0].len(), 126 * 2 + 1);
    }

    #[test]
    fn a_program_that_does_not_compile_is_refused_with_the_place() {
        let err = Program::compile(".a | ").unwrap_err();
        assert!(err.contains("line 1, column 6"), "{err}");
        assert!(err.contains("expected term"), "{err}");
        let err = Program::compile(".a |\n  {b: .c").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("{b: .c"), "{err}");
        let err = Program::compile(".a | frobnicate(1)").unwrap_err();
        assert!(err.contains("line 1, column 6") && err.contains("undefined filter `frobnicate/1`"), "{err}");
        let err = Program::compile("\"\\q\"").unwrap_err();
        assert!(err.contains("escape"), "{err}");
    }

    #[test]
    fn the_mappers_environment_input_and_disk_are_out_of_reach() {
        for program in [
            "$ENV.HOME",
            "env.HOME",
            "env",
            "input",
            "[inputs]",
            ".a | halt",
            "halt_error(1)",
            "now",
            "localtime",
            "0 | strflocaltime(\"%H\")",
        ] {
            let err = Program::compile(program).err().unwrap_or_else(|| panic!("{program} compiled"));
            assert!(err.contains("is not available in chunkmill"), "{program}: {err}");
        }
        let err = Program::compile("$ENV.NATS_PASSWORD").unwrap_err();
        assert!(err.contains("`$ENV`") && err.contains("environment"), "{err}");
        let err = Program::compile("include \"etc/passwd\"; .").unwrap_err();
        assert!(err.contains("cannot be included or imported"), "{err}");
        let err = Program::compile("import \"/etc/passwd\" as $data; $data").unwrap_err();
        assert!(err.contains("data files cannot be imported"), "{err}");
        let err = Program::compile("input_filename").unwrap_err();
        assert!(err.contains("not available"), "{err}");
        // debug and stderr pass the value through and print nothing.
        assert_eq!(run("debug | stderr | debug(\"x\") | .a", r#"{"a":1}"#).unwrap(), vec!["1"]);
        // What works in UTC stays.
        assert_eq!(run("0 | todate", "{}").unwrap(), vec!["\"1970-01-01T00:00:00Z\""]);
    }

    #[test]
    fn a_runtime_error_refuses_the_object_with_jaqs_message() {
        let err = run(".a.b", r#"{"a":"text"}"#).unwrap_err();
        assert_eq!(err.cause, Cause::Transform);
        assert!(err.message.contains("cannot index") && err.message.contains("text"), "{err}");
        let err = run("error(\"no total\")", "{}").unwrap_err();
        assert_eq!(err, ObjectError::refused("no total"));
        // Outputs before the error are not kept.
        let err = run("1, 2, error(\"late\")", "{}").unwrap_err();
        assert_eq!(err.message, "late");
        // A message quoting a big value is cut.
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(100_000));
        let err = run(".a | error", &big).unwrap_err();
        assert!(err.message.len() < MAX_ERROR_BYTES + 100, "{}", err.message.len());
        assert!(err.message.ends_with("(cut)"), "{}", &err.message[err.message.len() - 40..]);
        let err = run("{} | error", &big).unwrap_err();
        assert_eq!(err.message, "{}");
    }

    #[test]
    fn an_endless_generator_is_refused_not_fatal() {
        let err = run("repeat(1)", "{}").unwrap_err();
        assert!(err.message.contains("endless"), "{err}");
        assert_eq!(run("[limit(3; repeat(1))]", "{}").unwrap(), vec!["[1,1,1]"]);
    }

    #[test]
    fn a_record_nested_too_deep_for_jaq_is_refused_not_fatal() {
        let deep = format!(r#"{{"id":1,"x":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        let err = run(".id", &deep).unwrap_err();
        assert!(err.message.contains("nested more than"), "{err}");
        let fine = format!(r#"{{"x":{}"[[{{\"}}"{}}}"#, "[".repeat(125), "]".repeat(125));
        assert_eq!(run(".x | length", &fine).unwrap(), vec!["1"]);
    }

    #[test]
    fn a_negative_zero_read_from_the_input_keeps_its_text() {
        let input = r#"{"z": -0, "a": [-0, 0, -0.0, -0e1], "s": "-0 \" -0", "-0": {"k": -0}}"#;
        assert_eq!(run(".", input).unwrap(), vec![r#"{"z":-0,"a":[-0,0,-0.0,-0e1],"s":"-0 \" -0","-0":{"k":-0}}"#]);
        assert_eq!(run("-0", "{}").unwrap(), vec!["0"], "a literal in the program is not read from the input");
        assert_eq!(run(".z | tostring", input).unwrap(), vec![r#""-0""#]);
        assert_eq!(run(".z == 0", input).unwrap(), vec!["true"]);
        assert_eq!(run("[.z, .a[0]] | map(. * 2)", input).unwrap(), vec!["[-0.0,-0.0]"]);
        // Nothing else of the input changes on the way.
        let plain = r#"{"n": -10, "m": -0.5, "t": "x-0"}"#;
        assert_eq!(run(".", plain).unwrap(), vec![r#"{"n":-10,"m":-0.5,"t":"x-0"}"#]);
        assert_eq!(Shape::of(plain.as_bytes()), Shape::default());
    }

    #[test]
    fn numbers_are_checked_against_the_json_grammar() {
        for good in ["0", "-0", "1.5", "1e5", "1E+5", "-12.5e-3", "10"] {
            assert!(is_json_number(good), "{good}");
        }
        for bad in ["", "-", "01", ".5", "1.", "1e", "+1", "NaN", "1e+", "0x1"] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }
}
