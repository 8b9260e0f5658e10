//! Leases: what a running command reads or writes in the cache.
//!
//! A lease is two files in `<cache>/.sarde/leases/`: `<id>.lock`, held with an
//! exclusive `flock` for the lease's life (so it ends when its process dies, even
//! by `kill -9`), and `<id>.json`, the [`LeaseRecord`], replaced atomically as the
//! command learns what it needs. A collector treats a record whose lock it can
//! take as dead.
//!
//! Every change of a record is written while holding the layout's blob-set lock
//! shared (see `Layout::blobs_shared`); a collector reads the records while
//! holding it exclusively, so it either sees the claim or runs entirely before
//! it (and then the command finds a blob gone and fetches it again).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use sarde_api::Digest;
use sarde_transport_oci_dir::Layout;
use serde::{Deserialize, Serialize};

use crate::{LifecycleError, Result, layout_key, state_dir, try_lock_existing, unix_ns};

/// What a lease protects. Layouts are named relative to the cache root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub pid: u32,
    /// The command, for people reading the file.
    pub command: String,
    /// When the lease began (ns since the epoch): blobs of a leased layout changed
    /// since then are the command's own new blobs.
    pub started_ns: i128,
    /// Layouts the command writes new blobs into: their blobs changed since
    /// `started_ns` and their temporary files stay.
    #[serde(default)]
    pub layouts: BTreeSet<String>,
    /// Images read or written: `(layout, tag or digest)`.
    #[serde(default)]
    pub images: BTreeSet<(String, String)>,
    /// Blobs counted on, in any layout of the cache.
    #[serde(default)]
    pub blobs: BTreeSet<Digest>,
}

impl LeaseRecord {
    /// Whether the lease names this image (by the tag or digest it was asked for).
    pub fn holds_image(&self, layout: &str, tag: Option<&str>, manifest: &Digest) -> bool {
        self.images.iter().any(|(l, reference)| {
            l == layout && (Some(reference.as_str()) == tag || *reference == manifest.to_string())
        })
    }
}

/// A held lease; released (its files removed) on drop.
#[derive(Debug)]
pub struct Lease {
    cache: PathBuf,
    lock_path: PathBuf,
    record_path: PathBuf,
    record: Mutex<LeaseRecord>,
    _lock: File,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Where leases live.
pub fn lease_dir(cache: &Path) -> PathBuf {
    state_dir(cache).join("leases")
}

impl Lease {
    /// Takes a new, empty lease in the cache at `cache`.
    pub fn take(cache: &Path, command: &str) -> Result<Lease> {
        let dir = lease_dir(cache);
        fs::create_dir_all(&dir)
            .map_err(LifecycleError::io(&dir, "creating the lease directory"))?;
        let started = SystemTime::now();
        let id = format!(
            "{}-{}-{}",
            std::process::id(),
            unix_ns(started),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let lock_path = dir.join(format!("{id}.lock"));
        let record_path = dir.join(format!("{id}.json"));
        let lock = File::options()
            .create_new(true)
            .write(true)
            .open(&lock_path)
            .map_err(LifecycleError::io(&lock_path, "creating the lease"))?;
        // SAFETY: flock on a descriptor we own; a new file nobody else holds.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(LifecycleError::io(&lock_path, "locking the lease")(
                std::io::Error::last_os_error(),
            ));
        }
        let lease = Lease {
            cache: cache.to_path_buf(),
            lock_path,
            record_path,
            record: Mutex::new(LeaseRecord {
                pid: std::process::id(),
                command: command.to_string(),
                started_ns: unix_ns(started),
                ..LeaseRecord::default()
            }),
            _lock: lock,
        };
        let record = lease.record.lock().expect("lease record lock").clone();
        lease.write(&record)?;
        // Leases of killed processes would otherwise stay until a prune; a
        // runner host that never prunes would gather one pair per kill.
        for dead in Leases::read(cache).dead {
            remove_dead(&dead);
        }
        Ok(lease)
    }

    /// The cache the lease is in.
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// Claims a layout the command writes new blobs into.
    pub fn protect_layout(&self, layout: &Layout) -> Result<()> {
        let key = layout_key(&self.cache, layout.path());
        self.change(layout, |r| r.layouts.insert(key))
    }

    /// Claims an image (tag or digest) of a layout: it is neither untagged nor
    /// collected while the lease lives.
    pub fn protect_image(&self, layout: &Layout, reference: &str) -> Result<()> {
        let key = layout_key(&self.cache, layout.path());
        self.change(layout, |r| r.images.insert((key, reference.to_string())))
    }

    /// Claims blobs the command is about to find or put in `layout`; claim them
    /// before looking for them, so a collector cannot take one in between.
    pub fn protect_blobs<'a>(
        &self,
        layout: &Layout,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) -> Result<()> {
        let digests: Vec<Digest> = digests.into_iter().cloned().collect();
        self.change(layout, |r| {
            let before = r.blobs.len();
            r.blobs.extend(digests);
            r.blobs.len() != before
        })
    }

    /// Lets go of blobs the command no longer counts on.
    pub fn release_blobs<'a>(
        &self,
        layout: &Layout,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) -> Result<()> {
        let digests: Vec<&Digest> = digests.into_iter().collect();
        self.change(layout, |r| {
            let before = r.blobs.len();
            r.blobs.retain(|d| !digests.contains(&d));
            r.blobs.len() != before
        })
    }

    fn change(&self, layout: &Layout, change: impl FnOnce(&mut LeaseRecord) -> bool) -> Result<()> {
        let mut record = self.record.lock().expect("lease record lock");
        if !change(&mut record) {
            return Ok(());
        }
        let _guard = layout.blobs_shared()?;
        self.write(&record)
    }

    fn write(&self, record: &LeaseRecord) -> Result<()> {
        let dir = self
            .record_path
            .parent()
            .expect("a lease file has a directory");
        let mut temp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(LifecycleError::io(dir, "writing the lease"))?;
        temp.write_all(&serde_json::to_vec(record).expect("a lease record serialises"))
            .map_err(LifecycleError::io(temp.path(), "writing the lease"))?;
        // No fsync: a lease means nothing after a crash.
        temp.persist(&self.record_path)
            .map_err(|e| LifecycleError::io(&self.record_path, "writing the lease")(e.error))?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The record first: a lock file without a record protects nothing.
        let _ = fs::remove_file(&self.record_path);
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// The leases in a cache: the live ones' records, and the files of dead ones.
#[derive(Debug, Clone, Default)]
pub struct Leases {
    pub live: Vec<LeaseRecord>,
    /// Files of leases whose process is gone.
    pub dead: Vec<PathBuf>,
}

impl Leases {
    /// Reads the lease directory. A record whose lock nobody holds is dead.
    pub fn read(cache: &Path) -> Leases {
        let mut out = Leases::default();
        let dir = lease_dir(cache);
        let Ok(entries) = fs::read_dir(&dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(id) = name.strip_suffix(".json") {
                if try_lock_existing(&dir.join(format!("{id}.lock"))).is_some() {
                    out.dead.push(path);
                    continue;
                }
                // Unreadable: removed by its owner in between, so it ended.
                if let Some(record) = fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<LeaseRecord>(&b).ok())
                {
                    out.live.push(record);
                }
            } else if name.ends_with(".lock") {
                // Between its creation and its flock, and before its first record,
                // a lease's lock file stands alone: only an old one is dead.
                let record = path.with_extension("json");
                if !record.exists() && stale(&path) && try_lock_existing(&path).is_some() {
                    out.dead.push(path);
                }
            } else if name.starts_with(".tmp-") && stale(&path) {
                // A record write cut short long ago; one being written is young.
                out.dead.push(path);
            }
        }
        out.dead.sort();
        out
    }

    /// Whether some live lease writes into this layout.
    pub fn writes_layout(&self, layout: &str) -> bool {
        self.live.iter().any(|l| l.layouts.contains(layout))
    }

    /// The earliest start of a live lease writing into this layout.
    pub fn earliest_writer_ns(&self, layout: &str) -> Option<i128> {
        self.live
            .iter()
            .filter(|l| l.layouts.contains(layout))
            .map(|l| l.started_ns)
            .min()
    }

    pub fn holds_blob(&self, digest: &Digest) -> bool {
        self.live.iter().any(|l| l.blobs.contains(digest))
    }

    pub fn holds_image(&self, layout: &str, tag: Option<&str>, manifest: &Digest) -> bool {
        self.live
            .iter()
            .any(|l| l.holds_image(layout, tag, manifest))
    }
}

/// Lease files younger than this may belong to a lease being created.
const LEASE_FILE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

fn stale(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= LEASE_FILE_GRACE)
}

/// Removes the files of a dead lease, checking again that nobody holds it.
pub(crate) fn remove_dead(path: &Path) -> bool {
    let lock = if path.extension().is_some_and(|e| e == "json") {
        path.with_extension("lock")
    } else {
        path.to_path_buf()
    };
    let held = try_lock_existing(&lock);
    if lock.exists() && held.is_none() {
        return false;
    }
    let removed = fs::remove_file(path).is_ok();
    if lock != path {
        let _ = fs::remove_file(&lock);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_live_while_held_and_gone_after() {
        let cache = tempfile::tempdir().unwrap();
        let layout = Layout::create(cache.path().join("h/r")).unwrap();
        let lease = Lease::take(cache.path(), "test").unwrap();
        lease.protect_layout(&layout).unwrap();
        lease.protect_image(&layout, "v1").unwrap();
        let digest = Digest::sha256_of(b"x");
        lease.protect_blobs(&layout, [&digest]).unwrap();
        let leases = Leases::read(cache.path());
        assert_eq!(leases.live.len(), 1, "{leases:?}");
        assert!(leases.dead.is_empty());
        assert!(leases.writes_layout("h/r"));
        assert!(leases.holds_blob(&digest));
        assert!(leases.holds_image("h/r", Some("v1"), &digest));
        assert!(!leases.holds_image("h/r", Some("v2"), &digest));
        drop(lease);
        let leases = Leases::read(cache.path());
        assert!(
            leases.live.is_empty() && leases.dead.is_empty(),
            "{leases:?}"
        );
        assert_eq!(fs::read_dir(lease_dir(cache.path())).unwrap().count(), 0);
    }

    #[test]
    fn a_lease_whose_lock_is_free_is_dead() {
        let cache = tempfile::tempdir().unwrap();
        let lease = Lease::take(cache.path(), "test").unwrap();
        // A killed process: its files stay, its flock goes.
        let (record, lock) = (lease.record_path.clone(), lease.lock_path.clone());
        let kept = (fs::read(&record).unwrap(), lock.clone());
        drop(lease);
        fs::write(&record, kept.0).unwrap();
        fs::write(&kept.1, b"").unwrap();
        let leases = Leases::read(cache.path());
        assert!(leases.live.is_empty());
        assert_eq!(leases.dead, vec![record.clone()]);
        assert!(remove_dead(&record));
        assert!(!record.exists() && !lock.exists());
    }

    #[test]
    fn taking_a_lease_removes_dead_ones() {
        let cache = tempfile::tempdir().unwrap();
        let killed = Lease::take(cache.path(), "killed").unwrap();
        let (record, lock) = (killed.record_path.clone(), killed.lock_path.clone());
        let kept = fs::read(&record).unwrap();
        drop(killed);
        fs::write(&record, kept).unwrap();
        fs::write(&lock, b"").unwrap();
        let other = Lease::take(cache.path(), "live elsewhere").unwrap();
        let lease = Lease::take(cache.path(), "next").unwrap();
        assert!(!record.exists() && !lock.exists(), "the dead lease stays");
        let leases = Leases::read(cache.path());
        assert_eq!(leases.live.len(), 2, "a live lease went: {leases:?}");
        drop((other, lease));
    }
}
