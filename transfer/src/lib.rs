//! # sarde-transfer
//!
//! The one copy engine ([`CopyRequest`]): an image from any
//! [`Transport`](sarde_api::Transport) to any others, talking only to the trait
//! on both sides — `push` (the cache to a registry), `fetch` and `pull` (any
//! source to the cache, which is a transport like the others) and `copy`.
//!
//! - Several blobs at a time; a blob the destination has is skipped, one it can
//!   link from another of its repositories is linked (the cache), one in
//!   another repository of the same registry is mounted.
//! - What a destination kept of an interrupted blob is resumed from (the
//!   cache's partial files), in the same run after a network error and in a
//!   later run; locking concurrent writers of one blob is the destination's
//!   business too. Every blob is verified by size and digest on its way;
//!   manifests and tags are written last, so a cut copy leaves no half image.
//! - Transient failures (network errors, timeouts, 5xx, 429) are retried with
//!   exponential backoff, `retries` times per request and at most
//!   `retry_budget` times in all; everything else fails at once with the
//!   transport's error.

pub mod copy;
mod counters;
mod error;
mod gate;
mod manifest;
pub mod progress;
mod retry;
mod verify;

use std::time::Duration;

use serde::Serialize;

pub use copy::{Attachments, Copied, CopyRequest, Counting, Destination, Merge, SourceImage};
pub use error::{TransferError, VerifyFailure};
pub use gate::{BlobGate, WITHHELD};
pub use progress::{Event, NoProgress, Progress};
pub use retry::RetryBudget;

/// How transfers behave.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Blobs moved at a time.
    pub concurrency: usize,
    /// Attempts per request after the first, for transient failures.
    pub retries: u32,
    /// The first backoff; doubled per attempt, capped at [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Retries in all, shared by every request made with these options (and
    /// their clones): a registry failing everything ends a command after this
    /// many, however many blobs it has.
    pub retry_budget: RetryBudget,
}

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            concurrency: 4,
            retries: 5,
            backoff: Duration::from_millis(500),
            retry_budget: RetryBudget::new(50),
        }
    }
}

/// What one transfer moved, for `--format json` and the log.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Bytes uploaded.
    pub bytes_sent: u64,
    /// Bytes downloaded (blobs and manifests).
    pub bytes_received: u64,
    /// Bytes of blobs not moved because the other side had them (present, mounted
    /// or linked from another repository of the cache).
    pub bytes_skipped: u64,
    /// Blobs uploaded or downloaded.
    pub blobs_transferred: usize,
    /// Blobs the other side had already.
    pub blobs_skipped: usize,
    /// Blobs made available by a cross-repository mount or a local link.
    pub blobs_mounted: usize,
    /// Requests retried after a transient failure.
    pub retries: usize,
    pub seconds: f64,
}

impl Summary {
    /// Adds what another transfer moved.
    pub fn add(&mut self, other: &Summary) {
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.bytes_skipped += other.bytes_skipped;
        self.blobs_transferred += other.blobs_transferred;
        self.blobs_skipped += other.blobs_skipped;
        self.blobs_mounted += other.blobs_mounted;
        self.retries += other.retries;
    }
}
