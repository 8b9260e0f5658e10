//! Blob writes that survive interruption, serialised per blob: what the
//! `oci-dir` transport (the cache, or one `oci:` layout) offers the copy engine
//! through [`sarde_api::transport::BlobSink`].
//!
//! - In the cache, one lock per blob under the root (`flock` on
//!   `.sarde/locks/<algo>-<hex>`), so processes fetching the same image write
//!   each blob once; held by the open file, so it goes when the process dies.
//! - The bytes go to a partial file first (in the cache
//!   `.sarde/partial/<algo>-<hex>`, where prune finds it; in a user's layout
//!   directory `blobs/<algo>/.partial-<hex>`, beside the blobs, so the directory
//!   stays what skopeo expects); an interrupted write leaves them there and the
//!   next sink resumes after them (they are hashed again, so nothing unverified
//!   counts).
//! - Verified by size and digest, synced, then renamed into the layout.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sarde_api::oci::Descriptor;
use sarde_api::transport::{BlobReader, BlobSink};
use sarde_api::{Digest, TransportError};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::layout::Layout;

/// Bytes read per write to the partial file.
const READ_CHUNK: usize = 1 << 20;

/// sarde's own state under a root; its name starts with a dot, so listing the
/// cache's repositories never sees it.
pub(crate) fn state_dir(root: &Path) -> PathBuf {
    root.join(".sarde")
}

fn blob_file_name(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm().name(), digest.hex())
}

/// A root-wide lock on one blob.
pub(crate) struct BlobLock {
    _file: File,
}

impl BlobLock {
    /// Waits for the lock of `digest` (off the async threads).
    pub(crate) async fn acquire(root: &Path, digest: &Digest) -> io::Result<BlobLock> {
        let dir = state_dir(root).join("locks");
        let path = dir.join(blob_file_name(digest));
        tokio::task::spawn_blocking(move || {
            fs::create_dir_all(&dir)?;
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            loop {
                // SAFETY: flock on a descriptor we own.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    return Ok(BlobLock { _file: file });
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Where the cache keeps the partial file of a blob.
pub(crate) fn cache_partial_path(root: &Path, digest: &Digest) -> PathBuf {
    state_dir(root).join("partial").join(blob_file_name(digest))
}

/// Where a layout directory keeps the partial file of a blob.
pub(crate) fn layout_partial_path(layout: &Layout, digest: &Digest) -> PathBuf {
    let blob = layout.blob_path(digest);
    blob.with_file_name(format!(".partial-{}", digest.hex()))
}

/// A blob being written into a layout through its partial file.
pub(crate) struct PartialBlob {
    _lock: Option<BlobLock>,
    layout: Layout,
    blob: Descriptor,
    path: PathBuf,
    file: File,
    hasher: Sha256,
    have: u64,
    /// For messages.
    location: String,
    repository: String,
}

impl PartialBlob {
    /// Opens (or starts) the partial file of `blob` under `root` and hashes what
    /// it holds; a file longer than the blob starts over. Blocking.
    pub(crate) fn open(
        lock: Option<BlobLock>,
        path: PathBuf,
        layout: Layout,
        blob: &Descriptor,
        location: String,
        repository: String,
    ) -> io::Result<PartialBlob> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let len = file.metadata()?.len();
        let mut hasher = Sha256::new();
        let mut have = 0u64;
        if len > blob.size {
            file.set_len(0)?;
        } else {
            let mut buf = vec![0u8; READ_CHUNK];
            while have < len {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                have += n as u64;
            }
            file.seek(SeekFrom::Start(have))?;
            file.set_len(have)?;
        }
        if have > 0 {
            tracing::info!(
                "{location}: resuming {} at {have} of {} bytes",
                blob.digest,
                blob.size
            );
        }
        Ok(PartialBlob {
            _lock: lock,
            layout,
            blob: blob.clone(),
            path,
            file,
            hasher,
            have,
            location,
            repository,
        })
    }

    fn io(&self, context: &str) -> impl FnOnce(io::Error) -> TransportError + '_ {
        let context = format!("{context} ({})", self.path.display());
        move |source| TransportError::Io {
            location: self.location.clone(),
            context,
            source,
        }
    }

    /// Verified: synced and renamed into the layout (a verified copy across
    /// file systems).
    fn commit(self) -> Result<(), TransportError> {
        self.file
            .sync_all()
            .map_err(self.io("syncing the partial blob"))?;
        let target = self.layout.blob_path(&self.blob.digest);
        let dir = target
            .parent()
            .expect("blob paths have a directory")
            .to_path_buf();
        fs::create_dir_all(&dir).map_err(self.io("creating the blob directory"))?;
        match fs::rename(&self.path, &target) {
            Ok(()) => File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(self.io("syncing the blob directory")),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let copy = || -> Result<(), crate::LayoutError> {
                    let mut input =
                        File::open(&self.path).map_err(|source| crate::LayoutError::Io {
                            path: self.path.clone(),
                            context: "reopening the partial blob",
                            source,
                        })?;
                    let mut writer = self.layout.blob_writer()?;
                    io::copy(&mut input, &mut writer).map_err(|source| crate::LayoutError::Io {
                        path: target.clone(),
                        context: "copying the blob into the layout",
                        source,
                    })?;
                    writer.commit(Some((&self.blob.digest, self.blob.size)))?;
                    Ok(())
                };
                copy().map_err(|e| TransportError::Protocol {
                    location: self.location.clone(),
                    message: e.to_string(),
                })?;
                let _ = fs::remove_file(&self.path);
                Ok(())
            }
            Err(e) => Err(self.io("moving the blob into the layout")(e)),
        }
    }
}

#[async_trait]
impl BlobSink for PartialBlob {
    fn offset(&self) -> u64 {
        self.have
    }

    async fn write(mut self: Box<Self>, mut data: BlobReader) -> Result<(), TransportError> {
        let mut buf = vec![0u8; READ_CHUNK];
        while self.have < self.blob.size {
            let n = match data.read(&mut buf).await {
                Ok(n) => n,
                Err(source) => {
                    if source.kind() == io::ErrorKind::InvalidData {
                        // The data is wrong, not cut short: keep none of it.
                        let _ = fs::remove_file(&self.path);
                    }
                    return Err(TransportError::Io {
                        location: self.location.clone(),
                        context: format!(
                            "reading blob {} for {} after {} bytes",
                            self.blob.digest, self.repository, self.have
                        ),
                        source,
                    });
                }
            };
            if n == 0 {
                return Err(TransportError::Mismatch {
                    location: self.location.clone(),
                    object: format!("blob {} for {}", self.blob.digest, self.repository),
                    what: "size of the data received",
                    expected: self.blob.size.to_string(),
                    actual: self.have.to_string(),
                });
            }
            let n = n.min(usize::try_from(self.blob.size - self.have).unwrap_or(usize::MAX));
            // Written from the async task as it arrives: a local file write is
            // short next to a network read, and the kernel writes back behind us.
            let (file, have) = (&mut self.file, self.have);
            file.write_all(&buf[..n])
                .map_err(|source| TransportError::Io {
                    location: self.location.clone(),
                    context: format!("writing {}", self.path.display()),
                    source,
                })?;
            sarde_api::writeback::start_writeback(file, have, n as u64);
            self.hasher.update(&buf[..n]);
            self.have += n as u64;
        }
        let actual = Digest::from_sha256(std::mem::take(&mut self.hasher).finalize().into());
        if actual != self.blob.digest {
            // Whatever part is wrong, none of it is kept for a resume.
            let _ = fs::remove_file(&self.path);
            return Err(TransportError::Mismatch {
                location: self.location.clone(),
                object: format!(
                    "blob {} for {} (nothing stored)",
                    self.blob.digest, self.repository
                ),
                what: "digest",
                expected: self.blob.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        tokio::task::spawn_blocking(move || self.commit())
            .await
            .map_err(|e| TransportError::Protocol {
                location: String::new(),
                message: format!("committing a blob failed: {e}"),
            })?
    }
}
