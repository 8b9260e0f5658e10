//! # sarde-transport-registry
//!
//! The `docker` transport: OCI distribution registries (`docker://host[:port]/repo:tag`)
//! as a [`sarde_api::Transport`], built on oci-client for authentication, manifests,
//! mounts and tags, plus requests of its own where oci-client cannot stream an
//! upload, report a blob's size, or download a blob without hashing it a second time.

pub mod credentials;
mod error;
mod transport;

pub use error::{Object, map_oci_error, map_status};
pub use transport::{RegistryFactory, RegistryTransport, SCHEME, register};
