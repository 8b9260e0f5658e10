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

mod blob_file;
mod cache;
mod direct;
mod error;
mod layout;
mod partial;
mod transport;

pub use cache::{OciDir, RepositoryEntry};

/// Index entries with this annotation keep only their metadata blobs: their disk
/// pieces were dropped on purpose (an image pulled with `keep-blobs = false`, whose
/// VM holds the data), so missing pieces do not make them broken.
pub const ANNOTATION_BLOBS: &str = "org.sardinecake.blobs";
/// The value of [`ANNOTATION_BLOBS`] for such images.
pub const BLOBS_METADATA_ONLY: &str = "metadata-only";
pub use direct::DirectReader;
pub use error::LayoutError;
pub use layout::{BlobWriter, Layout, MAX_IN_MEMORY_BLOB, OCI_LAYOUT_FILE, OCI_LAYOUT_MARKER};
pub use transport::{OciDirFactory, OciDirTransport, SCHEME, register};
