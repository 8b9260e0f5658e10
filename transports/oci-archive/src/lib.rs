//! # sarde-transport-oci-archive
//!
//! The `oci-archive` transport: an OCI image layout packed in one tar file, named
//! as containers/image (skopeo, podman) names it, `oci-archive:FILE[:TAG]` (the
//! file ends at the first `:`; without a tag, the only image when read, untagged
//! when written, as in skopeo).
//!
//! - Reading never unpacks: the tar's headers are indexed once (`tar` seeks past
//!   the data), and a blob is streamed from its offset in the file.
//! - Writing stages an OCI layout beside the file (`.<FILE>.sarde-staging/`,
//!   written and verified by the cache's layout code, kept across an interrupted
//!   run so the next one resumes), and packs it into a temporary file renamed over
//!   FILE when the tagged manifest arrives: the archive is complete or absent. A
//!   write replaces what FILE held before, as skopeo's does.

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
    Access, BlobReader, RawManifest, TransportOptions, TransportReference, path_and_tag,
    require_path,
};
use sarde_api::{Digest, Registrar, RegistryError, Transport, TransportError, TransportFactory};
use sarde_transport_oci_dir::OciDirTransport;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

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
    staging_path: PathBuf,
    staging: OciDirTransport,
    /// Set once the operation declared a push: then the staged layout is what
    /// the destination "has", not the archive being replaced.
    writing: AtomicBool,
    /// The staging directory was created or checked (see `prepare_staging`).
    staging_checked: AtomicBool,
    entries: OnceLock<Result<Entries, String>>,
}

impl OciArchiveTransport {
    pub fn new(file: impl Into<PathBuf>) -> Self {
        let file = file.into();
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "archive".to_string());
        let staging_path = file.with_file_name(format!(".{name}.sarde-staging"));
        OciArchiveTransport {
            staging: OciDirTransport::layout(&staging_path),
            staging_path,
            file,
            writing: AtomicBool::new(false),
            staging_checked: AtomicBool::new(false),
            entries: OnceLock::new(),
        }
    }

    fn writing(&self) -> bool {
        self.writing.load(Ordering::Relaxed)
    }

    /// Before the first write: the staging directory is made private (0700),
    /// or, left by an interrupted run, resumed only when it is a directory of
    /// this user's (a shared directory could hold someone else's, or a symlink).
    fn prepare_staging(&self) -> Result<(), TransportError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        self.writing.store(true, Ordering::Relaxed);
        if self.staging_checked.load(Ordering::Relaxed) {
            return Ok(());
        }
        match std::fs::symlink_metadata(&self.staging_path) {
            Ok(meta) => {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let me = unsafe { libc::geteuid() };
                if !meta.is_dir() || meta.uid() != me {
                    return Err(TransportError::Protocol {
                        location: self.location(),
                        message: format!(
                            "{} is not a staging directory of this user: remove it, or write the archive elsewhere",
                            self.staging_path.display()
                        ),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&self.staging_path)
                .map_err(|e| self.io_error("creating the staging directory", e))?,
            Err(e) => return Err(self.io_error("checking the staging directory", e)),
        }
        self.staging_checked.store(true, Ordering::Relaxed);
        Ok(())
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

    /// Packs the staged layout into a temporary file and renames it over the
    /// archive, then drops the staging directory.
    fn pack(&self) -> io::Result<()> {
        let dir = self.file.parent().filter(|p| !p.as_os_str().is_empty());
        let temp = tempfile_in(dir.unwrap_or(Path::new(".")), &self.file)?;
        {
            let mut builder = tar::Builder::new(io::BufWriter::new(temp.as_file()));
            let mut names = vec!["oci-layout".to_string(), "index.json".to_string()];
            let blobs = self.staging_path.join("blobs").join("sha256");
            let mut digests: Vec<String> = std::fs::read_dir(&blobs)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
                .collect();
            digests.sort();
            names.extend(digests.into_iter().map(|d| format!("blobs/sha256/{d}")));
            for name in names {
                use std::os::unix::fs::OpenOptionsExt;
                let path = self.staging_path.join(&name);
                // A link planted there is not followed into the archive.
                let file = File::options()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)?;
                let mut header = tar::Header::new_gnu();
                header.set_size(file.metadata()?.len());
                header.set_mode(0o644);
                header.set_mtime(0);
                header.set_entry_type(tar::EntryType::Regular);
                builder.append_data(&mut header, &name, file)?;
            }
            builder
                .into_inner()?
                .into_inner()
                .map_err(|e| e.into_error())?;
        }
        temp.as_file().sync_all()?;
        temp.persist(&self.file).map_err(|e| e.error)?;
        if let Some(dir) = dir {
            File::open(dir)?.sync_all()?;
        }
        std::fs::remove_dir_all(&self.staging_path)
    }
}

/// A named temporary file beside `file`, so the rename stays on one file system.
fn tempfile_in(dir: &Path, file: &Path) -> io::Result<tempfile::NamedTempFile> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tempfile::Builder::new()
        .prefix(&format!(".{name}.sarde-tmp-"))
        .tempfile_in(dir)
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

/// A manifest's media type from its own `mediaType`, or its shape.
fn own_media_type(bytes: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    match value.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) => m.to_string(),
        None if value.get("manifests").is_some() => media_types::IMAGE_INDEX.to_string(),
        None => media_types::IMAGE_MANIFEST.to_string(),
    }
}

fn blob_name(digest: &Digest) -> String {
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
            return self.staging.get_manifest(repository, reference).await;
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
        repository: &str,
        reference: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        self.prepare_staging()?;
        self.staging
            .put_manifest(repository, reference, manifest)
            .await
    }

    async fn put_child_manifest(
        &self,
        repository: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        self.prepare_staging()?;
        self.staging.put_child_manifest(repository, manifest).await
    }

    /// Packs the staged layout into the archive (a temporary file renamed over
    /// FILE): only now does the archive change.
    async fn finish_image(
        &self,
        _repository: &str,
        _reference: &str,
    ) -> Result<(), TransportError> {
        if !self.writing() {
            return Ok(());
        }
        self.pack()
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
        repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        if self.writing() {
            return self.staging.blob_exists(repository, blob).await;
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
        let mut file = tokio::fs::File::open(&self.file)
            .await
            .map_err(|e| self.io_error("opening", e))?;
        file.seek(SeekFrom::Start(start + offset))
            .await
            .map_err(|e| self.io_error("seeking to a blob", e))?;
        Ok(Box::pin(file.take(size - offset)))
    }

    async fn put_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        data: BlobReader,
    ) -> Result<(), TransportError> {
        self.prepare_staging()?;
        self.staging.put_blob(repository, blob, data).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(
            !dir.path().join(".image.tar.sarde-staging").exists(),
            "staging left"
        );

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
