//! # sarde-engine
//!
//! The operations users run, built from the extension points: `export` (libvirt →
//! local OCI layout), `import` (layout → libvirt), `list` and `getconfig`. Formats
//! come from `sarde-format`, domain XML handling from `sarde-domain`, disk bytes from
//! `sarde-disk`, the local cache from the `oci-dir` transport, codecs and the
//! hypervisor from the registry. The binaries only parse flags and print results.

mod blobs;
pub mod clone;
pub mod export;
mod export_record;
mod gzip_header;
pub mod import;
pub mod lifecycle;
pub mod list;
mod marker;
pub mod remote;
pub mod trust;
mod update;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sarde_api::{ImageReference, Registry};
use sarde_transport_oci_dir::{Layout, OciDir};
use thiserror::Error;

pub use marker::{MARKER_NAME, Marker};

/// Everything an operation needs from configuration.
#[derive(Clone)]
pub struct Engine {
    pub registry: Arc<Registry>,
    /// libvirt connection URI.
    pub connect: String,
    /// The local image cache.
    pub ocidir: OciDir,
    /// Where imported VMs' directories go.
    pub vmdir: PathBuf,
    /// Worker threads for compression, hashing and decompression; 0: as many
    /// as cores (twice that where workers also wait for the disk).
    pub threads: usize,
    /// Registries: TLS settings and transfer behaviour.
    pub remote: remote::Remote,
    /// Space budget and automatic reclaim.
    pub lifecycle: lifecycle::LifecycleSettings,
}

/// What can go wrong, by the part that failed; every message names the object.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Layout(#[from] sarde_transport_oci_dir::LayoutError),
    // The cause follows in the error chain (`{:#}` prints "image format: …").
    #[error("image format")]
    Format(#[from] sarde_format::FormatError),
    #[error("domain XML")]
    Domain(#[from] sarde_domain::DomainError),
    #[error(transparent)]
    UnsafeXml(#[from] sarde_domain::UnsafeXml),
    #[error(transparent)]
    Disk(#[from] sarde_disk::DiskError),
    #[error(transparent)]
    Hypervisor(#[from] sarde_api::HypervisorError),
    #[error(transparent)]
    Registry(#[from] sarde_api::RegistryError),
    #[error(transparent)]
    Codec(#[from] sarde_api::CodecError),
    #[error("{path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The request cannot be carried out as asked; the message says what to do.
    #[error("{0}")]
    Refused(String),
}

impl EngineError {
    pub(crate) fn io(
        path: &Path,
        context: impl Into<String>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        let context = context.into();
        move |source| EngineError::Io {
            path,
            context,
            source,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Where an image lives locally: an OCI layout directory and a tag or digest in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLocation {
    pub layout: PathBuf,
    /// Tag or `sha256:` digest within the layout.
    pub reference: String,
    /// How to name the image in messages and records.
    pub name: String,
}

impl ImageLocation {
    /// An image of the cache by tag or digest, where the cache holds it (see
    /// [`OciDir::locate`]: also a layout the Python tool wrote), else where it
    /// is written.
    pub fn cached(ocidir: &OciDir, image: &ImageReference) -> ImageLocation {
        let (layout, reference) = ocidir.locate(image);
        ImageLocation {
            layout,
            reference,
            name: image.to_string(),
        }
    }

    /// Where a fetch or pull writes `image` into the cache: always its own
    /// layout (a copy found elsewhere, see [`ImageLocation::cached`], lends its
    /// blobs by link; the Python tool's `host:port` layouts are never written).
    pub fn to_write(ocidir: &OciDir, image: &ImageReference) -> ImageLocation {
        ImageLocation {
            layout: ocidir.layout_for(image),
            reference: image.reference_for_registry(),
            name: image.to_string(),
        }
    }

    /// The repository the cache transport (`oci-dir`) names this layout by:
    /// its path below the cache root.
    pub fn cache_repository(&self, ocidir: &OciDir) -> Option<String> {
        let relative = self.layout.strip_prefix(ocidir.root()).ok()?;
        let parts: Vec<&str> = relative.iter().filter_map(|c| c.to_str()).collect();
        (!parts.is_empty()).then(|| parts.join("/"))
    }

    /// The image a pull imports before the pull has named it (an image of
    /// another transport, named once its digest is read): [`Engine::pull`]
    /// sets it.
    pub fn pending(ocidir: &OciDir) -> ImageLocation {
        ImageLocation {
            layout: ocidir.root().to_path_buf(),
            reference: String::new(),
            name: String::new(),
        }
    }

    /// `--raw`: `DIR[:TAG]` names a layout directory directly (tag `latest` when
    /// omitted), as the Python tool's `--raw` did.
    pub fn raw(spec: &str) -> ImageLocation {
        let (dir, reference) = match spec.rsplit_once(':') {
            Some((dir, tag)) if !dir.is_empty() && !tag.contains('/') && !tag.is_empty() => {
                // `dir@sha256:…` names a digest.
                match dir.rsplit_once('@') {
                    Some((d, algo)) => (d, format!("{algo}:{tag}")),
                    None => (dir, tag.to_string()),
                }
            }
            _ => (spec, "latest".to_string()),
        };
        ImageLocation {
            layout: PathBuf::from(dir),
            reference,
            name: spec.to_string(),
        }
    }

    /// The tag, when the location names one (export needs it).
    pub fn tag(&self) -> Option<&str> {
        (!self.reference.contains(':')).then_some(self.reference.as_str())
    }
}

impl Engine {
    /// The layout of an image, which must exist.
    pub fn layout(&self, image: &ImageLocation) -> Result<Layout> {
        Ok(Layout::open(&image.layout)?)
    }

    pub(crate) fn effective_threads(&self) -> usize {
        match self.threads {
            0 => cores(),
            n => n,
        }
    }

    /// Workers that each wait for the disk between computations (export's reads,
    /// import's direct writes): twice the cores unless set, so one computes
    /// while another waits (measured: a 1.5 GB export in 2.6 s instead of 4.4 s
    /// on 2 cores).
    pub(crate) fn disk_bound_threads(&self) -> usize {
        match self.threads {
            0 => 2 * cores(),
            n => n,
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Reads until `buf` is full or the input ends; returns how much was read.
pub(crate) fn read_full(input: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
