//! # sarde-lifecycle
//!
//! Keeps a runner host from filling up, without ever removing what is in use.
//!
//! - [`lease`] — a running command's claim on images, blobs and layouts of the
//!   cache (a file in `<cache>/.sarde/leases/` held with `flock`: it dies with its
//!   process, as containerd's leases expire);
//! - [`usage`] — when an image or a VM was last used, as sarde records it (pull,
//!   fetch, import, clone, executor job), never the file system's atime;
//! - [`space`] — real sizes: allocated blocks, each inode once, free space;
//! - [`inventory`] — one scan of the cache: images, their blobs, orphans,
//!   temporary files, partial downloads, leases;
//! - [`metadata_only`] — images kept without their disk pieces (`keep-blobs =
//!   false`: the imported VM holds the data);
//! - [`plan`] — what a prune removes (always garbage; `--older-than`;
//!   `--space-budget`; the shortfall of an automatic reclaim), least recently used
//!   first, computed the same way for `--dry-run` and for the real run;
//! - [`sweep`] — carries a plan out, crash-safe: tags leave the index before any
//!   blob is deleted, and each deletion is checked again under the layout's lock.
//!
//! VMs are the engine's (they need the hypervisor); the planner takes them as
//! [`plan::VmItem`]s and the sweeper hands them back to a callback.

pub mod inventory;
pub mod lease;
pub mod metadata_only;
pub mod plan;
pub mod space;
pub mod sweep;
pub mod usage;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use inventory::CacheInventory;
pub use lease::Lease;
pub use plan::{Plan, Policy, VmItem};
pub use sweep::Swept;

/// What can go wrong; every message names the file.
#[derive(Debug, Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Layout(#[from] sarde_transport_oci_dir::LayoutError),
    #[error("{}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl LifecycleError {
    pub(crate) fn io(path: &Path, context: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| LifecycleError::Io {
            path,
            context,
            source,
        }
    }
}

pub type Result<T, E = LifecycleError> = std::result::Result<T, E>;

/// sarde's own state inside the cache; the leading dot keeps it out of the list
/// of repositories.
pub fn state_dir(cache: &Path) -> PathBuf {
    cache.join(".sarde")
}

/// A layout's path relative to the cache root (`host[:port]/repo`), the key of
/// leases and usage records; the full path when it is outside the cache.
pub fn layout_key(cache: &Path, layout: &Path) -> String {
    layout
        .strip_prefix(cache)
        .unwrap_or(layout)
        .to_string_lossy()
        .into_owned()
}

/// Tries an exclusive `flock` on an existing file without waiting: `Some(file)`
/// (holding the lock) when nobody holds it, `None` when somebody does or the file
/// is gone. Never creates the file.
pub(crate) fn try_lock_existing(path: &Path) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::options().write(true).open(path).ok()?;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Some(file);
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return None;
        }
    }
}

/// Nanoseconds since the epoch (0 before it).
pub(crate) fn unix_ns(t: std::time::SystemTime) -> i128 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}
