//! A result as the saver keeps it between decoding and saving: the message's bytes, and where
//! each output value lies in them. The values are parsed once (borrowed, which checks their
//! JSON and UTF-8) and then written as they arrived: nothing is re-serialised.

use std::ops::Range;

use bytes::Bytes;
use common::protocol::{self, ChunkResult, DeadObject, ProtocolError, ResultHead};

/// A decoded, validated result.
#[derive(Debug, Clone)]
pub struct Decoded {
    payload: Bytes,
    /// What names it.
    pub head: ResultHead,
    /// Every output value's bytes in `payload`, object after object.
    values: Vec<Range<usize>>,
    /// Where object `i`'s values start in `values` (one more entry than objects).
    starts: Vec<usize>,
    /// Per object, its id (the job's id field), when the job has one.
    pub ids: Option<Vec<Option<String>>>,
    /// The objects without outputs.
    pub dead: Vec<DeadObject>,
}

impl Decoded {
    /// Decodes and validates a result message (see [`ChunkResult::validate`]).
    pub fn decode(payload: Bytes) -> Result<Self, ProtocolError> {
        let (head, values, starts, ids, dead) = {
            let result: ChunkResult = protocol::decode_bounded(&payload)?;
            result.validate()?;
            let base = payload.as_ptr() as usize;
            let mut values = Vec::with_capacity(result.outputs.len());
            let mut starts = Vec::with_capacity(result.outputs.len() + 1);
            for object in &result.outputs {
                starts.push(values.len());
                for value in object {
                    let start = (value.get().as_ptr() as usize)
                        .checked_sub(base)
                        .ok_or_else(|| ProtocolError::Invalid("a value outside its message".into()))?;
                    values.push(start..start + value.get().len());
                }
            }
            starts.push(values.len());
            let dead = result.all_dead();
            (result.head, values, starts, result.ids, dead)
        };
        Ok(Decoded { payload, head, values, starts, ids, dead })
    }

    /// Input objects accounted for.
    pub fn objects(&self) -> usize {
        self.starts.len() - 1
    }

    /// Output values in all.
    pub fn value_count(&self) -> usize {
        self.values.len()
    }

    /// Object `index`'s output values, in order.
    pub fn values_of(&self, index: usize) -> impl Iterator<Item = &[u8]> + '_ {
        let range = self.starts.get(index).copied().unwrap_or(0)..self.starts.get(index + 1).copied().unwrap_or(0);
        self.values[range].iter().map(|r| &self.payload[r.clone()])
    }

    /// Every output value with its object's index and its position among that object's values.
    pub fn values(&self) -> impl Iterator<Item = (usize, usize, &[u8])> + '_ {
        (0..self.objects()).flat_map(move |i| self.values_of(i).enumerate().map(move |(j, v)| (i, j, v)))
    }

    /// Object `index`'s id, if the job has ids and the object one.
    pub fn id_of(&self, index: usize) -> Option<&str> {
        self.ids.as_ref().and_then(|ids| ids.get(index)).and_then(|id| id.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::protocol::Cause;
    use uuid::Uuid;

    #[test]
    fn values_are_found_in_the_message_by_object() {
        let head = ResultHead {
            run: "0123456789abcdef".into(),
            job: "00000000000000aa".into(),
            chunk: common::protocol::ChunkId(1),
            lease: Uuid::nil(),
            attempt: 1,
            mapper: "m".into(),
        };
        let dead = vec![DeadObject { index: 1, id: None, cause: Cause::Transform, error: "x".into(), line: None }];
        let objects: Vec<Vec<&[u8]>> = vec![vec![b"{\"a\":1}", b"[2]"], vec![], vec![b"\"three\""]];
        let body = protocol::encode_result(&head, objects.iter().map(|o| o.iter().copied()), None, &dead);
        let decoded = Decoded::decode(Bytes::from(body)).expect("decodes");
        assert_eq!((decoded.objects(), decoded.value_count()), (3, 3));
        assert_eq!(decoded.values_of(0).collect::<Vec<_>>(), vec![&b"{\"a\":1}"[..], b"[2]"]);
        assert_eq!(decoded.values_of(1).count(), 0);
        let all: Vec<(usize, usize)> = decoded.values().map(|(i, j, _)| (i, j)).collect();
        assert_eq!(all, vec![(0, 0), (0, 1), (2, 0)]);
    }
}
