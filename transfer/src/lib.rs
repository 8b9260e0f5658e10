//! # sarde-transfer
//!
//! Moves images between a [`Transport`](sarde_api::Transport) (a registry, or any
//! plugin's) and the local cache of OCI layouts — `push` one way, `fetch` the other.
//!
//! - Several blobs at a time; a blob the other side has is skipped (HEAD before
//!   upload; a local blob under any repository of the cache is linked, not
//!   downloaded); a blob in another repository of the same registry is mounted.
//! - Downloads go to a partial file per blob in the cache and resume with a range
//!   request, in the same run after a network error and in a later run after an
//!   interruption. A blob enters a layout only once its size and digest are
//!   verified; manifests and tags are written last, so a cut transfer leaves no
//!   half image.
//! - One lock per blob, cache-wide: processes fetching the same image download
//!   each blob once and all succeed.
//! - Transient failures (network errors, timeouts, 5xx, 429) are retried with
//!   exponential backoff, `retries` times per request and at most
//!   `retry_budget` times in all; everything else fails at once with the
//!   transport's error.

mod counters;
mod error;
pub mod fetch;
mod gate;
mod lock;
mod manifest;
pub mod progress;
pub mod push;
mod retry;
mod verify;

use std::time::Duration;

use serde::Serialize;

pub use error::{TransferError, VerifyFailure};
pub use fetch::{FetchRequest, Fetched, ResolvedImage};
pub use gate::BlobGate;
pub use progress::{Event, NoProgress, Progress};
pub use push::{PushRequest, PushTarget, Pushed};
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
