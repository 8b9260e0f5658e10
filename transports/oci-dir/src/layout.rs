//! One OCI image layout: `oci-layout`, `index.json` and `blobs/<algorithm>/<hex>`.
//!
//! Blobs are written to a temporary file next to their final place and renamed
//! into it only once complete, synced and (when the caller knows what to expect)
//! verified, so a crash or a cut transfer never leaves a partial blob under a
//! digest name. `index.json` is rewritten the same way, under an exclusive
//! `flock` on `index.json.lock` so concurrent sarde processes don't lose each
//! other's tags; readers need no lock because a rename is atomic.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use sarde_api::Digest;
use sarde_api::digest::Algorithm;
use sarde_api::limits::MAX_INDEX_SIZE;
use sarde_api::oci::{Descriptor, ImageIndex, media_types};
use serde::Deserialize;
use sha2::{Digest as _, Sha256, Sha512};
use tempfile::NamedTempFile;

use crate::blob_file::BlobFile;
use crate::error::{LayoutError, io_error};

/// The largest blob [`Layout::read_blob`] reads into memory: manifests, configs and
/// domain XML are far smaller; anything bigger is a disk layer named by mistake.
pub const MAX_IN_MEMORY_BLOB: u64 = 16 << 20;

/// The file that makes a directory an OCI image layout.
pub const OCI_LAYOUT_FILE: &str = "oci-layout";
/// What sarde writes in it (image-layout version 1.0.0; it reads any 1.x).
pub const OCI_LAYOUT_MARKER: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
const INDEX_FILE: &str = "index.json";
const LOCK_FILE: &str = "index.json.lock";
/// Writers of blobs hold it shared around the moment a blob appears or is reused;
/// a garbage collector holds it exclusively while it decides and deletes, so it
/// never deletes a blob a writer has just counted on.
const BLOBS_LOCK_FILE: &str = "blobs.lock";
/// Prefix of temporary files; never a valid hex digest, so never taken for a blob.
const TEMP_PREFIX: &str = ".tmp-";

type Result<T, E = LayoutError> = std::result::Result<T, E>;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciLayoutFile {
    image_layout_version: String,
}

/// An OCI image layout on disk (one repository of the cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    path: PathBuf,
}

impl Layout {
    /// Opens an existing layout; [`LayoutError::NotFound`] when `path/oci-layout`
    /// is missing.
    pub fn open(path: impl Into<PathBuf>) -> Result<Layout> {
        let path = path.into();
        let marker = path.join(OCI_LAYOUT_FILE);
        let bytes = match fs::read(&marker) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::NotFound { path });
            }
            Err(e) => return Err(io_error(&marker, "reading the layout marker")(e)),
        };
        let parsed: OciLayoutFile =
            serde_json::from_slice(&bytes).map_err(|source| LayoutError::BadJson {
                path: marker.clone(),
                source,
            })?;
        if !parsed.image_layout_version.starts_with("1.") {
            return Err(LayoutError::UnsupportedVersion {
                path,
                version: parsed.image_layout_version,
            });
        }
        Ok(Layout { path })
    }

    /// Creates the layout (directories, `index.json`, `oci-layout`) where missing and
    /// opens it. Idempotent and safe against concurrent creators.
    pub fn create(path: impl Into<PathBuf>) -> Result<Layout> {
        let path = path.into();
        let layout = Layout { path };
        let blobs = layout.path.join("blobs").join(Algorithm::Sha256.name());
        fs::create_dir_all(&blobs).map_err(io_error(&blobs, "creating the layout directory"))?;
        let marker = layout.path.join(OCI_LAYOUT_FILE);
        let index = layout.index_path();
        if !marker.exists() || !index.exists() {
            let _lock = layout.lock()?;
            // The index first: `oci-layout` is what makes the directory a layout.
            if !index.exists() {
                let empty = serde_json::to_vec(&ImageIndex::default()).map_err(|source| {
                    LayoutError::BadJson {
                        path: index.clone(),
                        source,
                    }
                })?;
                write_atomic(&layout.path, &index, &empty)?;
            }
            if !marker.exists() {
                write_atomic(&layout.path, &marker, OCI_LAYOUT_MARKER.as_bytes())?;
            }
        }
        Layout::open(layout.path)
    }

    /// The layout's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn index_path(&self) -> PathBuf {
        self.path.join(INDEX_FILE)
    }

    fn blob_dir(&self, digest: &Digest) -> PathBuf {
        self.path.join("blobs").join(digest.algorithm().name())
    }

    /// Where the blob lives: `blobs/<algorithm>/<hex>`. Digests are validated hex,
    /// so this never leaves the layout.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir(digest).join(digest.hex())
    }

    /// Whether the blob exists with the size the descriptor gives. The digest is not
    /// checked here (that means reading it all); readers verify while they read.
    pub fn has_blob(&self, blob: &Descriptor) -> bool {
        fs::metadata(self.blob_path(&blob.digest))
            .map(|m| m.is_file() && m.len() == blob.size)
            .unwrap_or(false)
    }

    /// Opens a blob for streaming after checking its size; the caller verifies the
    /// digest as it reads.
    pub fn open_blob(&self, blob: &Descriptor) -> Result<File> {
        let path = self.blob_path(&blob.digest);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::BlobMissing {
                    dir: self.blob_dir(&blob.digest),
                    digest: blob.digest.clone(),
                });
            }
            Err(e) => return Err(io_error(&path, "opening the blob")(e)),
        };
        let len = file
            .metadata()
            .map_err(io_error(&path, "reading the blob's size"))?
            .len();
        if len != blob.size {
            return Err(LayoutError::BlobSize {
                dir: self.blob_dir(&blob.digest),
                digest: blob.digest.clone(),
                expected: blob.size,
                actual: len,
            });
        }
        Ok(file)
    }

    /// Reads a small blob (manifest, config, XML) whole, verifying size and digest.
    /// Refuses blobs over [`MAX_IN_MEMORY_BLOB`].
    pub fn read_blob(&self, blob: &Descriptor) -> Result<Vec<u8>> {
        let dir = self.blob_dir(&blob.digest);
        if blob.size > MAX_IN_MEMORY_BLOB {
            return Err(LayoutError::BlobTooLarge {
                dir,
                digest: blob.digest.clone(),
                size: blob.size,
                limit: MAX_IN_MEMORY_BLOB,
            });
        }
        let file = self.open_blob(blob)?;
        let mut bytes = Vec::with_capacity(blob.size as usize);
        // One byte more than expected, so a blob growing after the size check shows.
        file.take(blob.size + 1)
            .read_to_end(&mut bytes)
            .map_err(io_error(self.blob_path(&blob.digest), "reading the blob"))?;
        if bytes.len() as u64 != blob.size {
            return Err(LayoutError::BlobSize {
                dir,
                digest: blob.digest.clone(),
                expected: blob.size,
                actual: bytes.len() as u64,
            });
        }
        let actual = digest_of(blob.digest.algorithm(), &bytes);
        if actual != blob.digest {
            return Err(LayoutError::BlobDigest {
                dir,
                digest: blob.digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores `data` as a sha256 blob (atomically; nothing is written when it is
    /// already there) and returns its digest and size.
    pub fn write_blob(&self, data: &[u8]) -> Result<(Digest, u64)> {
        let digest = Digest::sha256_of(data);
        let size = data.len() as u64;
        {
            let _guard = self.blobs_shared()?;
            if self.has_blob(&Descriptor::new("", digest.clone(), size)) {
                refresh(&self.blob_path(&digest));
                return Ok((digest, size));
            }
        }
        let mut writer = self.blob_writer()?;
        let path = writer.dir.clone();
        writer
            .write_all(data)
            .map_err(io_error(path, "writing the blob"))?;
        writer.commit(Some((&digest, size)))
    }

    /// A streaming writer for a new sha256 blob; see [`BlobWriter`].
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        self.new_blob_writer(BlobFile::buffered)
    }

    /// [`Layout::blob_writer`] for a large blob nothing reads back soon (an
    /// export's pieces): written with `O_DIRECT` where the file system allows,
    /// past the page cache.
    pub fn blob_writer_direct(&self) -> Result<BlobWriter> {
        self.new_blob_writer(BlobFile::direct)
    }

    fn new_blob_writer(&self, file: fn(NamedTempFile) -> BlobFile) -> Result<BlobWriter> {
        let dir = self.path.join("blobs").join(Algorithm::Sha256.name());
        fs::create_dir_all(&dir).map_err(io_error(&dir, "creating the blob directory"))?;
        let temp = new_temp_in(&dir).map_err(io_error(&dir, "creating a temporary blob file"))?;
        Ok(BlobWriter {
            layout: self.clone(),
            dir,
            file: file(temp),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Makes `source`'s blob available here without copying bytes where the
    /// filesystem allows: a hard link, else a verified copy. `Ok(false)` when
    /// `source` does not hold the blob (with its size).
    pub fn mount_blob_from(&self, source: &Layout, blob: &Descriptor) -> Result<bool> {
        if !source.has_blob(blob) {
            return Ok(false);
        }
        let _guard = self.blobs_shared()?;
        if self.has_blob(blob) {
            refresh(&self.blob_path(&blob.digest));
            return Ok(true);
        }
        let from = source.blob_path(&blob.digest);
        let dir = self.blob_dir(&blob.digest);
        let target = self.blob_path(&blob.digest);
        fs::create_dir_all(&dir).map_err(io_error(&dir, "creating the blob directory"))?;
        // Link under a temporary name, then rename: this replaces a damaged blob too.
        let linked = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .make_in(&dir, |path| fs::hard_link(&from, path));
        match linked {
            Ok(link) => {
                let temp_path = link.path().to_path_buf();
                link.persist(&target)
                    .map_err(|e| io_error(&target, "moving the linked blob into place")(e.error))?;
                // rename(2) between two links to the same file does nothing: when a
                // concurrent mount won the race, the temporary name is still there.
                if fs::symlink_metadata(&temp_path).is_ok() {
                    let _ = fs::remove_file(&temp_path);
                }
                sync_dir(&dir)?;
            }
            // Collected from the source meanwhile: the caller gets it another way.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                tracing::debug!(
                    "hard-linking {} failed ({e}); copying instead",
                    from.display()
                );
                let mut input = match source.open_blob(blob) {
                    Ok(input) => input,
                    Err(LayoutError::BlobMissing { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                };
                let mut writer = self.blob_writer()?;
                io::copy(&mut input, &mut writer).map_err(io_error(&from, "copying the blob"))?;
                writer.commit_unguarded(Some((&blob.digest, blob.size)))?;
            }
        }
        Ok(true)
    }

    /// The layout's `index.json` (an empty index when the file is missing).
    pub fn index(&self) -> Result<ImageIndex> {
        let path = self.index_path();
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ImageIndex::default()),
            Err(e) => return Err(io_error(&path, "opening the index")(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_INDEX_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(io_error(&path, "reading the index"))?;
        if bytes.len() as u64 > MAX_INDEX_SIZE {
            return Err(io_error(&path, "reading the index")(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "larger than {MAX_INDEX_SIZE} bytes: not a real index; delete the layout and fetch again"
                ),
            )));
        }
        serde_json::from_slice(&bytes).map_err(|source| LayoutError::BadJson { path, source })
    }

    /// Tagged entries of the index, in index order. Should a tag appear twice (the
    /// Python tool appended on re-export), the last entry — the newest — wins.
    pub fn tags(&self) -> Result<Vec<(String, Descriptor)>> {
        Ok(tags_of(&self.index()?))
    }

    /// Finds a manifest by tag or by digest (`sha256:…`). A digest not listed in the
    /// index is still found when its blob is stored (e.g. a child of an index).
    /// An empty reference means the layout's only manifest, as skopeo reads
    /// `oci:PATH` without a tag.
    pub fn resolve(&self, reference: &str) -> Result<Descriptor> {
        let index = self.index()?;
        if reference.is_empty() {
            return match index.manifests.as_slice() {
                [only] => Ok(only.clone()),
                all => Err(LayoutError::NoSingleImage {
                    path: self.path.clone(),
                    count: all.len(),
                    available: tags_of(&index).into_iter().map(|(tag, _)| tag).collect(),
                }),
            };
        }
        if reference.starts_with("sha256:") || reference.starts_with("sha512:") {
            let digest: Digest =
                reference
                    .parse()
                    .map_err(
                        |e: sarde_api::digest::DigestError| LayoutError::InvalidReference {
                            path: self.path.clone(),
                            reference: reference.to_string(),
                            reason: e.reason,
                        },
                    )?;
            if let Some(found) = index.manifests.iter().find(|d| d.digest == digest) {
                return Ok(found.clone());
            }
            return self.unlisted_manifest(digest);
        }
        let tags = tags_of(&index);
        match tags.iter().find(|(tag, _)| tag == reference) {
            Some((_, descriptor)) => Ok(descriptor.clone()),
            None => Err(LayoutError::TagNotFound {
                path: self.path.clone(),
                tag: reference.to_string(),
                available: tags.into_iter().map(|(tag, _)| tag).collect(),
            }),
        }
    }

    /// A manifest stored as a blob but not listed in the index; its media type comes
    /// from its own `mediaType` field.
    fn unlisted_manifest(&self, digest: Digest) -> Result<Descriptor> {
        let not_found = || LayoutError::ManifestNotFound {
            path: self.path.clone(),
            digest: digest.clone(),
        };
        let Ok(meta) = fs::metadata(self.blob_path(&digest)) else {
            return Err(not_found());
        };
        if !meta.is_file() || meta.len() > MAX_IN_MEMORY_BLOB {
            return Err(not_found());
        }
        let probe = Descriptor::new("", digest.clone(), meta.len());
        let bytes = self.read_blob(&probe)?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| LayoutError::BadJson {
                path: self.blob_path(&digest),
                source,
            })?;
        let media_type = match value.get("mediaType").and_then(|v| v.as_str()) {
            Some(media_type) => media_type.to_string(),
            None if value.get("manifests").is_some() => media_types::IMAGE_INDEX.to_string(),
            None if value.get("config").is_some() => media_types::IMAGE_MANIFEST.to_string(),
            None => return Err(not_found()),
        };
        Ok(Descriptor::new(media_type, digest, meta.len()))
    }

    /// Points `tag` at a manifest, replacing any entry that had that tag (every one,
    /// should there be duplicates) and keeping all other entries. The manifest blob
    /// must be stored first.
    pub fn set_tag(&self, tag: &str, manifest: &Descriptor) -> Result<()> {
        if !valid_tag(tag) {
            return Err(LayoutError::InvalidTag {
                path: self.path.clone(),
                tag: tag.to_string(),
            });
        }
        if !self.has_blob(manifest) {
            return Err(LayoutError::BlobMissing {
                dir: self.blob_dir(&manifest.digest),
                digest: manifest.digest.clone(),
            });
        }
        let mut entry = manifest.clone();
        entry.annotations.insert(
            media_types::ANNOTATION_REF_NAME.to_string(),
            tag.to_string(),
        );
        self.update_index(|index| {
            let first = index
                .manifests
                .iter()
                .position(|d| d.annotation(media_types::ANNOTATION_REF_NAME) == Some(tag));
            index
                .manifests
                .retain(|d| d.annotation(media_types::ANNOTATION_REF_NAME) != Some(tag));
            // Keep the tag where it was, so re-exporting does not reorder the index.
            let at = first.unwrap_or(index.manifests.len());
            index.manifests.insert(at, entry);
        })
    }

    /// Removes every entry with this tag; `Ok(false)` when there was none. The
    /// manifest's blobs stay (other tags may share them).
    pub fn remove_tag(&self, tag: &str) -> Result<bool> {
        let mut removed = false;
        self.update_index(|index| {
            let before = index.manifests.len();
            index
                .manifests
                .retain(|d| d.annotation(media_types::ANNOTATION_REF_NAME) != Some(tag));
            removed = index.manifests.len() != before;
        })?;
        Ok(removed)
    }

    /// Keeps the index entries `keep` accepts and removes the others (tagged or not);
    /// returns how many were removed. Blobs stay: a collector removes them after.
    pub fn retain_entries(&self, mut keep: impl FnMut(&Descriptor) -> bool) -> Result<usize> {
        let mut removed = 0;
        self.update_index(|index| {
            let before = index.manifests.len();
            index.manifests.retain(|d| keep(d));
            removed = before - index.manifests.len();
        })?;
        Ok(removed)
    }

    /// Lists a manifest in the index without a tag (a push by digest), unless an
    /// entry with that digest is already there; so it stays reachable for tools
    /// that collect unreferenced blobs.
    pub fn add_untagged(&self, manifest: &Descriptor) -> Result<()> {
        if !self.has_blob(manifest) {
            return Err(LayoutError::BlobMissing {
                dir: self.blob_dir(&manifest.digest),
                digest: manifest.digest.clone(),
            });
        }
        let mut entry = manifest.clone();
        entry.annotations.remove(media_types::ANNOTATION_REF_NAME);
        self.update_index(|index| {
            if !index.manifests.iter().any(|d| d.digest == entry.digest) {
                index.manifests.push(entry);
            }
        })
    }

    /// Stores manifest bytes as a blob and returns their descriptor (untagged; see
    /// [`Layout::set_tag`]).
    pub fn put_manifest(&self, bytes: &[u8], media_type: &str) -> Result<Descriptor> {
        let (digest, size) = self.write_blob(bytes)?;
        Ok(Descriptor::new(media_type, digest, size))
    }

    /// Read-modify-write of `index.json` under the layout lock; written only when
    /// `change` changed something.
    fn update_index(&self, change: impl FnOnce(&mut ImageIndex)) -> Result<()> {
        let _lock = self.lock()?;
        let before = self.index()?;
        let mut index = before.clone();
        change(&mut index);
        if index == before {
            return Ok(());
        }
        let path = self.index_path();
        let bytes = serde_json::to_vec(&index).map_err(|source| LayoutError::BadJson {
            path: path.clone(),
            source,
        })?;
        write_atomic(&self.path, &path, &bytes)
    }

    /// Takes the exclusive advisory lock of this layout; released on drop.
    fn lock(&self) -> Result<LayoutLock> {
        self.flock(LOCK_FILE, libc::LOCK_EX, "locking the layout")
    }

    /// The blob-set lock, shared: held by writers while a blob appears or an existing
    /// blob is reused, so a collector holding it exclusively sees either the old
    /// state or the new one. Released on drop.
    pub fn blobs_shared(&self) -> Result<LayoutLock> {
        self.flock(BLOBS_LOCK_FILE, libc::LOCK_SH, "locking the layout's blobs")
    }

    /// The blob-set lock, exclusive: for a collector deleting blobs. Waits for
    /// writers inside their (short) shared sections.
    pub fn blobs_exclusive(&self) -> Result<LayoutLock> {
        self.flock(BLOBS_LOCK_FILE, libc::LOCK_EX, "locking the layout's blobs")
    }

    fn flock(&self, name: &str, mode: libc::c_int, context: &'static str) -> Result<LayoutLock> {
        let path = self.path.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            // Readable too: where flock is emulated with POSIX locks (NFS), a
            // shared lock needs a descriptor open for reading.
            .read(true)
            .write(true)
            // A planted symbolic link must not make us create files elsewhere.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_error(&path, "opening the layout lock file"))?;
        loop {
            // SAFETY: flock on a file descriptor we own and keep open; no memory involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), mode) };
            if rc == 0 {
                return Ok(LayoutLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(io_error(&path, context)(err));
            }
        }
    }
}

/// Holds one of the layout's `flock`s; closing the file releases it.
#[derive(Debug)]
pub struct LayoutLock {
    _file: File,
}

/// A new blob being written: hashes (sha256) and counts as it goes, and only
/// becomes a blob on [`BlobWriter::commit`]. Dropped without commit, it removes
/// its temporary file.
pub struct BlobWriter {
    layout: Layout,
    dir: PathBuf,
    file: BlobFile,
    hasher: Sha256,
    written: u64,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("temp", &self.file.temp().path())
            .field("written", &self.written)
            .finish()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The temporary file being written (removed on drop, renamed on commit).
    pub fn temp_path(&self) -> &Path {
        self.file.temp().path()
    }

    /// Finishes the blob: checks it against `expected` (digest, size) when given —
    /// on mismatch nothing is stored — then syncs it and renames it into place. A
    /// blob that is already there with this size is kept and the new copy dropped.
    pub fn commit(self, expected: Option<(&Digest, u64)>) -> Result<(Digest, u64)> {
        let layout = self.layout.clone();
        let _guard = layout.blobs_shared()?;
        self.commit_unguarded(expected)
    }

    /// [`BlobWriter::commit`] for a caller that holds the blob-set lock already.
    fn commit_unguarded(self, expected: Option<(&Digest, u64)>) -> Result<(Digest, u64)> {
        let BlobWriter {
            layout: _,
            dir,
            file,
            hasher,
            written,
        } = self;
        let temp = file
            .finish()
            .map_err(|e| io_error(&dir, "writing the blob")(e))?;
        let digest = Digest::from_sha256(hasher.finalize().into());
        if let Some((want, want_size)) = expected {
            if want.algorithm() != Algorithm::Sha256 {
                return Err(LayoutError::UnsupportedAlgorithm {
                    dir,
                    digest: want.clone(),
                });
            }
            if *want != digest || want_size != written {
                return Err(LayoutError::VerifyFailed {
                    dir,
                    expected: want.clone(),
                    expected_size: want_size,
                    actual: digest,
                    actual_size: written,
                });
            }
        }
        let target = dir.join(digest.hex());
        let present = fs::metadata(&target)
            .map(|m| m.is_file() && m.len() == written)
            .unwrap_or(false);
        if present {
            refresh(&target);
            return Ok((digest, written));
        }
        temp.as_file()
            .sync_all()
            .map_err(io_error(temp.path(), "syncing the blob"))?;
        temp.persist(&target)
            .map_err(|e| io_error(&target, "moving the blob into place")(e.error))?;
        sync_dir(&dir)?;
        Ok((digest, written))
    }
}

/// Write-back of a blob being written starts every this many bytes.
const WRITEBACK_EVERY: u64 = 8 << 20;

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        let before = self.written;
        self.written += n as u64;
        if self.file.cached() && before / WRITEBACK_EVERY != self.written / WRITEBACK_EVERY {
            // The commit's fsync then finds most of the blob on disk already.
            let end = self.written / WRITEBACK_EVERY * WRITEBACK_EVERY;
            sarde_api::writeback::start_writeback(
                self.file.temp().as_file(),
                end - WRITEBACK_EVERY,
                WRITEBACK_EVERY,
            );
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Sets a reused blob's times to now: a collector spares blobs changed since a
/// live writer's lease began, so a blob a writer counts on stays.
fn refresh(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path we own; a null `times` means "now".
    if unsafe { libc::utimensat(libc::AT_FDCWD, c_path.as_ptr(), std::ptr::null(), 0) } != 0 {
        tracing::warn!(
            "could not refresh the times of {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }
}

/// Tagged entries, last duplicate winning, in index order.
fn tags_of(index: &ImageIndex) -> Vec<(String, Descriptor)> {
    let mut out: Vec<(String, Descriptor)> = Vec::new();
    for d in &index.manifests {
        if let Some(tag) = d.annotation(media_types::ANNOTATION_REF_NAME) {
            out.retain(|(t, _)| t != tag);
            out.push((tag.to_string(), d.clone()));
        }
    }
    out
}

/// The tag grammar of image references: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn digest_of(algorithm: Algorithm, data: &[u8]) -> Digest {
    match algorithm {
        Algorithm::Sha256 => Digest::sha256_of(data),
        Algorithm::Sha512 => {
            let hex: String = Sha512::digest(data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            // Always valid: 128 lower-case hex digits.
            format!("sha512:{hex}")
                .parse()
                .unwrap_or_else(|_| unreachable!("sha512 hex is always a valid digest"))
        }
    }
}

/// A temporary file in `dir`, readable by others like any cache file (umask applies).
pub(crate) fn new_temp_in(dir: &Path) -> io::Result<NamedTempFile> {
    tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .permissions(Permissions::from_mode(0o644))
        .tempfile_in(dir)
}

/// Replaces `target` (in `dir`) with `bytes` atomically and durably.
fn write_atomic(dir: &Path, target: &Path, bytes: &[u8]) -> Result<()> {
    let mut temp = new_temp_in(dir).map_err(io_error(dir, "creating a temporary file"))?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(io_error(temp.path(), "writing a temporary file"))?;
    temp.persist(target)
        .map_err(|e| io_error(target, "replacing the file")(e.error))?;
    sync_dir(dir)
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir, "syncing the directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_grammar() {
        for good in ["latest", "v1.2-3", "_x", "A", &"a".repeat(128)] {
            assert!(valid_tag(good), "{good:?}");
        }
        for bad in ["", "-x", ".x", "a:b", "a/b", "a b", &"a".repeat(129)] {
            assert!(!valid_tag(bad), "{bad:?}");
        }
    }

    #[test]
    fn sha512_digests_match_the_known_value() {
        assert_eq!(
            digest_of(Algorithm::Sha512, b"").to_string(),
            "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
        );
    }
}
