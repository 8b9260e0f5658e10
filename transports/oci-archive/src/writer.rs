//! Writing an archive: one tar into a temporary file beside FILE. Each blob's
//! entry is reserved at the end of the file when its sink opens (its size is
//! known), so several blobs stream into their own regions at once, verified by
//! size and digest on the way; `oci-layout` and `index.json` go last, when the
//! copy engine says the image is complete, and the file is renamed over FILE:
//! the archive is whole or absent. A region whose blob never arrived fails the
//! finish: no archive with a hole is ever renamed into place.
//!
//! Nothing is staged and nothing is written twice; an interrupted write starts
//! over (the temporary file goes with the process).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sarde_api::oci::{Descriptor, ImageIndex, media_types};
use sarde_api::transport::{BlobReader, BlobSink, RawManifest};
use sarde_api::{Digest, TransportError};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

/// Bytes read per write.
const CHUNK: usize = 1 << 20;
/// A tar block: entries start on one, and direct I/O works in them.
pub(crate) const BLOCK: u64 = 512;

/// The bytes an entry of `size` takes: its header, its data, the padding.
fn entry_len(size: u64) -> u64 {
    BLOCK + size.div_ceil(BLOCK) * BLOCK
}

/// The archive being written.
pub(crate) struct ArchiveWriter {
    temp: tempfile::NamedTempFile,
    file: Arc<File>,
    /// The same file opened for direct I/O, while the file system takes it.
    direct: Direct,
    /// The end of the last reserved entry.
    end: u64,
    /// Entries by name: where they start, their size, and whether complete.
    entries: HashMap<String, Entry>,
    /// Manifests written in this session, by digest.
    manifests: HashMap<Digest, RawManifest>,
    /// The images `index.json` lists.
    index: ImageIndex,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u64,
    size: u64,
    complete: bool,
}

/// The writer as the transport and its sinks share it.
pub(crate) type SharedWriter = Arc<Mutex<Option<ArchiveWriter>>>;

impl ArchiveWriter {
    /// A new, empty tar file beside `file`.
    pub(crate) fn create(file: &Path) -> io::Result<ArchiveWriter> {
        let dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}.sarde-tmp-"))
            .tempfile_in(dir)?;
        let file = Arc::new(temp.as_file().try_clone()?);
        let direct = Direct::open(temp.path());
        Ok(ArchiveWriter {
            temp,
            file,
            direct,
            end: 0,
            entries: HashMap::new(),
            manifests: HashMap::new(),
            index: ImageIndex::default(),
        })
    }

    pub(crate) fn has(&self, digest: &Digest, size: u64) -> bool {
        self.entries
            .get(&crate::blob_name(digest))
            .is_some_and(|e| e.complete && e.size == size)
    }

    /// The temporary file, for a sink's positional writes.
    pub(crate) fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// The temporary file for direct writes of whole entries.
    pub(crate) fn direct(&self) -> Direct {
        self.direct.clone()
    }

    pub(crate) fn manifest(&self, digest: &Digest) -> Option<&RawManifest> {
        self.manifests.get(digest)
    }

    /// The region of entry `name` (reserved now at the end, or the one an
    /// earlier attempt reserved).
    pub(crate) fn reserve(&mut self, name: &str, size: u64) -> io::Result<u64> {
        if let Some(entry) = self.entries.get(name) {
            if entry.size != size {
                return Err(io::Error::other(format!(
                    "{name} was announced with {} bytes, now with {size}",
                    entry.size
                )));
            }
            return Ok(entry.start);
        }
        let start = self.end;
        self.end += entry_len(size);
        // Blocks for the whole entry now, in one piece: entries written side
        // by side would otherwise interleave on disk and read back slowly.
        allocate(&self.file, start, entry_len(size));
        self.entries.insert(
            name.to_string(),
            Entry {
                start,
                size,
                complete: false,
            },
        );
        Ok(start)
    }

    fn complete(&mut self, name: &str) {
        if let Some(entry) = self.entries.get_mut(name) {
            entry.complete = true;
        }
    }

    /// An entry from bytes in memory (manifests, `index.json`).
    fn add_bytes(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let size = bytes.len() as u64;
        if self
            .entries
            .get(name)
            .is_some_and(|e| e.complete && e.size == size)
        {
            return Ok(());
        }
        let start = self.reserve(name, size)?;
        write_header(&self.file, start, name, size)?;
        self.file.write_all_at(bytes, start + BLOCK)?;
        write_padding(&self.file, start, size)?;
        self.complete(name);
        Ok(())
    }

    /// Stores a manifest's bytes; `listed` adds it to `index.json` under `tag`
    /// (untagged without one), replacing an entry with that tag.
    pub(crate) fn add_manifest(
        &mut self,
        manifest: &RawManifest,
        listed: bool,
        tag: Option<&str>,
    ) -> io::Result<()> {
        self.add_bytes(&crate::blob_name(&manifest.digest), &manifest.bytes)?;
        self.manifests
            .insert(manifest.digest.clone(), manifest.clone());
        if listed {
            let mut entry = Descriptor::new(
                manifest.media_type.clone(),
                manifest.digest.clone(),
                manifest.bytes.len() as u64,
            );
            if let Some(tag) = tag {
                entry.annotations.insert(
                    media_types::ANNOTATION_REF_NAME.to_string(),
                    tag.to_string(),
                );
                self.index
                    .manifests
                    .retain(|m| m.annotation(media_types::ANNOTATION_REF_NAME) != Some(tag));
            } else {
                self.index.manifests.retain(|m| m.digest != manifest.digest);
            }
            self.index.manifests.push(entry);
        }
        Ok(())
    }

    /// Ends the tar with the layout's own files, syncs it and renames it over
    /// `file`; refused while a reserved entry is incomplete.
    pub(crate) fn finish(mut self, file: &Path) -> io::Result<()> {
        if let Some((name, _)) = self.entries.iter().find(|(_, e)| !e.complete) {
            return Err(io::Error::other(format!(
                "{name} never arrived: the archive is not written"
            )));
        }
        self.add_bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let index = serde_json::to_vec(&self.index).map_err(io::Error::other)?;
        self.add_bytes("index.json", &index)?;
        // The end of a tar: two zero blocks.
        self.file
            .write_all_at(&[0u8; 2 * BLOCK as usize], self.end)?;
        self.temp.as_file_mut().flush()?;
        self.file.sync_all()?;
        self.temp.persist(file).map_err(|e| e.error)?;
        if let Some(dir) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Allocates `[start, start + len)` of `file` (a hint: a file system that
/// can't still gets the data when it is written).
fn allocate(file: &File, start: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(start), Ok(len)) = (i64::try_from(start), i64::try_from(len)) else {
        return;
    };
    // SAFETY: fallocate on a descriptor we borrow; no memory is passed.
    unsafe {
        libc::fallocate(file.as_raw_fd(), 0, start, len);
    }
}

fn write_header(file: &File, start: u64, name: &str, size: u64) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    fill_header(&mut header, name, size)?;
    file.write_all_at(header.as_bytes(), start)
}

fn fill_header(header: &mut tar::Header, name: &str, size: u64) -> io::Result<()> {
    header.set_path(name)?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    Ok(())
}

/// Zeros from the end of the data to the end of its last block.
fn write_padding(file: &File, start: u64, size: u64) -> io::Result<()> {
    let padding = (BLOCK - size % BLOCK) % BLOCK;
    file.write_all_at(&vec![0u8; padding as usize], start + BLOCK + size)
}

/// The archive opened with `O_DIRECT`: blob entries go from our buffer to the
/// disk without passing through the page cache. Nothing reads the archive
/// back in this run, and filling the page cache with a 40 GB archive would
/// evict what the host's running VMs use; on a VM host it is also the costly
/// part (fresh guest memory for every page: measured here, copying into new
/// page-cache pages took 4 of the 4.3 s of a 600 MB archive push). Whole
/// entries (header, data, padding) are multiples of 512 bytes at offsets that
/// are too; a file system or device that wants more falls back to buffered
/// writes for the rest of the archive.
#[derive(Debug, Clone)]
pub(crate) struct Direct {
    file: Option<Arc<File>>,
    usable: Arc<AtomicBool>,
}

impl Direct {
    fn open(path: &Path) -> Direct {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
            .map(Arc::new);
        Direct {
            usable: Arc::new(AtomicBool::new(file.is_some())),
            file,
        }
    }

    /// Writes `data` at `offset` directly when it can, else through `buffered`.
    fn write_at(&self, buffered: &File, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(file) = self
            .file
            .as_ref()
            .filter(|_| self.usable.load(Ordering::Relaxed))
        {
            match file.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                // Alignment the file system refuses: buffered from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!("direct writes refused ({e}); writing through the page cache");
                    self.usable.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        buffered.write_all_at(data, offset)
    }
}

/// Memory alignment direct I/O may ask for (a page).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A buffer of `len` bytes whose start is aligned for direct I/O.
struct AlignedBuffer {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> AlignedBuffer {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let offset = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuffer {
            storage,
            offset,
            len,
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// One blob streamed into its region of the archive.
pub(crate) struct ArchiveSink {
    pub(crate) shared: SharedWriter,
    pub(crate) file: Arc<File>,
    pub(crate) direct: Direct,
    pub(crate) start: u64,
    pub(crate) blob: Descriptor,
    pub(crate) location: PathBuf,
}

impl ArchiveSink {
    fn error(&self, what: &'static str, expected: String, actual: String) -> TransportError {
        TransportError::Mismatch {
            location: self.location.display().to_string(),
            object: format!("blob {} (nothing stored)", self.blob.digest),
            what,
            expected,
            actual,
        }
    }

    fn io_error(&self, context: String) -> impl FnOnce(io::Error) -> TransportError + '_ {
        move |source| TransportError::Io {
            location: self.location.display().to_string(),
            context,
            source,
        }
    }
}

#[async_trait]
impl BlobSink for ArchiveSink {
    fn offset(&self) -> u64 {
        0
    }

    fn verifies_digest(&self) -> bool {
        true
    }

    async fn write(&mut self, mut data: BlobReader) -> Result<(), TransportError> {
        let name = crate::blob_name(&self.blob.digest);
        let size = self.blob.size;
        // The entry goes out in chunks of whole blocks: the header first, the
        // data, and the last chunk padded with zeros to its block.
        let mut buffer = AlignedBuffer::new(CHUNK);
        let mut header = tar::Header::new_gnu();
        fill_header(&mut header, &name, size)
            .map_err(self.io_error(format!("writing the entry of {name}")))?;
        buffer.as_mut()[..BLOCK as usize].copy_from_slice(header.as_bytes());
        let mut filled = BLOCK as usize;
        let mut written = 0u64;
        let mut hasher = Sha256::new();
        let mut have = 0u64;
        loop {
            if filled == CHUNK {
                buffer = self.write_out(buffer, filled, written, &name).await?;
                written += filled as u64;
                filled = 0;
            }
            let buf = buffer.as_mut();
            let n = data
                .read(&mut buf[filled..])
                .await
                .map_err(self.io_error(format!("reading blob {}", self.blob.digest)))?;
            if n == 0 {
                break;
            }
            if have + n as u64 > size {
                return Err(self.error("size", size.to_string(), format!("more than {size}")));
            }
            hasher.update(&buf[filled..filled + n]);
            filled += n;
            have += n as u64;
        }
        if have != size {
            return Err(self.error("size", size.to_string(), have.to_string()));
        }
        let actual = Digest::from_sha256(hasher.finalize().into());
        if actual != self.blob.digest {
            return Err(self.error("digest", self.blob.digest.to_string(), actual.to_string()));
        }
        let padded = (filled as u64).div_ceil(BLOCK) * BLOCK;
        buffer.as_mut()[filled..padded as usize].fill(0);
        self.write_out(buffer, padded as usize, written, &name)
            .await?;
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(writer) = shared.as_mut() {
            writer.complete(&name);
        }
        Ok(())
    }
}

impl ArchiveSink {
    /// Writes the first `len` bytes of `buffer` at `written` bytes into the
    /// entry, on a blocking thread (a direct write waits for the disk, which
    /// must not hold up the runtime's network reads and timers); gives the
    /// buffer back for the next chunk.
    async fn write_out(
        &self,
        mut buffer: AlignedBuffer,
        len: usize,
        written: u64,
        name: &str,
    ) -> Result<AlignedBuffer, TransportError> {
        let (direct, file, at) = (self.direct.clone(), self.file.clone(), self.start + written);
        let (buffer, result) = tokio::task::spawn_blocking(move || {
            let result = direct.write_at(&file, &buffer.as_mut()[..len], at);
            (buffer, result)
        })
        .await
        .map_err(|e| self.io_error(format!("writing {name}"))(io::Error::other(e)))?;
        result.map_err(self.io_error(format!("writing {name}")))?;
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_write_the_file_system_refuses_goes_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.tar");
        let buffered = File::create(&path).unwrap();
        let direct = Direct::open(&path);
        // An offset off the block size: direct I/O refuses it (EINVAL).
        let mut buffer = AlignedBuffer::new(BLOCK as usize);
        buffer.as_mut().fill(7);
        direct.write_at(&buffered, buffer.as_mut(), 1).unwrap();
        assert!(!direct.usable.load(Ordering::Relaxed), "direct I/O is off");
        // Later writes go through the page cache too, and both arrived.
        direct.write_at(&buffered, &[9u8; 512], 513).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 1025);
        assert_eq!(bytes[0], 0);
        assert!(bytes[1..513].iter().all(|&b| b == 7));
        assert!(bytes[513..].iter().all(|&b| b == 9));
    }

    #[test]
    fn aligned_entries_are_written_directly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.tar");
        let buffered = File::create(&path).unwrap();
        let direct = Direct::open(&path);
        let mut buffer = AlignedBuffer::new(4 * BLOCK as usize);
        buffer.as_mut().fill(3);
        direct.write_at(&buffered, buffer.as_mut(), 512).unwrap();
        // Only where the file system takes direct I/O at all (not tmpfs before 6.6).
        if direct.file.is_some() {
            assert!(direct.usable.load(Ordering::Relaxed), "stays direct");
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 512 + 4 * 512);
        assert!(bytes[512..].iter().all(|&b| b == 3));
    }
}
