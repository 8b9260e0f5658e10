//! Image references: `[HOST[:PORT]/]PATH[:TAG][@DIGEST]`, parsed and normalised the way
//! docker's `distribution/reference` does it.
//!
//! Grammar (after distribution/reference):
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [ domain "/" ] path
//! domain           := host [ ":" port ]
//! host             := domain-component [ "." domain-component ]* | "[" IPv6 "]"
//! domain-component := [A-Za-z0-9] | [A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]
//! port             := 1..=65535
//! path             := path-component [ "/" path-component ]*
//! path-component   := alnum [ separator alnum ]*
//! alnum            := [a-z0-9]+
//! separator        := "." | "_" | "__" | "-"+
//! tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest           := algorithm ":" hex          (see [`Digest`])
//! ```
//!
//! The first `/`-separated component is the registry host when it contains `.` or `:`,
//! is `localhost`, or is a bracketed IPv6 literal; otherwise the registry is
//! `docker.io`, and a one-component path there gets `library/` in front.
//! `index.docker.io` is normalised to `docker.io`. The whole name (host, port and path)
//! may be at most 255 characters long.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::digest::Digest;

/// The registry used when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The path prefix of official images on [`DEFAULT_REGISTRY`].
pub const OFFICIAL_PREFIX: &str = "library/";
/// The tag used when a reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// The longest tag allowed.
pub const MAX_TAG_LEN: usize = 128;
/// The longest name (`host[:port]/path`) allowed.
pub const MAX_NAME_LEN: usize = 255;

/// The legacy host name of Docker Hub, normalised to [`DEFAULT_REGISTRY`].
const LEGACY_DEFAULT_REGISTRY: &str = "index.docker.io";

const EXPECTED_FORM: &str =
    "expected [HOST[:PORT]/]PATH[:TAG][@DIGEST], e.g. docker.io/library/debian:12";

/// Why a string is not a valid image reference.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid image reference {input:?}: {kind}")]
pub struct ReferenceError {
    input: String,
    kind: ReferenceErrorKind,
}

impl ReferenceError {
    fn new(input: &str, kind: ReferenceErrorKind) -> Self {
        ReferenceError {
            input: input.to_string(),
            kind,
        }
    }

    /// The string that failed to parse.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// What exactly is wrong with it.
    pub fn kind(&self) -> &ReferenceErrorKind {
        &self.kind
    }
}

/// What exactly is wrong with a reference.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReferenceErrorKind {
    #[error("the reference is empty; {EXPECTED_FORM}")]
    Empty,
    #[error("the repository path is missing before the tag or digest; {EXPECTED_FORM}")]
    MissingPath,
    #[error(
        "it has an empty path component (a leading or trailing '/' or '//'); remove the extra '/'"
    )]
    EmptyComponent,
    #[error("repository names must be lower case: use '{suggestion}'")]
    UpperCase { suggestion: String },
    #[error(
        "path component {component:?} contains {character:?}; path components may hold only \
         a-z, 0-9 and the separators '.', '_', '__' and '-'"
    )]
    InvalidCharacter { component: String, character: char },
    #[error(
        "path component {component:?} {problem}; a separator ('.', '_', '__' or one or more '-') \
         must stand between letters or digits"
    )]
    InvalidSeparator {
        component: String,
        problem: SeparatorProblem,
    },
    #[error(
        "the repository name {name:?} is 64 hex digits, which would be mistaken for an image ID; \
         choose another name"
    )]
    HexName { name: String },
    #[error(
        "registry host {host:?} is invalid: {reason}; a host is DNS labels of letters, digits \
         and inner '-' joined by '.', or an IPv6 address in brackets such as [::1]"
    )]
    InvalidHost { host: String, reason: String },
    #[error("registry port {port:?} is invalid: {reason}; use a number from 1 to 65535")]
    InvalidPort { port: String, reason: String },
    #[error("the tag after ':' is empty; remove the ':' or give a tag such as 'latest'")]
    EmptyTag,
    #[error("the tag is {len} characters long; the limit is {MAX_TAG_LEN}")]
    TagTooLong { len: usize },
    #[error(
        "tag {tag:?} is invalid: a tag starts with a letter, digit or '_' and holds only \
         letters, digits, '_', '.' and '-'"
    )]
    InvalidTag { tag: String },
    #[error("the digest after '@' is empty; give one such as sha256:<64 hex digits>")]
    EmptyDigest,
    #[error("bad digest {digest:?}: {reason}")]
    InvalidDigest { digest: String, reason: String },
    #[error(
        "the name {name:?} is {len} characters long; the limit for host, port and path together \
         is {MAX_NAME_LEN}"
    )]
    NameTooLong { name: String, len: usize },
}

/// How a separator in a path component is misplaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeparatorProblem {
    Leading,
    Trailing,
    /// Two separators in a row other than `__` or a run of `-`, such as `..` or `_-`.
    Consecutive,
}

impl fmt::Display for SeparatorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeparatorProblem::Leading => "starts with a separator",
            SeparatorProblem::Trailing => "ends with a separator",
            SeparatorProblem::Consecutive => "has separators in a row",
        })
    }
}

/// A parsed, normalised image reference such as `docker.io/library/debian:12`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageReference {
    registry: String,
    port: Option<u16>,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageReference {
    /// The registry host, e.g. `docker.io`, `127.0.0.1` or `[::1]` (IPv6 in brackets).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The registry port, if one was given.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// `host:port`, or `host` without a port: what to connect to.
    pub fn registry_location(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{}", self.registry, port),
            None => self.registry.clone(),
        }
    }

    /// The repository path, e.g. `library/debian`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The tag, or `latest` when the reference names neither tag nor digest. With
    /// only a digest there is no tag: `None`.
    pub fn tag_or_default(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(tag), _) => Some(tag),
            (None, None) => Some(DEFAULT_TAG),
            (None, Some(_)) => None,
        }
    }

    /// What to ask the registry for (`/v2/<repository>/manifests/<this>`): the digest
    /// when there is one, else the tag, else `latest`.
    pub fn reference_for_registry(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The same reference with another tag. A digest is kept (as docker does);
    /// use [`ImageReference::without_digest`] to drop it.
    pub fn with_tag(&self, tag: &str) -> Result<ImageReference, ReferenceError> {
        check_tag(tag)
            .map_err(|kind| ReferenceError::new(&format!("{}:{tag}", self.name()), kind))?;
        Ok(ImageReference {
            tag: Some(tag.to_string()),
            ..self.clone()
        })
    }

    /// The same reference with the given digest.
    pub fn with_digest(&self, digest: Digest) -> ImageReference {
        ImageReference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same reference without its digest.
    pub fn without_digest(&self) -> ImageReference {
        ImageReference {
            digest: None,
            ..self.clone()
        }
    }

    /// `host[:port]/path`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry_location(), self.repository)
    }

    /// The short form docker shows: `docker.io/` and an official image's `library/`
    /// left out, e.g. `debian:12`, `sardines/debian`, `localhost:5000/foo`. A
    /// Docker Hub repository whose first component would read as a host
    /// (`docker.io/foo.bar/x`) keeps `docker.io/`, so the short form reads back
    /// as the same image.
    pub fn familiar(&self) -> String {
        let short = self
            .docker_hub_path()
            .filter(|path| match path.split_once('/') {
                Some((first, _)) => !is_registry_component(first),
                None => true,
            });
        let mut out = short.map_or_else(|| self.name(), str::to_string);
        self.push_tag_and_digest(&mut out);
        out
    }

    /// A Docker Hub image's path without an official image's `library/`; `None`
    /// for other registries.
    fn docker_hub_path(&self) -> Option<&str> {
        if self.registry != DEFAULT_REGISTRY || self.port.is_some() {
            return None;
        }
        Some(match self.repository.strip_prefix(OFFICIAL_PREFIX) {
            Some(rest) if !rest.contains('/') => rest,
            _ => self.repository.as_str(),
        })
    }

    /// The path components of this image's directory in a local cache. Where
    /// the Python tool put it, so both tools share one cache: a Docker Hub image
    /// at its familiar path (`<ocidir>/sardines/debian/`, `<ocidir>/debian/`), any
    /// other at `<ocidir>/<host[:port]>/<path...>/` (the port stays in the host
    /// directory, never a tag). Tags and digests are not part of it; every
    /// component is a safe file name (no `/`, never `.` or `..`, never empty).
    pub fn cache_path_components(&self) -> Vec<String> {
        if let Some(path) = self.familiar_cache_path() {
            return path.split('/').map(str::to_string).collect();
        }
        self.qualified_cache_path_components()
    }

    /// `["host[:port]", "part", ...]`: where earlier sarde versions kept every image,
    /// and where the Python tool keeps names written with a host.
    pub fn qualified_cache_path_components(&self) -> Vec<String> {
        let mut out = vec![self.registry_location()];
        out.extend(self.repository.split('/').map(str::to_string));
        out
    }

    /// A Docker Hub image's familiar path, unless its first component would
    /// read as a host (`localhost/x`, `foo.bar`): those keep `docker.io/`.
    fn familiar_cache_path(&self) -> Option<&str> {
        let familiar = self.docker_hub_path()?;
        let first = familiar.split('/').next().unwrap_or(familiar);
        let host_like = first.contains(['.', ':']) || first == "localhost";
        (!host_like).then_some(familiar)
    }

    fn push_tag_and_digest(&self, out: &mut String) {
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(&digest.to_string());
        }
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.name();
        self.push_tag_and_digest(&mut out);
        f.write_str(&out)
    }
}

impl FromStr for ImageReference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse(input).map_err(|kind| ReferenceError::new(input, kind))
    }
}

impl Serialize for ImageReference {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ImageReference {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn parse(input: &str) -> Result<ImageReference, ReferenceErrorKind> {
    use ReferenceErrorKind as K;

    if input.is_empty() {
        return Err(K::Empty);
    }
    // Docker refuses a bare image ID as a name: it would be ambiguous.
    if input.len() == 64
        && input
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(K::HexName {
            name: input.to_string(),
        });
    }

    // The digest follows the first '@'; it contains no '@' itself.
    let (rest, digest) = match input.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (input, None),
    };
    // A tag follows the last ':' that comes after the last '/' (an earlier ':' is a port).
    let (name, tag) = match rest.rfind(':') {
        Some(colon) if !rest[colon..].contains('/') => (&rest[..colon], Some(&rest[colon + 1..])),
        _ => (rest, None),
    };
    if name.is_empty() {
        return Err(K::MissingPath);
    }

    // Split off the registry.
    let (domain, path) = match name.split_once('/') {
        Some((first, path)) if is_registry_component(first) => (Some(first), path),
        _ => (None, name),
    };

    let (registry, port) = match domain {
        Some(domain) => parse_domain(domain)?,
        None => (DEFAULT_REGISTRY.to_string(), None),
    };
    let registry = if registry == LEGACY_DEFAULT_REGISTRY {
        DEFAULT_REGISTRY.to_string()
    } else {
        registry
    };

    check_path(input, name, path)?;

    let repository = if registry == DEFAULT_REGISTRY && port.is_none() && !path.contains('/') {
        format!("{OFFICIAL_PREFIX}{path}")
    } else {
        path.to_string()
    };

    let name_len =
        registry.len() + port.map(|p| p.to_string().len() + 1).unwrap_or(0) + 1 + repository.len();
    if name_len > MAX_NAME_LEN {
        return Err(K::NameTooLong {
            name: name.to_string(),
            len: name_len,
        });
    }

    let tag = match tag {
        Some(tag) => {
            check_tag(tag)?;
            Some(tag.to_string())
        }
        None => None,
    };

    let digest = match digest {
        Some("") => return Err(K::EmptyDigest),
        Some(digest) => Some(digest.parse::<Digest>().map_err(|e| K::InvalidDigest {
            digest: digest.to_string(),
            reason: e.reason,
        })?),
        None => None,
    };

    Ok(ImageReference {
        registry,
        port,
        repository,
        tag,
        digest,
    })
}

/// Whether the first path component names a registry rather than a repository.
fn is_registry_component(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.starts_with('[')
}

/// `host[:port]` → (host, port); IPv6 hosts keep their brackets.
fn parse_domain(domain: &str) -> Result<(String, Option<u16>), ReferenceErrorKind> {
    use ReferenceErrorKind as K;

    let (host, port) = if let Some(inner) = domain.strip_prefix('[') {
        let Some(close) = inner.find(']') else {
            return Err(K::InvalidHost {
                host: domain.to_string(),
                reason: "the '[' of an IPv6 address is not closed by ']'".to_string(),
            });
        };
        let addr = &inner[..close];
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(K::InvalidHost {
                host: domain[..close + 2].to_string(),
                reason: format!("{addr:?} is not an IPv6 address"),
            });
        }
        let after = &inner[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => {
                return Err(K::InvalidHost {
                    host: domain.to_string(),
                    reason: "only ':PORT' may follow the ']' of an IPv6 address".to_string(),
                });
            }
        };
        (&domain[..close + 2], port)
    } else {
        match domain.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        }
    };

    if !host.starts_with('[') {
        check_host(host)?;
    }
    let port = port.map(parse_port).transpose()?;
    Ok((host.to_string(), port))
}

fn check_host(host: &str) -> Result<(), ReferenceErrorKind> {
    let invalid = |reason: String| ReferenceErrorKind::InvalidHost {
        host: host.to_string(),
        reason,
    };
    if host.is_empty() {
        return Err(invalid("it is empty".to_string()));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(invalid(
                "it has an empty label (a leading, trailing or doubled '.')".to_string(),
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(invalid(format!("it contains {c:?}")));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid(format!("label {label:?} starts or ends with '-'")));
        }
    }
    Ok(())
}

fn parse_port(port: &str) -> Result<u16, ReferenceErrorKind> {
    let invalid = |reason: &str| ReferenceErrorKind::InvalidPort {
        port: port.to_string(),
        reason: reason.to_string(),
    };
    if port.is_empty() {
        return Err(invalid("it is empty"));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("it is not a number"));
    }
    match port.parse::<u32>() {
        Ok(0) => Err(invalid("port 0 cannot be connected to")),
        Ok(n) if n <= u32::from(u16::MAX) => Ok(n as u16),
        _ => Err(invalid("it is larger than 65535")),
    }
}

/// Checks the repository path. `input` and `name` are for the upper-case suggestion.
fn check_path(input: &str, name: &str, path: &str) -> Result<(), ReferenceErrorKind> {
    use ReferenceErrorKind as K;

    // Upper case first: one clear message with a usable suggestion, if lower-casing
    // the path is all it takes.
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        let lower = path.to_ascii_lowercase();
        if lower.split('/').all(|c| check_component(c).is_ok()) {
            let path_start = name.len() - path.len();
            let suggestion = format!("{}{}{}", &input[..path_start], lower, &input[name.len()..]);
            return Err(K::UpperCase { suggestion });
        }
    }
    for component in path.split('/') {
        check_component(component)?;
    }
    Ok(())
}

/// `alnum [separator alnum]*` with separator `.`, `_`, `__` or `-`+.
fn check_component(component: &str) -> Result<(), ReferenceErrorKind> {
    use ReferenceErrorKind as K;

    if component.is_empty() {
        return Err(K::EmptyComponent);
    }
    // Upper case is reported last, when it is the only problem of this component.
    if let Some(character) = component
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-'))
    {
        return Err(K::InvalidCharacter {
            component: component.to_string(),
            character,
        });
    }
    let is_sep = |b: u8| matches!(b, b'.' | b'_' | b'-');
    let bytes = component.as_bytes();
    let separator = |problem| K::InvalidSeparator {
        component: component.to_string(),
        problem,
    };
    if is_sep(bytes[0]) {
        return Err(separator(SeparatorProblem::Leading));
    }
    if is_sep(bytes[bytes.len() - 1]) {
        return Err(separator(SeparatorProblem::Trailing));
    }
    // Every run of separators must be ".", "_", "__" or all '-'.
    for run in component
        .split(|c: char| c.is_ascii_alphanumeric())
        .filter(|run| !run.is_empty())
    {
        let ok = run == "." || run == "_" || run == "__" || run.bytes().all(|b| b == b'-');
        if !ok {
            return Err(separator(SeparatorProblem::Consecutive));
        }
    }
    if component.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(K::UpperCase {
            suggestion: component.to_ascii_lowercase(),
        });
    }
    Ok(())
}

/// Whether `tag` is a tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn is_tag(tag: &str) -> bool {
    check_tag(tag).is_ok()
}

fn check_tag(tag: &str) -> Result<(), ReferenceErrorKind> {
    use ReferenceErrorKind as K;

    if tag.is_empty() {
        return Err(K::EmptyTag);
    }
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    if !word(bytes[0]) || !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return Err(K::InvalidTag {
            tag: tag.to_string(),
        });
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(K::TagTooLong { len: tag.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn sha(hex: &str) -> String {
        format!("sha256:{hex}")
    }

    struct Valid {
        input: String,
        registry: &'static str,
        port: Option<u16>,
        repository: &'static str,
        tag: Option<&'static str>,
        digest: bool,
        display: String,
    }

    fn v(
        input: impl Into<String>,
        registry: &'static str,
        port: Option<u16>,
        repository: &'static str,
        tag: Option<&'static str>,
        digest: bool,
        display: impl Into<String>,
    ) -> Valid {
        Valid {
            input: input.into(),
            registry,
            port,
            repository,
            tag,
            digest,
            display: display.into(),
        }
    }

    #[rustfmt::skip]
    fn valid_table() -> Vec<Valid> {
        let d = sha(H);
        let tag128 = format!("t{}", "x".repeat(127));
        let long_tag: &'static str = Box::leak(tag128.clone().into_boxed_str());
        // 255 characters of name: "docker.io/" (10) + "library/" (8) + 237.
        let long_repo: &'static str =
            Box::leak(format!("library/{}", "a".repeat(237)).into_boxed_str());
        vec![
            v("debian", "docker.io", None, "library/debian", None, false, "docker.io/library/debian"),
            v("debian:12", "docker.io", None, "library/debian", Some("12"), false, "docker.io/library/debian:12"),
            v("debian:latest", "docker.io", None, "library/debian", Some("latest"), false, "docker.io/library/debian:latest"),
            v("library/debian", "docker.io", None, "library/debian", None, false, "docker.io/library/debian"),
            v("docker.io/debian", "docker.io", None, "library/debian", None, false, "docker.io/library/debian"),
            v("docker.io/library/debian", "docker.io", None, "library/debian", None, false, "docker.io/library/debian"),
            v("index.docker.io/library/debian:latest", "docker.io", None, "library/debian", Some("latest"), false, "docker.io/library/debian:latest"),
            v("index.docker.io/debian", "docker.io", None, "library/debian", None, false, "docker.io/library/debian"),
            v("sardines/debian", "docker.io", None, "sardines/debian", None, false, "docker.io/sardines/debian"),
            v("sardines/debian:bookworm", "docker.io", None, "sardines/debian", Some("bookworm"), false, "docker.io/sardines/debian:bookworm"),
            v("a/b/c/d", "docker.io", None, "a/b/c/d", None, false, "docker.io/a/b/c/d"),
            v("localhost/foo", "localhost", None, "foo", None, false, "localhost/foo"),
            v("localhost:5000/foo/bar:tag", "localhost", Some(5000), "foo/bar", Some("tag"), false, "localhost:5000/foo/bar:tag"),
            v("localhost:5000/foo", "localhost", Some(5000), "foo", None, false, "localhost:5000/foo"),
            // Without '/', "localhost:5000" is a repository with a tag, as in docker.
            v("localhost:5000", "docker.io", None, "library/localhost", Some("5000"), false, "docker.io/library/localhost:5000"),
            v("127.0.0.1:5000/sardines/debian:bookworm", "127.0.0.1", Some(5000), "sardines/debian", Some("bookworm"), false, "127.0.0.1:5000/sardines/debian:bookworm"),
            v("127.0.0.1/foo", "127.0.0.1", None, "foo", None, false, "127.0.0.1/foo"),
            v(format!("registry.example.org/a/b/c@{d}"), "registry.example.org", None, "a/b/c", None, true, format!("registry.example.org/a/b/c@{d}")),
            v(format!("host:5000/x:tag@{d}"), "host", Some(5000), "x", Some("tag"), true, format!("host:5000/x:tag@{d}")),
            v(format!("debian@{d}"), "docker.io", None, "library/debian", None, true, format!("docker.io/library/debian@{d}")),
            v(format!("debian:12@{d}"), "docker.io", None, "library/debian", Some("12"), true, format!("docker.io/library/debian:12@{d}")),
            v("[::1]:5000/foo", "[::1]", Some(5000), "foo", None, false, "[::1]:5000/foo"),
            v("[::1]/foo:v1", "[::1]", None, "foo", Some("v1"), false, "[::1]/foo:v1"),
            v("[2001:db8::1]:443/a/b", "[2001:db8::1]", Some(443), "a/b", None, false, "[2001:db8::1]:443/a/b"),
            v("foo__bar", "docker.io", None, "library/foo__bar", None, false, "docker.io/library/foo__bar"),
            v("foo_bar", "docker.io", None, "library/foo_bar", None, false, "docker.io/library/foo_bar"),
            v("foo.bar", "docker.io", None, "library/foo.bar", None, false, "docker.io/library/foo.bar"),
            v("a-b--c", "docker.io", None, "library/a-b--c", None, false, "docker.io/library/a-b--c"),
            v("a-b--c/d---e", "docker.io", None, "a-b--c/d---e", None, false, "docker.io/a-b--c/d---e"),
            v("a.b_c__d-e", "docker.io", None, "library/a.b_c__d-e", None, false, "docker.io/library/a.b_c__d-e"),
            v("0/1", "docker.io", None, "0/1", None, false, "docker.io/0/1"),
            v("x", "docker.io", None, "library/x", None, false, "docker.io/library/x"),
            v("Registry.Example.COM/foo", "Registry.Example.COM", None, "foo", None, false, "Registry.Example.COM/foo"),
            v("my-host.example/foo", "my-host.example", None, "foo", None, false, "my-host.example/foo"),
            v("host:1/foo", "host", Some(1), "foo", None, false, "host:1/foo"),
            v("host:65535/foo", "host", Some(65535), "foo", None, false, "host:65535/foo"),
            v("host.example:443/foo:TAG_1.2-3", "host.example", Some(443), "foo", Some("TAG_1.2-3"), false, "host.example:443/foo:TAG_1.2-3"),
            v("foo:_", "docker.io", None, "library/foo", Some("_"), false, "docker.io/library/foo:_"),
            v("foo:1.0", "docker.io", None, "library/foo", Some("1.0"), false, "docker.io/library/foo:1.0"),
            v(format!("foo:{tag128}"), "docker.io", None, "library/foo", Some(long_tag), false, format!("docker.io/library/foo:{tag128}")),
            v("ghcr.io/cirruslabs/macos-sonoma-base:latest", "ghcr.io", None, "cirruslabs/macos-sonoma-base", Some("latest"), false, "ghcr.io/cirruslabs/macos-sonoma-base:latest"),
            v("quay.io/a/b:c", "quay.io", None, "a/b", Some("c"), false, "quay.io/a/b:c"),
            v("docker.io:5000/debian", "docker.io", Some(5000), "debian", None, false, "docker.io:5000/debian"),
            v("a".repeat(237), "docker.io", None, long_repo, None, false, format!("docker.io/{long_repo}")),
            v(format!("foo@sha512:{}", "ab".repeat(64)), "docker.io", None, "library/foo", None, true, format!("docker.io/library/foo@sha512:{}", "ab".repeat(64))),
        ]
    }

    #[test]
    fn valid_references_parse_and_display() {
        let table = valid_table();
        assert!(table.len() >= 40, "only {} valid cases", table.len());
        for case in table {
            let r: ImageReference = case
                .input
                .parse()
                .unwrap_or_else(|e| panic!("{:?} was rejected: {e}", case.input));
            assert_eq!(r.registry(), case.registry, "registry of {:?}", case.input);
            assert_eq!(r.port(), case.port, "port of {:?}", case.input);
            assert_eq!(
                r.repository(),
                case.repository,
                "repository of {:?}",
                case.input
            );
            assert_eq!(r.tag(), case.tag, "tag of {:?}", case.input);
            assert_eq!(
                r.digest().is_some(),
                case.digest,
                "digest of {:?}",
                case.input
            );
            if case.digest {
                let digest = case.input.rsplit_once('@').unwrap().1;
                assert_eq!(r.digest().unwrap().to_string(), digest);
            }
            assert_eq!(r.to_string(), case.display, "display of {:?}", case.input);
            // The normalised form parses to the same reference.
            let again: ImageReference = case.display.parse().unwrap();
            assert_eq!(again, r, "round trip of {:?}", case.input);
            // So does the familiar form.
            let familiar: ImageReference = r.familiar().parse().unwrap();
            assert_eq!(familiar, r, "familiar round trip of {:?}", case.input);
        }
    }

    #[test]
    #[rustfmt::skip]
    fn invalid_references_are_rejected_with_a_reason() {
        use ReferenceErrorKind as K;
        type Check = fn(&ReferenceErrorKind) -> bool;
        let d = sha(H);
        let tag129 = format!("t{}", "x".repeat(128));
        let cases: Vec<(String, Check, &str)> = vec![
            ("".into(), |k| matches!(k, K::Empty), "the reference is empty"),
            (":tag".into(), |k| matches!(k, K::MissingPath), "repository path is missing"),
            (format!("@{d}"), |k| matches!(k, K::MissingPath), "repository path is missing"),
            ("Foo".into(), |k| matches!(k, K::UpperCase { suggestion } if suggestion == "foo"), "repository names must be lower case: use 'foo'"),
            ("foo/Bar".into(), |k| matches!(k, K::UpperCase { suggestion } if suggestion == "foo/bar"), "must be lower case: use 'foo/bar'"),
            ("localhost:5000/Foo/bar:Tag".into(), |k| matches!(k, K::UpperCase { suggestion } if suggestion == "localhost:5000/foo/bar:Tag"), "lower case"),
            ("foo:".into(), |k| matches!(k, K::EmptyTag), "tag after ':' is empty"),
            ("foo@".into(), |k| matches!(k, K::EmptyDigest), "digest after '@' is empty"),
            ("foo@sha256:abc".into(), |k| matches!(k, K::InvalidDigest { .. }), "sha256 needs 64 hex digits, found 3"),
            ("foo@md5:abc".into(), |k| matches!(k, K::InvalidDigest { .. }), "unsupported algorithm"),
            (format!("foo@sha256:{}", H.to_uppercase()), |k| matches!(k, K::InvalidDigest { .. }), "0-9 and a-f"),
            ("host:99999/foo".into(), |k| matches!(k, K::InvalidPort { .. }), "larger than 65535"),
            ("host:0/foo".into(), |k| matches!(k, K::InvalidPort { .. }), "port 0"),
            ("host:/foo".into(), |k| matches!(k, K::InvalidPort { .. }), "port \"\" is invalid: it is empty"),
            ("host:http/foo".into(), |k| matches!(k, K::InvalidPort { .. }), "not a number"),
            ("host:50:00/foo".into(), |k| matches!(k, K::InvalidPort { .. }), "not a number"),
            ("foo//bar".into(), |k| matches!(k, K::EmptyComponent), "empty path component"),
            ("/foo".into(), |k| matches!(k, K::EmptyComponent), "empty path component"),
            ("foo/".into(), |k| matches!(k, K::EmptyComponent), "empty path component"),
            ("localhost/".into(), |k| matches!(k, K::EmptyComponent), "empty path component"),
            ("-foo".into(), |k| matches!(k, K::InvalidSeparator { problem: SeparatorProblem::Leading, .. }), "starts with a separator"),
            ("foo-".into(), |k| matches!(k, K::InvalidSeparator { problem: SeparatorProblem::Trailing, .. }), "ends with a separator"),
            ("_foo".into(), |k| matches!(k, K::InvalidSeparator { problem: SeparatorProblem::Leading, .. }), "starts with a separator"),
            ("foo..bar".into(), |k| matches!(k, K::InvalidSeparator { problem: SeparatorProblem::Consecutive, .. }), "separators in a row"),
            ("foo___bar".into(), |k| matches!(k, K::InvalidSeparator { problem: SeparatorProblem::Consecutive, .. }), "separators in a row"),
            ("foo.-bar".into(), |k| matches!(k, K::InvalidSeparator { problem: SeparatorProblem::Consecutive, .. }), "separators in a row"),
            ("foo/bar./baz".into(), |k| matches!(k, K::InvalidSeparator { problem: SeparatorProblem::Trailing, .. }), "\"bar.\" ends with a separator"),
            ("foo bar".into(), |k| matches!(k, K::InvalidCharacter { character: ' ', .. }), "contains ' '"),
            ("foo/b%r".into(), |k| matches!(k, K::InvalidCharacter { character: '%', .. }), "contains '%'"),
            ("föo".into(), |k| matches!(k, K::InvalidCharacter { character: 'ö', .. }), "contains 'ö'"),
            (format!("foo:{tag129}"), |k| matches!(k, K::TagTooLong { len: 129 }), "the limit is 128"),
            ("foo:-tag".into(), |k| matches!(k, K::InvalidTag { .. }), "tag \"-tag\" is invalid"),
            ("foo:.tag".into(), |k| matches!(k, K::InvalidTag { .. }), "starts with a letter, digit or '_'"),
            ("foo:ta+g".into(), |k| matches!(k, K::InvalidTag { .. }), "tag \"ta+g\" is invalid"),
            ("foo:a:b".into(), |k| matches!(k, K::InvalidCharacter { character: ':', .. }), "\"foo:a\" contains ':'"),
            ("Foo bar".into(), |k| matches!(k, K::InvalidCharacter { character: ' ', .. }), "contains ' '"),
            ("-host.com/foo".into(), |k| matches!(k, K::InvalidHost { .. }), "starts or ends with '-'"),
            ("host-.com/foo".into(), |k| matches!(k, K::InvalidHost { .. }), "starts or ends with '-'"),
            ("host..com/foo".into(), |k| matches!(k, K::InvalidHost { .. }), "empty label"),
            (".com/foo".into(), |k| matches!(k, K::InvalidHost { .. }), "empty label"),
            (":5000/foo".into(), |k| matches!(k, K::InvalidHost { .. }), "it is empty"),
            ("ho_st.com/foo".into(), |k| matches!(k, K::InvalidHost { .. }), "contains '_'"),
            ("[::1/foo".into(), |k| matches!(k, K::InvalidHost { .. }), "not closed"),
            ("[zz::1]:5000/foo".into(), |k| matches!(k, K::InvalidHost { .. }), "not an IPv6 address"),
            ("[::1]x/foo".into(), |k| matches!(k, K::InvalidHost { .. }), "only ':PORT'"),
            (H.into(), |k| matches!(k, K::HexName { .. }), "64 hex digits"),
            ("a".repeat(238), |k| matches!(k, K::NameTooLong { len: 256, .. }), "the limit for host, port and path together is 255"),
            (format!("registry.example.org/{}", "b/".repeat(120) + "c"), |k| matches!(k, K::NameTooLong { .. }), "is 262 characters long"),
        ];
        assert!(cases.len() >= 25, "only {} invalid cases", cases.len());
        for (input, check, message) in cases {
            let err = match input.parse::<ImageReference>() {
                Ok(r) => panic!("{input:?} was accepted as {r}"),
                Err(e) => e,
            };
            assert_eq!(err.input(), input);
            assert!(check(err.kind()), "{input:?}: unexpected error kind {:?}", err.kind());
            let text = err.to_string();
            assert!(
                text.contains(message),
                "{input:?}: message {text:?} lacks {message:?}"
            );
            assert!(
                text.starts_with(&format!("invalid image reference {input:?}: ")),
                "{input:?}: message {text:?} does not name the input"
            );
        }
    }

    #[test]
    fn accessors_and_derived_forms() {
        let r: ImageReference = "debian".parse().unwrap();
        assert_eq!(r.registry_location(), "docker.io");
        assert_eq!(r.tag_or_default(), Some("latest"));
        assert_eq!(r.reference_for_registry(), "latest");
        assert_eq!(r.familiar(), "debian");
        // Docker Hub images go where the Python tool put them: the familiar path.
        assert_eq!(r.cache_path_components(), ["debian"]);
        assert_eq!(
            r.qualified_cache_path_components(),
            ["docker.io", "library", "debian"]
        );
        let r: ImageReference = "docker.io/sardines/debian:12".parse().unwrap();
        assert_eq!(r.cache_path_components(), ["sardines", "debian"]);
        let r: ImageReference = "docker.io/localhost/x".parse().unwrap();
        assert_eq!(r.cache_path_components(), ["docker.io", "localhost", "x"]);
        let r: ImageReference = "docker.io/library/foo.bar".parse().unwrap();
        assert_eq!(
            r.cache_path_components(),
            ["docker.io", "library", "foo.bar"]
        );

        let r: ImageReference = "127.0.0.1:5000/sardines/debian:bookworm".parse().unwrap();
        assert_eq!(r.registry_location(), "127.0.0.1:5000");
        assert_eq!(r.tag_or_default(), Some("bookworm"));
        assert_eq!(r.reference_for_registry(), "bookworm");
        assert_eq!(r.familiar(), "127.0.0.1:5000/sardines/debian:bookworm");
        // The port is part of the host directory and never becomes a tag.
        assert_eq!(
            r.cache_path_components(),
            ["127.0.0.1:5000", "sardines", "debian"]
        );

        let d = sha(H);
        let r: ImageReference = format!("host:5000/x:tag@{d}").parse().unwrap();
        assert_eq!(r.reference_for_registry(), d);
        assert_eq!(r.tag_or_default(), Some("tag"));
        let r: ImageReference = format!("quay.io/a/b@{d}").parse().unwrap();
        assert_eq!(r.tag_or_default(), None);
        assert_eq!(r.reference_for_registry(), d);
        assert_eq!(r.cache_path_components(), ["quay.io", "a", "b"]);

        let r: ImageReference = "[::1]:5000/foo".parse().unwrap();
        assert_eq!(r.registry_location(), "[::1]:5000");
        assert_eq!(r.cache_path_components(), ["[::1]:5000", "foo"]);
    }

    #[test]
    fn familiar_form_strips_only_docker_hub_defaults() {
        for (input, familiar) in [
            ("debian:12", "debian:12"),
            ("docker.io/library/debian", "debian"),
            ("index.docker.io/sardines/debian", "sardines/debian"),
            ("library/a/b", "library/a/b"),
            (
                "docker.io:443/library/debian",
                "docker.io:443/library/debian",
            ),
            ("localhost/library/debian", "localhost/library/debian"),
            ("ghcr.io/a/b:c", "ghcr.io/a/b:c"),
            ("foo.bar", "foo.bar"),
            // Found by fuzzing: a first component that reads as a host.
            ("index.docker.io/foo.io/x", "docker.io/foo.io/x"),
            ("docker.io/localhost/x:1", "docker.io/localhost/x:1"),
        ] {
            let r: ImageReference = input.parse().unwrap();
            assert_eq!(r.familiar(), familiar, "familiar form of {input:?}");
            assert_eq!(familiar.parse::<ImageReference>().unwrap(), r, "{input:?}");
        }
    }

    #[test]
    fn with_tag_validates_and_keeps_the_rest() {
        let d = sha(H);
        let r: ImageReference = format!("localhost:5000/foo:old@{d}").parse().unwrap();
        let t = r.with_tag("new").unwrap();
        assert_eq!(t.to_string(), format!("localhost:5000/foo:new@{d}"));
        assert_eq!(
            t.without_digest().to_string(),
            "localhost:5000/foo:new".to_string()
        );
        assert_eq!(t.without_digest().reference_for_registry(), "new");
        let err = r.with_tag("bad tag").unwrap_err();
        assert!(matches!(err.kind(), ReferenceErrorKind::InvalidTag { .. }));
        let err = r.with_tag("").unwrap_err();
        assert!(matches!(err.kind(), ReferenceErrorKind::EmptyTag));
        let digest = Digest::sha256_of(b"x");
        assert_eq!(
            r.without_digest().with_digest(digest.clone()).digest(),
            Some(&digest)
        );
    }

    #[test]
    fn serde_uses_the_string_form() {
        let r: ImageReference = "debian:12".parse().unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"docker.io/library/debian:12\"");
        assert_eq!(serde_json::from_str::<ImageReference>(&json).unwrap(), r);
        assert!(serde_json::from_str::<ImageReference>("\"Foo\"").is_err());
    }
}
