//! The `docker` transport: one registry (`host[:port]`) as a [`Transport`].
//!
//! oci-client does the authentication handshake (anonymous, Basic, bearer
//! tokens), manifest pulls and pushes with exact bytes, cross-repository mounts
//! and tag lists. Three operations are made here instead, with a reqwest client
//! built with the same TLS settings and the credentials oci-client negotiated:
//!
//! - `blob_exists`: oci-client's `blob_exists` hides the `Content-Length` of the
//!   HEAD answer, so the size can't be checked;
//! - `put_blob`: oci-client's streamed monolithic push insists on `201` for the
//!   upload session (ECR answers `201` where `202` is expected), cannot cancel a
//!   failed session, and would let a short or wrong stream reach the registry.
//!   Here the digest is checked before the last byte leaves, so a wrong stream
//!   aborts the request and nothing is committed;
//! - `get_blob`: oci-client hashes a download from its first byte, and the copy
//!   engine hashes every blob itself (it must, to resume a partial file), so the
//!   same bytes were hashed twice: 9% of a pull's CPU.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderValue, LOCATION, RANGE};
use sarde_api::digest::Algorithm;
use sarde_api::oci::{Descriptor, media_types};
use sarde_api::transport::{BlobReader, RawManifest, TransportOptions};
use sarde_api::{Digest, Registrar, RegistryError, Transport, TransportError, TransportFactory};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio_util::io::StreamReader;

use crate::error::{Object, map_oci_error, map_reqwest, map_status, retry_after};

/// The URL scheme of this transport.
pub const SCHEME: &str = "docker";

/// Manifest types asked for; sarde copies whatever of these it gets unchanged.
const ACCEPT: &[&str] = &[
    media_types::IMAGE_MANIFEST,
    media_types::IMAGE_INDEX,
    media_types::DOCKER_MANIFEST,
    media_types::DOCKER_MANIFEST_LIST,
];
/// Bytes read from the caller per upload chunk: small, so memory stays bounded.
const UPLOAD_CHUNK: usize = 256 * 1024;
/// How long a negotiated token is reused for our own requests; registry tokens
/// live at least a minute.
const TOKEN_TTL: Duration = Duration::from_secs(50);
/// Tags asked for per page.
const TAG_PAGE: usize = 1000;
const USER_AGENT: &str = concat!("sarde/", env!("CARGO_PKG_VERSION"));

/// Opens `docker` transports.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegistryFactory;

impl TransportFactory for RegistryFactory {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn description(&self) -> &str {
        "OCI distribution registries: docker://<host[:port]>/<repository>[:tag]"
    }

    fn open(
        &self,
        location: &str,
        options: &TransportOptions,
    ) -> Result<Box<dyn Transport>, TransportError> {
        if options.credentials.is_some() {
            return Ok(Box::new(RegistryTransport::new(location, options)?));
        }
        // Credentials from the environment, the containers auth file or docker's
        // config, in that order; anonymous when none names this registry.
        let found = crate::credentials::CredentialSources::from_process()
            .lookup(location)
            .map_err(|e| TransportError::Protocol {
                location: location.to_string(),
                message: format!("reading credentials: {e}"),
            })?;
        let mut options = options.clone();
        if let Some((credentials, source)) = found {
            tracing::debug!(
                "{location}: credentials of {} from {source}",
                credentials.username
            );
            options.credentials = Some(credentials);
        }
        Ok(Box::new(RegistryTransport::new(location, &options)?))
    }
}

/// Registers [`RegistryFactory`] under `docker`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_transport(Arc::new(RegistryFactory))
}

/// One registry.
pub struct RegistryTransport {
    location: String,
    client: Client,
    /// For the requests oci-client can't make; same TLS settings, no cookies
    /// (Harbor's CSRF check fails on clients that keep them).
    http: reqwest::Client,
    auth: RegistryAuth,
    scheme: &'static str,
    /// Authorization for our own requests, per repository and operation.
    tokens: Mutex<HashMap<(String, bool), (Authz, Instant)>>,
}

/// How our own requests authenticate.
#[derive(Clone)]
enum Authz {
    None,
    Bearer(HeaderValue),
    /// The registry asked for Basic (or nothing) and we have credentials.
    Basic(String, String),
}

impl std::fmt::Debug for RegistryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryTransport")
            .field("location", &self.location)
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl RegistryTransport {
    /// Opens `location` (`host[:port]`). Nothing is sent until the first request.
    pub fn new(location: &str, options: &TransportOptions) -> Result<Self, TransportError> {
        let protocol_error = |message: String| TransportError::Protocol {
            location: location.to_string(),
            message,
        };
        if location.is_empty() || location.contains('/') || location.contains("://") {
            return Err(protocol_error(format!(
                "{location:?} is not a registry location: use host[:port]"
            )));
        }
        let mut certificates = Vec::new();
        if let Some(path) = &options.ca_file {
            let data = std::fs::read(path).map_err(|source| TransportError::Io {
                location: location.to_string(),
                context: format!("reading the CA file {}", path.display()),
                source,
            })?;
            certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let tls_error = |message: String| TransportError::Tls {
            location: location.to_string(),
            message,
        };
        let config = ClientConfig {
            protocol: if options.insecure {
                ClientProtocol::HttpsExcept(vec![location.to_string()])
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: options.insecure,
            extra_root_certificates: certificates.clone(),
            // Never pick one manifest out of an index: sarde copies indexes whole.
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            // Idle time between reads, not the whole transfer.
            read_timeout: Some(Duration::from_secs(300)),
            user_agent: USER_AGENT,
            ..Default::default()
        };
        let client = Client::try_from(config)
            .map_err(|e| tls_error(format!("cannot set up the HTTP client: {e}")))?;

        let mut extra = Vec::new();
        for c in &certificates {
            extra.push(
                reqwest::Certificate::from_pem(&c.data)
                    .map_err(|e| tls_error(format!("the CA file is not PEM: {e}")))?,
            );
        }
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(options.insecure)
            .tls_certs_merge(extra)
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(300))
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| tls_error(format!("cannot set up the HTTP client: {e}")))?;

        let auth = match &options.credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        Ok(RegistryTransport {
            location: location.to_string(),
            client,
            http,
            auth,
            scheme: if options.insecure { "http" } else { "https" },
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// An oci-client reference; a reference containing `:` is a digest.
    fn reference(&self, repository: &str, reference: &str) -> Reference {
        if reference.contains(':') {
            Reference::with_digest(
                self.location.clone(),
                repository.to_string(),
                reference.to_string(),
            )
        } else {
            Reference::with_tag(
                self.location.clone(),
                repository.to_string(),
                reference.to_string(),
            )
        }
    }

    /// `scheme://host/v2/<repository>`, the host as oci-client resolves it.
    fn repository_url(&self, r: &Reference) -> String {
        format!(
            "{}://{}/v2/{}",
            self.scheme,
            r.resolve_registry(),
            r.repository()
        )
    }

    fn oci_error(&self, object: &Object, e: OciDistributionError) -> TransportError {
        map_oci_error(&self.location, object, e)
    }

    fn reqwest_error(&self, object: &Object, e: &reqwest::Error) -> TransportError {
        map_reqwest(&self.location, object, e)
    }

    /// Turns a failed answer of our own requests into an error.
    async fn response_error(&self, object: &Object, res: reqwest::Response) -> TransportError {
        let status = res.status().as_u16();
        let after = retry_after(res.headers());
        let body = error_body(res).await;
        map_status(&self.location, object, Some(status), &body, after)
    }

    /// The `Authorization` value for our own request, negotiated by oci-client
    /// (bearer token, or Basic when the registry asks for that) and cached briefly.
    async fn authorization(
        &self,
        r: &Reference,
        op: RegistryOperation,
        object: &Object,
    ) -> Result<Authz, TransportError> {
        let key = (r.repository().to_string(), op == RegistryOperation::Push);
        if let Ok(tokens) = self.tokens.lock() {
            if let Some((value, at)) = tokens.get(&key) {
                if at.elapsed() < TOKEN_TTL {
                    return Ok(value.clone());
                }
            }
        }
        let token = self
            .client
            .auth(r, &self.auth, op)
            .await
            .map_err(|e| self.oci_error(object, e))?;
        let value = match (token, &self.auth) {
            (Some(token), _) => HeaderValue::from_str(&format!("Bearer {token}"))
                .map(Authz::Bearer)
                .unwrap_or(Authz::None),
            (None, RegistryAuth::Basic(user, password)) => {
                Authz::Basic(user.clone(), password.clone())
            }
            (None, _) => Authz::None,
        };
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(key, (value.clone(), Instant::now()));
        }
        Ok(value)
    }

    /// Forgets cached authorization after a 401, so the next call negotiates anew.
    fn forget_authorization(&self, repository: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.retain(|(repo, _), _| repo != repository);
        }
    }

    /// Sends one of our own requests with authorization.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        r: &Reference,
        op: RegistryOperation,
        object: &Object,
    ) -> Result<reqwest::Response, TransportError> {
        let request = match self.authorization(r, op, object).await? {
            Authz::Bearer(value) => request.header(reqwest::header::AUTHORIZATION, value),
            Authz::Basic(user, password) => request.basic_auth(user, Some(password)),
            Authz::None => request,
        };
        let res = request
            .send()
            .await
            .map_err(|e| self.reqwest_error(object, &e))?;
        if res.status() == StatusCode::UNAUTHORIZED {
            self.forget_authorization(r.repository());
        }
        Ok(res)
    }

    /// Starts an upload session and returns its URL (`Location`), accepting
    /// `201` as well as `202`.
    async fn start_upload(
        &self,
        r: &Reference,
        object: &Object,
    ) -> Result<reqwest::Url, TransportError> {
        let url = format!("{}/blobs/uploads/", self.repository_url(r));
        let res = self
            .send(
                self.http.post(&url).header(CONTENT_LENGTH, 0),
                r,
                RegistryOperation::Push,
                object,
            )
            .await?;
        if !(res.status() == StatusCode::ACCEPTED || res.status() == StatusCode::CREATED) {
            return Err(self.response_error(object, res).await);
        }
        let location = res
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| TransportError::Protocol {
                location: self.location.clone(),
                message: format!("{object}: the registry opened an upload without a Location"),
            })?;
        // Location may be absolute, or a path relative to the request.
        res.url()
            .join(location)
            .map_err(|e| TransportError::Protocol {
                location: self.location.clone(),
                message: format!("{object}: bad upload Location {location:?}: {e}"),
            })
    }
}

#[async_trait]
impl Transport for RegistryTransport {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<RawManifest, TransportError> {
        let object = Object::Manifest {
            repository: repository.to_string(),
            reference: reference.to_string(),
            media_type: None,
        };
        let r = self.reference(repository, reference);
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(&r, &self.auth, ACCEPT)
            .await
            .map_err(|e| self.oci_error(&object, e))?;
        let digest: Digest = digest.parse().map_err(|e| TransportError::Protocol {
            location: self.location.clone(),
            message: format!("{object}: the registry gave an invalid digest: {e}"),
        })?;
        // oci-client checks the digest against the registry's header and a digest
        // reference; check the bytes ourselves too for sha256.
        if digest.algorithm() == Algorithm::Sha256 {
            let actual = Digest::sha256_of(&bytes);
            if actual != digest {
                return Err(TransportError::Mismatch {
                    location: self.location.clone(),
                    object: object.to_string(),
                    what: "digest",
                    expected: digest.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok(RawManifest {
            media_type: manifest_media_type(&bytes),
            digest,
            bytes: bytes.to_vec(),
        })
    }

    async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        let object = Object::Manifest {
            repository: repository.to_string(),
            reference: reference.to_string(),
            media_type: Some(manifest.media_type.clone()),
        };
        let actual = Digest::sha256_of(&manifest.bytes);
        let by_digest = reference.parse::<Digest>().ok();
        for expected in std::iter::once(&manifest.digest).chain(by_digest.as_ref()) {
            if expected.algorithm() == Algorithm::Sha256 && *expected != actual {
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
        let r = self.reference(repository, reference);
        // oci-client pushes raw bytes only after a pull or auth stored the credentials.
        self.client
            .store_auth_if_needed(r.resolve_registry(), &self.auth)
            .await;
        self.client
            .push_manifest_raw(&r, manifest.bytes.clone(), content_type)
            .await
            .map_err(|e| self.oci_error(&object, e))?;
        Ok(())
    }

    async fn list_tags(&self, repository: &str) -> Result<Vec<String>, TransportError> {
        let object = Object::Tags {
            repository: repository.to_string(),
        };
        let r = self.reference(repository, "latest");
        let mut tags: Vec<String> = Vec::new();
        // Page with `n`/`last` until a page is empty or doesn't move on (a
        // registry that ignores `last`), since oci-client drops the Link header.
        loop {
            let last = tags.last().cloned();
            let page = self
                .client
                .list_tags(&r, &self.auth, Some(TAG_PAGE), last.as_deref())
                .await
                .map_err(|e| self.oci_error(&object, e))?;
            let before = tags.len();
            for tag in page.tags {
                if !tags.contains(&tag) {
                    tags.push(tag);
                }
            }
            if tags.len() == before || tags.last() == last.as_ref() {
                break;
            }
        }
        Ok(tags)
    }

    async fn blob_exists(
        &self,
        repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        let object = Object::Blob {
            repository: repository.to_string(),
            digest: blob.digest.clone(),
        };
        let r = self.reference(repository, &blob.digest.to_string());
        let url = format!("{}/blobs/{}", self.repository_url(&r), blob.digest);
        let res = self
            .send(self.http.head(&url), &r, RegistryOperation::Pull, &object)
            .await?;
        match res.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => {
                let length = res
                    .headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                match length {
                    Some(n) if n != blob.size => Err(TransportError::Mismatch {
                        location: self.location.clone(),
                        object: object.to_string(),
                        what: "size",
                        expected: blob.size.to_string(),
                        actual: n.to_string(),
                    }),
                    _ => Ok(true),
                }
            }
            _ => Err(self.response_error(&object, res).await),
        }
    }

    async fn get_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, TransportError> {
        let object = Object::Blob {
            repository: repository.to_string(),
            digest: blob.digest.clone(),
        };
        if offset > blob.size {
            return Err(TransportError::Protocol {
                location: self.location.clone(),
                message: format!(
                    "offset {offset} is past the end of {object} ({} bytes)",
                    blob.size
                ),
            });
        }
        if offset == blob.size {
            // Nothing left; a Range there would be unsatisfiable (416).
            return Ok(Box::pin(tokio::io::empty()));
        }
        let r = self.reference(repository, &blob.digest.to_string());
        let url = format!("{}/blobs/{}", self.repository_url(&r), blob.digest);
        let mut request = self.http.get(&url);
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let res = self
            .send(request, &r, RegistryOperation::Pull, &object)
            .await?;
        let skip = match res.status() {
            // A registry that ignores the Range sends everything: drop what the
            // caller has.
            StatusCode::OK => offset,
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let start = res
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(offset) {
                    return Err(TransportError::Protocol {
                        location: self.location.clone(),
                        message: format!(
                            "{object}: asked for the bytes from {offset} on, the registry answered the range {:?}",
                            res.headers().get(CONTENT_RANGE)
                        ),
                    });
                }
                0
            }
            _ => return Err(self.response_error(&object, res).await),
        };
        let stream = res.bytes_stream().map(|r| r.map_err(io::Error::other));
        let reader = StreamReader::new(stream);
        Ok(Box::pin(Exact {
            inner: Box::pin(reader),
            skip,
            remaining: blob.size - offset,
            what: object.to_string(),
        }))
    }

    async fn put_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        data: BlobReader,
    ) -> Result<(), TransportError> {
        // No HEAD here: the copy engine asks `blob_exists` first and decides.
        let object = Object::Blob {
            repository: repository.to_string(),
            digest: blob.digest.clone(),
        };
        let r = self.reference(repository, &blob.digest.to_string());
        let mut url = self.start_upload(&r, &object).await?;
        url.query_pairs_mut()
            .append_pair("digest", &blob.digest.to_string());

        let failure: Arc<Mutex<Option<TransportError>>> = Arc::default();
        let body = checked_stream(
            data,
            blob.clone(),
            self.location.clone(),
            object.clone(),
            failure.clone(),
        );
        let sent = self
            .send(
                self.http
                    .put(url.clone())
                    .header(CONTENT_LENGTH, blob.size)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(reqwest::Body::wrap_stream(body)),
                &r,
                RegistryOperation::Push,
                &object,
            )
            .await;
        let ours = failure.lock().ok().and_then(|mut f| f.take());
        let res = match (sent, ours) {
            // Our own check stopped the stream: that is the real reason.
            (_, Some(e)) => {
                self.cancel_upload(&r, url, &object).await;
                return Err(e);
            }
            (Err(e), None) => {
                self.cancel_upload(&r, url, &object).await;
                return Err(e);
            }
            (Ok(res), None) => res,
        };
        if res.status() == StatusCode::CREATED || res.status() == StatusCode::ACCEPTED {
            return Ok(());
        }
        let e = self.response_error(&object, res).await;
        self.cancel_upload(&r, url, &object).await;
        Err(e)
    }

    /// The login handshake as docker does it: `GET /v2/`; on a Basic challenge the
    /// same with the credentials, on a Bearer challenge a token request for no
    /// scope with them. Only a refusal of the credentials is `Unauthorized`.
    async fn check_credentials(&self) -> Result<(), TransportError> {
        let object = Object::Login;
        let r = self.reference("library/check", "latest");
        let url = format!("{}://{}/v2/", self.scheme, r.resolve_registry());
        let res = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| self.reqwest_error(&object, &e))?;
        if res.status().is_success() {
            return Ok(());
        }
        if res.status() != StatusCode::UNAUTHORIZED {
            return Err(self.response_error(&object, res).await);
        }
        let challenge = res
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let RegistryAuth::Basic(user, password) = &self.auth else {
            return Err(TransportError::Unauthorized {
                location: self.location.clone(),
                object: object.to_string(),
            });
        };
        let (scheme, params) = parse_challenge(&challenge);
        let request = if scheme.eq_ignore_ascii_case("bearer") {
            let realm = params
                .get("realm")
                .cloned()
                .ok_or_else(|| TransportError::Protocol {
                    location: self.location.clone(),
                    message: format!("a Bearer challenge without realm: {challenge:?}"),
                })?;
            let mut query = vec![("account", user.clone())];
            if let Some(service) = params.get("service") {
                query.push(("service", service.clone()));
            }
            self.http.get(realm).query(&query)
        } else {
            self.http.get(&url)
        };
        let res = request
            .basic_auth(user, Some(password))
            .send()
            .await
            .map_err(|e| self.reqwest_error(&object, &e))?;
        match res.status() {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(TransportError::Unauthorized {
                location: self.location.clone(),
                object: object.to_string(),
            }),
            _ => Err(self.response_error(&object, res).await),
        }
    }

    /// oci-client's mount: `201` is a mount; the `202` upload session a registry
    /// answers when it can't mount surfaces as a spec violation and means
    /// "upload instead". That session is left to expire (oci-client drops its URL).
    async fn mount_blob(
        &self,
        repository: &str,
        from_repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        let object = Object::Blob {
            repository: repository.to_string(),
            digest: blob.digest.clone(),
        };
        let digest = blob.digest.to_string();
        let target = self.reference(repository, &digest);
        let source = self.reference(from_repository, &digest);
        self.client
            .store_auth_if_needed(target.resolve_registry(), &self.auth)
            .await;
        match self.client.mount_blob(&target, &source, &digest).await {
            Ok(()) => Ok(true),
            // 201 without a Location: mounted all the same.
            Err(OciDistributionError::RegistryNoLocationError) => Ok(true),
            Err(OciDistributionError::SpecViolationError(_)) => Ok(false),
            Err(e) => Err(self.oci_error(&object, e)),
        }
    }
}

impl RegistryTransport {
    /// Best effort: tells the registry to drop a failed upload session.
    async fn cancel_upload(&self, r: &Reference, mut url: reqwest::Url, object: &Object) {
        url.set_query(None);
        if let Ok(res) = self
            .send(self.http.delete(url), r, RegistryOperation::Push, object)
            .await
        {
            tracing::debug!(status = %res.status(), "cancelled upload of {object}");
        }
    }
}

/// The media type of manifest bytes. oci-client's raw pull drops the
/// `Content-Type`, so it is read from the manifest's own `mediaType`, or
/// inferred from its shape when absent (allowed for OCI manifests).
fn manifest_media_type(bytes: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    if let Some(m) = value.get("mediaType").and_then(|m| m.as_str()) {
        return m.to_string();
    }
    if value.get("manifests").is_some() {
        media_types::IMAGE_INDEX.to_string()
    } else {
        media_types::IMAGE_MANIFEST.to_string()
    }
}

/// The upload body: reads the caller's data in small chunks, counts and hashes
/// it, and fails instead of sending the last chunk when the digest is wrong, or
/// as soon as the data runs longer or shorter than announced — so the request
/// aborts and the registry never commits anything else. The reason goes to
/// `failure` because reqwest reports only "body error".
fn checked_stream(
    data: BlobReader,
    blob: Descriptor,
    location: String,
    object: Object,
    failure: Arc<Mutex<Option<TransportError>>>,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    struct State {
        data: BlobReader,
        hasher: Option<Sha256>,
        total: u64,
        done: bool,
    }
    let hasher = (blob.digest.algorithm() == Algorithm::Sha256).then(Sha256::new);
    let state = State {
        data,
        hasher,
        total: 0,
        done: false,
    };
    futures_util::stream::unfold(state, move |mut st| {
        let (blob, location, object, failure) = (
            blob.clone(),
            location.clone(),
            object.clone(),
            failure.clone(),
        );
        async move {
            if st.done {
                return None;
            }
            let fail = |e: TransportError| {
                let message = e.to_string();
                if let Ok(mut f) = failure.lock() {
                    *f = Some(e);
                }
                io::Error::other(message)
            };
            let mismatch =
                |what: &'static str, expected: String, actual: String| TransportError::Mismatch {
                    location: location.clone(),
                    object: format!("{object} (nothing stored)"),
                    what,
                    expected,
                    actual,
                };
            let read_error = |source: io::Error| TransportError::Io {
                location: location.clone(),
                context: format!("reading the data of {object}"),
                source,
            };
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let n = match st.data.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    st.done = true;
                    return Some((Err(fail(read_error(e))), st));
                }
            };
            st.total += n as u64;
            if n == 0 && st.total < blob.size {
                st.done = true;
                let e = mismatch(
                    "size of the data",
                    blob.size.to_string(),
                    st.total.to_string(),
                );
                return Some((Err(fail(e)), st));
            }
            if st.total > blob.size {
                st.done = true;
                let e = mismatch(
                    "size of the data",
                    blob.size.to_string(),
                    format!("more than {}", blob.size),
                );
                return Some((Err(fail(e)), st));
            }
            buf.truncate(n);
            if let Some(h) = st.hasher.as_mut() {
                h.update(&buf);
            }
            if st.total == blob.size {
                // The last chunk: check everything before it leaves.
                st.done = true;
                if let Some(h) = st.hasher.take() {
                    let actual = Digest::from_sha256(h.finalize().into());
                    if actual != blob.digest {
                        let e = mismatch(
                            "digest of the data",
                            blob.digest.to_string(),
                            actual.to_string(),
                        );
                        return Some((Err(fail(e)), st));
                    }
                }
                let mut probe = [0u8; 1];
                match st.data.read(&mut probe).await {
                    Ok(0) => {}
                    Ok(_) => {
                        let e = mismatch(
                            "size of the data",
                            blob.size.to_string(),
                            format!("more than {}", blob.size),
                        );
                        return Some((Err(fail(e)), st));
                    }
                    Err(e) => return Some((Err(fail(read_error(e))), st)),
                }
                if buf.is_empty() {
                    return None;
                }
            }
            Some((Ok(Bytes::from(buf)), st))
        }
    })
    .boxed()
}

/// Bytes of an error answer read for its message: a registry (or a proxy) may send
/// a large or endless body with an error status.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// The start of an error answer's body, as text.
async fn error_body(mut res: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_LIMIT {
        match res.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_LIMIT);
    String::from_utf8_lossy(&body).into_owned()
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` answer.
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

/// A blob download that yields exactly `remaining` bytes after skipping `skip`,
/// and fails if the registry's answer ends early.
struct Exact {
    inner: Pin<Box<dyn AsyncRead + Send>>,
    skip: u64,
    remaining: u64,
    what: String,
}

impl AsyncRead for Exact {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.skip > 0 {
            let mut scratch = [0u8; 8192];
            let want = scratch
                .len()
                .min(usize::try_from(this.skip).unwrap_or(usize::MAX));
            let mut rb = ReadBuf::new(&mut scratch[..want]);
            match this.inner.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} ended before the resume offset", this.what),
                    )));
                }
                Poll::Ready(Ok(())) => this.skip -= rb.filled().len() as u64,
                other => return other,
            }
        }
        if this.remaining == 0 || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match this.inner.as_mut().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let mut n = (buf.filled().len() - before) as u64;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} ended {} bytes early", this.what, this.remaining),
                    )));
                }
                if n > this.remaining {
                    // Never more than the descriptor says.
                    n = this.remaining;
                    buf.set_filled(before + n as usize);
                }
                this.remaining -= n;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// `Bearer realm="…",service="…"` → (`Bearer`, {realm, service}).
fn parse_challenge(header: &str) -> (String, HashMap<String, String>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_string());
        rest = next.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
    }
    (scheme.to_string(), params)
}

#[cfg(test)]
mod challenge_tests {
    use super::parse_challenge;

    #[test]
    fn bearer_and_basic_challenges_parse() {
        let (scheme, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(scheme, "Bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
        let (scheme, p) = parse_challenge(r#"Basic realm="sarde-test""#);
        assert_eq!(scheme, "Basic");
        assert_eq!(p["realm"], "sarde-test");
    }
}

#[cfg(test)]
mod range_tests {
    use super::content_range_start;

    #[test]
    fn content_range_start_is_read() {
        assert_eq!(content_range_start("bytes 1024-2047/4096"), Some(1024));
        assert_eq!(content_range_start("bytes 0-9/*"), Some(0));
        assert_eq!(content_range_start(" bytes  77-99/100 "), Some(77));
        assert_eq!(content_range_start("items 1-2/3"), None);
        assert_eq!(content_range_start("bytes */4096"), None);
    }
}
