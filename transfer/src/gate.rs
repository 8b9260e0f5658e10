//! Lets a consumer (pull's import) use blobs as soon as each one is in the cache,
//! while the rest still download.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use sarde_api::Digest;

#[derive(Debug, Default)]
struct State {
    /// Ready blobs, and whether this transfer downloaded and verified them (rather
    /// than finding them in the cache).
    ready: HashMap<Digest, bool>,
    /// Blobs the transfer does not move, with what to tell a waiter.
    withheld: HashMap<Digest, String>,
    failed: Option<String>,
}

/// In the message a waiter for a withheld blob gets, so the consumer can tell it
/// from a failed transfer and fetch the blob after all.
pub const WITHHELD: &str = "was not fetched, as the previous version on this host held its content";

/// Blobs that have arrived, and whether the transfer failed.
#[derive(Debug, Default)]
pub struct BlobGate {
    state: Mutex<State>,
    changed: Condvar,
}

impl BlobGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks a blob as in the cache; `verified_here` when this transfer downloaded
    /// it and checked its size and digest (not when it was there already, or
    /// linked from another repository of the cache, which only checks the size).
    pub fn ready(&self, digest: &Digest, verified_here: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.ready.insert(digest.clone(), verified_here);
        self.changed.notify_all();
    }

    /// Whether a ready blob was downloaded and verified by this transfer.
    pub fn verified_here(&self, digest: &Digest) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.ready.get(digest).copied().unwrap_or(false)
    }

    /// Marks a blob the transfer will not move: a waiter for it gets `message`.
    pub fn withhold(&self, digest: &Digest, message: String) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.withheld.insert(digest.clone(), message);
        self.changed.notify_all();
    }

    /// Marks the transfer as failed: every waiter gets `message`.
    pub fn fail(&self, message: String) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.failed.get_or_insert(message);
        self.changed.notify_all();
    }

    /// Blocks until the blob is ready, or returns the failure that ended the transfer.
    pub fn wait(&self, digest: &Digest) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if state.ready.contains_key(digest) {
                return Ok(());
            }
            if let Some(message) = state.withheld.get(digest) {
                return Err(message.clone());
            }
            if let Some(message) = &state.failed {
                return Err(message.clone());
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn waiters_wake_on_ready_and_on_failure() {
        let gate = Arc::new(BlobGate::new());
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let (g, d) = (gate.clone(), a.clone());
        let waiter = std::thread::spawn(move || g.wait(&d));
        std::thread::sleep(std::time::Duration::from_millis(20));
        gate.ready(&a, true);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert!(gate.verified_here(&a));
        assert!(!gate.verified_here(&b));
        let (g, d) = (gate.clone(), b.clone());
        let waiter = std::thread::spawn(move || g.wait(&d));
        gate.fail("registry gone".into());
        assert_eq!(waiter.join().unwrap(), Err("registry gone".into()));
        // Ready blobs stay usable after a failure elsewhere.
        assert_eq!(gate.wait(&a), Ok(()));
    }

    #[test]
    fn blobs_found_in_the_cache_are_ready_but_not_verified_here() {
        let gate = BlobGate::new();
        let a = Digest::sha256_of(b"a");
        gate.ready(&a, false);
        assert_eq!(gate.wait(&a), Ok(()));
        assert!(!gate.verified_here(&a));
    }
}
