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
        "{location}: TLS failure: {message} (for a private CA put its certificate in <certs-dir>/{location}/ca.crt, e.g. /etc/containers/certs.d/{location}/ca.crt; for plain HTTP or to skip verification, --insecure or the `insecure` key)"
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
    /// The `containers-registries.conf(5)` files that apply, in the order they
    /// are merged (the main file, then `registries.conf.d/` in name order), for
    /// a registry transport to resolve `prefix`, `location`, `blocked`,
    /// `insecure` and mirrors per repository; other transports ignore them.
    /// Empty: the files podman and skopeo read in this process's environment
    /// (`CONTAINERS_REGISTRIES_CONF`, or the user's or system file and the
    /// `registries.conf.d/` drop-ins).
    pub registries_conf: Vec<std::path::PathBuf>,
    /// Directories of per-registry CA certificates (`<dir>/<host[:port]>/*.crt`),
    /// for a transport that reaches hosts besides `location` (mirrors, a
    /// rewritten location): see [`ca_file_in`].
    pub certs_dirs: Vec<std::path::PathBuf>,
    /// Registries (`host[:port]`, or a host for all its ports) configured as
    /// insecure, for the same hosts.
    pub insecure_locations: Vec<String>,
}

/// The CA certificate for `location` (`host[:port]`) in `dirs`, as podman and
/// docker look for it: `<dir>/<location>/ca.crt`, else the first `*.crt`
/// there (in name order), in the first directory that has one.
pub fn ca_file_in(dirs: &[std::path::PathBuf], location: &str) -> Option<std::path::PathBuf> {
    for dir in dirs {
        let dir = dir.join(location);
        let preferred = dir.join("ca.crt");
        if preferred.is_file() {
            return Some(preferred);
        }
        let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
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

/// The host of `host[:port]` (`[::1]` keeps its brackets).
pub fn location_host(location: &str) -> &str {
    if location.starts_with('[') {
        return location.find(']').map_or(location, |end| &location[..=end]);
    }
    location.split(':').next().unwrap_or(location)
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

/// How a destination takes a blob: it has it already (or linked it from
/// another repository it holds), or it opened a [`BlobSink`] for it.
pub enum BlobWrite<'a> {
    /// The blob is there, complete; `linked` when it was made available from
    /// another repository of the same location just now, without copying bytes.
    Present {
        linked: bool,
    },
    Write(Box<dyn BlobSink + 'a>),
}

/// One blob being written. A destination that keeps what an interrupted write
/// stored resumes: [`BlobSink::offset`] says from which byte the data must come.
/// The sink verifies the whole blob (the bytes it kept and the new ones) by size
/// and digest before it is committed, and holds whatever lock makes concurrent
/// writers of the same blob wait, until it is dropped.
#[async_trait]
pub trait BlobSink: Send {
    /// The first byte the sink still needs (0 when nothing was kept).
    fn offset(&self) -> u64;

    /// Whether the sink checks the whole blob's digest itself before it
    /// commits it (and fails with [`TransportError::Mismatch`] of `what`
    /// "digest" otherwise), so the copy engine need not hash the stream a
    /// second time. The default says no: the engine hashes what it sends.
    fn verifies_digest(&self) -> bool {
        false
    }

    /// Stores the blob from [`BlobSink::offset`] on; `Ok` only once it is
    /// complete and verified, and the sink is done. After a failure the caller
    /// may write again, from the new [`BlobSink::offset`] (what the failed write
    /// kept; 0 for a sink that keeps nothing) — unless reading `data` failed
    /// with [`std::io::ErrorKind::InvalidData`]: the data is wrong (the copy
    /// engine found another size or digest than the descriptor's), and nothing
    /// of it may be kept.
    async fn write(&mut self, data: BlobReader) -> Result<(), TransportError>;
}

/// The sink of a transport that does not resume: [`Transport::put_blob`] from 0.
struct WholeBlob<'a, T: Transport + ?Sized> {
    transport: &'a T,
    repository: String,
    blob: Descriptor,
}

#[async_trait]
impl<T: Transport + ?Sized> BlobSink for WholeBlob<'_, T> {
    fn offset(&self) -> u64 {
        0
    }

    async fn write(&mut self, data: BlobReader) -> Result<(), TransportError> {
        self.transport
            .put_blob(&self.repository, &self.blob, data)
            .await
    }
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

    /// Begins storing a blob: [`BlobWrite::Present`] when the location has it,
    /// else a sink to write it into. The default asks [`Transport::blob_exists`]
    /// and writes with [`Transport::put_blob`] from byte 0; a transport that can
    /// resume an interrupted write, share a blob between its repositories or
    /// must serialise writers of one blob overrides it.
    async fn start_blob_write<'a>(
        &'a self,
        repository: &str,
        blob: &Descriptor,
    ) -> Result<BlobWrite<'a>, TransportError> {
        if self.blob_exists(repository, blob).await? {
            return Ok(BlobWrite::Present { linked: false });
        }
        Ok(BlobWrite::Write(Box::new(WholeBlob {
            transport: self,
            repository: repository.to_string(),
            blob: blob.clone(),
        })))
    }

    /// The image just written under `reference` (its tag, or its digest when
    /// untagged) is complete: the copy engine calls this after the image's last
    /// manifest. A transport that writes in one piece (an archive: a temporary
    /// file renamed into place) commits now; others need not do anything.
    async fn finish_image(
        &self,
        _repository: &str,
        _reference: &str,
    ) -> Result<(), TransportError> {
        Ok(())
    }

    /// Stores a manifest an index names (written before the index): like
    /// [`Transport::put_manifest`] by digest, which the default calls. A
    /// transport whose untagged manifests are images of their own (a layout's
    /// `index.json`) stores it without listing it.
    async fn put_child_manifest(
        &self,
        repository: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        self.put_manifest(repository, &manifest.digest.to_string(), manifest)
            .await
    }

    /// Whether the repository holds this manifest and everything it names, so a
    /// copy only has to write the tag. The default trusts the manifest's presence
    /// (a registry refuses a manifest whose blobs it lacks); a transport whose
    /// blobs can go missing behind its back (a directory) checks them.
    async fn holds_image(
        &self,
        repository: &str,
        manifest: &RawManifest,
        _blobs: &[Descriptor],
    ) -> Result<bool, TransportError> {
        match self
            .get_manifest(repository, &manifest.digest.to_string())
            .await
        {
            Ok(m) => Ok(m.digest == manifest.digest),
            Err(TransportError::ManifestUnknown { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The manifests that name `subject` as theirs (signatures, attestations,
    /// SBOMs), as the OCI referrers API lists them, filtered by `artifact_type`
    /// when given. `Ok(None)` when the location has no such list; callers then
    /// look for the tag schema (`sha256-<hex>.sig`, as cosign writes it), which
    /// every transport serves through [`Transport::get_manifest`]. A referrer is
    /// written as any manifest, with its `subject` field set.
    async fn list_referrers(
        &self,
        _repository: &str,
        _subject: &Digest,
        _artifact_type: Option<&str>,
    ) -> Result<Option<Vec<Descriptor>>, TransportError> {
        Ok(None)
    }

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportReference {
    /// What the factory opens: `host[:port]`, a directory, a file.
    pub location: String,
    /// The repository at that location (empty where it holds one set of images).
    pub repository: String,
    /// What to read: a tag or a digest.
    pub reference: String,
    /// The tag a write sets; `None` writes by digest only.
    pub tag: Option<String>,
    /// The registry reference (`host/repository[:tag]`) a signature of this
    /// image must claim (`critical.identity.docker-reference`), when the
    /// transport has one; `None` for places with no registry name (a layout
    /// directory, an archive), whose policy needs `signedIdentity`.
    pub identity: Option<String>,
    /// The scopes of `containers-policy.json(5)` that apply, most specific first
    /// (for a registry: `host/repo:tag`, `host/repo`, its parent namespaces,
    /// `host`; for a path: the path and its parent directories). The transport's
    /// default (`""` scope) is not listed.
    pub policy_scopes: Vec<String>,
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
            identity: Some(image.to_string()),
            policy_scopes: registry_scopes(image),
        }
    }
}

/// The policy scopes of a registry image as containers/image lists them: the
/// full reference, the repository, each parent namespace, the host, then
/// `*.domain` wildcards from the most specific.
pub fn registry_scopes(image: &crate::ImageReference) -> Vec<String> {
    // A name without tag or digest is `:latest`, as containers/image reads it.
    let full = match (image.tag(), image.digest()) {
        (None, None) => image
            .with_tag(crate::reference::DEFAULT_TAG)
            .map_or_else(|_| image.to_string(), |i| i.to_string()),
        _ => image.to_string(),
    };
    let mut scopes = vec![full];
    let mut name = image.name();
    scopes.push(name.clone());
    while let Some((parent, _)) = name.rsplit_once('/') {
        scopes.push(parent.to_string());
        name = parent.to_string();
    }
    let host = image.registry();
    let mut labels: &str = host;
    // `*.example.org` for `registry.example.org`; never for an IP address.
    if host.parse::<std::net::IpAddr>().is_err() && !host.starts_with('[') {
        while let Some((_, rest)) = labels.split_once('.') {
            scopes.push(format!("*.{rest}"));
            labels = rest;
        }
    }
    scopes
}

/// The policy scopes of an image at a path (`oci:`, `oci-archive:`): the
/// absolute path with `:tag`, then the path, then each parent directory, as
/// containers/image lists them.
pub fn path_scopes(path: &str, tag: Option<&str>) -> Vec<String> {
    let absolute = std::path::absolute(path)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| path.to_string());
    let mut scopes = Vec::new();
    if let Some(tag) = tag {
        scopes.push(format!("{absolute}:{tag}"));
    }
    let mut current = std::path::PathBuf::from(&absolute);
    scopes.push(absolute.clone());
    while let Some(parent) = current.parent() {
        if parent.as_os_str().is_empty() {
            break;
        }
        scopes.push(parent.to_string_lossy().into_owned());
        current = parent.to_path_buf();
    }
    scopes
}

/// `PATH[:TAG]`, the syntax of skopeo's `oci:` and `oci-archive:` (the path
/// ends at the first `:`), for transports that keep one set of images at a
/// path: location PATH, no repository. Without a tag, as in skopeo, a read
/// takes the one image the path holds (`reference` is empty) and a write adds
/// the image untagged (`tag` is `None`).
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
    if !tag.is_empty() && !crate::reference::is_tag(tag) {
        return Err(bad("the tag has characters a tag can't have"));
    }
    let tag = (!tag.is_empty()).then(|| tag.to_string());
    Ok(TransportReference {
        location: path.to_string(),
        repository: String::new(),
        reference: tag.clone().unwrap_or_default(),
        policy_scopes: path_scopes(path, tag.as_deref()),
        tag,
        identity: None,
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

    /// What the transport reads from outside sarde's own configuration, as
    /// lines for `sarde config` (the registry transport: the registries.conf
    /// files and the tables they resolve to). Empty by default.
    fn configuration(&self, _options: &TransportOptions) -> Result<Vec<String>, TransportError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_images_carry_their_identity_and_policy_scopes() {
        let image: crate::ImageReference =
            "registry.example.org:5000/team/vm/win:11".parse().unwrap();
        let r = TransportReference::from(&image);
        assert_eq!(
            r.identity.as_deref(),
            Some("registry.example.org:5000/team/vm/win:11")
        );
        assert_eq!(
            r.policy_scopes,
            [
                "registry.example.org:5000/team/vm/win:11",
                "registry.example.org:5000/team/vm/win",
                "registry.example.org:5000/team/vm",
                "registry.example.org:5000/team",
                "registry.example.org:5000",
                "*.example.org",
                "*.org",
            ]
        );
        let ip: crate::ImageReference = "127.0.0.1:5000/x:1".parse().unwrap();
        assert_eq!(
            registry_scopes(&ip),
            ["127.0.0.1:5000/x:1", "127.0.0.1:5000/x", "127.0.0.1:5000"]
        );
    }

    #[test]
    fn paths_have_no_identity_and_their_directories_as_scopes() {
        let r = path_and_tag("oci", "/srv/images/win:11", "oci:PATH[:TAG]").unwrap();
        assert_eq!(r.identity, None);
        assert_eq!(
            r.policy_scopes,
            [
                "/srv/images/win:11",
                "/srv/images/win",
                "/srv/images",
                "/srv",
                "/"
            ]
        );
        let untagged = path_and_tag("oci", "/srv/w.tar", "oci:PATH[:TAG]").unwrap();
        assert_eq!((untagged.reference.as_str(), untagged.tag), ("", None));
        assert_eq!(untagged.policy_scopes, ["/srv/w.tar", "/srv", "/"]);
    }

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
