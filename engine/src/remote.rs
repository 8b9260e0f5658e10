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

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub manifest: Descriptor,
    /// The image's name in the cache.
    pub image: ImageReference,
    pub summary: Summary,
    /// The cache had the image under that name already.
    pub up_to_date: bool,
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
            ..TransportOptions::default()
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
    ) -> Result<Copied, RemoteError> {
        let location = ImageLocation::cached(&self.ocidir, image);
        let own;
        let targets = if targets.is_empty() {
            own = [RemoteReference::registry(image)];
            &own[..]
        } else {
            targets
        };
        let mut destinations = Vec::new();
        for target in targets {
            destinations.push(self.destination(target)?);
        }
        // The image stays while its blobs are read and sent.
        let _lease = self.lease_image("push", &location, false)?;
        let request = CopyRequest {
            source: self.open_cache()?,
            repository: cache_repository(image),
            reference: location.reference,
            image: image.to_string(),
            destinations,
            mount_from: vec![(image.registry_location(), image.repository().to_string())],
            check_source_blobs: true,
            counting: Counting::Sent,
            gate: None,
        };
        Ok(request.run(&self.remote.transfer, progress).await?)
    }

    /// Copies an image between two transports, neither of them necessarily the
    /// cache.
    pub async fn copy(
        &self,
        source: &RemoteReference,
        destination: &RemoteReference,
        progress: Arc<dyn Progress>,
    ) -> Result<Copied, RemoteError> {
        let request = CopyRequest {
            source: self.open_remote(source)?,
            repository: source.target.repository.clone(),
            reference: source.target.reference.clone(),
            image: source.to_string(),
            destinations: vec![self.destination(destination)?],
            // A registry mounts blobs of the source repository it holds too.
            mount_from: vec![(
                source.target.location.clone(),
                source.target.repository.clone(),
            )],
            check_source_blobs: source.scheme != DEFAULT_SCHEME,
            counting: Counting::Both,
            gate: None,
        };
        Ok(request.run(&self.remote.transfer, progress).await?)
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
    fn open_cache(&self) -> Result<Arc<dyn Transport>, RemoteError> {
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
    /// transport is `localhost/<file or directory name>` with the source's tag,
    /// or with its manifest digest when the source names no tag (an archive
    /// entry with no name). `digest` is needed only then.
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
        let stem = local_repository_name(&source.target.location, &source.target.repository);
        let named = match (&source.target.tag, digest) {
            (Some(tag), _) => format!("localhost/{stem}:{tag}"),
            (None, Some(digest)) => format!("localhost/{stem}@{digest}"),
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
        };
        let options = &self.remote.transfer;
        let resolved = request.resolve(options).await?;
        let image = match image {
            Some(image) => image.clone(),
            None => self
                .cache_name(source, Some(&resolved.manifest.digest))?
                .expect("a digest always makes a name"),
        };
        let location = ImageLocation::cached(&self.ocidir, &image);
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
        let up_to_date = request.up_to_date(&resolved, options).await?;
        Ok(PreparedFetch {
            request,
            resolved,
            image,
            location,
            lease,
            up_to_date,
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
        let prepared = self.prepare_fetch(source, image, "fetch", None).await?;
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
        image: Option<&ImageReference>,
        mut import: ImportRequest,
        progress: Arc<dyn Progress>,
    ) -> Result<Pulled, RemoteError> {
        let started = std::time::Instant::now();
        let options = &self.remote.transfer;
        let gate = Arc::new(BlobGate::new());
        let prepared = self
            .prepare_fetch(source, image, "pull", Some(gate.clone()))
            .await?;
        import.image = prepared.location.clone();
        let engine = self.clone();
        let resolved = &prepared.resolved;
        if prepared.up_to_date {
            self.record_image_use(&import.image, &resolved.manifest.digest);
            let outcome = tokio::task::spawn_blocking(move || engine.import(&import))
                .await
                .map_err(|e| RemoteError::Refused(format!("the import task failed: {e}")))??;
            let mut summary = resolved.up_to_date_summary(Counting::Received);
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(Pulled {
                fetched: Fetched {
                    manifest: resolved.descriptor(),
                    image: prepared.image,
                    summary,
                    up_to_date: true,
                },
                import: outcome,
            });
        }
        let need = SpaceNeed {
            cache: self.claim_blobs(&prepared)?,
            vms: self.disk_bytes_to_write(&resolved.manifest.bytes, &import),
        };
        let keep_vm = self.import_name(&resolved.manifest.bytes, &import);
        self.make_room_off_thread(need, import.image.clone(), keep_vm)
            .await?;
        import.incoming = Some(Incoming {
            manifest: resolved.descriptor(),
            manifest_bytes: resolved.manifest.bytes.clone(),
            gate,
        });
        let mut import_task = tokio::task::spawn_blocking(move || engine.import(&import));
        let fetch = prepared
            .request
            .copy_resolved(resolved, options, progress, started);
        tokio::pin!(fetch);
        let task_failed = |e: tokio::task::JoinError| {
            RemoteError::Refused(format!("the import task failed: {e}"))
        };
        let (copied, outcome) = tokio::select! {
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
        };
        let mut summary = copied.summary;
        summary.seconds = started.elapsed().as_secs_f64();
        self.record_image_use(&prepared.location, &resolved.manifest.digest);
        Ok(Pulled {
            fetched: Fetched {
                manifest: resolved.descriptor(),
                image: prepared.image,
                summary,
                up_to_date: false,
            },
            import: outcome,
        })
    }
}

/// A fetch or pull once its source is read and its cache name decided.
struct PreparedFetch {
    request: CopyRequest,
    resolved: SourceImage,
    image: ImageReference,
    location: ImageLocation,
    lease: sarde_lifecycle::Lease,
    up_to_date: bool,
}

/// An image's repository in the cache transport: `host[:port]/path`.
fn cache_repository(image: &ImageReference) -> String {
    image.cache_path_components().join("/")
}

/// A repository name made of the last component of a path (`win11` of
/// `/mnt/usb/win11.tar`) or of a plugin's repository: lower case, characters
/// a repository can't have turned into `-`.
fn local_repository_name(location: &str, repository: &str) -> String {
    let base = if repository.is_empty() {
        let name = std::path::Path::new(location)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.strip_suffix(".tar")
            .map(str::to_string)
            .unwrap_or(name)
    } else {
        repository.to_string()
    };
    let mut out = String::new();
    for c in base.to_lowercase().chars() {
        let keep = c.is_ascii_alphanumeric()
            || c == '/'
            || ((c == '.' || c == '_' || c == '-') && !out.is_empty());
        let c = if keep { c } else { '-' };
        if (c == '-' || c == '/') && (out.ends_with('-') || out.ends_with('/') || out.is_empty()) {
            continue;
        }
        out.push(c);
    }
    let out = out.trim_end_matches(['-', '.', '_', '/']).to_string();
    if out.is_empty() {
        "image".to_string()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_are_made_of_the_last_path_component() {
        assert_eq!(local_repository_name("/mnt/usb/Win 11.tar", ""), "win-11");
        assert_eq!(
            local_repository_name("/srv/images/debian_12", ""),
            "debian_12"
        );
        assert_eq!(local_repository_name("relative", ""), "relative");
        assert_eq!(local_repository_name("/", ""), "image");
        assert_eq!(local_repository_name("/x/..tar", ""), "image");
        assert_eq!(local_repository_name("/x/-A--b-.tar", ""), "a-b");
        assert_eq!(local_repository_name("ignored", "team/Vm"), "team/vm");
        for made in ["win-11", "debian_12", "a-b", "team/vm", "image"] {
            let image: ImageReference = format!("localhost/{made}:1").parse().unwrap();
            assert_eq!(image.to_string(), format!("localhost/{made}:1"));
        }
    }
}
