//! Entry points for the fuzz targets (`fuzz-targets/`): what a registry sends back,
//! fed to the same functions the transport hands it to, without a network. Not an
//! API: nothing else calls these.

use std::collections::BTreeSet;

use futures_util::FutureExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LINK, RETRY_AFTER, WWW_AUTHENTICATE};
use sarde_api::transport::Access;
use sarde_api::{Digest, TransportError};

use crate::auth::{Authenticator, Scope};
use crate::error::{Object, retry_after};

/// Header values as a server may send them; values `http` refuses are left out,
/// as no answer can carry them.
fn headers(name: HeaderName, values: &[&[u8]]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for value in values {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            map.append(name.clone(), value);
        }
    }
    map
}

/// Every kind of object a request is about.
fn objects() -> Vec<Object> {
    let digest = Digest::sha256_of(b"");
    vec![
        Object::Manifest {
            repository: "library/fuzz".into(),
            reference: "latest".into(),
            media_type: None,
        },
        Object::Manifest {
            repository: "library/fuzz".into(),
            reference: digest.to_string(),
            media_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
        },
        Object::Blob {
            repository: "library/fuzz".into(),
            digest,
        },
        Object::Tags {
            repository: "library/fuzz".into(),
        },
        Object::Login,
        Object::Token {
            scopes: vec!["repository:library/fuzz:pull".into()],
        },
    ]
}

/// A failed answer with `status`, `Retry-After` values and `body`, as
/// `Http::error` turns it into an error for each kind of object.
pub fn error_answer(status: u16, retry_after_values: &[&[u8]], body: &[u8]) -> Vec<TransportError> {
    let after = retry_after(&headers(RETRY_AFTER, retry_after_values));
    objects()
        .iter()
        .map(|object| {
            crate::http::error_answer("fuzz.example", object, status, after, body.to_vec())
        })
        .collect()
}

/// A token server's answer, as a token request reads it.
pub fn token_answer(body: &[u8]) -> Result<(), TransportError> {
    let auth = Authenticator::new("fuzz.example", None, false);
    let scopes = BTreeSet::from([Scope::new("library/fuzz", Access::Pull)]);
    let object = Object::Token {
        scopes: scopes.iter().map(Scope::param).collect(),
    };
    auth.token_from_answer(&object, body, &scopes).map(drop)
}

/// `WWW-Authenticate` values of a 401, learned by a secure and an insecure
/// registry's authenticator: whether each took it as a new challenge.
pub fn www_authenticate(values: &[&[u8]]) -> Vec<bool> {
    let map = headers(WWW_AUTHENTICATE, values);
    [false, true]
        .into_iter()
        .map(|insecure| {
            let auth = Authenticator::new("fuzz.example", None, insecure);
            // `learn` waits only for its own lock, free here.
            auth.learn(&map)
                .now_or_never()
                .expect("an uncontended lock is taken at once")
        })
        .collect()
}

/// The next page a tag list's `Link` values point at, joined to the page's URL
/// as the tag listing does.
pub fn next_page(values: &[&[u8]]) -> Option<Result<String, String>> {
    let next = crate::transport::next_link(&headers(LINK, values))?;
    let page = reqwest::Url::parse("https://fuzz.example/v2/library/fuzz/tags/list?n=1000")
        .expect("a valid URL");
    Some(
        page.join(&next)
            .map(|url| url.to_string())
            .map_err(|e| e.to_string()),
    )
}
