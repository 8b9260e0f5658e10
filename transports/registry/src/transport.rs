//! The `docker` transport: one registry (`host[:port]`) as a [`Transport`],
//! speaking the OCI distribution API over reqwest.
//!
//! sarde speaks the protocol itself rather than through oci-client, which it
//! used before: oci-client reads manifests, token answers and error bodies
//! without a bound (an endless manifest cost 12.9 GB of memory), asks for a
//! token scoped to one repository per request (so cross-repository mounts were
//! refused and every blob re-sent) and for a new token on nearly every request,
//! drops tag lists' `Link` header, and can't verify an upload before it commits.
//! What each request may cost is in `http.rs`, authentication in `auth.rs`, the
//! blob streams in `blob.rs`.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::StreamExt;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderValue,
    LINK, LOCATION, RANGE,
};
use reqwest::{RequestBuilder, Response, StatusCode};
use sarde_api::digest::Algorithm;
use sarde_api::limits::{MAX_MANIFEST_SIZE, MAX_TAG_PAGE_SIZE, MAX_TAG_PAGES, MAX_TAGS};
use sarde_api::oci::{Descriptor, media_types};
use sarde_api::reference::{ReferenceError, is_tag};
use sarde_api::transport::{Access, BlobReader, RawManifest, TransportOptions, TransportReference};
use sarde_api::{
    Digest, ImageReference, Registrar, RegistryError, Transport, TransportError, TransportFactory,
};
use sha2::Digest as _;
use tokio_util::io::StreamReader;

use crate::auth::{Authenticator, Authorization, Scope};
use crate::blob::{Exact, checked_stream, content_range_start};
use crate::configured::ConfiguredRegistry;
use crate::error::Object;
use crate::http::{Http, UploadWatch, content_length};
use crate::registries_conf::RegistriesConf;

/// The URL scheme of this transport.
pub const SCHEME: &str = "docker";

/// Manifest types asked for; sarde copies whatever of these it gets unchanged.
const MANIFEST_TYPES: &[&str] = &[
    media_types::IMAGE_MANIFEST,
    media_types::IMAGE_INDEX,
    media_types::DOCKER_MANIFEST,
    media_types::DOCKER_MANIFEST_LIST,
];
/// Tags asked for per page.
const TAG_PAGE: usize = 1000;

/// Opens `docker` transports.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegistryFactory;

impl TransportFactory for RegistryFactory {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn description(&self) -> &str {
        "OCI distribution registries: docker://[host[:port]/]repository[:tag|@digest] (the default for references without a scheme)"
    }

    /// `//[host[:port]/]repository[:tag|@digest]` after `docker:`, as skopeo
    /// writes it; the `//` may be left out.
    fn parse_reference(&self, rest: &str) -> Result<TransportReference, TransportError> {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let image: ImageReference =
            rest.parse()
                .map_err(|e: ReferenceError| TransportError::BadReference {
                    scheme: SCHEME.to_string(),
                    reference: rest.to_string(),
                    message: e.to_string(),
                    expected: "[host[:port]/]repository[:tag|@digest]".to_string(),
                })?;
        Ok(TransportReference::from(&image))
    }

    fn configuration(&self, options: &TransportOptions) -> Result<Vec<String>, TransportError> {
        let conf = load_conf(options, "registries.conf")?;
        let mut lines = Vec::new();
        if conf.files.is_empty() {
            lines.push("registries.conf: none (no mirrors, rewrites or blocks)".to_string());
        }
        for file in &conf.files {
            lines.push(format!("registries.conf read: {}", file.display()));
        }
        for table in &conf.tables {
            let mut line = format!("[[registry]] prefix {:?}", table.effective_prefix());
            if !table.location.is_empty() {
                line += &format!(" -> location {:?}", table.location);
            }
            if table.insecure {
                line += ", insecure";
            }
            if table.blocked {
                line += ", blocked";
            }
            if table.mirror_by_digest_only {
                line += ", mirror-by-digest-only";
            }
            for mirror in &table.mirror {
                line += &format!("; mirror {:?}", mirror.location);
                if mirror.insecure {
                    line += " (insecure)";
                }
                if let Some(only) = mirror.pull_from_mirror {
                    line += &format!(" pull-from-mirror {only:?}");
                }
            }
            line += &format!(" (from {})", table.file.display());
            lines.push(line);
        }
        Ok(lines)
    }

    /// The registry, as `registries.conf` makes it when a table applies to it
    /// (mirrors, a `location` rewrite, `insecure`, `blocked`), else as named.
    fn open(
        &self,
        location: &str,
        options: &TransportOptions,
    ) -> Result<Box<dyn Transport>, TransportError> {
        let conf = load_conf(options, location)?;
        if conf.applies_to(location) {
            return Ok(Box::new(ConfiguredRegistry::new(
                location,
                Arc::new(conf),
                options,
            )));
        }
        Ok(Box::new(open_with_stored_credentials(
            location,
            options.clone(),
        )?))
    }
}

/// The registries.conf files `options` name, or else those podman and skopeo
/// read in this process's environment.
fn load_conf(options: &TransportOptions, location: &str) -> Result<RegistriesConf, TransportError> {
    let failed = |e: crate::registries_conf::ConfError| TransportError::Protocol {
        location: location.to_string(),
        message: format!("{e} (registries.conf applies to every docker:// reference)"),
    };
    let files = if options.registries_conf.is_empty() {
        crate::registries_conf::files_from_process().map_err(failed)?
    } else {
        let mut listed = options.registries_conf.iter().cloned();
        crate::registries_conf::ConfFiles {
            main: listed.next(),
            drop_ins: listed.collect(),
        }
    };
    RegistriesConf::load(&files).map_err(failed)
}

/// Opens `location` with `options`' credentials, or else those stored for it:
/// the environment, the containers auth file or docker's config, in that
/// order; anonymous when none names this registry.
pub(crate) fn open_with_stored_credentials(
    location: &str,
    mut options: TransportOptions,
) -> Result<RegistryTransport, TransportError> {
    if options.credentials.is_none() {
        let found = crate::credentials::CredentialSources::from_process()
            .lookup(location)
            .map_err(|e| TransportError::Protocol {
                location: location.to_string(),
                message: format!("reading credentials: {e}"),
            })?;
        if let Some((credentials, source)) = found {
            tracing::debug!(
                "{location}: credentials of {} from {source}",
                credentials.username
            );
            options.credentials = Some(credentials);
        }
    }
    RegistryTransport::new(location, &options)
}

/// Registers [`RegistryFactory`] under `docker`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_transport(Arc::new(RegistryFactory))
}

/// One registry.
pub struct RegistryTransport {
    location: String,
    http: Http,
    auth: Authenticator,
}

impl std::fmt::Debug for RegistryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryTransport")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// Which bound a request gets.
#[derive(Clone, Copy)]
enum Kind {
    /// The request deadline for all of it.
    Small,
    /// Only the idle timeout: a blob download.
    Download,
}

impl RegistryTransport {
    /// Opens `location` (`host[:port]`). Nothing is sent until the first request.
    pub fn new(location: &str, options: &TransportOptions) -> Result<Self, TransportError> {
        if location.is_empty() || location.contains('/') || location.contains("://") {
            return Err(TransportError::Protocol {
                location: location.to_string(),
                message: format!("{location:?} is not a registry location: use host[:port]"),
            });
        }
        Ok(RegistryTransport {
            location: location.to_string(),
            http: Http::new(location, options)?,
            auth: Authenticator::new(location, options.credentials.clone(), options.insecure),
        })
    }

    fn protocol_error(&self, message: String) -> TransportError {
        TransportError::Protocol {
            location: self.location.clone(),
            message,
        }
    }

    /// Sends a request needing `scope` with its authorization. On a 401 it
    /// learns the challenge or renews the token, and sends once more; `make`
    /// builds the request each time.
    async fn send(
        &self,
        scope: &Scope,
        object: &Object,
        kind: Kind,
        make: impl Fn() -> RequestBuilder,
    ) -> Result<Response, TransportError> {
        let mut stale: Option<HeaderValue> = None;
        for attempt in 0..2 {
            let authorization = self
                .auth
                .authorization(&self.http, scope, object, stale.as_ref())
                .await?;
            let mut request = make();
            let sent = match authorization {
                Authorization::Header(value) => {
                    request = request.header(AUTHORIZATION, value.clone());
                    Some(value)
                }
                Authorization::None => None,
            };
            let res = match kind {
                Kind::Small => self.http.send_small(request, object).await?,
                Kind::Download => self.http.send_download(request, object).await?,
            };
            let refused = matches!(
                res.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            );
            if refused && !self.http.is_registry_url(res.url()) {
                // A host the registry redirected to: its challenge is not the
                // registry's, and our credentials are not the ones it wants.
                return Err(self.protocol_error(format!(
                    "{object}: the registry redirected to {}, which refused the request with HTTP {}",
                    res.url(),
                    res.status().as_u16()
                )));
            }
            if res.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let changed = self.auth.learn(res.headers()).await;
                // A refused token is renewed once; refused credentials are not
                // sent again (a lockout counts every try).
                let token = sent
                    .as_ref()
                    .is_some_and(|v| v.as_bytes().starts_with(b"Bearer "));
                if changed || token {
                    stale = sent;
                    continue;
                }
            }
            return Ok(res);
        }
        unreachable!("the second attempt returns")
    }

    /// `/v2/<repository>` + `rest`.
    fn repository_url(&self, repository: &str, rest: &str) -> String {
        self.http.url(&format!("/v2/{repository}{rest}"))
    }

    /// Starts an upload session and returns its URL (`Location`), accepting
    /// `201` as well as `202` (ECR answers `201`).
    async fn start_upload(
        &self,
        repository: &str,
        object: &Object,
    ) -> Result<reqwest::Url, TransportError> {
        let url = self.repository_url(repository, "/blobs/uploads/");
        let scope = Scope::new(repository, Access::Push);
        let res = self
            .send(&scope, object, Kind::Small, || {
                self.http.client().post(&url).header(CONTENT_LENGTH, 0)
            })
            .await?;
        if !(res.status() == StatusCode::ACCEPTED || res.status() == StatusCode::CREATED) {
            return Err(self.http.error(object, res).await);
        }
        let url = upload_location(&res)
            .map_err(|message| self.protocol_error(format!("{object}: {message}")))?;
        if self.http.is_downgrade(&url) {
            return Err(self.protocol_error(format!(
                "{object}: the registry placed the upload at {url}, which is not https: refused"
            )));
        }
        Ok(url)
    }

    /// Every page of a tag list (see `list_tags`).
    async fn all_tag_pages(
        &self,
        repository: &str,
        object: &Object,
    ) -> Result<Vec<String>, TransportError> {
        let scope = Scope::new(repository, Access::Pull);
        let first = self.repository_url(repository, &format!("/tags/list?n={TAG_PAGE}"));
        let mut url = reqwest::Url::parse(&first)
            .map_err(|e| self.protocol_error(format!("{object}: bad URL {first:?}: {e}")))?;
        let mut visited = HashSet::new();
        let mut seen = HashSet::new();
        let mut tags = Vec::new();
        for _ in 0..MAX_TAG_PAGES {
            visited.insert(url.clone());
            let res = self
                .send(&scope, object, Kind::Small, || {
                    self.http.client().get(url.clone())
                })
                .await?;
            if !res.status().is_success() {
                return Err(self.http.error(object, res).await);
            }
            let next = next_link(res.headers());
            let body = self
                .http
                .read_capped(res, MAX_TAG_PAGE_SIZE, object)
                .await?;
            let page: TagPage = serde_json::from_slice(&body).map_err(|e| {
                self.protocol_error(format!("{object}: the answer is not a tag list: {e}"))
            })?;
            for tag in page.tags.unwrap_or_default() {
                // The distribution spec's tag grammar, which also bounds its length.
                if !is_tag(&tag) {
                    return Err(self.protocol_error(format!(
                        "{object}: the registry lists {:?}, which is not a tag",
                        tag.chars().take(140).collect::<String>()
                    )));
                }
                if seen.insert(tag.clone()) {
                    tags.push(tag);
                }
            }
            if tags.len() > MAX_TAGS {
                return Err(self.protocol_error(format!(
                    "{object}: more than {MAX_TAGS} tags, more than sarde lists"
                )));
            }
            let Some(next) = next else {
                return Ok(tags);
            };
            let next = url.join(&next).map_err(|e| {
                self.protocol_error(format!("{object}: bad Link to the next page {next:?}: {e}"))
            })?;
            if !self.http.is_registry_url(&next) {
                return Err(self.protocol_error(format!(
                    "{object}: the next page is not on the registry ({next}): refused"
                )));
            }
            if visited.contains(&next) {
                return Err(
                    self.protocol_error(format!("{object}: the pages loop (Link back to {next})"))
                );
            }
            url = next;
        }
        Err(self.protocol_error(format!(
            "{object}: more than {MAX_TAG_PAGES} pages, more than sarde follows"
        )))
    }

    /// Best effort: tells the registry to drop an upload session.
    async fn cancel_upload(&self, repository: &str, mut url: reqwest::Url, object: &Object) {
        // The session's own state (`_state`) stays; only our `digest` goes.
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "digest")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        let scope = Scope::new(repository, Access::Push);
        let res = if self.http.is_registry_url(&url) {
            self.send(&scope, object, Kind::Small, || {
                self.http.client().delete(url.clone())
            })
            .await
        } else {
            // A session elsewhere gets no credentials.
            self.http
                .send_small(self.http.client().delete(url.clone()), object)
                .await
        };
        if let Ok(res) = res {
            tracing::debug!(status = %res.status(), "cancelled upload of {object}");
        }
    }
}

#[async_trait]
impl Transport for RegistryTransport {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn will_access(&self, repository: &str, access: Access) {
        self.auth.declare(Scope::new(repository, access));
    }

    async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<RawManifest, TransportError> {
        // Before any URL is made: an insecure registry's scheme.
        self.http.ready().await;
        let object = Object::Manifest {
            repository: repository.to_string(),
            reference: reference.to_string(),
            media_type: None,
        };
        let by_digest = reference.parse::<Digest>().ok();
        let url = self.repository_url(repository, &format!("/manifests/{reference}"));
        let accept = MANIFEST_TYPES.join(", ");
        let scope = Scope::new(repository, Access::Pull);
        let res = self
            .send(&scope, &object, Kind::Small, || {
                self.http.client().get(&url).header(ACCEPT, &accept)
            })
            .await?;
        if !res.status().is_success() {
            return Err(self.http.error(&object, res).await);
        }
        let announced = res
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<Digest>().ok());
        let content_type = res
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string());
        let bytes = self
            .http
            .read_capped(res, MAX_MANIFEST_SIZE, &object)
            .await?;
        // The digest asked for wins over the registry's header, which wins over
        // the bytes' own sha256; whatever is claimed must be what arrived.
        let digest = by_digest
            .or(announced)
            .unwrap_or_else(|| Digest::sha256_of(&bytes));
        let actual = digest_with(digest.algorithm(), &bytes);
        if actual != digest {
            return Err(TransportError::Mismatch {
                location: self.location.clone(),
                object: object.to_string(),
                what: "digest",
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(RawManifest {
            media_type: manifest_media_type(&bytes, content_type.as_deref()),
            digest,
            bytes,
        })
    }

    async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        // Before any URL is made: an insecure registry's scheme.
        self.http.ready().await;
        let object = Object::Manifest {
            repository: repository.to_string(),
            reference: reference.to_string(),
            media_type: Some(manifest.media_type.clone()),
        };
        let by_digest = reference.parse::<Digest>().ok();
        for expected in std::iter::once(&manifest.digest).chain(by_digest.as_ref()) {
            let actual = digest_with(expected.algorithm(), &manifest.bytes);
            if *expected != actual {
                return Err(TransportError::Mismatch {
                    location: self.location.clone(),
                    object: object.to_string(),
                    what: "digest",
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        let content_type = HeaderValue::from_str(&manifest.media_type).map_err(|_| {
            TransportError::UnsupportedMediaType {
                location: self.location.clone(),
                media_type: format!("{:?} (not a header value)", manifest.media_type),
            }
        })?;
        let url = self.repository_url(repository, &format!("/manifests/{reference}"));
        let body = bytes::Bytes::from(manifest.bytes.clone());
        let scope = Scope::new(repository, Access::Push);
        let res = self
            .send(&scope, &object, Kind::Small, || {
                self.http
                    .client()
                    .put(&url)
                    .header(CONTENT_TYPE, content_type.clone())
                    .body(body.clone())
            })
            .await?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(self.http.error(&object, res).await)
        }
    }

    /// Follows the `Link` header page by page, as the distribution spec says;
    /// a chain that loops, leaves the registry or never ends is refused, and the
    /// whole listing has a deadline of five request timeouts.
    async fn list_tags(&self, repository: &str) -> Result<Vec<String>, TransportError> {
        // Before any URL is made: an insecure registry's scheme.
        self.http.ready().await;
        let object = Object::Tags {
            repository: repository.to_string(),
        };
        let deadline = self.http.bounds().request.saturating_mul(5);
        tokio::time::timeout(deadline, self.all_tag_pages(repository, &object))
            .await
            .unwrap_or_else(|_| {
                Err(TransportError::Transient {
                    location: self.location.clone(),
                    message: format!(
                        "{object}: not listed within {} s (five request-timeouts)",
                        deadline.as_secs_f64()
                    ),
                    retry_after: None,
                })
            })
    }

    /// `GET /v2/<name>/referrers/<digest>`: the distribution spec's referrers
    /// API. A registry without it answers 404 (Debian's distribution 2.8 does;
    /// 400 and 405 are taken the same way): `None`, and callers use the tag
    /// schema. Only the first page is read; a registry that ignores the
    /// `artifactType` filter is filtered here.
    async fn list_referrers(
        &self,
        repository: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<Vec<Descriptor>>, TransportError> {
        self.http.ready().await;
        let object = Object::Referrers {
            repository: repository.to_string(),
            digest: subject.clone(),
        };
        let base = self.repository_url(repository, &format!("/referrers/{subject}"));
        let mut url = reqwest::Url::parse(&base)
            .map_err(|e| self.protocol_error(format!("{object}: bad URL {base:?}: {e}")))?;
        if let Some(kind) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", kind);
        }
        let scope = Scope::new(repository, Access::Pull);
        let res = self
            .send(&scope, &object, Kind::Small, || {
                self.http
                    .client()
                    .get(url.clone())
                    .header(ACCEPT, media_types::IMAGE_INDEX)
            })
            .await?;
        match res.status() {
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST | StatusCode::METHOD_NOT_ALLOWED => {
                tracing::debug!(
                    "{}: {object}: no referrers API ({})",
                    self.location,
                    res.status()
                );
                return Ok(None);
            }
            status if !status.is_success() => return Err(self.http.error(&object, res).await),
            _ => {}
        }
        let body = self
            .http
            .read_capped(res, MAX_MANIFEST_SIZE, &object)
            .await?;
        let index: sarde_api::oci::ImageIndex = serde_json::from_slice(&body).map_err(|e| {
            self.protocol_error(format!("{object}: the answer is not an image index: {e}"))
        })?;
        let mut referrers = index.manifests;
        if let Some(kind) = artifact_type {
            referrers.retain(|d| d.artifact_type.as_deref() == Some(kind));
        }
        Ok(Some(referrers))
    }

    async fn blob_exists(
        &self,
        repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        // Before any URL is made: an insecure registry's scheme.
        self.http.ready().await;
        let object = Object::Blob {
            repository: repository.to_string(),
            digest: blob.digest.clone(),
        };
        let url = self.repository_url(repository, &format!("/blobs/{}", blob.digest));
        let scope = Scope::new(repository, Access::Pull);
        let res = self
            .send(&scope, &object, Kind::Small, || {
                self.http.client().head(&url)
            })
            .await?;
        match res.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => match content_length(&res) {
                Some(n) if n != blob.size => Err(TransportError::Mismatch {
                    location: self.location.clone(),
                    object: object.to_string(),
                    what: "size",
                    expected: blob.size.to_string(),
                    actual: n.to_string(),
                }),
                _ => Ok(true),
            },
            _ => Err(self.http.error(&object, res).await),
        }
    }

    async fn get_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, TransportError> {
        // Before any URL is made: an insecure registry's scheme.
        self.http.ready().await;
        let object = Object::Blob {
            repository: repository.to_string(),
            digest: blob.digest.clone(),
        };
        if offset > blob.size {
            return Err(self.protocol_error(format!(
                "offset {offset} is past the end of {object} ({} bytes)",
                blob.size
            )));
        }
        if offset == blob.size {
            // Nothing left; a Range there would be unsatisfiable (416).
            return Ok(Box::pin(tokio::io::empty()));
        }
        let url = self.repository_url(repository, &format!("/blobs/{}", blob.digest));
        let scope = Scope::new(repository, Access::Pull);
        let res = self
            .send(&scope, &object, Kind::Download, || {
                let request = self.http.client().get(&url);
                if offset > 0 {
                    request.header(RANGE, format!("bytes={offset}-"))
                } else {
                    request
                }
            })
            .await?;
        let (skip, expected_length) = match res.status() {
            // A registry that ignores the Range sends everything: drop what the
            // caller has.
            StatusCode::OK => (offset, blob.size),
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let start = res
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(offset) {
                    return Err(self.protocol_error(format!(
                        "{object}: asked for the bytes from {offset} on, the registry answered the range {:?}",
                        res.headers().get(CONTENT_RANGE)
                    )));
                }
                (0, blob.size - offset)
            }
            _ => return Err(self.http.error(&object, res).await),
        };
        // More than the descriptor says is another blob; less is a short
        // answer that ends early and is resumed.
        if let Some(length) = content_length(&res) {
            if length > expected_length {
                return Err(TransportError::Mismatch {
                    location: self.location.clone(),
                    object: format!("{object} (nothing stored)"),
                    what: "length the registry announces",
                    expected: expected_length.to_string(),
                    actual: length.to_string(),
                });
            }
        }
        let idle = self.http.bounds().idle;
        let stream = res.bytes_stream().map(move |r| {
            r.map_err(|e| {
                if e.is_timeout() {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no byte for idle-timeout {} s", idle.as_secs_f64()),
                    )
                } else {
                    io::Error::other(e)
                }
            })
        });
        Ok(Box::pin(Exact::new(
            Box::pin(StreamReader::new(stream)),
            skip,
            blob.size - offset,
            object.to_string(),
            self.http.bounds(),
        )))
    }

    async fn put_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        data: BlobReader,
    ) -> Result<(), TransportError> {
        // Before any URL is made: an insecure registry's scheme.
        self.http.ready().await;
        // No HEAD here: the copy engine asks `blob_exists` first and decides.
        let object = Object::Blob {
            repository: repository.to_string(),
            digest: blob.digest.clone(),
        };
        let mut url = self.start_upload(repository, &object).await?;
        url.query_pairs_mut()
            .append_pair("digest", &blob.digest.to_string());

        let failure: Arc<Mutex<Option<TransportError>>> = Arc::default();
        let watch = UploadWatch::new();
        let body = checked_stream(
            data,
            blob.clone(),
            self.location.clone(),
            object.clone(),
            failure.clone(),
            watch.clone(),
        );
        // The upload session was just opened with this authorization: the body
        // streams once, so there is no second attempt here.
        let scope = Scope::new(repository, Access::Push);
        let mut request = self
            .http
            .upload_client()
            .put(url.clone())
            .header(CONTENT_LENGTH, blob.size)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body));
        // Credentials only to the registry itself, not to an upload session the
        // registry placed on another host (a storage service).
        if self.http.is_registry_url(&url) {
            if let Authorization::Header(value) = self
                .auth
                .authorization(&self.http, &scope, &object, None)
                .await?
            {
                request = request.header(AUTHORIZATION, value);
            }
        }
        let sent = self
            .http
            .send_upload(request, &watch, blob.size, &object)
            .await;
        let ours = failure.lock().ok().and_then(|mut f| f.take());
        let res = match (sent, ours) {
            // Our own check stopped the stream: that is the real reason.
            (_, Some(e)) | (Err(e), None) => {
                self.cancel_upload(repository, url, &object).await;
                return Err(e);
            }
            (Ok(res), None) => res,
        };
        if res.status() == StatusCode::CREATED || res.status() == StatusCode::ACCEPTED {
            return Ok(());
        }
        let e = self.http.error(&object, res).await;
        self.cancel_upload(repository, url, &object).await;
        Err(e)
    }

    /// The login handshake as docker does it: `GET /v2/`; on a Basic challenge the
    /// same with the credentials, on a Bearer challenge a token request for no
    /// scope with them. Only a refusal of the credentials is `Unauthorized`.
    async fn check_credentials(&self) -> Result<(), TransportError> {
        // Before any URL is made: an insecure registry's scheme.
        self.http.ready().await;
        self.auth.check_credentials(&self.http).await
    }

    /// `201` is a mount. Anything else means "upload instead": `202` opened an
    /// upload session, which is cancelled; a 401 or 404 means the source can't
    /// be read with these credentials (the token covers the source's `pull`,
    /// declared here, so a registry that allows it mounts).
    async fn mount_blob(
        &self,
        repository: &str,
        from_repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        // Before any URL is made: an insecure registry's scheme.
        self.http.ready().await;
        let object = Object::Blob {
            repository: repository.to_string(),
            digest: blob.digest.clone(),
        };
        self.auth.declare(Scope::new(from_repository, Access::Pull));
        let mut url = reqwest::Url::parse(&self.repository_url(repository, "/blobs/uploads/"))
            .map_err(|e| self.protocol_error(format!("{object}: bad URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("mount", &blob.digest.to_string())
            .append_pair("from", from_repository);
        let scope = Scope::new(repository, Access::Push);
        let res = self
            .send(&scope, &object, Kind::Small, || {
                self.http
                    .client()
                    .post(url.clone())
                    .header(CONTENT_LENGTH, 0)
            })
            .await?;
        match res.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                if let Ok(session) = upload_location(&res) {
                    self.cancel_upload(repository, session, &object).await;
                }
                Ok(false)
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(self.http.error(&object, res).await)
            }
            s => {
                tracing::debug!(
                    "{}: mount of {object} from {from_repository}: {s}",
                    self.location
                );
                Ok(false)
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct TagPage {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// The URL of an upload session from the `Location` of an answer: absolute,
/// or a path relative to the request.
fn upload_location(res: &Response) -> Result<reqwest::Url, String> {
    let location = res
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or("the registry opened an upload without a Location")?;
    res.url()
        .join(location)
        .map_err(|e| format!("bad upload Location {location:?}: {e}"))
}

/// The `rel="next"` target of a `Link` header (`<url>; rel="next"`).
pub(crate) fn next_link(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|link| {
            let (target, params) = link.trim().split_once(';')?;
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            });
            let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
            is_next.then(|| target.to_string())
        })
}

/// The digest of `bytes` with `algorithm`.
fn digest_with(algorithm: Algorithm, bytes: &[u8]) -> Digest {
    match algorithm {
        Algorithm::Sha256 => Digest::sha256_of(bytes),
        Algorithm::Sha512 => {
            let hex: String = sha2::Sha512::digest(bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("sha512:{hex}")
                .parse()
                .expect("a sha512 digest of 128 hex digits parses")
        }
    }
}

/// The media type of manifest bytes: the manifest's own `mediaType`, else the
/// answer's `Content-Type` when it names a manifest, else inferred from the
/// shape (OCI manifests may omit it).
fn manifest_media_type(bytes: &[u8], content_type: Option<&str>) -> String {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    if let Some(m) = value.get("mediaType").and_then(|m| m.as_str()) {
        return m.to_string();
    }
    if let Some(t) = content_type.filter(|t| MANIFEST_TYPES.contains(t)) {
        return t.to_string();
    }
    if value.get("manifests").is_some() {
        media_types::IMAGE_INDEX.to_string()
    } else {
        media_types::IMAGE_MANIFEST.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha512_digests_are_computed() {
        let d = digest_with(Algorithm::Sha512, b"abc");
        assert!(d.to_string().starts_with("sha512:ddaf35a193617aba"), "{d}");
        assert_eq!(
            digest_with(Algorithm::Sha256, b"abc"),
            Digest::sha256_of(b"abc")
        );
    }

    #[test]
    fn media_type_from_the_manifest_then_the_header_then_the_shape() {
        let typed = br#"{"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(manifest_media_type(typed, None), media_types::IMAGE_INDEX);
        let bare = br#"{"schemaVersion":2,"config":{}}"#;
        assert_eq!(
            manifest_media_type(bare, Some(media_types::DOCKER_MANIFEST)),
            media_types::DOCKER_MANIFEST
        );
        assert_eq!(
            manifest_media_type(bare, Some("text/plain")),
            media_types::IMAGE_MANIFEST
        );
        assert_eq!(
            manifest_media_type(br#"{"manifests":[]}"#, None),
            media_types::IMAGE_INDEX
        );
    }
}
