//! Signed images: cosign-compatible signatures made at push and checked against
//! `containers-policy.json(5)` before any blob of an image is used.
//!
//! - [`cosign`]: the signature format (payload, signature manifest, tag).
//! - [`keys`]: cosign's key formats (through the `sigstore` crate).
//! - [`policy`]: the policy file and which of its rules apply.
//! - [`identity`]: `signedIdentity`, the name a signature must claim.
//! - [`signatures`]: finding, writing and carrying signatures through any transport.
//! - [`sign`] and [`verify`]: the two ends.

pub mod cosign;
pub mod identity;
pub mod keys;
pub mod policy;
pub mod sign;
pub mod signatures;
pub mod verify;

pub use keys::{PrivateKey, PublicKey};
pub use policy::Policy;
pub use verify::{Accepted, Subject};

use thiserror::Error;

/// What went wrong with a signature, a key or a policy.
#[derive(Debug, Error)]
pub enum TrustError {
    /// The policy refuses the image.
    #[error("{image} is refused by the policy: {rule}: {reason}")]
    Refused {
        image: String,
        rule: String,
        reason: String,
    },
    #[error("policy {path}: {message}")]
    Policy { path: String, message: String },
    #[error("key {path}: {message}")]
    Key { path: String, message: String },
    #[error("signature: {0}")]
    BadSignature(String),
    #[error("{0}")]
    Crypto(String),
    #[error(transparent)]
    Transport(#[from] sarde_api::TransportError),
}

/// The policy transport of registries, which the engine's own cache uses too
/// (it keeps registry images under their names, with their signatures).
pub const REGISTRY_POLICY_TRANSPORT: &str = "docker";

/// The name a transport's images have in `containers-policy.json(5)`: its
/// scheme (`docker`, `oci`, `oci-archive`). A directory a user names with
/// `oci-dir:` is judged by `oci-dir` rules, never by the registry's whose names
/// it uses: its bytes never came from that registry.
pub fn policy_transport(scheme: &str) -> &str {
    scheme
}
