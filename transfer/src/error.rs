use sarde_api::{Digest, TransportError};
use thiserror::Error;

/// Why a transfer failed; every message names the image and the object.
#[derive(Debug, Error)]
pub enum TransferError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The registry's manifest is not something sarde copies.
    #[error("{image}: manifest {digest}: {message}")]
    Manifest {
        image: String,
        digest: String,
        message: String,
    },
    /// A download ended with other content than its descriptor promised.
    #[error("{0}")]
    Verify(Box<VerifyFailure>),
    /// The connection broke while a blob streamed; retried like a transient error.
    // The cause follows in the error chain.
    #[error("{location}: blob {digest}: the download broke off after {received} bytes")]
    Stream {
        location: String,
        digest: Digest,
        received: u64,
        #[source]
        source: std::io::Error,
    },
    /// Another part of the same transfer failed first.
    #[error("{0}")]
    Aborted(String),
    /// Transient failures went on after the command's retries were spent.
    #[error("{last} (gave up: the {limit} retries of `retry-budget` are spent)")]
    RetryBudgetSpent {
        limit: u32,
        last: Box<TransferError>,
    },
}

impl TransferError {
    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        match self {
            TransferError::Transport(e) => e.is_transient(),
            TransferError::Stream { .. } => true,
            _ => false,
        }
    }

    /// How long the other side asked us to wait, if it did.
    pub(crate) fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            TransferError::Transport(TransportError::Transient { retry_after, .. }) => *retry_after,
            _ => None,
        }
    }
}

/// A blob whose downloaded content is not what its descriptor says.
#[derive(Debug, Error)]
#[error(
    "{image}: blob {digest} from {location} has {what} {actual}, expected {expected}; nothing was stored (the registry's copy is damaged, or a proxy or mirror in between sent other data; if it persists, push the image again)"
)]
pub struct VerifyFailure {
    pub image: String,
    pub location: String,
    pub digest: Digest,
    pub what: &'static str,
    pub expected: String,
    pub actual: String,
}
