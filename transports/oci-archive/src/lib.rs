//! # sarde-transport-oci-archive
//!
//! The `oci-archive` transport: an OCI image layout packed in one tar file, named
//! as containers/image (skopeo, podman) names it, `oci-archive:FILE[:TAG]` (the
//! file ends at the first `:`; without a tag, the only image when read, untagged
//! when written, as in skopeo).
//!
//! - Reading never unpacks: the tar's headers are indexed once (`tar` seeks past
//!   the data), and a blob is streamed from its offset in the file.
//! - Writing streams one tar into a temporary file beside FILE, several blobs at
//!   once into regions reserved for them, verified on the way, and renames it
//!   over FILE when the image is complete (`finish_image`): the archive is
//!   complete or absent (see `writer.rs`). A write replaces what FILE held before, as
//!   skopeo's does; an interrupted one starts over.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use sarde_api::limits::{MAX_INDEX_SIZE, MAX_MANIFEST_SIZE};
use sarde_api::oci::{Descriptor, ImageIndex, media_types};
use sarde_api::transport::{
    Access, BlobReader, BlobWrite, RawManifest, TransportOptions, TransportReference, path_and_tag,
    require_path,
};
use sarde_api::{Digest, Registrar, RegistryError, Transport, TransportError, TransportFactory};

mod reader;
mod writer;
use writer::{ArchiveSink, ArchiveWriter, SharedWriter};

/// The URL scheme of this transport, as in skopeo.
pub const SCHEME: &str = "oci-archive";
const SYNTAX: &str = "oci-archive:FILE[:TAG]";

/// Opens `oci-archive` transports.
#[derive(Debug, Clone, Copy, Default)]
pub struct OciArchiveFactory;

impl TransportFactory for OciArchiveFactory {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn description(&self) -> &str {
        "an OCI image layout in one tar file, as skopeo's oci-archive: (FILE ends at the first ':'; without TAG: the only image when read, untagged when written): oci-archive:FILE[:TAG]"
    }

    fn parse_reference(&self, rest: &str) -> Result<TransportReference, TransportError> {
        path_and_tag(SCHEME, rest, SYNTAX)
    }

    fn open(
        &self,
        location: &str,
        _options: &TransportOptions,
    ) -> Result<Box<dyn Transport>, TransportError> {
        require_path(SCHEME, location, SYNTAX)?;
        Ok(Box::new(OciArchiveTransport::new(location)))
    }
}

/// Registers [`OciArchiveFactory`] under `oci-archive`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_transport(Arc::new(OciArchiveFactory))
}

/// Where each file of the archive's layout is: (offset of its data, size).
type Entries = HashMap<String, (u64, u64)>;

/// One archive file.
pub struct OciArchiveTransport {
    file: PathBuf,
    /// Set once the operation declared a push: then what this run wrote is
    /// what the destination "has", not the archive being replaced.
    writing: AtomicBool,
    /// The archive being written.
    writer: SharedWriter,
    entries: OnceLock<Result<Entries, String>>,
}

impl OciArchiveTransport {
    pub fn new(file: impl Into<PathBuf>) -> Self {
        OciArchiveTransport {
            file: file.into(),
            writing: AtomicBool::new(false),
            writer: Arc::default(),
            entries: OnceLock::new(),
        }
    }

    fn writing(&self) -> bool {
        self.writing.load(Ordering::Relaxed)
    }

    /// Runs `work` on the writer, started on first use.
    fn with_writer<T>(
        &self,
        work: impl FnOnce(&mut ArchiveWriter) -> io::Result<T>,
    ) -> Result<T, TransportError> {
        self.writing.store(true, Ordering::Relaxed);
        let mut guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(
                ArchiveWriter::create(&self.file)
                    .map_err(|e| self.io_error("creating the archive's temporary file", e))?,
            );
        }
        work(guard.as_mut().expect("started above"))
            .map_err(|e| self.io_error("writing the archive", e))
    }

    fn io_error(&self, context: &str, source: io::Error) -> TransportError {
        TransportError::Io {
            location: self.location(),
            context: context.to_string(),
            source,
        }
    }

    /// The archive's entries, indexed on first use.
    fn entries(&self) -> Result<&Entries, TransportError> {
        self.entries
            .get_or_init(|| index_entries(&self.file).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|message| TransportError::Protocol {
                location: self.location(),
                message: format!("cannot read the archive: {message}"),
            })
    }

    /// An entry read whole, refused when larger than `limit`.
    fn read_entry(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, TransportError> {
        let Some(&(offset, size)) = self.entries()?.get(name) else {
            return Ok(None);
        };
        if size > limit {
            return Err(TransportError::Protocol {
                location: self.location(),
                message: format!(
                    "{name} is {size} bytes, more than the {limit} sarde reads for it: not a real archive"
                ),
            });
        }
        let mut file = File::open(&self.file).map_err(|e| self.io_error("opening", e))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| self.io_error(name, e))?;
        let mut data = Vec::with_capacity(size as usize);
        file.take(size)
            .read_to_end(&mut data)
            .map_err(|e| self.io_error(name, e))?;
        if data.len() as u64 != size {
            return Err(self.io_error(
                name,
                io::Error::new(io::ErrorKind::UnexpectedEof, "the archive is truncated"),
            ));
        }
        Ok(Some(data))
    }

    fn index(&self) -> Result<ImageIndex, TransportError> {
        let bytes = self
            .read_entry("index.json", MAX_INDEX_SIZE)?
            .ok_or_else(|| TransportError::Protocol {
                location: self.location(),
                message: "the archive has no index.json: not an OCI archive".to_string(),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| TransportError::Protocol {
            location: self.location(),
            message: format!("index.json is not an OCI index: {e}"),
        })
    }
}

/// Every regular file of the archive by its normalised path.
fn index_entries(file: &Path) -> io::Result<Entries> {
    let mut archive = tar::Archive::new(File::open(file)?);
    let mut entries = HashMap::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        let name = path.trim_start_matches("./").to_string();
        entries.insert(name, (entry.raw_file_position(), entry.size()));
    }
    Ok(entries)
}

/// Refuses a manifest whose bytes are not its digest.
fn check_manifest(
    archive: &OciArchiveTransport,
    manifest: &RawManifest,
) -> Result<(), TransportError> {
    let actual = Digest::sha256_of(&manifest.bytes);
    if actual == manifest.digest {
        return Ok(());
    }
    Err(TransportError::Mismatch {
        location: archive.location(),
        object: "a manifest (nothing stored)".to_string(),
        what: "digest",
        expected: manifest.digest.to_string(),
        actual: actual.to_string(),
    })
}

/// A manifest's media type from its own `mediaType`, or its shape.
fn own_media_type(bytes: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    match value.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) => m.to_string(),
        None if value.get("manifests").is_some() => media_types::IMAGE_INDEX.to_string(),
        None => media_types::IMAGE_MANIFEST.to_string(),
    }
}

pub(crate) fn blob_name(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().name(), digest.hex())
}

#[async_trait]
impl Transport for OciArchiveTransport {
    fn location(&self) -> String {
        self.file.display().to_string()
    }

    fn will_access(&self, _repository: &str, access: Access) {
        if access == Access::Push {
            self.writing.store(true, Ordering::Relaxed);
        }
    }

    async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<RawManifest, TransportError> {
        if self.writing() {
            // What this run wrote so far (by digest), nothing of the archive
            // being replaced.
            let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let written = reference
                .parse::<Digest>()
                .ok()
                .and_then(|d| guard.as_ref()?.manifest(&d).cloned());
            return written.ok_or_else(|| TransportError::ManifestUnknown {
                location: self.location(),
                repository: repository.to_string(),
                reference: reference.to_string(),
            });
        }
        let index = self.index()?;
        let by_digest = reference.parse::<Digest>().ok();
        if reference.is_empty() && index.manifests.len() != 1 {
            // As skopeo: no tag reads the archive's only image.
            return Err(TransportError::Protocol {
                location: self.location(),
                message: format!(
                    "the archive holds {} images and the reference names none: add :TAG",
                    index.manifests.len()
                ),
            });
        }
        let descriptor = index
            .manifests
            .iter()
            .rev()
            .find(|m| match &by_digest {
                None if reference.is_empty() => true,
                Some(d) => m.digest == *d,
                None => {
                    m.annotations
                        .get(media_types::ANNOTATION_REF_NAME)
                        .map(String::as_str)
                        == Some(reference)
                }
            })
            .cloned();
        let unknown = || TransportError::ManifestUnknown {
            location: self.location(),
            repository: repository.to_string(),
            reference: reference.to_string(),
        };
        // The children of an index are blobs the archive's index.json need not
        // list: by digest, the blob itself, its media type from its own field.
        let descriptor = match (descriptor, &by_digest) {
            (Some(d), _) => d,
            (None, Some(digest)) => {
                let &(_, size) = self
                    .entries()?
                    .get(&blob_name(digest))
                    .ok_or_else(unknown)?;
                Descriptor::new("", digest.clone(), size)
            }
            (None, None) => return Err(unknown()),
        };
        let name = blob_name(&descriptor.digest);
        let bytes = self.read_entry(&name, MAX_MANIFEST_SIZE)?.ok_or_else(|| {
            TransportError::BlobUnknown {
                location: self.location(),
                repository: repository.to_string(),
                digest: descriptor.digest.clone(),
            }
        })?;
        let actual = Digest::sha256_of(&bytes);
        if actual != descriptor.digest || bytes.len() as u64 != descriptor.size {
            return Err(TransportError::Mismatch {
                location: self.location(),
                object: format!("manifest {reference}"),
                what: "digest",
                expected: descriptor.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        let media_type = if descriptor.media_type.is_empty() {
            own_media_type(&bytes)
        } else {
            descriptor.media_type
        };
        Ok(RawManifest {
            media_type,
            digest: descriptor.digest,
            bytes,
        })
    }

    async fn put_manifest(
        &self,
        _repository: &str,
        reference: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        check_manifest(self, manifest)?;
        let tag = reference.parse::<Digest>().is_err().then_some(reference);
        self.with_writer(|w| w.add_manifest(manifest, true, tag))
    }

    async fn put_child_manifest(
        &self,
        _repository: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        check_manifest(self, manifest)?;
        self.with_writer(|w| w.add_manifest(manifest, false, None))
    }

    /// Ends the tar and renames it over FILE: only now does the archive change.
    async fn finish_image(
        &self,
        _repository: &str,
        _reference: &str,
    ) -> Result<(), TransportError> {
        let taken = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(writer) = taken else {
            return Ok(());
        };
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || writer.finish(&file))
            .await
            .map_err(|e| self.io_error("writing the archive", io::Error::other(e)))?
            .map_err(|e| self.io_error("writing the archive", e))
    }

    async fn list_tags(&self, _repository: &str) -> Result<Vec<String>, TransportError> {
        Ok(self
            .index()?
            .manifests
            .iter()
            .filter_map(|m| m.annotations.get(media_types::ANNOTATION_REF_NAME).cloned())
            .collect())
    }

    async fn blob_exists(
        &self,
        _repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        if self.writing() {
            let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            return Ok(guard
                .as_ref()
                .is_some_and(|w| w.has(&blob.digest, blob.size)));
        }
        Ok(self
            .entries()?
            .get(&blob_name(&blob.digest))
            .is_some_and(|&(_, size)| size == blob.size))
    }

    async fn get_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, TransportError> {
        let Some(&(start, size)) = self.entries()?.get(&blob_name(&blob.digest)) else {
            return Err(TransportError::BlobUnknown {
                location: self.location(),
                repository: repository.to_string(),
                digest: blob.digest.clone(),
            });
        };
        if size != blob.size || offset > size {
            return Err(TransportError::Mismatch {
                location: self.location(),
                object: format!("blob {}", blob.digest),
                what: "size",
                expected: blob.size.to_string(),
                actual: size.to_string(),
            });
        }
        reader::blob_reader(&self.file, start + offset, size - offset)
            .map_err(|e| self.io_error("opening", e))
    }

    /// A region of the archive for the blob: several stream at once.
    async fn start_blob_write<'a>(
        &'a self,
        _repository: &str,
        blob: &Descriptor,
    ) -> Result<BlobWrite<'a>, TransportError> {
        let name = blob_name(&blob.digest);
        let region = self.with_writer(|w| {
            if w.has(&blob.digest, blob.size) {
                return Ok(None);
            }
            Ok(Some((w.reserve(&name, blob.size)?, w.file(), w.direct())))
        })?;
        let Some((start, file, direct)) = region else {
            return Ok(BlobWrite::Present { linked: false });
        };
        Ok(BlobWrite::Write(Box::new(ArchiveSink {
            shared: self.writer.clone(),
            file,
            direct,
            start,
            blob: blob.clone(),
            location: self.file.clone(),
        })))
    }

    async fn put_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        data: BlobReader,
    ) -> Result<(), TransportError> {
        match self.start_blob_write(repository, blob).await? {
            BlobWrite::Present { .. } => Ok(()),
            BlobWrite::Write(mut sink) => sink.write(data).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn file_then_tag() {
        let r = OciArchiveFactory
            .parse_reference("/mnt/usb/win11.tar:2024")
            .unwrap();
        assert_eq!(
            (r.location.as_str(), r.reference.as_str()),
            ("/mnt/usb/win11.tar", "2024")
        );
        // No tag: the archive's only image when read, untagged when written.
        let r = OciArchiveFactory.parse_reference("w.tar").unwrap();
        assert_eq!((r.reference.as_str(), r.tag), ("", None));
        let e = OciArchiveFactory
            .parse_reference(":x")
            .unwrap_err()
            .to_string();
        assert!(e.contains(SYNTAX), "{e}");
    }

    async fn write_image(archive: &OciArchiveTransport, tag: &str) -> (RawManifest, Vec<u8>) {
        archive.will_access("", Access::Push);
        let layer: Vec<u8> = (0..300_000u32).map(|n| (n % 251) as u8).collect();
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let mut descriptors = Vec::new();
        for data in [&config, &layer] {
            let d = Descriptor::new(
                "application/octet-stream",
                Digest::sha256_of(data),
                data.len() as u64,
            );
            archive
                .put_blob("", &d, Box::pin(std::io::Cursor::new(data.clone())))
                .await
                .unwrap();
            descriptors.push(d);
        }
        let manifest = sarde_api::oci::ImageManifest::new(
            Descriptor::new(
                media_types::IMAGE_CONFIG,
                descriptors[0].digest.clone(),
                descriptors[0].size,
            ),
            vec![descriptors[1].clone()],
        );
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let raw = RawManifest {
            media_type: media_types::IMAGE_MANIFEST.to_string(),
            digest: Digest::sha256_of(&bytes),
            bytes,
        };
        archive.put_manifest("", tag, &raw).await.unwrap();
        archive.finish_image("", tag).await.unwrap();
        (raw, layer)
    }

    #[tokio::test]
    async fn written_then_read_back_from_the_tar() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("image.tar");
        let (raw, layer) = write_image(&OciArchiveTransport::new(&file), "v1").await;
        assert!(file.is_file());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["image.tar"], "only the archive is left");

        let reader = OciArchiveTransport::new(&file);
        let got = reader.get_manifest("", "v1").await.unwrap();
        assert_eq!(got.digest, raw.digest);
        assert_eq!(reader.list_tags("").await.unwrap(), ["v1"]);
        let d = Descriptor::new("x", Digest::sha256_of(&layer), layer.len() as u64);
        assert!(reader.blob_exists("", &d).await.unwrap());
        let mut data = Vec::new();
        reader
            .get_blob("", &d, 1000)
            .await
            .unwrap()
            .read_to_end(&mut data)
            .await
            .unwrap();
        assert_eq!(data, layer[1000..]);
        let e = reader.get_manifest("", "v2").await.unwrap_err();
        assert!(matches!(e, TransportError::ManifestUnknown { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_truncated_archive_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("image.tar");
        write_image(&OciArchiveTransport::new(&file), "v1").await;
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        let reader = OciArchiveTransport::new(&file);
        let e = reader.get_manifest("", "v1").await.unwrap_err().to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
    }
}
