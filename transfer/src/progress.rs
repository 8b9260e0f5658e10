//! What a transfer reports as it goes; the binary draws bars or writes lines.

use sarde_api::Digest;

/// One step of a transfer.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// The image's blobs are known: `bytes` in `blobs` blobs may move.
    Start {
        image: &'a str,
        blobs: usize,
        bytes: u64,
    },
    /// Bytes of a blob moved (also bytes already there from an earlier run).
    Bytes { digest: &'a Digest, n: u64 },
    /// A blob needs no transfer: it is there, was mounted or linked.
    Skipped { digest: &'a Digest, size: u64 },
    /// A blob was moved and verified.
    Done { digest: &'a Digest, size: u64 },
    /// The transfer retried after a transient failure.
    Retry { message: &'a str },
    /// The manifest was written; the image is complete.
    Finish { image: &'a str },
}

/// Receives [`Event`]s, from several tasks at once.
pub trait Progress: Send + Sync {
    fn event(&self, event: &Event<'_>);
}

/// Ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _: &Event<'_>) {}
}
