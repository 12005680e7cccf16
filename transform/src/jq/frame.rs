//! The jq sandbox's wire: length-prefixed binary frames between a process that runs jq (a
//! mapper, `saver verify`) and its sandbox child, over the child's stdin and stdout (one Unix
//! socket). Both ends are this crate, built into the same binary, so the framing is compact and
//! private: integers are little-endian, lengths are `u32`.
//!
//! ```text
//! parent → child, once:   MAGIC  timeout_ms:u64  memory:u64  len:u32 program
//! child → parent, once:   MAGIC  status:u8  len:u32 message      (0 ready, 1 does not compile, 2 cannot start)
//! parent → child, a run:  careful:u8  count:u32  count × (len:u32 object)
//! child → parent, per object, in order:
//!                         kind:u8  len:u32 payload
//!                         0 values:   n:u32  n × end:u32  bytes  (compact JSON, one after another)
//!                         1 refused:  the message (UTF-8)
//!                         2 panicked: the message (UTF-8)
//!                         3 timed out (empty): the object took longer than the timeout; the child exits
//! ```
//!
//! A careful run asks the child to write each answer as soon as it has it; otherwise it may
//! keep answers for up to [`FLUSH_EVERY`] (and writes all of a run's answers when the run ends).

use std::io::{self, BufRead, Read, Write};
use std::time::Duration;

use super::program::Values;

/// What a sandbox's first frame starts with, both ways.
pub(crate) const MAGIC: &[u8; 8] = b"CMJQSBX1";

/// The longest a child keeps answers before writing them, outside careful runs: the parent
/// hears from a busy child at least this often after each object.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Answers kept in the child beyond this many bytes are written at once.
pub(crate) const FLUSH_BYTES: usize = 1 << 20;

/// The largest answer the parent reads: the most outputs an object may give
/// ([`super::MAX_OUTPUT_BYTES`], [`super::MAX_OUTPUTS`]) with their ends, and room to spare.
const MAX_ANSWER: usize = super::MAX_OUTPUT_BYTES + 4 * (super::MAX_OUTPUTS + 2) + 4096;

/// The largest program a child reads.
const MAX_PROGRAM: usize = 64 << 20;

/// The parent's first frame: the limits and the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) timeout: Duration,
    pub(crate) memory: u64,
    pub(crate) program: String,
}

/// The child's first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ready {
    /// Compiled, limits set: ready for runs.
    Compiled,
    /// The program does not compile: why.
    Invalid(String),
    /// The sandbox cannot run: why.
    Failed(String),
}

/// One object's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Values(Values),
    Refused(String),
    Panicked(String),
    TimedOut,
}

/// A run of objects as the child reads it: one buffer, and where each object ends.
#[derive(Debug, Default)]
pub(crate) struct Run {
    pub(crate) careful: bool,
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Run {
    /// The objects, in order.
    pub(crate) fn objects(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(start, end)| &self.bytes[start..end])
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn u32_of(len: usize) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| invalid(format!("{len} bytes do not fit a jq sandbox frame")))
}

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads `len:u32 bytes`, at most `max` bytes.
fn read_bytes(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let len = read_u32(r)? as usize;
    if len > max {
        return Err(invalid(format!("a jq sandbox frame of {len} bytes, more than the {max} expected")));
    }
    let mut bytes = vec![0; len];
    r.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn read_text(r: &mut impl Read, max: usize) -> io::Result<String> {
    String::from_utf8(read_bytes(r, max)?).map_err(|_| invalid("a jq sandbox message is not UTF-8"))
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> io::Result<()> {
    out.extend_from_slice(&u32_of(bytes.len())?.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_hello(w: &mut impl Write, hello: &Hello) -> io::Result<()> {
    let mut out = Vec::with_capacity(hello.program.len() + 32);
    out.extend_from_slice(MAGIC);
    let millis = u64::try_from(hello.timeout.as_millis()).unwrap_or(u64::MAX);
    out.extend_from_slice(&millis.to_le_bytes());
    out.extend_from_slice(&hello.memory.to_le_bytes());
    put_bytes(&mut out, hello.program.as_bytes())?;
    w.write_all(&out)?;
    w.flush()
}

pub(crate) fn read_hello(r: &mut impl Read) -> io::Result<Hello> {
    let mut magic = [0; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid("this is not a jq sandbox's parent (no greeting on stdin)"));
    }
    let timeout = Duration::from_millis(read_u64(r)?);
    let memory = read_u64(r)?;
    let program = read_text(r, MAX_PROGRAM)?;
    Ok(Hello { timeout, memory, program })
}

pub(crate) fn write_ready(w: &mut impl Write, ready: &Ready) -> io::Result<()> {
    let (status, message) = match ready {
        Ready::Compiled => (0, ""),
        Ready::Invalid(why) => (1, why.as_str()),
        Ready::Failed(why) => (2, why.as_str()),
    };
    let mut out = MAGIC.to_vec();
    out.push(status);
    put_bytes(&mut out, message.as_bytes())?;
    w.write_all(&out)?;
    w.flush()
}

/// Reads the child's first frame, skipping up to `preamble` bytes before it: a test binary
/// serving as the sandbox prints its harness's first line on stdout before the test runs.
pub(crate) fn read_ready(r: &mut impl BufRead, preamble: usize) -> io::Result<Ready> {
    let mut seen: Vec<u8> = Vec::new();
    while !seen.ends_with(MAGIC) {
        if seen.len() > preamble + MAGIC.len() {
            let shown = String::from_utf8_lossy(&seen[..seen.len().min(200)]).into_owned();
            return Err(invalid(format!("it wrote `{}` instead of greeting", common::text::escaped(&shown))));
        }
        seen.push(read_u8(r)?);
    }
    let status = read_u8(r)?;
    let message = read_text(r, 1 << 20)?;
    match status {
        0 => Ok(Ready::Compiled),
        1 => Ok(Ready::Invalid(message)),
        _ => Ok(Ready::Failed(message)),
    }
}

/// Writes a run of objects, as one write.
pub(crate) fn write_run(w: &mut impl Write, careful: bool, objects: &[&[u8]]) -> io::Result<()> {
    let size: usize = objects.iter().map(|o| o.len() + 4).sum();
    let mut out = Vec::with_capacity(size + 5);
    out.push(u8::from(careful));
    out.extend_from_slice(&u32_of(objects.len())?.to_le_bytes());
    for object in objects {
        put_bytes(&mut out, object)?;
    }
    w.write_all(&out)?;
    w.flush()
}

/// The next run, or None when the parent closed the connection between runs.
pub(crate) fn read_run(r: &mut impl Read) -> io::Result<Option<Run>> {
    let careful = match read_u8(r) {
        Ok(flag) => flag != 0,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    let count = read_u32(r)? as usize;
    let mut run = Run { careful, bytes: Vec::new(), ends: Vec::with_capacity(count.min(1 << 16)) };
    for _ in 0..count {
        let len = read_u32(r)? as usize;
        let start = run.bytes.len();
        run.bytes.resize(start + len, 0);
        r.read_exact(&mut run.bytes[start..])?;
        run.ends.push(run.bytes.len());
    }
    Ok(Some(run))
}

/// Appends `answer` to `out`, to be written with the answers around it.
pub(crate) fn put_answer(out: &mut Vec<u8>, answer: &Answer) -> io::Result<()> {
    match answer {
        Answer::Values(values) => {
            out.push(0);
            let len = 4 + 4 * values.ends.len() + values.bytes.len();
            out.extend_from_slice(&u32_of(len)?.to_le_bytes());
            out.extend_from_slice(&u32_of(values.ends.len())?.to_le_bytes());
            for end in &values.ends {
                out.extend_from_slice(&u32_of(*end)?.to_le_bytes());
            }
            out.extend_from_slice(&values.bytes);
        }
        Answer::Refused(message) => {
            out.push(1);
            put_bytes(out, message.as_bytes())?;
        }
        Answer::Panicked(message) => {
            out.push(2);
            put_bytes(out, message.as_bytes())?;
        }
        Answer::TimedOut => {
            out.push(3);
            put_bytes(out, b"")?;
        }
    }
    Ok(())
}

pub(crate) fn read_answer(r: &mut impl Read) -> io::Result<Answer> {
    let kind = read_u8(r)?;
    let payload = read_bytes(r, MAX_ANSWER)?;
    let text = |payload: Vec<u8>| String::from_utf8_lossy(&payload).into_owned();
    Ok(match kind {
        0 => Answer::Values(values_of(&payload)?),
        1 => Answer::Refused(text(payload)),
        2 => Answer::Panicked(text(payload)),
        3 => Answer::TimedOut,
        other => return Err(invalid(format!("an answer of unknown kind {other}"))),
    })
}

/// `n:u32 n × end:u32 bytes`, checked: ends ascend and stay within the bytes.
fn values_of(payload: &[u8]) -> io::Result<Values> {
    let mut r = payload;
    let n = read_u32(&mut r)? as usize;
    if n > r.len() / 4 {
        return Err(invalid("an answer with more values than bytes"));
    }
    let mut ends = Vec::with_capacity(n);
    for _ in 0..n {
        ends.push(read_u32(&mut r)? as usize);
    }
    let bytes = r.to_vec();
    let ascending = ends.windows(2).all(|w| w[0] <= w[1]) && ends.last().is_none_or(|&end| end == bytes.len());
    if !ascending || (ends.is_empty() && !bytes.is_empty()) {
        return Err(invalid("an answer whose values do not add up"));
    }
    Ok(Values { bytes, ends })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_reads_back_as_written() {
        let hello = Hello { timeout: Duration::from_millis(1500), memory: 1 << 30, program: ".a | .b".into() };
        let mut wire = Vec::new();
        write_hello(&mut wire, &hello).unwrap();
        assert_eq!(read_hello(&mut wire.as_slice()).unwrap(), hello);

        let mut wire = b"\nrunning 1 test\n".to_vec();
        write_ready(&mut wire, &Ready::Invalid("line 1, column 3: expected term".into())).unwrap();
        let ready = read_ready(&mut wire.as_slice(), 4096).unwrap();
        assert_eq!(ready, Ready::Invalid("line 1, column 3: expected term".into()));

        let mut wire = Vec::new();
        write_run(&mut wire, true, &[b"{\"a\":1}", b"", b"[2]"]).unwrap();
        let run = read_run(&mut wire.as_slice()).unwrap().unwrap();
        assert!(run.careful);
        assert_eq!(run.objects().collect::<Vec<_>>(), vec![&b"{\"a\":1}"[..], b"", b"[2]"]);
        assert!(read_run(&mut &b""[..]).unwrap().is_none(), "a closed connection between runs ends them");

        let answers = vec![
            Answer::Values(Values { bytes: b"1[2]".to_vec(), ends: vec![1, 4] }),
            Answer::Values(Values::default()),
            Answer::Refused("no total".into()),
            Answer::Panicked("oops".into()),
            Answer::TimedOut,
        ];
        let mut wire = Vec::new();
        for answer in &answers {
            put_answer(&mut wire, answer).unwrap();
        }
        let mut r = wire.as_slice();
        for answer in &answers {
            assert_eq!(&read_answer(&mut r).unwrap(), answer);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn a_garbled_frame_is_an_error_not_a_panic_or_a_huge_allocation() {
        let no_greeting = vec![b'x'; 10_000];
        let err = read_ready(&mut no_greeting.as_slice(), 4096).unwrap_err();
        assert!(err.to_string().contains("instead of greeting"), "{err}");
        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        assert!(read_answer(&mut &huge[..]).unwrap_err().to_string().contains("more than"));
        // Ends past the bytes.
        let mut wire = vec![0u8];
        wire.extend_from_slice(&12u32.to_le_bytes());
        wire.extend_from_slice(&1u32.to_le_bytes());
        wire.extend_from_slice(&9u32.to_le_bytes());
        wire.extend_from_slice(b"1234");
        assert!(read_answer(&mut wire.as_slice()).unwrap_err().to_string().contains("do not add up"));
        assert!(read_hello(&mut &b"GET / HTTP/1.1\r\n"[..]).is_err());
    }
}
