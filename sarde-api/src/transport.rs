//! The `Transport` extension point: a place that stores OCI images — a registry
//! (`docker://`), a local OCI image layout (`oci-dir:`) or whatever a plugin adds.
//!
//! The shape follows containers/image: a factory per URL scheme opens a transport
//! for one location (a registry host, a layout root); the transport reads and writes
//! manifests and blobs of repositories there. One copy engine moves images between
//! any two transports, so push and fetch are the same code with the ends swapped.
//! Blobs always stream; a transport never holds a whole blob in memory.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;
use tokio::io::AsyncRead;

use crate::digest::Digest;
use crate::limits::TimeBounds;
use crate::oci::Descriptor;

/// A blob's bytes as they arrive.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// What went wrong talking to a transport. Variants are the cases a user acts on
/// differently; each names the registry or path and the object.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error(
        "{location}: authentication required or refused for {object}: check the credentials (`sarde login {location}`; SARDE_REGISTRY_USERNAME/PASSWORD, when set, win over stored ones)"
    )]
    Unauthorized { location: String, object: String },
    #[error("{location}: access to {object} is forbidden for these credentials")]
    Forbidden { location: String, object: String },
    #[error("{location}: manifest {reference} not found in {repository}")]
    ManifestUnknown {
        location: String,
        repository: String,
        reference: String,
    },
    #[error("{location}: blob {digest} not found in {repository}")]
    BlobUnknown {
        location: String,
        repository: String,
        digest: Digest,
    },
    #[error("{location}: the registry refuses media type {media_type}")]
    UnsupportedMediaType {
        location: String,
        media_type: String,
    },
    #[error(
        "{location}: TLS failure: {message} (for a private CA see `ca-file`; for plain HTTP `--insecure`)"
    )]
    Tls { location: String, message: String },
    #[error("{location}: {object}: expected {expected}, got {actual} ({what})")]
    Mismatch {
        location: String,
        object: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{location}: {message}")]
    Protocol { location: String, message: String },
    /// A reference this transport can't read; `expected` shows its syntax.
    #[error("{reference:?} is not a {scheme} reference: {message} (expected {expected})")]
    BadReference {
        scheme: String,
        reference: String,
        message: String,
        expected: String,
    },
    /// A failure that may go away when retried (connection reset, 5xx, 429).
    #[error("{location}: {message}")]
    Transient {
        location: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{location}: {context}: {source}")]
    Io {
        location: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl TransportError {
    /// Whether retrying the same request can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, TransportError::Transient { .. })
    }
}

/// Settings a transport factory may honour when it opens a location.
#[derive(Debug, Clone, Default)]
pub struct TransportOptions {
    /// Allow plain HTTP and unverified TLS for this location.
    pub insecure: bool,
    /// Extra CA certificate (PEM) to trust.
    pub ca_file: Option<std::path::PathBuf>,
    /// Explicit credentials; otherwise the transport looks them up itself.
    pub credentials: Option<Credentials>,
    /// Blob transfers at a time.
    pub concurrency: usize,
    /// How long requests may wait; see [`TimeBounds`].
    pub bounds: TimeBounds,
}

/// What an operation will do in a repository, declared before its first
/// request (see [`Transport::will_access`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    Pull,
    /// Pull and push.
    Push,
}

/// A user name and secret for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never print the password, not even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A manifest as stored: its exact bytes (digests are over these), media type and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawManifest {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Vec<u8>,
}

/// One storage location opened by a factory.
#[async_trait]
pub trait Transport: Send + Sync {
    /// The location in the transport's own syntax (`registry.example.org:5000`, a path).
    fn location(&self) -> String;

    /// Reads a manifest by tag or digest.
    async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<RawManifest, TransportError>;

    /// Stores a manifest under a tag or its digest. Blobs it names must exist first.
    async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError>;

    /// Lists the tags of a repository.
    async fn list_tags(&self, repository: &str) -> Result<Vec<String>, TransportError>;

    /// Whether the repository holds the blob (size checked where the transport knows it).
    async fn blob_exists(
        &self,
        repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError>;

    /// Streams a blob from byte `offset` on (0 for all of it), for resuming.
    async fn get_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, TransportError>;

    /// Stores a blob whose digest and size are known in advance; the transport
    /// verifies both and fails rather than store anything else.
    async fn put_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        data: BlobReader,
    ) -> Result<(), TransportError>;

    /// Asks the location whether its credentials are accepted (for `sarde login`).
    /// `Ok(())` also when the location needs none.
    async fn check_credentials(&self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Announces that the current operation will access `repository` so: a
    /// registry asks for one token covering every repository an operation needs
    /// (a push's target and the sources it mounts from) instead of one per
    /// request. Optional; requests work without it.
    fn will_access(&self, _repository: &str, _access: Access) {}

    /// Makes a blob of another repository at the same location available in
    /// `repository` without copying bytes. `Ok(false)` when the transport can't,
    /// and the caller uploads instead.
    async fn mount_blob(
        &self,
        _repository: &str,
        _from_repository: &str,
        _blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        Ok(false)
    }
}

/// Where an image is, in one transport's own terms: what a factory made of the
/// part of a reference after its scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportReference {
    /// What the factory opens: `host[:port]`, a directory, a file.
    pub location: String,
    /// The repository at that location (empty where it holds one set of images).
    pub repository: String,
    /// What to read: a tag or a digest.
    pub reference: String,
    /// The tag a write sets; `None` writes by digest only.
    pub tag: Option<String>,
}

impl From<&crate::ImageReference> for TransportReference {
    /// A registry reference: `host[:port]`, repository, tag or digest (`latest`
    /// when it names neither).
    fn from(image: &crate::ImageReference) -> Self {
        TransportReference {
            location: image.registry_location(),
            repository: image.repository().to_string(),
            reference: image.reference_for_registry(),
            tag: image.tag_or_default().map(str::to_string),
        }
    }
}

/// `PATH[:TAG]`, the syntax of skopeo's `oci:` and `oci-archive:` (the path
/// ends at the first `:`, the tag defaults to `latest`), for transports that
/// keep one set of images at a path: location PATH, no repository.
pub fn path_and_tag(
    scheme: &str,
    rest: &str,
    syntax: &str,
) -> Result<TransportReference, TransportError> {
    let bad = |message: &str| TransportError::BadReference {
        scheme: scheme.to_string(),
        reference: rest.to_string(),
        message: message.to_string(),
        expected: syntax.to_string(),
    };
    let (path, tag) = rest.split_once(':').unwrap_or((rest, ""));
    require_path(scheme, path, syntax)?;
    if path.ends_with("@sha256") || path.ends_with("@sha512") {
        return Err(bad("a digest can't name an image here: use a tag"));
    }
    let tag = if tag.is_empty() {
        crate::reference::DEFAULT_TAG
    } else {
        tag
    };
    if !crate::reference::is_tag(tag) {
        return Err(bad("the tag has characters a tag can't have"));
    }
    Ok(TransportReference {
        location: path.to_string(),
        repository: String::new(),
        reference: tag.to_string(),
        tag: Some(tag.to_string()),
    })
}

/// Refuses an empty path, where a transport opens a path (`oci`, `oci-archive`).
pub fn require_path(scheme: &str, path: &str, syntax: &str) -> Result<(), TransportError> {
    if path.is_empty() {
        return Err(TransportError::BadReference {
            scheme: scheme.to_string(),
            reference: path.to_string(),
            message: "no path".to_string(),
            expected: syntax.to_string(),
        });
    }
    Ok(())
}

/// Splits `scheme:rest` off a reference when `scheme` is one `is_scheme` knows;
/// `None` for a reference in the default transport. A registry reference has a
/// colon too: `docker:5000/x` is the host `docker`, port 5000 (a port follows
/// the colon), never the `docker` transport. `rest` is left as written (`//…`
/// included): each transport reads its own syntax.
pub fn split_scheme(text: &str, is_scheme: impl Fn(&str) -> bool) -> Option<(&str, &str)> {
    let (scheme, rest) = text.split_once(':')?;
    let port = rest.split('/').next().unwrap_or("");
    let looks_like_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    if !is_scheme(scheme) || looks_like_port {
        return None;
    }
    Some((scheme, rest))
}

/// Opens transports for one URL scheme.
pub trait TransportFactory: Send + Sync {
    /// The scheme that selects this factory (`docker`, `oci`).
    fn scheme(&self) -> &str;

    /// One line for `sarde plugins`, including the reference syntax.
    fn description(&self) -> &str;

    /// Reads the part of a reference after `scheme:` (or `scheme://`) in this
    /// transport's own grammar.
    fn parse_reference(&self, rest: &str) -> Result<TransportReference, TransportError>;

    /// Opens `location` (the part after `scheme://` or `scheme:`).
    fn open(
        &self,
        location: &str,
        options: &TransportOptions,
    ) -> Result<Box<dyn Transport>, TransportError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_split_only_when_known() {
        let known = |s: &str| matches!(s, "docker" | "oci" | "oci-archive");
        assert_eq!(
            split_scheme("oci:/srv/x:1", known),
            Some(("oci", "/srv/x:1"))
        );
        assert_eq!(
            split_scheme("docker://host:5000/a:1", known),
            Some(("docker", "//host:5000/a:1"))
        );
        // A host named like a transport, with a port: a registry reference.
        assert_eq!(split_scheme("docker:5000/vm:1", known), None);
        assert_eq!(split_scheme("oci:5000", known), None);
        assert_eq!(
            split_scheme("oci-archive:/mnt/usb/w.tar", known),
            Some(("oci-archive", "/mnt/usb/w.tar"))
        );
        assert_eq!(split_scheme("host:5000/a:1", known), None);
        assert_eq!(split_scheme("debian:12", known), None);
        assert_eq!(split_scheme("debian", known), None);
    }
}
