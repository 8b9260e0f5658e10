//! # sarde-api
//!
//! The extension points of sardinecake and the types they share:
//!
//! - [`codec::Codec`] — compression formats (`compressors/`),
//! - [`transport::Transport`] — places that store OCI images (`transports/`),
//! - [`hypervisor::Hypervisor`] — where VMs run (`backends/`),
//! - [`registry::Registry`] — the factories, by name or URL scheme, built in or loaded
//!   from plugins ([`plugin`]),
//! - shared types: [`reference::ImageReference`], [`digest::Digest`], the OCI
//!   [`oci`] descriptors, manifests, index, config and media types.

pub mod age;
pub mod codec;
pub mod default_uri;
pub mod digest;
pub mod hypervisor;
pub mod limits;
pub mod oci;
pub mod plugin;
pub mod reference;
pub mod registry;
pub mod size;
pub mod transport;
pub mod writeback;

pub use codec::{Codec, CodecError, EncodeOptions, Encoder};
pub use digest::Digest;
pub use hypervisor::{Hypervisor, HypervisorError, HypervisorFactory};
pub use reference::{ImageReference, ReferenceError};
pub use registry::{Origin, Registrar, Registry, RegistryError};
pub use transport::{Transport, TransportError, TransportFactory};
