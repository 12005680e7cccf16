//! JetStream replicas: how many NATS servers keep a copy of a stream or key-value bucket (the
//! fetcher's `--kv-replicas`, the broadcaster's `--jetstream-replicas`), and what to tell an
//! operator when the server cannot place that many. One copy (the default) is what a single
//! nats-server can hold; a 3-node cluster holds 3 and survives the loss of one node.

use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind};
use async_nats::jetstream::ErrorCode;

/// The most copies JetStream keeps of one stream.
pub const MAX_REPLICAS: usize = 5;

/// Parses a replica count, 1 to [`MAX_REPLICAS`] (clap value parser).
pub fn parse_replicas(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a replica count: 1 to {MAX_REPLICAS}, at most the number of JetStream servers in the NATS cluster"
        )),
    }
}

/// Why JetStream refused to keep the asked number of copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicasRefused {
    /// The server is not part of a cluster: it keeps one copy, whatever is asked. Permanent.
    NotClustered,
    /// The cluster has fewer JetStream servers (or less room) than copies asked for. May pass
    /// while servers of a starting cluster join.
    TooFewServers,
}

impl ReplicasRefused {
    /// Whether JetStream's `error` (or an error it wraps) refuses a replica count, and why.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut next = Some(error);
        while let Some(e) = next {
            let code = e.downcast_ref::<async_nats::jetstream::Error>().map(|e| e.error_code()).or_else(|| {
                e.downcast_ref::<CreateStreamError>().and_then(|e| match e.kind() {
                    CreateStreamErrorKind::JetStream(js) => Some(js.error_code()),
                    _ => None,
                })
            });
            match code {
                Some(ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED) => return Some(ReplicasRefused::NotClustered),
                Some(ErrorCode::CLUSTER_NO_PEERS | ErrorCode::INSUFFICIENT_RESOURCES) => {
                    return Some(ReplicasRefused::TooFewServers)
                }
                _ => next = e.source(),
            }
        }
        None
    }

    /// Retrying cannot help.
    pub fn is_permanent(self) -> bool {
        self == ReplicasRefused::NotClustered
    }

    /// The reason in an operator's words, for `replicas` copies asked.
    pub fn describe(self, replicas: usize) -> String {
        match self {
            ReplicasRefused::NotClustered => {
                format!("the NATS server is not clustered and keeps 1 copy, not {replicas}")
            }
            ReplicasRefused::TooFewServers => {
                format!("the NATS cluster has fewer than {replicas} JetStream servers with room for a copy")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_counts_are_one_to_five() {
        assert_eq!(parse_replicas("1"), Ok(1));
        assert_eq!(parse_replicas("3"), Ok(3));
        assert!(parse_replicas("0").is_err());
        assert!(parse_replicas("6").unwrap_err().contains("1 to 5"));
        assert!(parse_replicas("three").is_err());
    }

    #[test]
    fn errors_that_are_not_about_replicas_are_not_read_as_such() {
        let other = std::io::Error::other("connection reset");
        assert_eq!(ReplicasRefused::of(&other), None);
    }
}
