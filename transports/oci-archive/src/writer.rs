//! Writing an archive: one tar stream into a temporary file beside FILE, each
//! blob appended as it arrives, verified by size and digest on the way (a wrong
//! one is cut off again, the file truncated to where its entry began);
//! `oci-layout` and `index.json` go last, when the copy engine says the image is
//! complete, and the file is renamed over FILE: the archive is whole or absent.
//!
//! One blob is written at a time: its sink holds the writer, so the copy engine
//! opens a blob's source only when the archive can take it (a registry stream
//! never waits idle). Nothing is staged and nothing is written twice; an
//! interrupted write starts over (the temporary file goes with the process).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sarde_api::oci::{Descriptor, ImageIndex, media_types};
use sarde_api::transport::{BlobReader, BlobSink, RawManifest};
use sarde_api::{Digest, TransportError};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::OwnedMutexGuard;

/// Bytes read per write.
const CHUNK: usize = 1 << 20;
const BLOCK: u64 = 512;

/// The archive being written.
pub(crate) struct ArchiveWriter {
    temp: tempfile::NamedTempFile,
    /// The end of the last complete entry.
    end: u64,
    /// Entries written, by name.
    written: HashMap<String, u64>,
    /// Manifests written in this session, by digest.
    manifests: HashMap<Digest, RawManifest>,
    /// The images `index.json` lists.
    index: ImageIndex,
}

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
        Ok(ArchiveWriter {
            temp,
            end: 0,
            written: HashMap::new(),
            manifests: HashMap::new(),
            index: ImageIndex::default(),
        })
    }

    pub(crate) fn has(&self, digest: &Digest, size: u64) -> bool {
        self.written.get(&crate::blob_name(digest)) == Some(&size)
    }

    pub(crate) fn manifest(&self, digest: &Digest) -> Option<&RawManifest> {
        self.manifests.get(digest)
    }

    fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// Starts the entry `name` of `size` bytes at the end.
    fn header(&mut self, name: &str, size: u64) -> io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_path(name)?;
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let end = self.end;
        let file = self.file();
        file.seek(SeekFrom::Start(end))?;
        file.write_all(header.as_bytes())
    }

    /// Pads the entry just written to a whole block and counts it as complete.
    fn close_entry(&mut self, name: &str, size: u64) -> io::Result<()> {
        let padding = (BLOCK - size % BLOCK) % BLOCK;
        self.file().write_all(&vec![0u8; padding as usize])?;
        self.end += BLOCK + size + padding;
        self.written.insert(name.to_string(), size);
        Ok(())
    }

    /// Cuts off an entry that did not complete.
    fn abandon_entry(&mut self) {
        let end = self.end;
        let file = self.file();
        let _ = file
            .set_len(end)
            .and_then(|()| file.seek(SeekFrom::Start(end)));
    }

    /// An entry from bytes in memory (manifests, `index.json`).
    fn add_bytes(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        if self.written.get(name) == Some(&(bytes.len() as u64)) {
            return Ok(());
        }
        let result = self
            .header(name, bytes.len() as u64)
            .and_then(|()| self.file().write_all(bytes))
            .and_then(|()| self.close_entry(name, bytes.len() as u64));
        if result.is_err() {
            self.abandon_entry();
        }
        result
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

    /// Ends the tar stream with the layout's own files, syncs it and renames it
    /// over `file`.
    pub(crate) fn finish(mut self, file: &Path) -> io::Result<()> {
        self.add_bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let index = serde_json::to_vec(&self.index).map_err(io::Error::other)?;
        self.add_bytes("index.json", &index)?;
        // The end of a tar: two zero blocks.
        self.file().write_all(&[0u8; 2 * BLOCK as usize])?;
        self.file().sync_all()?;
        self.temp.persist(file).map_err(|e| e.error)?;
        if let Some(dir) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// One blob appended to the archive; holds the writer until dropped.
pub(crate) struct ArchiveSink {
    pub(crate) writer: OwnedMutexGuard<Option<ArchiveWriter>>,
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

    async fn append(&mut self, data: &mut BlobReader) -> Result<(), TransportError> {
        let name = crate::blob_name(&self.blob.digest);
        let size = self.blob.size;
        let location = self.location.display().to_string();
        let io_error = |context: String| {
            let location = location.clone();
            move |source| TransportError::Io {
                location,
                context,
                source,
            }
        };
        let writer = self.writer.as_mut().expect("a sink holds an open writer");
        writer
            .header(&name, size)
            .map_err(io_error(format!("writing the entry of {name}")))?;
        let mut hasher = Sha256::new();
        let mut have = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = data
                .read(&mut buf)
                .await
                .map_err(io_error(format!("reading blob {}", self.blob.digest)))?;
            if n == 0 {
                break;
            }
            if have + n as u64 > size {
                return Err(self.error("size", size.to_string(), format!("more than {size}")));
            }
            let writer = self.writer.as_mut().expect("a sink holds an open writer");
            writer
                .file()
                .write_all(&buf[..n])
                .map_err(io_error(format!("writing {name}")))?;
            hasher.update(&buf[..n]);
            have += n as u64;
        }
        if have != size {
            return Err(self.error("size", size.to_string(), have.to_string()));
        }
        let actual = Digest::from_sha256(hasher.finalize().into());
        if actual != self.blob.digest {
            return Err(self.error("digest", self.blob.digest.to_string(), actual.to_string()));
        }
        let writer = self.writer.as_mut().expect("a sink holds an open writer");
        writer
            .close_entry(&name, size)
            .map_err(io_error(format!("writing {name}")))
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
        let result = self.append(&mut data).await;
        if result.is_err() {
            if let Some(writer) = self.writer.as_mut() {
                writer.abandon_entry();
            }
        }
        result
    }
}
