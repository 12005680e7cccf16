//! What happens to one object. A job's transform is data ([`TransformSpec`], part of the run id)
//! at the fetcher and behaviour ([`Transform`], built once per job by a [`Registry`]) at the
//! mappers and in `saver verify`. One input object gives zero, one or more output values (raw
//! JSON bytes, which travel to the sink as they are), or an [`ObjectError`] that becomes that
//! object's dead-letter entry.
//!
//! The built-in kinds, one module each: [`digest`] (the course's users data through iterated
//! SHA-256), [`jq`] (a jq program, run with jaq in sandbox processes) and [`command`] (a program
//! the mapper's operator registered, spoken to in JSON Lines). A user's own Rust transform
//! implements [`Transform`] and is registered by name (see `mapper::run_with`).
//!
//! Every kind runs on the caller's thread: the mapper calls [`Transform::apply_chunk`] on its
//! rayon pool, never on tokio's threads.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod command;
pub mod digest;
pub mod job_file;
pub mod jq;
pub mod registry;
pub mod spec;

use std::panic::{catch_unwind, AssertUnwindSafe};

use rayon::prelude::*;
use serde::Serialize;

pub use registry::{BuildError, Registry};
pub use spec::{IdField, Job, JobArgs, TransformSpec};

/// Why an object has no outputs: the protocol's causes (a transform produces `Transform`,
/// `Crash` or `Timeout`; the others come from the fetcher and the sink).
pub use common::protocol::Cause;

/// An object the transform gives no outputs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    /// What kind of failure.
    pub cause: Cause,
    /// What went wrong, for people.
    pub message: String,
}

impl ObjectError {
    /// The transform refused the object.
    pub fn refused(message: impl Into<String>) -> Self {
        ObjectError { cause: Cause::Transform, message: message.into() }
    }
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The output values of one input object: compact JSON, one after another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outputs {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Outputs {
    /// Appends one value given as JSON bytes. The caller guarantees they are one valid JSON
    /// value; line breaks outside strings are removed so a value always fits on one line.
    pub fn push_json(&mut self, json: &[u8]) {
        self.bytes.extend_from_slice(&common::json::compact(json));
        self.ends.push(self.bytes.len());
    }

    /// Values already compact and on one line each, one after another in `bytes`, each ending
    /// at its `ends` (ascending, the last at `bytes.len()`): a jq sandbox's answer.
    pub(crate) fn from_compact(bytes: Vec<u8>, ends: Vec<usize>) -> Self {
        Outputs { bytes, ends }
    }

    /// Appends one value serialised with serde_json (compact).
    pub fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ObjectError> {
        serde_json::to_writer(&mut self.bytes, value)
            .map_err(|e| ObjectError::refused(format!("cannot serialise an output: {e}")))?;
        self.ends.push(self.bytes.len());
        Ok(())
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// No values.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The values, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(start, end)| &self.bytes[start..end])
    }
}

/// What a transform does to the objects of a chunk.
pub trait Transform: Send + Sync {
    /// Transforms one input object (strict JSON bytes of one object, checked by the fetcher)
    /// into zero or more outputs appended to `out`.
    fn apply(&self, input: &[u8], out: &mut Outputs) -> Result<(), ObjectError>;

    /// A check of an input record that can be made before any chunk is leased (the digest's
    /// users schema), so that `fetcher --bad-records fail` can refuse bad input up front. The
    /// default accepts every object.
    fn check(&self, _input: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// Transforms the objects of a chunk, in order: the default runs [`Transform::apply`] on
    /// each in parallel on the current rayon pool, a panic becoming that object's
    /// [`Cause::Crash`]. A transform that talks to child processes overrides this to stream.
    fn apply_chunk(&self, inputs: &[&[u8]]) -> Vec<Result<Outputs, ObjectError>> {
        inputs.par_iter().map(|input| apply_caught(self, input)).collect()
    }

    /// Why this transform can no longer run here at all (a command whose every fresh child
    /// fails at once), if it cannot: the mapper then hands the chunk back as `cannot_run`
    /// instead of dead-lettering its objects. The default never breaks.
    fn broken(&self) -> Option<String> {
        None
    }
}

/// [`Transform::apply`] with a panic turned into [`Cause::Crash`].
pub fn apply_caught<T: Transform + ?Sized>(transform: &T, input: &[u8]) -> Result<Outputs, ObjectError> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut out = Outputs::default();
        transform.apply(input, &mut out).map(|()| out)
    }));
    outcome.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(ObjectError { cause: Cause::Crash, message: format!("the transform panicked: {what}") })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Twice;
    impl Transform for Twice {
        fn apply(&self, input: &[u8], out: &mut Outputs) -> Result<(), ObjectError> {
            if input == b"{}" {
                panic!("empty object");
            }
            out.push_json(input);
            out.push_json(input);
            Ok(())
        }
    }

    #[test]
    fn outputs_keep_their_order_and_fit_on_one_line_each() {
        let mut out = Outputs::default();
        out.push_json(b"{\"a\": [1,\n 2]}");
        out.push(&serde_json::json!({"b": "x\ny"})).unwrap();
        let values: Vec<&[u8]> = out.iter().collect();
        assert_eq!(values, vec![&b"{\"a\":[1,2]}"[..], &b"{\"b\":\"x\\ny\"}"[..]]);
    }

    #[test]
    fn a_chunk_gives_one_outcome_per_object_in_order_and_a_panic_is_a_crash() {
        let inputs: Vec<&[u8]> = vec![b"{\"a\":1}", b"{}", b"{\"a\":3}"];
        let outcomes = Twice.apply_chunk(&inputs);
        assert_eq!(outcomes[0].as_ref().unwrap().len(), 2);
        let err = outcomes[1].as_ref().unwrap_err();
        assert_eq!(err.cause, Cause::Crash);
        assert!(err.message.contains("empty object"), "{err}");
        assert_eq!(outcomes[2].as_ref().unwrap().iter().next(), Some(&b"{\"a\":3}"[..]));
    }
}
