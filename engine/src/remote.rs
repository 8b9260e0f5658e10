//! `push`, `fetch` and `pull`: the cache and registries, through the transports
//! the registry of factories offers and the copy engine of `sarde-transfer`.
//!
//! An image reference names its transport by an optional `scheme://` prefix
//! (`docker://` when absent), as containers/image does.

use std::path::PathBuf;
use std::sync::Arc;

use sarde_api::oci::Descriptor;
use sarde_api::transport::{TransportOptions, TransportReference, split_scheme};
use sarde_api::{ImageReference, Transport};
use sarde_transfer::{
    BlobGate, Copied, CopyRequest, Counting, Destination, Progress, SourceImage, Summary,
    TransferError, TransferOptions,
};
use sarde_transport_oci_dir::Layout;
use thiserror::Error;

use crate::import::{ImportOutcome, ImportRequest, Incoming};
use crate::lifecycle::SpaceNeed;
use crate::{Engine, EngineError, ImageLocation};

/// The default transport scheme.
pub const DEFAULT_SCHEME: &str = "docker";
/// The transport of the cache (`oci-dir`): fetch and pull write through it,
/// push reads through it.
pub const CACHE_SCHEME: &str = "oci-dir";

/// How sarde reaches registries.
#[derive(Debug, Clone, Default)]
pub struct Remote {
    /// Registries (`host[:port]`) reached over plain HTTP or unverified TLS.
    pub insecure: Vec<String>,
    /// Directories with `<host[:port]>/*.crt` CA certificates, first match wins
    /// (the layout of `/etc/containers/certs.d` and `/etc/docker/certs.d`).
    pub certs_dirs: Vec<PathBuf>,
    pub transfer: TransferOptions,
    /// How long requests may wait.
    pub bounds: sarde_api::limits::TimeBounds,
    /// The transport of references written without a scheme.
    pub default_transport: String,
    /// Credentials per registry (`host[:port]`) given by the caller (a CI job's);
    /// others are looked up by the transport.
    pub credentials: Vec<(String, sarde_api::transport::Credentials)>,
    /// The signature policy fetch, pull and copy check images against.
    pub trust: crate::trust::Trust,
}

/// A push, fetch or pull that failed.
#[derive(Debug, Error)]
pub enum RemoteError {
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Refused(String),
    /// The signature policy refuses the image, or a key or policy is unusable.
    #[error(transparent)]
    Trust(#[from] sarde_trust::TrustError),
}

impl From<sarde_api::TransportError> for RemoteError {
    fn from(e: sarde_api::TransportError) -> Self {
        RemoteError::Transfer(e.into())
    }
}

impl From<sarde_transport_oci_dir::LayoutError> for RemoteError {
    fn from(e: sarde_transport_oci_dir::LayoutError) -> Self {
        RemoteError::Engine(e.into())
    }
}

/// A reference with the transport it names: `scheme:rest` (`docker://` for
/// registries, the default when there is no scheme), read by that transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteReference {
    pub scheme: String,
    /// The reference after the scheme, as written.
    pub rest: String,
    /// The transport's reading of `rest`.
    pub target: TransportReference,
}

impl RemoteReference {
    /// A registry reference.
    pub fn registry(image: &ImageReference) -> RemoteReference {
        RemoteReference {
            scheme: DEFAULT_SCHEME.to_string(),
            rest: image.to_string(),
            target: image.into(),
        }
    }

    /// The host a location names without its port, for `insecure` entries
    /// written without one.
    fn host(&self) -> &str {
        let location = self.target.location.as_str();
        match location.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(location),
            None => location.split(':').next().unwrap_or(location),
        }
    }
}

impl std::fmt::Display for RemoteReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.scheme == DEFAULT_SCHEME {
            // `docker://host/x` reads as `host/x`.
            write!(f, "{}", self.rest.strip_prefix("//").unwrap_or(&self.rest))
        } else {
            write!(f, "{}:{}", self.scheme, self.rest)
        }
    }
}

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub manifest: Descriptor,
    /// The image's name in the cache.
    pub image: ImageReference,
    pub summary: Summary,
    /// The cache had the image under that name already.
    pub up_to_date: bool,
    /// Why the signature policy let it in (`None`: no policy in force).
    pub policy: Option<sarde_trust::Accepted>,
}

/// What a push or copy did, and the signatures it made.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub copied: Copied,
    /// Why the signature policy let the source in (copy; `None` for push,
    /// whose source is the cache, or when no policy is in force).
    pub policy: Option<sarde_trust::Accepted>,
    pub signed: Vec<sarde_trust::sign::Signed>,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub fetched: Fetched,
    pub import: ImportOutcome,
}

impl Remote {
    /// The CA file for a registry from the certificate directories.
    pub fn ca_file(&self, location: &str) -> Option<PathBuf> {
        sarde_api::transport::ca_file_in(&self.certs_dirs, location)
    }
}

impl Engine {
    /// Reads `scheme:rest` with the transport the scheme names (a registry when
    /// there is none), so each transport parses its own syntax.
    pub fn parse_remote(&self, text: &str) -> Result<RemoteReference, RemoteError> {
        let known = |scheme: &str| self.registry.transport(scheme).is_ok();
        let default = match self.remote.default_transport.as_str() {
            "" => DEFAULT_SCHEME,
            name => name,
        };
        let (scheme, rest) = split_scheme(text, known).unwrap_or((default, text));
        let factory = self.registry.transport(scheme).map_err(EngineError::from)?;
        Ok(RemoteReference {
            scheme: scheme.to_string(),
            rest: rest.to_string(),
            target: factory.parse_reference(rest)?,
        })
    }

    /// The IMAGE argument of fetch, pull and clone: a registry reference (the
    /// image's name in the cache and where it comes from), or `scheme:rest` of
    /// another transport (where it comes from; the cache name is made by
    /// [`Engine::cache_name`], `None` when only the digest will tell). The
    /// `transport` setting does not apply: an IMAGE without a scheme is always
    /// a registry reference, as an image's own name is.
    pub fn parse_image_argument(
        &self,
        text: &str,
    ) -> Result<(RemoteReference, Option<ImageReference>), RemoteError> {
        let known = |scheme: &str| self.registry.transport(scheme).is_ok();
        if split_scheme(text, known).is_some() {
            let source = self.parse_remote(text)?;
            let name = self.cache_name(&source, None)?;
            return Ok((source, name));
        }
        let image: ImageReference = text.parse().map_err(|e| {
            RemoteError::Refused(format!("{text:?} is not an image reference: {e}"))
        })?;
        Ok((RemoteReference::registry(&image), Some(image)))
    }

    /// Opens the transport a reference names, with the TLS settings of its registry.
    pub fn open_remote(
        &self,
        reference: &RemoteReference,
    ) -> Result<Arc<dyn Transport>, RemoteError> {
        let location = reference.target.location.clone();
        let factory = self
            .registry
            .transport(&reference.scheme)
            .map_err(EngineError::from)?;
        let insecure = self
            .remote
            .insecure
            .iter()
            .any(|r| r == &location || r == reference.host());
        if insecure {
            tracing::warn!(
                "{location}: insecure registry: plain HTTP or unverified TLS, as configured"
            );
        }
        let options = TransportOptions {
            insecure,
            ca_file: self.remote.ca_file(&location),
            credentials: self
                .remote
                .credentials
                .iter()
                .find(|(l, _)| *l == location)
                .map(|(_, c)| c.clone()),
            concurrency: self.remote.transfer.concurrency,
            bounds: self.remote.bounds,
            certs_dirs: self.remote.certs_dirs.clone(),
            insecure_locations: self.remote.insecure.clone(),
            ..TransportOptions::default()
        };
        if let Some(ca) = &options.ca_file {
            tracing::debug!("{location}: trusting the CA in {}", ca.display());
        }
        Ok(Arc::from(factory.open(&location, &options)?))
    }

    /// Pushes a cached image to each target (the image's own name when none),
    /// with the signatures the cache holds, and signs it at each target with
    /// `sign` when given.
    pub async fn push(
        &self,
        image: &ImageReference,
        targets: &[RemoteReference],
        sign: Option<&sarde_trust::PrivateKey>,
        progress: Arc<dyn Progress>,
    ) -> Result<Pushed, RemoteError> {
        let location = ImageLocation::cached(&self.ocidir, image);
        let own;
        let targets = if targets.is_empty() {
            own = [RemoteReference::registry(image)];
            &own[..]
        } else {
            targets
        };
        let mut destinations = Vec::new();
        let mut to_sign = Vec::new();
        for target in targets {
            let destination = self.destination(target)?;
            if sign.is_some() {
                // Refused before anything moves.
                to_sign.push((destination.clone(), crate::trust::signing_identity(target)?));
            }
            destinations.push(destination);
        }
        // The image stays while its blobs are read and sent.
        let _lease = self.lease_image("push", &location, false)?;
        let repository = location
            .cache_repository(&self.ocidir)
            .unwrap_or_else(|| cache_repository(image));
        let request = CopyRequest {
            source: self.open_cache()?,
            repository,
            reference: location.reference,
            image: image.to_string(),
            destinations,
            mount_from: vec![(image.registry_location(), image.repository().to_string())],
            check_source_blobs: true,
            counting: Counting::Sent,
            gate: None,
            withheld: Default::default(),
            blobs_only: false,
            attachments: Some(crate::trust::signatures()),
        };
        let copied = request.run(&self.remote.transfer, progress).await?;
        let signed = match sign {
            Some(key) => {
                self.sign_destinations(&to_sign, &copied.manifest.digest, key)
                    .await?
            }
            None => Vec::new(),
        };
        Ok(Pushed {
            copied,
            policy: None,
            signed,
        })
    }

    /// Copies an image between two transports, neither of them necessarily the
    /// cache, with its signatures, once the signature policy accepts it; signs
    /// it at the destination with `sign` when given (a registry: a signature
    /// names the image's registry reference).
    pub async fn copy(
        &self,
        source: &RemoteReference,
        destination: &RemoteReference,
        sign: Option<&sarde_trust::PrivateKey>,
        progress: Arc<dyn Progress>,
    ) -> Result<Pushed, RemoteError> {
        let started = std::time::Instant::now();
        // Refused before anything moves.
        let identity = sign
            .map(|_| crate::trust::signing_identity(destination))
            .transpose()?;
        let target = self.destination(destination)?;
        let to_sign: Vec<_> = identity
            .map(|identity| (target.clone(), identity))
            .into_iter()
            .collect();
        let request = CopyRequest {
            source: self.open_remote(source)?,
            repository: source.target.repository.clone(),
            reference: source.target.reference.clone(),
            image: source.to_string(),
            destinations: vec![target],
            // A registry mounts blobs of the source repository it holds too.
            mount_from: vec![(
                source.target.location.clone(),
                source.target.repository.clone(),
            )],
            check_source_blobs: source.scheme != DEFAULT_SCHEME,
            counting: Counting::Both,
            gate: None,
            withheld: Default::default(),
            blobs_only: false,
            attachments: Some(crate::trust::signatures()),
        };
        let options = &self.remote.transfer;
        let (resolved, policy) = self.resolve_trusted(&request, source).await?;
        let copied = request
            .copy_resolved(&resolved, options, progress, started)
            .await?;
        let signed = match sign {
            Some(key) => {
                self.sign_destinations(&to_sign, &copied.manifest.digest, key)
                    .await?
            }
            None => Vec::new(),
        };
        Ok(Pushed {
            copied,
            policy,
            signed,
        })
    }

    fn destination(&self, target: &RemoteReference) -> Result<Destination, RemoteError> {
        Ok(Destination {
            transport: self.open_remote(target)?,
            repository: target.target.repository.clone(),
            tag: target.target.tag.clone(),
            name: target.to_string(),
        })
    }

    /// The cache as a transport (`oci-dir`, one layout per repository): the
    /// destination of fetch and pull, the source of push.
    pub(crate) fn open_cache(&self) -> Result<Arc<dyn Transport>, RemoteError> {
        let factory = self
            .registry
            .transport(CACHE_SCHEME)
            .map_err(EngineError::from)?;
        let root = self.ocidir.root().to_string_lossy();
        Ok(Arc::from(
            factory.open(&root, &TransportOptions::default())?,
        ))
    }

    /// The name an image read from `source` gets in the cache when the user
    /// gives none: a registry reference is its own name; an image of another
    /// transport is `localhost/<its absolute path>` with the source's tag, or
    /// with its manifest digest when the source names no tag (an archive entry
    /// with no name), so two places never share a cache name. `digest` is
    /// needed only then.
    pub fn cache_name(
        &self,
        source: &RemoteReference,
        digest: Option<&sarde_api::Digest>,
    ) -> Result<Option<ImageReference>, RemoteError> {
        if source.scheme == DEFAULT_SCHEME {
            let text = source.rest.strip_prefix("//").unwrap_or(&source.rest);
            return Ok(Some(text.parse().map_err(|e| {
                RemoteError::Refused(format!("{source} is not an image reference: {e}"))
            })?));
        }
        let path = local_repository_name(&source.target.location, &source.target.repository);
        let named = match (&source.target.tag, digest) {
            (Some(tag), _) => format!("localhost/{path}:{tag}"),
            (None, Some(digest)) => format!("localhost/{path}@{digest}"),
            (None, None) => return Ok(None),
        };
        Ok(Some(named.parse().map_err(|e| {
            RemoteError::Refused(format!(
                "{source}: no cache name can be made of it ({named}: {e}); name the image: `sarde pull --source {source} NAME`"
            ))
        })?))
    }

    /// Reads `source` and decides its cache name: what fetch and pull do before
    /// any blob moves.
    async fn prepare_fetch(
        &self,
        source: &RemoteReference,
        image: Option<&ImageReference>,
        command: &str,
        gate: Option<Arc<BlobGate>>,
        import: Option<&ImportRequest>,
    ) -> Result<PreparedFetch, RemoteError> {
        let mut request = CopyRequest {
            source: self.open_remote(source)?,
            repository: source.target.repository.clone(),
            reference: source.target.reference.clone(),
            image: source.to_string(),
            destinations: Vec::new(),
            mount_from: Vec::new(),
            check_source_blobs: false,
            counting: Counting::Received,
            gate,
            withheld: Default::default(),
            blobs_only: false,
            attachments: self.signatures_to_keep(source),
        };
        let options = &self.remote.transfer;
        let (resolved, policy) = self.resolve_trusted(&request, source).await?;
        let image = match image {
            Some(image) => image.clone(),
            None => self
                .cache_name(source, Some(&resolved.manifest.digest))?
                .expect("a digest always makes a name"),
        };
        let location = ImageLocation::to_write(&self.ocidir, &image);
        let lease = match self.lease_image(command, &location, false)? {
            Some(lease) => lease,
            None => sarde_lifecycle::Lease::take(self.ocidir.root(), command)
                .map_err(EngineError::from)?,
        };
        request.destinations.push(Destination {
            transport: self.open_cache()?,
            repository: cache_repository(&image),
            tag: image.tag_or_default().map(str::to_string),
            name: source.to_string(),
        });
        // A pull whose VM is this image, untouched, needs nothing from the cache
        // but the tag: its blobs are not even looked at (a re-pull costs the same
        // for 10 pieces and for 1000).
        let vm_current =
            import.is_some_and(|import| self.vm_is_current(&location, &resolved, import));
        let up_to_date = vm_current || request.up_to_date(&resolved, options).await?;
        if up_to_date {
            // The image is there; its signatures may be newer at the source.
            request.copy_attachments(&resolved, options).await?;
        }
        Ok(PreparedFetch {
            request,
            resolved,
            image,
            location,
            lease,
            up_to_date,
            policy,
        })
    }

    /// Fetches `source` into the cache as `image` (named after the source when
    /// `None`, see [`Engine::cache_name`]).
    pub async fn fetch(
        &self,
        source: &RemoteReference,
        image: Option<&ImageReference>,
        progress: Arc<dyn Progress>,
    ) -> Result<Fetched, RemoteError> {
        let started = std::time::Instant::now();
        let prepared = self
            .prepare_fetch(source, image, "fetch", None, None)
            .await?;
        let options = &self.remote.transfer;
        let summary = if prepared.up_to_date {
            progress.event(&sarde_transfer::Event::Finish {
                image: &source.to_string(),
            });
            let mut summary = prepared.resolved.up_to_date_summary(Counting::Received);
            summary.seconds = started.elapsed().as_secs_f64();
            summary
        } else {
            let need = SpaceNeed {
                cache: self.claim_blobs(&prepared)?,
                vms: 0,
            };
            self.make_room_off_thread(need, prepared.location.clone(), None)
                .await?;
            prepared
                .request
                .copy_resolved(&prepared.resolved, options, progress, started)
                .await?
                .summary
        };
        self.record_image_use(&prepared.location, &prepared.resolved.manifest.digest);
        Ok(Fetched {
            manifest: prepared.resolved.descriptor(),
            image: prepared.image,
            summary,
            up_to_date: prepared.up_to_date,
            policy: prepared.policy,
        })
    }

    /// [`Engine::make_room`] on a blocking thread (it reads the whole cache).
    async fn make_room_off_thread(
        &self,
        need: SpaceNeed,
        keep: ImageLocation,
        keep_vm: Option<String>,
    ) -> Result<(), RemoteError> {
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.make_room(need, &keep, keep_vm.as_deref()))
            .await
            .map_err(|e| RemoteError::Refused(format!("the reclaim task failed: {e}")))??;
        Ok(())
    }

    /// Claims the image and every blob of it in the fetch's lease (so no
    /// reclaim or prune takes one from now on, shared ones included) and
    /// returns the bytes of those no repository of the cache holds yet: what
    /// the fetch will write.
    fn claim_blobs(&self, prepared: &PreparedFetch) -> Result<u64, RemoteError> {
        let layout = Layout::create(&prepared.location.layout)?;
        let resolved = &prepared.resolved;
        let digests = resolved
            .contents()
            .into_iter()
            .map(|b| b.digest)
            .chain([resolved.manifest.digest.clone()])
            .collect::<Vec<_>>();
        let lease = &prepared.lease;
        let reference = prepared
            .image
            .tag_or_default()
            .map(str::to_string)
            .unwrap_or_else(|| prepared.location.reference.clone());
        lease
            .protect_layout(&layout)
            .and_then(|()| lease.protect_image(&layout, &reference))
            .and_then(|()| lease.protect_blobs(&layout, digests.iter()))
            .map_err(EngineError::from)?;
        let layouts: Vec<Layout> = self
            .ocidir
            .repositories()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| Layout::open(&r.path).ok())
            .collect();
        let withheld = &prepared.request.withheld;
        Ok(resolved
            .blobs
            .iter()
            .filter(|b| !withheld.contains(&b.digest) && !layouts.iter().any(|l| l.has_blob(b)))
            .map(|b| b.size)
            .sum())
    }

    /// Fetches and imports; when the image is not cached yet, pieces are written
    /// into the VM's disks as they arrive. `import.image` is set here.
    pub async fn pull(
        &self,
        source: &RemoteReference,
        image: Option<&ImageReference>,
        mut import: ImportRequest,
        progress: Arc<dyn Progress>,
    ) -> Result<Pulled, RemoteError> {
        let started = std::time::Instant::now();
        let gate = Arc::new(BlobGate::new());
        let mut prepared = self
            .prepare_fetch(source, image, "pull", Some(gate.clone()), Some(&import))
            .await?;
        import.image = prepared.location.clone();
        let engine = self.clone();
        let keep_blobs = self.lifecycle.keep_blobs;
        if prepared.up_to_date {
            let resolved = &prepared.resolved;
            self.record_image_use(&import.image, &resolved.manifest.digest);
            let outcome = tokio::task::spawn_blocking(move || engine.import(&import))
                .await
                .map_err(|e| RemoteError::Refused(format!("the import task failed: {e}")))??;
            if !keep_blobs {
                self.keep_metadata_only(&prepared)?;
            }
            let mut summary = resolved.up_to_date_summary(Counting::Received);
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(Pulled {
                fetched: Fetched {
                    manifest: resolved.descriptor(),
                    image: prepared.image,
                    summary,
                    up_to_date: true,
                    policy: prepared.policy.clone(),
                },
                import: outcome,
            });
        }
        let keep_vm = self.import_name(&prepared.resolved.manifest.bytes, &import);
        if !keep_blobs {
            // The pieces an earlier version on this host holds are copied from
            // it, never fetched; the manifest is written once the VM is there.
            if let Some(name) = &keep_vm {
                prepared.request.withheld = self.pieces_held_on_host(
                    &import.image.name,
                    name,
                    &prepared.resolved.manifest.bytes,
                )?;
            }
            prepared.request.blobs_only = true;
        }
        let need = SpaceNeed {
            cache: self.claim_blobs(&prepared)?,
            vms: self.disk_bytes_to_write(&prepared.resolved.manifest.bytes, &import),
        };
        self.make_room_off_thread(need, import.image.clone(), keep_vm)
            .await?;
        let manifest = prepared.resolved.descriptor();
        let manifest_bytes = prepared.resolved.manifest.bytes.clone();
        let mut first = Some(gate);
        let (copied, outcome) = loop {
            let gate = first.take().unwrap_or_else(|| Arc::new(BlobGate::new()));
            prepared.request.gate = Some(gate.clone());
            let mut import = import.clone();
            import.incoming = Some(Incoming {
                manifest: manifest.clone(),
                manifest_bytes: manifest_bytes.clone(),
                gate: gate.clone(),
            });
            let result = self
                .fetch_and_import(&prepared, import, gate, progress.clone(), started)
                .await;
            match result {
                // A piece the previous version was to give (its blob withheld)
                // could not come from it after all: fetch what is missing.
                Err(e)
                    if !prepared.request.withheld.is_empty()
                        && e.to_string().contains(sarde_transfer::WITHHELD) =>
                {
                    tracing::warn!("{e}; fetching the pieces the previous version did not give");
                    prepared.request.withheld.clear();
                }
                other => break other?,
            }
        };
        if !keep_blobs {
            self.keep_metadata_only(&prepared)?;
        }
        let mut summary = copied.summary;
        summary.seconds = started.elapsed().as_secs_f64();
        self.record_image_use(&prepared.location, &manifest.digest);
        Ok(Pulled {
            fetched: Fetched {
                manifest,
                image: prepared.image,
                summary,
                up_to_date: false,
                policy: prepared.policy.clone(),
            },
            import: outcome,
        })
    }
}

impl Engine {
    /// Copies the image's blobs into the cache while the import writes each
    /// piece into the VM as it arrives.
    async fn fetch_and_import(
        &self,
        prepared: &PreparedFetch,
        import: ImportRequest,
        gate: Arc<BlobGate>,
        progress: Arc<dyn Progress>,
        started: std::time::Instant,
    ) -> Result<(sarde_transfer::Copied, crate::import::ImportOutcome), RemoteError> {
        // A pull stopped half way (Ctrl-C, a cancelled job) must not leave the
        // import waiting for blobs that will never come.
        let _stop_import = FailOnDrop(gate);
        let engine = self.clone();
        let mut import_task = tokio::task::spawn_blocking(move || engine.import(&import));
        let fetch = prepared.request.copy_resolved(
            &prepared.resolved,
            &self.remote.transfer,
            progress,
            started,
        );
        tokio::pin!(fetch);
        let task_failed = |e: tokio::task::JoinError| {
            RemoteError::Refused(format!("the import task failed: {e}"))
        };
        Ok(tokio::select! {
            copied = &mut fetch => {
                // On failure the gate is failed too, so the import stops waiting.
                let outcome = import_task.await.map_err(task_failed)?;
                (copied?, outcome?)
            }
            imported = &mut import_task => {
                // An import that fails (a hostile image, a name taken) stops the download.
                let outcome = imported.map_err(task_failed)??;
                (fetch.await?, outcome)
            }
        })
    }

    /// Whether the cache's tag names this manifest and the VM a pull would
    /// import it as was imported from it and is untouched since (its files'
    /// identity stamps are those recorded after the import), and the domain is
    /// defined.
    fn vm_is_current(
        &self,
        location: &ImageLocation,
        resolved: &sarde_transfer::SourceImage,
        import: &ImportRequest,
    ) -> bool {
        let digest = &resolved.manifest.digest;
        let tagged = Layout::open(&location.layout)
            .and_then(|layout| layout.resolve(&location.reference))
            .is_ok_and(|entry| entry.digest == *digest);
        let Some(name) = self.import_name(&resolved.manifest.bytes, import) else {
            return false;
        };
        let dir = self.vmdir.join(&name);
        let defined = || {
            self.registry
                .connect(&self.connect)
                .ok()
                .and_then(|hypervisor| hypervisor.exists(&name).ok())
                .unwrap_or(false)
        };
        tagged
            && crate::Marker::read(&dir).is_some_and(|marker| {
                marker.defined
                    && marker.manifest == *digest
                    && marker.files.iter().all(|file| {
                        file.stamp.is_some()
                            && crate::marker::FileStamp::of(&dir.join(&file.name)).ok()
                                == file.stamp
                    })
            })
            && defined()
    }

    /// Keeps the pulled image in the cache without its disk pieces (the VM holds
    /// the data): its manifest tagged and marked so, the pieces nothing else
    /// needs deleted.
    fn keep_metadata_only(&self, prepared: &PreparedFetch) -> Result<(), RemoteError> {
        let layout = Layout::create(&prepared.location.layout)?;
        let reference = prepared
            .image
            .tag_or_default()
            .map(str::to_string)
            .unwrap_or_else(|| prepared.location.reference.clone());
        let freed = sarde_lifecycle::metadata_only::keep_metadata_only(
            self.ocidir.root(),
            &layout,
            &prepared.resolved.manifest.bytes,
            &prepared.resolved.descriptor(),
            &reference,
            &prepared.lease,
        )
        .map_err(EngineError::from)?;
        tracing::info!(
            "{}: kept without its disk pieces (keep-blobs = false); {freed} bytes of pieces removed from the cache",
            prepared.image
        );
        Ok(())
    }
}

/// Fails the gate when dropped: the import waiting on it stops. After a
/// complete copy every blob is ready already, and failing changes nothing.
struct FailOnDrop(Arc<BlobGate>);

impl Drop for FailOnDrop {
    fn drop(&mut self) {
        self.0
            .fail("the pull stopped before every piece arrived".into());
    }
}

/// A fetch or pull once its source is read and its cache name decided.
struct PreparedFetch {
    request: CopyRequest,
    resolved: SourceImage,
    image: ImageReference,
    location: ImageLocation,
    lease: sarde_lifecycle::Lease,
    policy: Option<sarde_trust::Accepted>,
    up_to_date: bool,
}

/// An image's repository in the cache transport: `host[:port]/path`.
pub(crate) fn cache_repository(image: &ImageReference) -> String {
    image.cache_path_components().join("/")
}

/// The repository an image of another transport is cached under: its
/// location's absolute path (and the plugin's repository, if any), each
/// component in the repository grammar (lower case; characters it can't have
/// turned into `-`), so images at different places never share a name. When
/// anything had to change, or the path is too long for a name, a hash of the
/// original keeps it apart from the path it now looks like.
fn local_repository_name(location: &str, repository: &str) -> String {
    use sha2::Digest as _;
    let mut parts: Vec<String> = Vec::new();
    let absolute = std::path::absolute(location).unwrap_or_else(|_| location.into());
    for component in absolute.components() {
        match component {
            std::path::Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            std::path::Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts.extend(
        repository
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_string),
    );
    let original = parts.join("/");
    let mut clean: Vec<String> = parts
        .iter()
        .map(|p| repository_component(p))
        .filter(|p| !p.is_empty())
        .collect();
    let hash = || {
        let digest = sha2::Sha256::digest(original.as_bytes());
        digest[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let mut name = clean.join("/");
    if name.len() > 200 {
        let last = clean.pop().unwrap_or_default();
        let keep: String = last.chars().take(100).collect();
        name = format!("{keep}-{}", hash());
    } else if name != original || name.is_empty() {
        let last = clean.pop().unwrap_or_else(|| "image".into());
        clean.push(format!("{last}-{}", hash()));
        name = clean.join("/");
    }
    name
}

/// One path component in the grammar of a repository component: lower-case
/// letters and digits, separated by `.`, `_`, `__` or runs of `-`; any other
/// run of characters becomes `-`.
fn repository_component(text: &str) -> String {
    let lower = text.to_lowercase();
    let mut out = String::new();
    let mut run = String::new();
    let flush = |out: &mut String, run: &mut String| {
        if run.is_empty() {
            return;
        }
        let allowed = matches!(run.as_str(), "." | "_" | "__") || run.chars().all(|c| c == '-');
        if !out.is_empty() {
            out.push_str(if allowed { run } else { "-" });
        }
        run.clear();
    };
    for c in lower.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            flush(&mut out, &mut run);
            out.push(c);
        } else {
            run.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_are_the_path_in_the_repository_grammar() {
        assert_eq!(
            local_repository_name("/mnt/usb/win11.tar", ""),
            "mnt/usb/win11.tar"
        );
        assert_eq!(
            local_repository_name("/srv/images/../x/debian_12", ""),
            "srv/x/debian_12"
        );
        assert_eq!(local_repository_name("/srv/a", "team/vm"), "srv/a/team/vm");
        // Changed to fit the grammar: a hash of the original keeps them apart.
        let spaced = local_repository_name("/mnt/usb/Win 11.tar", "");
        assert!(spaced.starts_with("mnt/usb/win-11.tar-"), "{spaced}");
        assert_ne!(spaced, local_repository_name("/mnt/usb/win-11.tar", ""));
        assert_ne!(
            local_repository_name("/x/A", ""),
            local_repository_name("/x/a", "")
        );
        for odd in [
            "/x/a._b",
            "/x/a..b",
            "/x/.hidden/-y-",
            "/",
            "/x/é",
            &"/d".repeat(150),
        ] {
            let made = local_repository_name(odd, "");
            let image: ImageReference = format!("localhost/{made}:1")
                .parse()
                .unwrap_or_else(|e| panic!("{odd:?} → {made:?}: {e}"));
            assert_eq!(image.to_string(), format!("localhost/{made}:1"));
        }
    }
}
