//! A cache-wide lock per blob (`flock` on `<cache>/.sarde/locks/<algo>-<hex>`), so
//! concurrent fetches of one image download each blob once. Held by the open
//! file: released on drop and when the process dies.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sarde_api::Digest;

use crate::TransferError;

pub(crate) struct BlobLock {
    _file: File,
}

/// The directory for sarde's own state inside the cache; its name starts with a
/// dot, so listing the cache's repositories never sees it.
pub(crate) fn state_dir(cache: &Path) -> PathBuf {
    cache.join(".sarde")
}

impl BlobLock {
    /// Waits for the lock of `digest` (off the async threads).
    pub(crate) async fn acquire(cache: &Path, digest: &Digest) -> Result<BlobLock, TransferError> {
        let dir = state_dir(cache).join("locks");
        let path = dir.join(format!("{}-{}", digest.algorithm().name(), digest.hex()));
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(TransferError::io(&dir, "creating the lock directory"))?;
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(TransferError::io(&path, "opening the blob lock"))?;
            loop {
                // SAFETY: flock on a descriptor we own.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    return Ok(BlobLock { _file: file });
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(TransferError::io(&path, "locking the blob")(e));
                }
            }
        })
        .await
        .map_err(|e| TransferError::Aborted(format!("blob lock task failed: {e}")))?
    }
}
