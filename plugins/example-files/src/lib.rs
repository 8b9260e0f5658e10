//! An example plugin: a transport that keeps images as plain files, one per
//! blob and one per tag, under a directory: `files:DIR[:TAG]`.
//!
//! ```text
//! DIR/blobs/sha256-<hex>   every blob, manifests included
//! DIR/types/sha256-<hex>   the media type of a manifest
//! DIR/tags/<tag>           the digest a tag names
//! ```
//!
//! A third-party transport is exactly this: a `cdylib` crate that depends on
//! `sarde-api`, implements `TransportFactory` (its own reference syntax) and
//! `Transport`, and declares itself with `sarde_api::export_plugin!`. With
//! `--plugin PATH` (or the library in a plugin directory), `push`, `fetch`,
//! `pull` and `copy` take `files:` references. It verifies what it stores, as
//! the trait asks: a blob whose size or digest is wrong is never renamed into place.
//!
//! A plugin's async code runs on sarde's runtime but has its own copy of tokio,
//! which sees no runtime: tokio's `fs`, `spawn` and `time` panic in a plugin. So
//! files are read and written with `std::fs` (short blocking calls), and a blob
//! is handed out as a blocking reader behind `AsyncRead`.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use async_trait::async_trait;
use sarde_api::oci::Descriptor;
use sarde_api::transport::{
    BlobReader, RawManifest, TransportOptions, TransportReference, path_and_tag,
};
use sarde_api::{Digest, Registrar, RegistryError, Transport, TransportError, TransportFactory};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// A file read with blocking calls behind `AsyncRead` (see the module docs).
struct BlockingReader(io::Take<fs::File>);

impl AsyncRead for BlockingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.0.read(buf.initialize_unfilled())?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

pub const SCHEME: &str = "files";
const SYNTAX: &str = "files:DIR[:TAG]";
/// The largest manifest read into memory.
const MAX_MANIFEST: u64 = 4 << 20;

pub struct FilesFactory;

impl TransportFactory for FilesFactory {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn description(&self) -> &str {
        "plain files, one per blob and per tag (example plugin): files:DIR[:TAG]"
    }

    fn parse_reference(&self, rest: &str) -> Result<TransportReference, TransportError> {
        let mut reference = path_and_tag(SCHEME, rest, SYNTAX)?;
        // This transport's own grammar: no tag means `latest`.
        if reference.tag.is_none() {
            reference.reference = "latest".into();
            reference.tag = Some("latest".into());
        }
        Ok(reference)
    }

    fn open(
        &self,
        location: &str,
        _options: &TransportOptions,
    ) -> Result<Box<dyn Transport>, TransportError> {
        Ok(Box::new(Files {
            dir: PathBuf::from(location),
        }))
    }
}

/// Registers [`FilesFactory`] under `files`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_transport(Arc::new(FilesFactory))
}

#[cfg(not(feature = "previous-abi"))]
sarde_api::export_plugin!("example-files", register);

/// The same plugin as built against the sarde-api before the last ABI bump (for
/// the test that such a library is refused): the declaration by hand, with the
/// previous ABI version.
#[cfg(feature = "previous-abi")]
#[unsafe(no_mangle)]
pub static sarde_plugin_declaration: sarde_api::plugin::PluginDeclaration =
    sarde_api::plugin::PluginDeclaration {
        header: sarde_api::plugin::PluginHeader {
            magic: sarde_api::plugin::MAGIC,
            abi_version: sarde_api::plugin::ABI_VERSION - 1,
            rustc_version: sarde_api::plugin::RUSTC_VERSION.as_ptr().cast(),
            api_version: sarde_api::plugin::API_VERSION.as_ptr().cast(),
            name: c"example-files".as_ptr(),
        },
        register,
    };

pub struct Files {
    dir: PathBuf,
}

fn key(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm().name(), digest.hex())
}

/// A temporary name no other writer uses.
fn temp_name(dir: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Files {
    fn io(&self, context: &str, source: io::Error) -> TransportError {
        TransportError::Io {
            location: self.dir.display().to_string(),
            context: context.into(),
            source,
        }
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join(key(digest))
    }

    /// Writes `data` to `path` through a temporary file and a rename.
    async fn write_file(&self, path: &Path, data: &[u8]) -> Result<(), TransportError> {
        let dir = path.parent().expect("files live in a directory");
        fs::create_dir_all(dir).map_err(|e| self.io("creating a directory", e))?;
        let temp = temp_name(dir);
        fs::write(&temp, data).map_err(|e| self.io("writing", e))?;
        fs::rename(&temp, path).map_err(|e| self.io("renaming", e))
    }

    async fn resolve(&self, reference: &str) -> Result<Option<Digest>, TransportError> {
        if let Ok(digest) = reference.parse::<Digest>() {
            return Ok(Some(digest));
        }
        match fs::read_to_string(self.dir.join("tags").join(reference)) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|e| TransportError::Protocol {
                    location: self.dir.display().to_string(),
                    message: format!("tag {reference} names no digest: {e}"),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("reading a tag", e)),
        }
    }
}

#[async_trait]
impl Transport for Files {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<RawManifest, TransportError> {
        let unknown = || TransportError::ManifestUnknown {
            location: self.location(),
            repository: repository.into(),
            reference: reference.into(),
        };
        let digest = self.resolve(reference).await?.ok_or_else(unknown)?;
        let path = self.blob_path(&digest);
        let length = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(unknown()),
            Err(e) => return Err(self.io("reading a manifest", e)),
        };
        if length > MAX_MANIFEST {
            return Err(TransportError::Protocol {
                location: self.location(),
                message: format!("manifest {digest} is {length} bytes: too large"),
            });
        }
        let bytes = fs::read(&path).map_err(|e| self.io("reading a manifest", e))?;
        let actual = Digest::sha256_of(&bytes);
        if actual != digest {
            return Err(TransportError::Mismatch {
                location: self.location(),
                object: format!("manifest {reference}"),
                what: "digest",
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        let media_type = fs::read_to_string(self.dir.join("types").join(key(&digest)))
            .map_err(|e| self.io("reading a manifest's media type", e))?;
        Ok(RawManifest {
            media_type: media_type.trim().to_string(),
            digest,
            bytes,
        })
    }

    async fn put_manifest(
        &self,
        _repository: &str,
        reference: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        let actual = Digest::sha256_of(&manifest.bytes);
        if actual != manifest.digest {
            return Err(TransportError::Mismatch {
                location: self.location(),
                object: format!("manifest {reference}"),
                what: "digest",
                expected: manifest.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        self.write_file(&self.blob_path(&manifest.digest), &manifest.bytes)
            .await?;
        let types = self.dir.join("types").join(key(&manifest.digest));
        self.write_file(&types, manifest.media_type.as_bytes())
            .await?;
        if reference.parse::<Digest>().is_err() {
            let tag = self.dir.join("tags").join(reference);
            self.write_file(&tag, manifest.digest.to_string().as_bytes())
                .await?;
        }
        Ok(())
    }

    async fn list_tags(&self, _repository: &str) -> Result<Vec<String>, TransportError> {
        let mut tags = Vec::new();
        let dir = match fs::read_dir(self.dir.join("tags")) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(tags),
            Err(e) => return Err(self.io("listing tags", e)),
        };
        for entry in dir {
            let entry = entry.map_err(|e| self.io("listing tags", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                tags.push(name);
            }
        }
        tags.sort();
        Ok(tags)
    }

    async fn blob_exists(
        &self,
        _repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        match fs::metadata(self.blob_path(&blob.digest)) {
            Ok(m) => Ok(m.len() == blob.size),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io("looking for a blob", e)),
        }
    }

    async fn get_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, TransportError> {
        let mut file = match fs::File::open(self.blob_path(&blob.digest)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(TransportError::BlobUnknown {
                    location: self.location(),
                    repository: repository.into(),
                    digest: blob.digest.clone(),
                });
            }
            Err(e) => return Err(self.io("opening a blob", e)),
        };
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| self.io("seeking in a blob", e))?;
        Ok(Box::pin(BlockingReader(
            file.take(blob.size.saturating_sub(offset)),
        )))
    }

    async fn put_blob(
        &self,
        _repository: &str,
        blob: &Descriptor,
        mut data: BlobReader,
    ) -> Result<(), TransportError> {
        let dir = self.dir.join("blobs");
        fs::create_dir_all(&dir).map_err(|e| self.io("creating the blob directory", e))?;
        let temp = temp_name(&dir);
        let mut file = fs::File::create(&temp).map_err(|e| self.io("creating a blob", e))?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let outcome = loop {
            let n = match data.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(self.io("reading the data", e)),
            };
            total += n as u64;
            if total > blob.size {
                break Err(TransportError::Mismatch {
                    location: self.location(),
                    object: format!("blob {}", blob.digest),
                    what: "size",
                    expected: blob.size.to_string(),
                    actual: format!("more than {}", blob.size),
                });
            }
            hasher.update(&buf[..n]);
            if let Err(e) = file.write_all(&buf[..n]) {
                break Err(self.io("writing a blob", e));
            }
        };
        let actual = Digest::from_sha256(hasher.finalize().into());
        let checked = outcome.and_then(|()| {
            if total != blob.size || actual != blob.digest {
                Err(TransportError::Mismatch {
                    location: self.location(),
                    object: format!("blob {} (nothing stored)", blob.digest),
                    what: "size and digest",
                    expected: format!("{} ({} bytes)", blob.digest, blob.size),
                    actual: format!("{actual} ({total} bytes)"),
                })
            } else {
                Ok(())
            }
        });
        let synced = match checked {
            Ok(()) => file.sync_all().map_err(|e| self.io("syncing a blob", e)),
            Err(e) => Err(e),
        };
        if let Err(e) = synced {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        fs::rename(&temp, self.blob_path(&blob.digest))
            .map_err(|e| self.io("renaming a blob into place", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wrong_blob_is_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            dir: dir.path().to_path_buf(),
        };
        let data = b"hello".to_vec();
        let good = Descriptor::new("x", Digest::sha256_of(&data), 5);
        files
            .put_blob("", &good, Box::pin(std::io::Cursor::new(data.clone())))
            .await
            .unwrap();
        assert!(files.blob_exists("", &good).await.unwrap());
        let bad = Descriptor::new("x", Digest::sha256_of(b"other"), 5);
        let e = files
            .put_blob("", &bad, Box::pin(std::io::Cursor::new(data)))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nothing stored"), "{e}");
        assert!(!files.blob_exists("", &bad).await.unwrap());
    }
}
