//! `push`, `fetch` and `pull`: the cache and registries, through the transports
//! the registry of factories offers and the copy engine of `sarde-transfer`.
//!
//! An image reference names its transport by an optional `scheme://` prefix
//! (`docker://` when absent), as containers/image does.

use std::path::PathBuf;
use std::sync::Arc;

use sarde_api::transport::{TransportOptions, TransportReference, split_scheme};
use sarde_api::{ImageReference, Transport};
use sarde_transfer::{
    BlobGate, FetchRequest, Fetched, Progress, PushRequest, PushTarget, Pushed, ResolvedImage,
    TransferError, TransferOptions,
};
use sarde_transport_oci_dir::Layout;
use thiserror::Error;

use crate::import::{ImportOutcome, ImportRequest, Incoming};
use crate::lifecycle::SpaceNeed;
use crate::{Engine, EngineError, ImageLocation};

/// The default transport scheme.
pub const DEFAULT_SCHEME: &str = "docker";
/// The transport of one OCI layout directory, through which push reads the cache.
pub const LAYOUT_SCHEME: &str = "oci";

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

/// What a pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub fetched: Fetched,
    pub import: ImportOutcome,
}

impl Remote {
    /// The CA file for a registry from the certificate directories.
    pub fn ca_file(&self, location: &str) -> Option<PathBuf> {
        for dir in &self.certs_dirs {
            let dir = dir.join(location);
            let preferred = dir.join("ca.crt");
            if preferred.is_file() {
                return Some(preferred);
            }
            let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "crt") && p.is_file())
                .collect();
            found.sort();
            if let Some(first) = found.into_iter().next() {
                return Some(first);
            }
        }
        None
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
        };
        if let Some(ca) = &options.ca_file {
            tracing::debug!("{location}: trusting the CA in {}", ca.display());
        }
        Ok(Arc::from(factory.open(&location, &options)?))
    }

    /// Pushes a cached image to each target (the image's own name when none).
    pub async fn push(
        &self,
        image: &ImageReference,
        targets: &[RemoteReference],
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
        let mut push_targets = Vec::new();
        for target in targets {
            push_targets.push(PushTarget {
                transport: self.open_remote(target)?,
                repository: target.target.repository.clone(),
                tag: target.target.tag.clone(),
                name: target.to_string(),
            });
        }
        // The image stays while its blobs are read and sent.
        let _lease = self.lease_image("push", &location, false)?;
        let request = PushRequest {
            source: self.open_layout(&location)?,
            repository: String::new(),
            reference: location.reference,
            image: image.to_string(),
            targets: push_targets,
            mount_from: vec![(image.registry_location(), image.repository().to_string())],
        };
        Ok(request.run(&self.remote.transfer, progress).await?)
    }

    /// Copies an image between two transports, neither of them necessarily the
    /// cache: the push engine with another source.
    pub async fn copy(
        &self,
        source: &RemoteReference,
        destination: &RemoteReference,
        progress: Arc<dyn Progress>,
    ) -> Result<Pushed, RemoteError> {
        let request = PushRequest {
            source: self.open_remote(source)?,
            repository: source.target.repository.clone(),
            reference: source.target.reference.clone(),
            image: source.to_string(),
            targets: vec![PushTarget {
                transport: self.open_remote(destination)?,
                repository: destination.target.repository.clone(),
                tag: destination.target.tag.clone(),
                name: destination.to_string(),
            }],
            // A registry mounts blobs of the source repository it holds too.
            mount_from: vec![(
                source.target.location.clone(),
                source.target.repository.clone(),
            )],
        };
        Ok(request.run(&self.remote.transfer, progress).await?)
    }

    /// A layout of the cache (or a `--raw` one) as a transport: the `oci`
    /// transport, one layout directory.
    fn open_layout(&self, location: &ImageLocation) -> Result<Arc<dyn Transport>, RemoteError> {
        let factory = self
            .registry
            .transport(LAYOUT_SCHEME)
            .map_err(EngineError::from)?;
        let path = location.layout.to_string_lossy();
        Ok(Arc::from(
            factory.open(&path, &TransportOptions::default())?,
        ))
    }

    fn fetch_request(
        &self,
        source: &RemoteReference,
        image: &ImageReference,
        command: &str,
    ) -> Result<FetchRequest, RemoteError> {
        // The layout is made only once the source answered: a name that does not
        // exist leaves no empty repository behind.
        let location = ImageLocation::cached(&self.ocidir, image);
        let lease = match self.lease_image(command, &location, false)? {
            Some(lease) => lease,
            None => sarde_lifecycle::Lease::take(self.ocidir.root(), command)
                .map_err(EngineError::from)?,
        };
        Ok(FetchRequest {
            lease: Arc::new(lease),
            source: self.open_remote(source)?,
            repository: source.target.repository.clone(),
            reference: source.target.reference.clone(),
            cache: self.ocidir.root().to_path_buf(),
            layout: self.ocidir.layout_for(image),
            tag: image.tag_or_default().map(str::to_string),
            image: source.to_string(),
        })
    }

    /// Fetches `source` into the cache as `image`.
    pub async fn fetch(
        &self,
        source: &RemoteReference,
        image: &ImageReference,
        progress: &dyn Progress,
    ) -> Result<Fetched, RemoteError> {
        let request = self.fetch_request(source, image, "fetch")?;
        let options = &self.remote.transfer;
        let started = std::time::Instant::now();
        let resolved = request.resolve(options).await?;
        let location = ImageLocation::cached(&self.ocidir, image);
        if !resolved.up_to_date {
            let need = SpaceNeed {
                cache: self.claim_blobs(&request, &resolved)?,
                vms: 0,
            };
            self.make_room_off_thread(need, location.clone(), None)
                .await?;
        }
        let fetched = request
            .finish(&resolved, options, progress, started)
            .await?;
        self.record_image_use(&location, &fetched.manifest.digest);
        Ok(fetched)
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

    /// Claims every blob of a resolved image in the fetch's lease (so no reclaim
    /// or prune takes one from now on, shared ones included) and returns the bytes
    /// of those no repository of the cache holds yet: what the fetch will write.
    fn claim_blobs(
        &self,
        request: &FetchRequest,
        resolved: &ResolvedImage,
    ) -> Result<u64, RemoteError> {
        let layout = Layout::create(&request.layout)?;
        let digests = resolved
            .blobs
            .iter()
            .map(|b| &b.digest)
            .chain(resolved.children.iter().map(|c| &c.digest))
            .chain([&resolved.manifest.digest]);
        request
            .lease
            .protect_layout(&layout)
            .and_then(|()| request.lease.protect_blobs(&layout, digests))
            .map_err(EngineError::from)?;
        let layouts: Vec<Layout> = self
            .ocidir
            .repositories()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| Layout::open(&r.path).ok())
            .collect();
        Ok(resolved
            .blobs
            .iter()
            .filter(|b| !layouts.iter().any(|l| l.has_blob(b)))
            .map(|b| b.size)
            .sum())
    }

    /// Fetches and imports; when the image is not cached yet, pieces are written
    /// into the VM's disks as they arrive. `import.image` is set here.
    pub async fn pull(
        &self,
        source: &RemoteReference,
        image: &ImageReference,
        mut import: ImportRequest,
        progress: &dyn Progress,
    ) -> Result<Pulled, RemoteError> {
        let started = std::time::Instant::now();
        let options = &self.remote.transfer;
        let request = self.fetch_request(source, image, "pull")?;
        let resolved = request.resolve(options).await?;
        import.image = ImageLocation::cached(&self.ocidir, image);
        let engine = self.clone();
        if resolved.up_to_date {
            self.record_image_use(&import.image, &resolved.manifest.digest);
            let outcome = tokio::task::spawn_blocking(move || engine.import(&import))
                .await
                .map_err(|e| RemoteError::Refused(format!("the import task failed: {e}")))??;
            let mut summary = resolved.up_to_date_summary();
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(Pulled {
                fetched: Fetched {
                    manifest: resolved.descriptor(),
                    summary,
                    up_to_date: true,
                },
                import: outcome,
            });
        }
        let need = SpaceNeed {
            cache: self.claim_blobs(&request, &resolved)?,
            vms: self.disk_bytes_to_write(&resolved.manifest.bytes, &import),
        };
        let keep_vm = self.import_name(&resolved.manifest.bytes, &import);
        self.make_room_off_thread(need, import.image.clone(), keep_vm)
            .await?;
        let gate = Arc::new(BlobGate::new());
        import.incoming = Some(Incoming {
            manifest: resolved.descriptor(),
            manifest_bytes: resolved.manifest.bytes.clone(),
            gate: gate.clone(),
        });
        let mut import_task = tokio::task::spawn_blocking(move || engine.import(&import));
        let fetch = async {
            let mut summary = request
                .fetch_blobs(&resolved, options, progress, Some(&gate))
                .await?;
            request.commit(&resolved)?;
            summary.bytes_received += resolved.manifest_bytes;
            Ok::<_, RemoteError>(summary)
        };
        tokio::pin!(fetch);
        let task_failed = |e: tokio::task::JoinError| {
            RemoteError::Refused(format!("the import task failed: {e}"))
        };
        let (summary, outcome) = tokio::select! {
            fetched = &mut fetch => {
                // On failure the gate is failed too, so the import stops waiting.
                let outcome = import_task.await.map_err(task_failed)?;
                (fetched?, outcome?)
            }
            imported = &mut import_task => {
                // An import that fails (a hostile image, a name taken) stops the download.
                let outcome = imported.map_err(task_failed)??;
                (fetch.await?, outcome)
            }
        };
        let mut summary = summary;
        summary.seconds = started.elapsed().as_secs_f64();
        self.record_image_use(
            &ImageLocation::cached(&self.ocidir, image),
            &resolved.manifest.digest,
        );
        Ok(Pulled {
            fetched: Fetched {
                manifest: resolved.descriptor(),
                summary,
                up_to_date: false,
            },
            import: outcome,
        })
    }
}
