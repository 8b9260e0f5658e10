//! Bounds on what reading an image may cost: bytes held in memory and time spent
//! waiting. Registries, mirrors, proxies, archives and directories are untrusted;
//! a broken or hostile one must cost a clear error within these bounds, never an
//! out-of-memory kill or a hang. Every transport and the copy engine honour them.

use std::time::Duration;

/// A manifest or index read into memory (containers/image uses the same 4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// A config or another metadata blob read into memory (access JSON, domain XML).
pub const MAX_CONFIG_SIZE: u64 = 4 << 20;
/// An OCI layout's `index.json` (a directory's or an archive's): many tags, but
/// not without end.
pub const MAX_INDEX_SIZE: u64 = 16 << 20;
/// A token server's answer.
pub const MAX_TOKEN_RESPONSE_SIZE: u64 = 1 << 20;
/// The part of an error answer read for its message; the rest is dropped.
pub const MAX_ERROR_BODY_SIZE: u64 = 64 << 10;
/// One page of a tag list.
pub const MAX_TAG_PAGE_SIZE: u64 = 4 << 20;
/// Pages of one tag list; a `Link` chain longer than this is refused.
pub const MAX_TAG_PAGES: usize = 1000;
/// Tags of one repository.
pub const MAX_TAGS: usize = 100_000;
/// Redirects followed for one request (Go's HTTP client and docker stop at 10).
pub const MAX_REDIRECTS: usize = 10;

/// How long a transport waits. Set from the `connect-timeout`, `idle-timeout`,
/// `request-timeout` and `min-rate` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBounds {
    /// Establishing a connection (TCP and TLS).
    pub connect: Duration,
    /// No byte for this long fails the request as transient; it is retried,
    /// and a blob download resumes from its partial file.
    pub idle: Duration,
    /// The whole of a small request (manifest, token, tag page, existence check).
    pub request: Duration,
    /// Bytes per second a blob download must average over each `idle` window,
    /// so a drip that never goes idle ends too. 0 turns the check off.
    pub min_rate: u64,
}

impl Default for TimeBounds {
    /// Generous for a 60 GB pull over a slow WAN: only idleness and a crawl
    /// below 10 KiB/s end a download, never its total time.
    fn default() -> Self {
        TimeBounds {
            connect: Duration::from_secs(30),
            idle: Duration::from_secs(60),
            request: Duration::from_secs(120),
            min_rate: 10 << 10,
        }
    }
}
