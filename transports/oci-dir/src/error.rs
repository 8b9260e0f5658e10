//! What can go wrong with a local OCI image layout. Every message names the path
//! (and the digest or tag) and says what to do, because the user only sees the text.

use std::io;
use std::path::PathBuf;

use sarde_api::Digest;
use thiserror::Error;

/// Failures of [`crate::Layout`] and [`crate::OciDir`].
#[derive(Debug, Error)]
pub enum LayoutError {
    #[error(
        "no OCI image layout at {}: {}/oci-layout is missing; export or fetch the image first",
        path.display(), path.display()
    )]
    NotFound { path: PathBuf },

    #[error(
        "{}/oci-layout has imageLayoutVersion {version:?}, sarde reads 1.x layouts: the layout was written by an incompatible tool; delete it and fetch again",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, version: String },

    #[error("tag {tag:?} not found in {}: {}", path.display(), describe_tags(available))]
    TagNotFound {
        path: PathBuf,
        tag: String,
        available: Vec<String>,
    },

    #[error(
        "manifest {digest} is neither listed in {}/index.json nor stored as a blob: fetch the image by this digest first",
        path.display()
    )]
    ManifestNotFound { path: PathBuf, digest: Digest },

    #[error(
        "{} holds {count} images and the reference names none: add :TAG ({})",
        path.display(), describe_tags(available)
    )]
    NoSingleImage {
        path: PathBuf,
        count: usize,
        available: Vec<String>,
    },

    #[error("{reference:?} is not a valid digest (looking it up in {}): {reason}", path.display())]
    InvalidReference {
        path: PathBuf,
        reference: String,
        reason: String,
    },

    #[error(
        "invalid tag {tag:?} for {}: a tag is 1 to 128 of A-Z a-z 0-9 _ . - and does not start with . or -",
        path.display()
    )]
    InvalidTag { path: PathBuf, tag: String },

    #[error(
        "blob {digest} is missing from {}: the cache is incomplete; fetch the image again",
        dir.display()
    )]
    BlobMissing { dir: PathBuf, digest: Digest },

    #[error(
        "blob {digest} in {} has {actual} bytes, the manifest says {expected}: the cache is damaged; delete it and fetch again",
        dir.display()
    )]
    BlobSize {
        dir: PathBuf,
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    #[error(
        "blob {digest} in {} holds data whose digest is {actual}: the cache is damaged; delete it and fetch again",
        dir.display()
    )]
    BlobDigest {
        dir: PathBuf,
        digest: Digest,
        actual: Digest,
    },

    #[error(
        "blob {digest} in {} is {size} bytes, more than the {limit} bytes read into memory for a manifest, config or XML: the manifest points at the wrong blob; check its media types",
        dir.display()
    )]
    BlobTooLarge {
        dir: PathBuf,
        digest: Digest,
        size: u64,
        limit: u64,
    },

    #[error(
        "the data written to {} has digest {actual} and {actual_size} bytes, expected {expected} and {expected_size} bytes: nothing was stored; the source is damaged or the transfer was cut, try again",
        dir.display()
    )]
    VerifyFailed {
        dir: PathBuf,
        expected: Digest,
        expected_size: u64,
        actual: Digest,
        actual_size: u64,
    },

    #[error(
        "blob {digest} for {}: sarde writes and verifies sha256 blobs only; store the image with sha256 digests",
        dir.display()
    )]
    UnsupportedAlgorithm { dir: PathBuf, digest: Digest },

    #[error("{} is not valid: {source}: the cache is damaged; delete the layout and fetch again", path.display())]
    BadJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "unsafe path component {component:?} in {input:?} under {}: components must be non-empty and neither '.' nor '..'",
        root.display()
    )]
    UnsafePath {
        root: PathBuf,
        input: String,
        component: String,
    },

    #[error("{}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

fn describe_tags(available: &[String]) -> String {
    if available.is_empty() {
        "the layout has no tags; export or fetch the image with a tag first".to_string()
    } else {
        format!("available tags: {}", available.join(", "))
    }
}

/// Shorthand for [`LayoutError::Io`].
pub(crate) fn io_error(
    path: impl Into<PathBuf>,
    context: &'static str,
) -> impl FnOnce(io::Error) -> LayoutError {
    let path = path.into();
    move |source| LayoutError::Io {
        path,
        context,
        source,
    }
}
