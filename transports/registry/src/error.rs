//! How registry answers become [`TransportError`]s.
//!
//! Registries report failures twice: as an HTTP status and as OCI error codes in
//! the body (`{"errors":[{"code":"MANIFEST_UNKNOWN",…}]}`); a proxy in between
//! may keep only the status, so the mapping looks at both.

use std::time::Duration;

use sarde_api::{Digest, TransportError};

/// What a request was about, so every error names the object.
#[derive(Debug, Clone)]
pub enum Object {
    Manifest {
        repository: String,
        reference: String,
        /// Set when pushing, to name a refused media type.
        media_type: Option<String>,
    },
    Blob {
        repository: String,
        digest: Digest,
    },
    /// The tag list of a repository.
    Tags {
        repository: String,
    },
    /// The referrers of a manifest (OCI 1.1 referrers API).
    Referrers {
        repository: String,
        digest: Digest,
    },
    /// The login check (`GET /v2/`, token endpoint).
    Login,
    /// A token for these scopes.
    Token {
        scopes: Vec<String>,
    },
}

impl std::fmt::Display for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Object::Manifest {
                repository,
                reference,
                ..
            } if reference.contains(':') => write!(f, "manifest {repository}@{reference}"),
            Object::Manifest {
                repository,
                reference,
                ..
            } => write!(f, "manifest {repository}:{reference}"),
            Object::Blob { repository, digest } => write!(f, "blob {digest} in {repository}"),
            Object::Tags { repository } => write!(f, "the tags of {repository}"),
            Object::Referrers { repository, digest } => {
                write!(f, "the referrers of {repository}@{digest}")
            }
            Object::Login => f.write_str("the login"),
            Object::Token { scopes } if scopes.is_empty() => f.write_str("a token"),
            Object::Token { scopes } => write!(f, "a token for {}", scopes.join(" ")),
        }
    }
}

/// Maps an HTTP status plus the OCI error codes of the body to the variant a
/// caller acts on. `status` is `None` when only the body is known.
pub fn map_status(
    location: &str,
    object: &Object,
    status: Option<u16>,
    body: &str,
    retry_after: Option<Duration>,
) -> TransportError {
    let codes = error_codes(body);
    let has = |code: &str| codes.iter().any(|c| c == code);
    let location = location.to_string();
    let detail = {
        // Enough of the body to explain; printable, so junk stays short and harmless.
        let printable: String = body
            .trim()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let mut body: String = printable.chars().take(200).collect();
        if printable.chars().count() > 200 {
            body.push('…');
        }
        match status {
            Some(s) => format!("HTTP {s} {body}"),
            None => body,
        }
    };
    let status = status.unwrap_or(0);

    if status == 401 || has("UNAUTHORIZED") {
        return TransportError::Unauthorized {
            location,
            object: object.to_string(),
        };
    }
    if status == 403 || has("DENIED") {
        return TransportError::Forbidden {
            location,
            object: object.to_string(),
        };
    }
    if status == 429 || status >= 500 || has("TOOMANYREQUESTS") {
        return TransportError::Transient {
            location,
            message: format!("{object}: the registry answered {detail}"),
            retry_after,
        };
    }
    let unknown = status == 404
        || [
            "MANIFEST_UNKNOWN",
            "BLOB_UNKNOWN",
            "NAME_UNKNOWN",
            "NOT_FOUND",
        ]
        .iter()
        .any(|c| has(c));
    if unknown {
        return match object {
            Object::Manifest {
                repository,
                reference,
                ..
            } => TransportError::ManifestUnknown {
                location,
                repository: repository.clone(),
                reference: reference.clone(),
            },
            Object::Blob { repository, digest } => TransportError::BlobUnknown {
                location,
                repository: repository.clone(),
                digest: digest.clone(),
            },
            Object::Tags { repository } => TransportError::ManifestUnknown {
                location,
                repository: repository.clone(),
                reference: "(any tag: the repository is unknown)".to_string(),
            },
            Object::Referrers { repository, digest } => TransportError::ManifestUnknown {
                location,
                repository: repository.clone(),
                reference: digest.to_string(),
            },
            Object::Login => TransportError::Protocol {
                location,
                message: "the registry has no /v2/ API: is this an OCI registry?".to_string(),
            },
            Object::Token { .. } => TransportError::Protocol {
                location,
                message: format!("{object}: the token server answered {detail}"),
            },
        };
    }
    if let Object::Blob { digest, .. } = object {
        // A refused upload: the data did not hash or count to what we announced.
        if has("DIGEST_INVALID") || has("SIZE_INVALID") {
            return TransportError::Mismatch {
                location,
                object: format!("{object} (nothing stored)"),
                what: if has("DIGEST_INVALID") {
                    "digest of the data sent"
                } else {
                    "size of the data sent"
                },
                expected: digest.to_string(),
                actual: format!("something else ({detail})"),
            };
        }
    }
    let media_refused = status == 415
        || has("MANIFEST_INVALID")
        || has("UNSUPPORTED")
        || has("MANIFEST_UNVERIFIED");
    if media_refused {
        let media_type = match object {
            Object::Manifest {
                media_type: Some(m),
                ..
            } => m.clone(),
            _ => "(unknown)".to_string(),
        };
        return TransportError::UnsupportedMediaType {
            location,
            media_type: format!("{media_type} for {object}: {detail}"),
        };
    }
    TransportError::Protocol {
        location,
        message: format!("{object}: the registry answered {detail}"),
    }
}

/// The OCI error codes in a registry's error body, if it is one.
fn error_codes(body: &str) -> Vec<String> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    value
        .get("errors")
        .and_then(|e| e.as_array())
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e.get("code")?.as_str())
                .map(str::to_ascii_uppercase)
                .collect()
        })
        .unwrap_or_default()
}

/// Maps a reqwest failure (no HTTP answer, or a broken body) to Tls or Transient.
pub(crate) fn map_reqwest(location: &str, object: &Object, e: &reqwest::Error) -> TransportError {
    if let Some(status) = e.status() {
        return map_status(location, object, Some(status.as_u16()), "", None);
    }
    let chain = error_chain(e);
    // reqwest's message includes the URL: a repository named `openssl-builder`
    // must not make a refused connection look like a TLS failure.
    let without_url = match e.url() {
        Some(url) => chain.replace(url.as_str(), ""),
        None => chain.clone(),
    };
    if e.is_redirect() {
        // Loops, too many hops and downgrades repeat on every try.
        return TransportError::Protocol {
            location: location.to_string(),
            message: format!("{object}: {chain}"),
        };
    }
    if looks_like_tls(&without_url) {
        return TransportError::Tls {
            location: location.to_string(),
            message: format!("{object}: {chain}"),
        };
    }
    if e.is_builder() {
        return TransportError::Protocol {
            location: location.to_string(),
            message: format!("{object}: {chain}"),
        };
    }
    if host_does_not_exist(&without_url) {
        // A typo in a host name stays one: say so now, not after five retries.
        return TransportError::Protocol {
            location: location.to_string(),
            message: format!(
                "no such host: the name does not resolve (check the registry's name, or /etc/hosts and DNS): {object}: {chain}"
            ),
        };
    }
    // Connection refused or reset, timeouts, a body cut off: all worth a retry.
    TransportError::Transient {
        location: location.to_string(),
        message: format!("{object}: {chain}"),
        retry_after: None,
    }
}

/// The error and all its causes on one line: reqwest's own message is vague.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// getaddrinfo's answers that a name does not exist (EAI_NONAME, EAI_NODATA),
/// as opposed to a resolver that is down for now (EAI_AGAIN: retried).
fn host_does_not_exist(chain: &str) -> bool {
    let lower = chain.to_ascii_lowercase();
    lower.contains("dns error")
        && [
            "name or service not known",
            "no address associated with hostname",
            "nodename nor servname provided",
        ]
        .iter()
        .any(|m| lower.contains(m))
}

/// rustls errors carry no type we can match without depending on rustls; their
/// messages are stable enough to recognise.
fn looks_like_tls(chain: &str) -> bool {
    let lower = chain.to_ascii_lowercase();
    // rustls says "received corrupt message of type InvalidContentType" when the
    // server speaks plain HTTP: a protocol mismatch no retry will fix.
    [
        "certificate",
        "tls",
        "handshake",
        "unknownissuer",
        "ssl",
        "corrupt message",
        "invalidcontenttype",
        "peerincompatible",
    ]
    .iter()
    .any(|w| lower.contains(w))
}

/// `Retry-After` in seconds; HTTP dates are rare for registries and ignored.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOC: &str = "reg.example:5000";

    fn blob() -> Object {
        Object::Blob {
            repository: "a/b".into(),
            digest: Digest::sha256_of(b"x"),
        }
    }

    fn manifest() -> Object {
        Object::Manifest {
            repository: "a/b".into(),
            reference: "v1".into(),
            media_type: Some("application/x-odd".into()),
        }
    }

    #[test]
    fn statuses_map_to_variants() {
        let e = map_status(LOC, &blob(), Some(401), "", None);
        assert!(matches!(e, TransportError::Unauthorized { .. }), "{e:?}");
        assert!(e.to_string().contains(LOC) && e.to_string().contains("a/b"));
        let e = map_status(LOC, &blob(), Some(403), "", None);
        assert!(matches!(e, TransportError::Forbidden { .. }), "{e:?}");
        let e = map_status(LOC, &blob(), Some(404), "", None);
        assert!(matches!(e, TransportError::BlobUnknown { .. }), "{e:?}");
        let e = map_status(LOC, &manifest(), Some(404), "", None);
        assert!(
            matches!(&e, TransportError::ManifestUnknown { reference, .. } if reference == "v1"),
            "{e:?}"
        );
        let e = map_status(LOC, &manifest(), Some(415), "", None);
        assert!(
            matches!(&e, TransportError::UnsupportedMediaType { media_type, .. } if media_type.contains("application/x-odd")),
            "{e:?}"
        );
        let body = r#"{"errors":[{"code":"MANIFEST_INVALID","message":"bad"}]}"#;
        let e = map_status(LOC, &manifest(), Some(400), body, None);
        assert!(
            matches!(e, TransportError::UnsupportedMediaType { .. }),
            "{e:?}"
        );
        let body = r#"{"errors":[{"code":"DIGEST_INVALID","message":"bad"}]}"#;
        let e = map_status(LOC, &blob(), Some(400), body, None);
        assert!(matches!(e, TransportError::Mismatch { .. }), "{e:?}");
        let e = map_status(LOC, &blob(), Some(429), "", Some(Duration::from_secs(7)));
        assert!(
            matches!(e, TransportError::Transient { retry_after: Some(d), .. } if d.as_secs() == 7)
        );
        let e = map_status(LOC, &blob(), Some(503), "", None);
        assert!(e.is_transient());
        let e = map_status(LOC, &blob(), Some(400), "nonsense", None);
        assert!(matches!(e, TransportError::Protocol { .. }), "{e:?}");
    }

    #[test]
    fn a_name_that_does_not_resolve_is_final_a_resolver_down_is_not() {
        assert!(host_does_not_exist(
            "client error (Connect): dns error: failed to lookup address information: Name or service not known"
        ));
        assert!(!host_does_not_exist(
            "client error (Connect): dns error: failed to lookup address information: Temporary failure in name resolution"
        ));
        assert!(!host_does_not_exist("connection refused"));
    }

    #[test]
    fn tls_failures_are_recognised() {
        assert!(looks_like_tls("invalid peer certificate: UnknownIssuer"));
        assert!(!looks_like_tls("connection refused"));
    }

    #[test]
    fn retry_after_seconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "12".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(12)));
    }
}
