//! Lets a consumer (pull's import) use blobs as soon as each one is in the cache,
//! while the rest still download.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use sarde_api::Digest;

#[derive(Debug, Default)]
struct State {
    ready: HashMap<Digest, ()>,
    failed: Option<String>,
}

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

    /// Marks a blob as verified and in the cache.
    pub fn ready(&self, digest: &Digest) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.ready.insert(digest.clone(), ());
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
        gate.ready(&a);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        let (g, d) = (gate.clone(), b.clone());
        let waiter = std::thread::spawn(move || g.wait(&d));
        gate.fail("registry gone".into());
        assert_eq!(waiter.join().unwrap(), Err("registry gone".into()));
        // Ready blobs stay usable after a failure elsewhere.
        assert_eq!(gate.wait(&a), Ok(()));
    }
}
