//! # sarde-transport-registry
//!
//! The `docker` transport: OCI distribution registries (`docker://host[:port]/repo:tag`)
//! as a [`sarde_api::Transport`], speaking the distribution API over reqwest:
//! `http` bounds what every request may cost (memory, time, redirects), `auth`
//! does Basic and token authentication with scopes per operation, `blob` streams
//! blobs both ways, `transport` maps the API onto the trait, `registries_conf`
//! reads containers-registries.conf(5) and `configured` applies it (mirrors,
//! rewrites, blocked and insecure registries).

mod auth;
mod blob;
mod configured;
pub mod credentials;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod registries_conf;
mod transport;

pub use error::{Object, map_status};
pub use transport::{RegistryFactory, RegistryTransport, SCHEME, register};
