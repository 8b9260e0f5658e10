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
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sarde_api::oci::Descriptor;
use sarde_api::transport::{BlobReader, BlobSink};
use sarde_api::{Digest, TransportError};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::direct::DirectAppender;
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
    /// `None` once committed.
    file: Option<File>,
    /// Appends to `file` past the page cache: the import that reads the blob
    /// next reads it once, and the cache of a 60 GB pull would cost more than
    /// the disk (see [`crate::direct`]).
    appender: DirectAppender,
    hasher: Sha256,
    have: u64,
    /// For messages.
    location: String,
    repository: String,
}

/// Opens the partial file without following a link, as a regular file of this
/// user: a directory others can write (a shared file system) must not turn
/// sarde's appends or truncation onto another file.
fn open_own_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != me {
        return Err(io::Error::other(format!(
            "{} is not a partial blob file of this user: remove it",
            path.display()
        )));
    }
    Ok(file)
}

/// Whether `file` is still the file at `path` (not renamed into place or
/// removed by the writer we waited for).
fn still_at(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    Ok(fs::symlink_metadata(path).is_ok_and(|m| m.dev() == open.dev() && m.ino() == open.ino()))
}

impl PartialBlob {
    /// Opens (or starts) the partial file of `blob` at `path` and hashes what
    /// it holds; a file longer than the blob starts over. Without `lock` (a
    /// user's layout directory), the partial file's own `flock` makes writers
    /// of the blob take turns; `None` when the one we waited for stored it.
    /// Blocking.
    pub(crate) fn open(
        lock: Option<BlobLock>,
        path: PathBuf,
        layout: Layout,
        blob: &Descriptor,
        location: String,
        repository: String,
    ) -> io::Result<Option<PartialBlob>> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut file = loop {
            let file = open_own_file(&path)?;
            if lock.is_some() {
                break file;
            }
            loop {
                // SAFETY: flock on a descriptor we own.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            if still_at(&file, &path)? {
                break file;
            }
            if layout.has_blob(blob) {
                return Ok(None);
            }
        };
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
        let appender = DirectAppender::new(&file, have)?;
        Ok(Some(PartialBlob {
            _lock: lock,
            layout,
            blob: blob.clone(),
            path,
            file: Some(file),
            appender,
            hasher,
            have,
            location,
            repository,
        }))
    }

    fn io_error(&self, context: &str, source: io::Error) -> TransportError {
        TransportError::Io {
            location: self.location.clone(),
            context: format!("{context} ({})", self.path.display()),
            source,
        }
    }

    /// Forgets what the file holds: the next write starts at byte 0.
    fn start_over(&mut self) {
        if let Some(file) = &mut self.file {
            let _ = file.set_len(0).and_then(|()| file.seek(SeekFrom::Start(0)));
        }
        self.appender.reset();
        self.hasher = Sha256::new();
        self.have = 0;
    }

    /// Appends what `data` holds up to the blob's size.
    async fn append(&mut self, data: &mut BlobReader) -> Result<(), TransportError> {
        let mut buf = vec![0u8; READ_CHUNK];
        while self.have < self.blob.size {
            let n = match data.read(&mut buf).await {
                Ok(0) => {
                    return Err(TransportError::Mismatch {
                        location: self.location.clone(),
                        object: format!("blob {} for {}", self.blob.digest, self.repository),
                        what: "size of the data received",
                        expected: self.blob.size.to_string(),
                        actual: self.have.to_string(),
                    });
                }
                Ok(n) => n,
                Err(source) => {
                    if source.kind() == io::ErrorKind::InvalidData {
                        // The data is wrong, not cut short: keep none of it.
                        self.start_over();
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
            let n = n.min(usize::try_from(self.blob.size - self.have).unwrap_or(usize::MAX));
            // Written from the async task as it arrives: a direct write of a
            // megabyte now and then is short next to the network reads.
            let file = self.file.as_ref().expect("an open sink has its file");
            if let Err(e) = self.appender.push(file, &buf[..n]) {
                return Err(self.io_error("writing the partial blob", e));
            }
            self.hasher.update(&buf[..n]);
            self.have += n as u64;
        }
        Ok(())
    }
}

impl Drop for PartialBlob {
    /// An empty partial file (nothing received, or wrong data forgotten) is
    /// not left behind; one with bytes stays for the next run to resume.
    fn drop(&mut self) {
        if let Some(file) = &self.file {
            if self.have == 0 && still_at(file, &self.path).unwrap_or(false) {
                let _ = fs::remove_file(&self.path);
            } else {
                // Bytes still in the buffer are kept for the resume.
                let _ = self.appender.save(file);
            }
        }
    }
}

/// Verified: synced and renamed into the layout (a verified copy across file
/// systems). Blocking.
fn commit(
    file: File,
    path: &Path,
    layout: &Layout,
    blob: &Descriptor,
) -> Result<(), crate::LayoutError> {
    let io = |context: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| crate::LayoutError::Io {
            path,
            context,
            source,
        }
    };
    file.sync_all()
        .map_err(io("syncing the partial blob", path))?;
    // `file` stays open until the rename is done: its flock keeps a writer that
    // waits for it from taking the file for a partial one meanwhile.
    let target = layout.blob_path(&blob.digest);
    let dir = target.parent().expect("blob paths have a directory");
    fs::create_dir_all(dir).map_err(io("creating the blob directory", dir))?;
    match fs::rename(path, &target) {
        Ok(()) => {
            drop(file);
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing the blob directory", dir))
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let mut input = File::open(path).map_err(io("reopening the partial blob", path))?;
            let mut writer = layout.blob_writer()?;
            io::copy(&mut input, &mut writer)
                .map_err(io("copying the blob into the layout", &target))?;
            writer.commit(Some((&blob.digest, blob.size)))?;
            let _ = fs::remove_file(path);
            Ok(())
        }
        Err(e) => Err(io("moving the blob into the layout", &target)(e)),
    }
}

#[async_trait]
impl BlobSink for PartialBlob {
    fn offset(&self) -> u64 {
        self.have
    }

    fn verifies_digest(&self) -> bool {
        true
    }

    async fn write(&mut self, mut data: BlobReader) -> Result<(), TransportError> {
        if self.file.is_none() {
            return Ok(());
        }
        self.append(&mut data).await?;
        let actual = Digest::from_sha256(std::mem::take(&mut self.hasher).finalize().into());
        if actual != self.blob.digest {
            // Whatever part is wrong, none of it is kept for a resume.
            self.start_over();
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
        let file = self.file.take().expect("checked above");
        if let Err(e) = self.appender.finish(&file) {
            return Err(self.io_error("writing the partial blob", e));
        }
        let (path, layout, blob) = (self.path.clone(), self.layout.clone(), self.blob.clone());
        let committed = tokio::task::spawn_blocking(move || commit(file, &path, &layout, &blob))
            .await
            .map_err(|e| TransportError::Protocol {
                location: self.location.clone(),
                message: format!("committing blob {} failed: {e}", self.blob.digest),
            })?;
        committed.map_err(|e| TransportError::Protocol {
            location: self.location.clone(),
            message: e.to_string(),
        })
    }
}
