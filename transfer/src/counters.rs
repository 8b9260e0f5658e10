//! What the blob tasks of one push or fetch count, shared between them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use sarde_api::oci::Descriptor;

use crate::Summary;
use crate::progress::{Event, Progress};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub skipped_bytes: AtomicU64,
    pub transferred: AtomicUsize,
    pub skipped: AtomicUsize,
    pub mounted: AtomicUsize,
    pub retries: AtomicUsize,
}

impl Counters {
    /// A blob that did not move: the other side had it, or got it by a mount or
    /// link (`mounted`).
    pub fn skip(&self, blob: &Descriptor, mounted: bool, progress: &dyn Progress) {
        if mounted {
            self.mounted.fetch_add(1, Ordering::Relaxed);
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        self.skipped_bytes.fetch_add(blob.size, Ordering::Relaxed);
        progress.event(&Event::Skipped {
            digest: &blob.digest,
            size: blob.size,
        });
    }

    pub fn into_summary(self, seconds: f64) -> Summary {
        Summary {
            bytes_sent: self.sent.into_inner(),
            bytes_received: self.received.into_inner(),
            bytes_skipped: self.skipped_bytes.into_inner(),
            blobs_transferred: self.transferred.into_inner(),
            blobs_skipped: self.skipped.into_inner(),
            blobs_mounted: self.mounted.into_inner(),
            retries: self.retries.into_inner(),
            seconds,
        }
    }
}
