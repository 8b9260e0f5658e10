//! The `oci-dir` transport: the [`Transport`] view of the cache, so the copy
//! engine moves images between a registry and the cache like between any two
//! transports. Repositories are `host[:port]/path`; the location is the cache root.
//!
//! The layout code is synchronous (export and import call it from blocking
//! threads); here every filesystem step runs under `spawn_blocking`, and
//! `put_blob` feeds a [`crate::BlobWriter`] through a small bounded queue so
//! memory stays bounded whatever the blob size.

use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use sarde_api::digest::Algorithm;
use sarde_api::limits::MAX_MANIFEST_SIZE;
use sarde_api::oci::{Descriptor, ImageIndex, ImageManifest, media_types};
use sarde_api::reference::ReferenceError;
use sarde_api::transport::{
    BlobReader, BlobWrite, RawManifest, TransportOptions, TransportReference,
};
use sarde_api::{
    Digest, ImageReference, Registrar, RegistryError, Transport, TransportError, TransportFactory,
};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::cache::OciDir;
use crate::error::LayoutError;
use crate::layout::Layout;
use crate::partial::{BlobLock, PartialBlob, cache_partial_path, layout_partial_path};

/// The URL scheme of this transport.
pub const SCHEME: &str = "oci-dir";

/// Bytes per piece handed from the async reader to the blocking writer.
const PIECE: usize = 1 << 20;
/// Pieces in flight: with one being read and one being written, about 6 MiB.
const QUEUE: usize = 4;

/// Opens `oci-dir` transports.
#[derive(Debug, Clone, Copy, Default)]
pub struct OciDirFactory;

impl TransportFactory for OciDirFactory {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn description(&self) -> &str {
        "the cache: OCI image layouts, one per repository: oci-dir:DIR:[host[:port]/]repository[:tag|@digest]"
    }

    /// `DIR:IMAGE`: the cache's root (no `:` in it), then a registry-style
    /// reference, whose layout is `DIR/<host[:port]>/<repository>`.
    fn parse_reference(&self, rest: &str) -> Result<TransportReference, TransportError> {
        let bad = |message: String| TransportError::BadReference {
            scheme: SCHEME.to_string(),
            reference: rest.to_string(),
            message,
            expected: "DIR:[host[:port]/]repository[:tag|@digest]".to_string(),
        };
        let (dir, image) = rest
            .split_once(':')
            .ok_or_else(|| bad("no image after the directory".to_string()))?;
        if dir.is_empty() {
            return Err(bad("no directory".to_string()));
        }
        let image: ImageReference = image
            .parse()
            .map_err(|e: ReferenceError| bad(e.to_string()))?;
        Ok(TransportReference {
            location: dir.to_string(),
            repository: image.cache_path_components().join("/"),
            reference: image.reference_for_registry(),
            tag: image.tag_or_default().map(str::to_string),
            // The cache keeps images under their registry names.
            identity: Some(image.to_string()),
            policy_scopes: sarde_api::transport::registry_scopes(&image),
        })
    }

    fn open(
        &self,
        location: &str,
        _options: &TransportOptions,
    ) -> Result<Box<dyn Transport>, TransportError> {
        if location.is_empty() {
            return Err(TransportError::Protocol {
                location: format!("{SCHEME}:"),
                message: "no directory given: use oci-dir:/path/to/cache".to_string(),
            });
        }
        Ok(Box::new(OciDirTransport::new(location)))
    }
}

/// Registers [`OciDirFactory`] under `oci-dir`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_transport(Arc::new(OciDirFactory))
}

/// The cache as a transport. The root need not exist until something is stored.
#[derive(Debug, Clone)]
pub struct OciDirTransport {
    dir: OciDir,
    /// One layout that every repository name means (the `oci` transport's view).
    single: Option<PathBuf>,
    /// The cache's layouts, listed once, to link blobs from instead of writing them.
    others: Arc<std::sync::OnceLock<Vec<PathBuf>>>,
}

impl OciDirTransport {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        OciDirTransport {
            dir: OciDir::new(root),
            single: None,
            others: Arc::default(),
        }
    }

    /// One OCI image layout directory as a transport (skopeo's `oci:`): the
    /// repository name is ignored, tags are the index's `ref.name` annotations.
    pub fn layout(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        OciDirTransport {
            dir: OciDir::new(&path),
            single: Some(path),
            others: Arc::default(),
        }
    }

    fn layout_path(&self, repository: &str) -> Result<PathBuf, TransportError> {
        if let Some(single) = &self.single {
            return Ok(single.clone());
        }
        self.dir
            .layout_for_repository(repository)
            .map_err(|e| self.error(repository, e))
    }

    /// Maps layout failures to the transport variants callers act on.
    fn error(&self, repository: &str, e: LayoutError) -> TransportError {
        let location = self.location();
        match e {
            LayoutError::TagNotFound { tag, .. } => TransportError::ManifestUnknown {
                location,
                repository: repository.to_string(),
                reference: tag,
            },
            LayoutError::ManifestNotFound { digest, .. } => TransportError::ManifestUnknown {
                location,
                repository: repository.to_string(),
                reference: digest.to_string(),
            },
            LayoutError::BlobMissing { digest, .. } => TransportError::BlobUnknown {
                location,
                repository: repository.to_string(),
                digest,
            },
            LayoutError::BlobSize {
                digest,
                expected,
                actual,
                ..
            } => TransportError::Mismatch {
                location,
                object: format!("blob {digest} in {repository} (the cache is damaged)"),
                what: "size",
                expected: expected.to_string(),
                actual: actual.to_string(),
            },
            LayoutError::BlobDigest { digest, actual, .. } => TransportError::Mismatch {
                location,
                object: format!("blob {digest} in {repository} (the cache is damaged)"),
                what: "digest",
                expected: digest.to_string(),
                actual: actual.to_string(),
            },
            LayoutError::VerifyFailed {
                expected,
                expected_size,
                actual,
                actual_size,
                ..
            } => TransportError::Mismatch {
                location,
                object: format!("blob {expected} for {repository} (nothing stored)"),
                what: "digest and size of the data received",
                expected: format!("{expected} ({expected_size} bytes)"),
                actual: format!("{actual} ({actual_size} bytes)"),
            },
            LayoutError::Io {
                path,
                context,
                source,
            } => TransportError::Io {
                location,
                context: format!("{}: {context}", path.display()),
                source,
            },
            LayoutError::NotFound { .. } => TransportError::Io {
                location,
                context: format!("repository {repository}"),
                source: io::Error::new(io::ErrorKind::NotFound, e.to_string()),
            },
            other => TransportError::Protocol {
                location,
                message: other.to_string(),
            },
        }
    }

    /// Runs blocking filesystem work off the async threads.
    async fn blocking<T, F>(&self, work: F) -> Result<T, TransportError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, TransportError> + Send + 'static,
    {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| TransportError::Io {
                location: self.location(),
                context: "a filesystem task failed".to_string(),
                source: io::Error::other(e.to_string()),
            })?
    }

    /// Refuses a manifest whose bytes are not its sha256 digest.
    fn check_manifest_digest(
        &self,
        manifest: &RawManifest,
        object: impl FnOnce() -> String,
    ) -> Result<(), TransportError> {
        let actual = Digest::sha256_of(&manifest.bytes);
        if manifest.digest.algorithm() == Algorithm::Sha256 && actual == manifest.digest {
            return Ok(());
        }
        Err(TransportError::Mismatch {
            location: self.location(),
            object: object(),
            what: "digest",
            expected: manifest.digest.to_string(),
            actual: actual.to_string(),
        })
    }

    /// Refuses to store a blob of a digest algorithm the layouts don't verify.
    fn require_sha256(&self, repository: &str, blob: &Descriptor) -> Result<(), TransportError> {
        if blob.digest.algorithm() == Algorithm::Sha256 {
            return Ok(());
        }
        Err(self.error(
            repository,
            LayoutError::UnsupportedAlgorithm {
                dir: self.dir.root().to_path_buf(),
                digest: blob.digest.clone(),
            },
        ))
    }

    /// Opens the repository's layout; `None` when there is none yet.
    fn open_layout(&self, repository: &str) -> Result<Option<Layout>, TransportError> {
        match Layout::open(self.layout_path(repository)?) {
            Ok(layout) => Ok(Some(layout)),
            Err(LayoutError::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(repository, e)),
        }
    }

    /// Refuses a manifest naming blobs the layout lacks, as registries do, so a
    /// tag never points at an incomplete image.
    fn check_referenced_blobs(
        &self,
        repository: &str,
        layout: &Layout,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        let protocol = |message: String| TransportError::Protocol {
            location: self.location(),
            message,
        };
        let base = media_types::split(&manifest.media_type).0.to_string();
        let needed: Vec<Descriptor> = if base == media_types::split(media_types::IMAGE_MANIFEST).0
            || base == media_types::split(media_types::DOCKER_MANIFEST).0
        {
            let parsed: ImageManifest = serde_json::from_slice(&manifest.bytes)
                .map_err(|e| protocol(format!("manifest {} is not valid: {e}", manifest.digest)))?;
            std::iter::once(parsed.config)
                .chain(parsed.layers)
                // Foreign layers live elsewhere by design.
                .filter(|d| d.urls.is_empty())
                .collect()
        } else if base == media_types::split(media_types::IMAGE_INDEX).0
            || base == media_types::split(media_types::DOCKER_MANIFEST_LIST).0
        {
            let parsed: ImageIndex = serde_json::from_slice(&manifest.bytes)
                .map_err(|e| protocol(format!("index {} is not valid: {e}", manifest.digest)))?;
            parsed.manifests
        } else {
            Vec::new()
        };
        match needed.into_iter().find(|d| !layout.has_blob(d)) {
            Some(missing) => Err(TransportError::BlobUnknown {
                location: self.location(),
                repository: repository.to_string(),
                digest: missing.digest,
            }),
            None => Ok(()),
        }
    }
}

/// What the async side hands the blob writer.
enum Piece {
    Data(Vec<u8>),
    End,
}

#[async_trait]
impl Transport for OciDirTransport {
    fn location(&self) -> String {
        self.dir.root().display().to_string()
    }

    async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<RawManifest, TransportError> {
        let this = self.clone();
        let (repository, reference) = (repository.to_string(), reference.to_string());
        self.blocking(move || {
            let Some(layout) = this.open_layout(&repository)? else {
                return Err(TransportError::ManifestUnknown {
                    location: this.location(),
                    repository,
                    reference,
                });
            };
            let descriptor = layout
                .resolve(&reference)
                .map_err(|e| this.error(&repository, e))?;
            if descriptor.annotation(crate::ANNOTATION_BLOBS) == Some(crate::BLOBS_METADATA_ONLY) {
                return Err(TransportError::Protocol {
                    location: this.location(),
                    message: format!(
                        "{repository}:{reference} is kept here without its disk pieces (it was pulled with keep-blobs = false; the VM imported from it holds the data), so it cannot be read from this cache: `sarde fetch` it to bring its pieces back, or push or copy it from a host that has them"
                    ),
                });
            }
            // A layout is untrusted too (copied from elsewhere, or an archive's).
            if descriptor.size > MAX_MANIFEST_SIZE {
                return Err(TransportError::Protocol {
                    location: this.location(),
                    message: format!(
                        "manifest {repository}:{reference} announces {} bytes, more than the {MAX_MANIFEST_SIZE} sarde reads for a manifest",
                        descriptor.size
                    ),
                });
            }
            let bytes = layout
                .read_blob(&descriptor)
                .map_err(|e| this.error(&repository, e))?;
            Ok(RawManifest {
                media_type: descriptor.media_type,
                digest: descriptor.digest,
                bytes,
            })
        })
        .await
    }

    async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        self.check_manifest_digest(manifest, || {
            format!("manifest for {repository}:{reference}")
        })?;
        let by_digest = reference.parse::<Digest>().ok();
        if let Some(digest) = &by_digest {
            if *digest != manifest.digest {
                return Err(TransportError::Mismatch {
                    location: self.location(),
                    object: format!("manifest pushed as {repository}@{reference}"),
                    what: "digest",
                    expected: reference.to_string(),
                    actual: manifest.digest.to_string(),
                });
            }
        }
        let path = self.layout_path(repository)?;
        let this = self.clone();
        let (repository, reference, manifest) = (
            repository.to_string(),
            reference.to_string(),
            manifest.clone(),
        );
        self.blocking(move || {
            let err = |e| this.error(&repository, e);
            let layout = Layout::create(path).map_err(err)?;
            this.check_referenced_blobs(&repository, &layout, &manifest)?;
            let descriptor = layout
                .put_manifest(&manifest.bytes, &manifest.media_type)
                .map_err(err)?;
            match by_digest {
                Some(_) => layout.add_untagged(&descriptor).map_err(err),
                None => layout.set_tag(&reference, &descriptor).map_err(err),
            }
        })
        .await
    }

    /// Stored as a blob, not listed in `index.json`: only the index that names
    /// it is an image of the layout (a child is found by digest all the same).
    async fn put_child_manifest(
        &self,
        repository: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        self.check_manifest_digest(manifest, || format!("child manifest for {repository}"))?;
        let path = self.layout_path(repository)?;
        let this = self.clone();
        let (repository, manifest) = (repository.to_string(), manifest.clone());
        self.blocking(move || {
            let err = |e| this.error(&repository, e);
            let layout = Layout::create(path).map_err(err)?;
            this.check_referenced_blobs(&repository, &layout, &manifest)?;
            layout
                .put_manifest(&manifest.bytes, &manifest.media_type)
                .map_err(err)?;
            Ok(())
        })
        .await
    }

    async fn list_tags(&self, repository: &str) -> Result<Vec<String>, TransportError> {
        let this = self.clone();
        let repository = repository.to_string();
        self.blocking(move || {
            let layout = Layout::open(this.layout_path(&repository)?)
                .map_err(|e| this.error(&repository, e))?;
            let tags = layout.tags().map_err(|e| this.error(&repository, e))?;
            Ok(tags.into_iter().map(|(tag, _)| tag).collect())
        })
        .await
    }

    async fn blob_exists(
        &self,
        repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        let this = self.clone();
        let (repository, blob) = (repository.to_string(), blob.clone());
        self.blocking(move || {
            Ok(this
                .open_layout(&repository)?
                .is_some_and(|layout| layout.has_blob(&blob)))
        })
        .await
    }

    async fn get_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, TransportError> {
        if offset > blob.size {
            return Err(TransportError::Protocol {
                location: self.location(),
                message: format!(
                    "offset {offset} is past the end of blob {} ({} bytes) in {repository}",
                    blob.digest, blob.size
                ),
            });
        }
        let this = self.clone();
        let (repository, descriptor) = (repository.to_string(), blob.clone());
        let file = self
            .blocking(move || {
                let Some(layout) = this.open_layout(&repository)? else {
                    return Err(TransportError::BlobUnknown {
                        location: this.location(),
                        repository,
                        digest: descriptor.digest,
                    });
                };
                let mut file = layout
                    .open_blob(&descriptor)
                    .map_err(|e| this.error(&repository, e))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|source| TransportError::Io {
                        location: this.location(),
                        context: format!("seeking in blob {} of {repository}", descriptor.digest),
                        source,
                    })?;
                Ok(file)
            })
            .await?;
        // Never more than the descriptor says, even if the file grows meanwhile.
        let reader = tokio::fs::File::from_std(file).take(blob.size - offset);
        Ok(Box::pin(reader))
    }

    async fn put_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        mut data: BlobReader,
    ) -> Result<(), TransportError> {
        self.require_sha256(repository, blob)?;
        let path = self.layout_path(repository)?;
        let this = self.clone();
        let (repo, descriptor) = (repository.to_string(), blob.clone());
        let layout = self
            .blocking(move || {
                let layout = Layout::create(path).map_err(|e| this.error(&repo, e))?;
                if layout.has_blob(&descriptor) {
                    Ok(None)
                } else {
                    Ok(Some(layout))
                }
            })
            .await?;
        // Already there with the right size: nothing to store.
        let Some(layout) = layout else {
            return Ok(());
        };

        let (tx, mut rx) = mpsc::channel::<Piece>(QUEUE);
        let this = self.clone();
        let (repo, descriptor) = (repository.to_string(), blob.clone());
        let writer = tokio::task::spawn_blocking(move || -> Result<bool, TransportError> {
            let err = |e| this.error(&repo, e);
            let mut writer = layout.blob_writer().map_err(err)?;
            while let Some(piece) = rx.blocking_recv() {
                match piece {
                    Piece::Data(bytes) => {
                        writer
                            .write_all(&bytes)
                            .map_err(|source| TransportError::Io {
                                location: this.location(),
                                context: format!("writing blob {} of {repo}", descriptor.digest),
                                source,
                            })?;
                    }
                    Piece::End => {
                        writer
                            .commit(Some((&descriptor.digest, descriptor.size)))
                            .map_err(err)?;
                        return Ok(true);
                    }
                }
            }
            // The sender gave up: drop the writer, which removes the temporary file.
            Ok(false)
        });

        let pumped = pump(&mut data, &tx, blob, repository, &self.location()).await;
        drop(tx);
        let written = writer.await.map_err(|e| TransportError::Io {
            location: self.location(),
            context: format!("writing blob {} of {repository}", blob.digest),
            source: io::Error::other(e.to_string()),
        });
        // A reading failure explains an aborted writer; report it first.
        pumped?;
        match written?? {
            true => Ok(()),
            false => Err(TransportError::Protocol {
                location: self.location(),
                message: format!(
                    "blob {} of {repository} was not stored: the writer stopped early",
                    blob.digest
                ),
            }),
        }
    }

    /// Present, linked from another repository of the cache, or a sink that
    /// resumes what an interrupted write left; one writer per blob at a time.
    async fn start_blob_write<'a>(
        &'a self,
        repository: &str,
        blob: &Descriptor,
    ) -> Result<BlobWrite<'a>, TransportError> {
        self.require_sha256(repository, blob)?;
        let path = self.layout_path(repository)?;
        let this = self.clone();
        let (repo, descriptor) = (repository.to_string(), blob.clone());
        let layout = self
            .blocking(move || Layout::create(path).map_err(|e| this.error(&repo, e)))
            .await?;
        if layout.has_blob(blob) {
            return Ok(BlobWrite::Present { linked: false });
        }
        let root = self.dir.root().to_path_buf();
        // Writers of one blob take turns in the cache; a user's layout
        // directory gets no lock files (its blobs land by atomic rename).
        let lock = match self.single {
            Some(_) => None,
            None => Some(
                BlobLock::acquire(&root, &blob.digest)
                    .await
                    .map_err(|source| TransportError::Io {
                        location: self.location(),
                        context: format!("locking blob {}", blob.digest),
                        source,
                    })?,
            ),
        };
        let this = self.clone();
        let repo = repository.to_string();
        self.blocking(move || {
            // Another process may have written it while we waited for the lock.
            if layout.has_blob(&descriptor) {
                return Ok(BlobWrite::Present { linked: false });
            }
            if this.single.is_none() {
                let others = this.others.get_or_init(|| {
                    let all = this.dir.repositories().unwrap_or_default();
                    all.into_iter().map(|r| r.path).collect()
                });
                for other in others.iter().filter(|p| p.as_path() != layout.path()) {
                    let Ok(other) = Layout::open(other) else {
                        continue;
                    };
                    if layout
                        .mount_blob_from(&other, &descriptor)
                        .map_err(|e| this.error(&repo, e))?
                    {
                        tracing::debug!(
                            "{}: linked from {}",
                            descriptor.digest,
                            other.path().display()
                        );
                        return Ok(BlobWrite::Present { linked: true });
                    }
                }
            }
            let location = this.location();
            let path = match this.single {
                Some(_) => layout_partial_path(&layout, &descriptor.digest),
                None => cache_partial_path(&root, &descriptor.digest),
            };
            let sink = PartialBlob::open(lock, path, layout, &descriptor, location, repo.clone())
                .map_err(|source| TransportError::Io {
                location: this.location(),
                context: format!("opening the partial blob {}", descriptor.digest),
                source,
            })?;
            Ok(match sink {
                Some(sink) => BlobWrite::Write(Box::new(sink)),
                // The writer we waited for stored it.
                None => BlobWrite::Present { linked: false },
            })
        })
        .await
    }

    /// A directory's blobs can go (a prune, a hand): every one is looked for.
    async fn holds_image(
        &self,
        repository: &str,
        manifest: &RawManifest,
        blobs: &[Descriptor],
    ) -> Result<bool, TransportError> {
        let this = self.clone();
        let repository = repository.to_string();
        let manifest = Descriptor::new(
            manifest.media_type.clone(),
            manifest.digest.clone(),
            manifest.bytes.len() as u64,
        );
        let blobs = blobs.to_vec();
        self.blocking(move || {
            Ok(this.open_layout(&repository)?.is_some_and(|layout| {
                layout.has_blob(&manifest) && blobs.iter().all(|b| layout.has_blob(b))
            }))
        })
        .await
    }

    async fn mount_blob(
        &self,
        repository: &str,
        from_repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        let target = self.layout_path(repository)?;
        let this = self.clone();
        let (repo, from, descriptor) = (
            repository.to_string(),
            from_repository.to_string(),
            blob.clone(),
        );
        self.blocking(move || {
            let Some(source) = this.open_layout(&from)? else {
                return Ok(false);
            };
            if !source.has_blob(&descriptor) {
                return Ok(false);
            }
            let layout = Layout::create(target).map_err(|e| this.error(&repo, e))?;
            layout
                .mount_blob_from(&source, &descriptor)
                .map_err(|e| this.error(&repo, e))
        })
        .await
    }
}

/// Reads `data` in pieces of up to [`PIECE`] bytes into the writer's queue, then
/// sends [`Piece::End`]. Stops early (without `End`) when the writer has gone, and
/// fails when the data runs past the announced size or cannot be read.
async fn pump(
    data: &mut BlobReader,
    tx: &mpsc::Sender<Piece>,
    blob: &Descriptor,
    repository: &str,
    location: &str,
) -> Result<(), TransportError> {
    let mut total = 0u64;
    loop {
        let mut buf = vec![0u8; PIECE];
        let mut filled = 0;
        let mut eof = false;
        while filled < PIECE {
            let n = data
                .read(&mut buf[filled..])
                .await
                .map_err(|source| TransportError::Io {
                    location: location.to_string(),
                    context: format!("reading blob {} for {repository}", blob.digest),
                    source,
                })?;
            if n == 0 {
                eof = true;
                break;
            }
            filled += n;
        }
        total += filled as u64;
        if total > blob.size {
            return Err(TransportError::Mismatch {
                location: location.to_string(),
                object: format!("blob {} for {repository} (nothing stored)", blob.digest),
                what: "size of the data received",
                expected: blob.size.to_string(),
                actual: format!("more than {}", blob.size),
            });
        }
        if filled > 0 {
            buf.truncate(filled);
            if tx.send(Piece::Data(buf)).await.is_err() {
                return Ok(());
            }
        }
        if eof {
            let _ = tx.send(Piece::End).await;
            return Ok(());
        }
    }
}
