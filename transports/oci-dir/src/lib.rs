//! # sarde-transport-oci-dir
//!
//! The local image cache: one OCI image layout per repository under a root
//! directory, `<root>/<host[:port]>/<repository path>/`, as the Python tool and
//! skopeo (`oci:<path>:<tag>`) lay them out.
//!
//! - [`Layout`] — one layout: verified blob reads, atomic blob writes (also
//!   streaming, [`BlobWriter`]), tags in `index.json` updated under a lock and
//!   replaced rather than duplicated;
//! - [`OciDir`] — the cache root: where an image's layout lives, which exist;
//! - [`OciDirTransport`] / [`OciDirFactory`] — the same as a
//!   [`sarde_api::Transport`] under the scheme `oci-dir`.

mod cache;
mod error;
mod layout;
mod partial;
mod transport;

pub use cache::{OciDir, RepositoryEntry};
pub use error::LayoutError;
pub use layout::{BlobWriter, Layout, MAX_IN_MEMORY_BLOB};
pub use transport::{OciDirFactory, OciDirTransport, SCHEME, register};
