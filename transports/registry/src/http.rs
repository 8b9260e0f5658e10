//! HTTP to one registry with bounded memory and time.
//!
//! - Every answer read into memory has a cap ([`Http::read_capped`]); error
//!   bodies are read only up to `MAX_ERROR_BODY_SIZE`.
//! - Connect timeout, and an idle timeout between bytes (reqwest's read timeout)
//!   for everything but uploads; small requests also get a total deadline. An
//!   upload is watched instead: it fails when the registry takes no byte of the
//!   body, or gives no answer after it, for the idle time.
//! - Redirects are followed up to `MAX_REDIRECTS`, never in a loop and never
//!   from https to http unless the registry is insecure; reqwest drops
//!   `Authorization` when a redirect leaves the host, so credentials and tokens
//!   never reach a blob store a registry redirects to.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::CONTENT_LENGTH;
use reqwest::{RequestBuilder, Response};
use sarde_api::TransportError;
use sarde_api::limits::{MAX_ERROR_BODY_SIZE, MAX_REDIRECTS, TimeBounds};
use sarde_api::transport::TransportOptions;

use crate::error::{Object, map_reqwest, map_status, retry_after};

const USER_AGENT: &str = concat!("sarde/", env!("CARGO_PKG_VERSION"));

/// The HTTP side of one registry.
pub(crate) struct Http {
    location: String,
    /// `https://host[:port]/`; for an insecure registry `http://…` until
    /// [`Http::ready`] finds TLS there (then unverified https, as docker and
    /// containers/image reach insecure registries).
    base: std::sync::RwLock<reqwest::Url>,
    insecure: bool,
    scheme_probed: tokio::sync::OnceCell<()>,
    /// Idle timeout between reads; for everything but uploads.
    client: reqwest::Client,
    /// Without the idle timeout, which would count the upload's own time.
    upload: reqwest::Client,
    bounds: TimeBounds,
}

impl Http {
    pub fn new(location: &str, options: &TransportOptions) -> Result<Http, TransportError> {
        let tls_error = |message: String| TransportError::Tls {
            location: location.to_string(),
            message,
        };
        let mut certificates = Vec::new();
        if let Some(path) = &options.ca_file {
            let data = std::fs::read(path).map_err(|source| TransportError::Io {
                location: location.to_string(),
                context: format!("reading the CA file {}", path.display()),
                source,
            })?;
            certificates.push(
                reqwest::Certificate::from_pem(&data)
                    .map_err(|e| tls_error(format!("the CA file is not PEM: {e}")))?,
            );
        }
        let bounds = options.bounds;
        let insecure = options.insecure;
        let builder = || {
            reqwest::Client::builder()
                .danger_accept_invalid_certs(insecure)
                .tls_certs_merge(certificates.clone())
                .connect_timeout(bounds.connect)
                .redirect(redirect_policy(insecure))
                .user_agent(USER_AGENT)
        };
        let client = builder()
            .read_timeout(bounds.idle)
            .build()
            .map_err(|e| tls_error(format!("cannot set up the HTTP client: {e}")))?;
        let upload = builder()
            .build()
            .map_err(|e| tls_error(format!("cannot set up the HTTP client: {e}")))?;
        let scheme = if insecure { "http" } else { "https" };
        let base = reqwest::Url::parse(&format!("{scheme}://{location}/")).map_err(|e| {
            TransportError::Protocol {
                location: location.to_string(),
                message: format!("{location:?} is not a registry location (host[:port]): {e}"),
            }
        })?;
        Ok(Http {
            location: location.to_string(),
            base: std::sync::RwLock::new(base),
            insecure,
            scheme_probed: tokio::sync::OnceCell::new(),
            client,
            upload,
            bounds,
        })
    }

    fn base(&self) -> reqwest::Url {
        self.base.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// For an insecure registry, once: https (unverified) when something
    /// answers HTTP over TLS there, else plain http; a secure registry is
    /// always https. Every network method of the registry transport calls it
    /// first, before it makes a URL.
    ///
    /// On an explicit port, plain http is asked first: a port that answers it
    /// (without a redirect to https) with anything but 400 (what TLS servers
    /// answer a plain request with, "HTTP request to an HTTPS server") speaks no
    /// TLS, and the TLS attempt, which costs more than the rest of a re-pull of
    /// an unchanged tag, is spared.
    pub async fn ready(&self) {
        if !self.insecure {
            return;
        }
        self.scheme_probed
            .get_or_init(|| async {
                let timeout = self.bounds.connect.min(Duration::from_secs(10));
                // Only on an explicit port: port 80 commonly redirects to https.
                if has_port(&self.location) {
                    let plain = self
                        .client
                        .get(self.url("/v2/"))
                        .timeout(timeout)
                        .send()
                        .await;
                    match plain {
                        Ok(answer)
                            if answer.status() != reqwest::StatusCode::BAD_REQUEST
                                && answer.url().scheme() == "http" =>
                        {
                            tracing::debug!(
                                "{}: insecure registry answers plain http",
                                self.location
                            );
                            return;
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!("{}: no plain http there ({e})", self.location),
                    }
                }
                let Ok(https) = reqwest::Url::parse(&format!("https://{}/", self.location)) else {
                    return;
                };
                let probe = self
                    .client
                    .get(format!("{https}v2/"))
                    .timeout(timeout)
                    .send()
                    .await;
                match probe {
                    Ok(_) => {
                        tracing::debug!(
                            "{}: insecure registry speaks TLS: https, unverified",
                            self.location
                        );
                        *self.base.write().unwrap_or_else(|e| e.into_inner()) = https;
                    }
                    Err(e) => tracing::debug!("{}: no TLS there ({e}): plain http", self.location),
                }
            })
            .await;
    }

    /// The registry's URL for `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base().as_str().trim_end_matches('/'))
    }

    /// Whether `url` is on the registry itself (scheme, host and port), where
    /// credentials and tokens may go; an upload session may live elsewhere.
    pub fn is_registry_url(&self, url: &reqwest::Url) -> bool {
        let base = self.base();
        base.scheme() == url.scheme()
            && base.host_str() == url.host_str()
            && base.port_or_known_default() == url.port_or_known_default()
    }

    /// Whether `url` would leave https for plain http on a registry reached
    /// over TLS.
    pub fn is_downgrade(&self, url: &reqwest::Url) -> bool {
        self.base().scheme() == "https" && url.scheme() != "https"
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn upload_client(&self) -> &reqwest::Client {
        &self.upload
    }

    pub fn bounds(&self) -> TimeBounds {
        self.bounds
    }

    /// Sends a small request: the whole of it, body included, within the
    /// request deadline.
    pub async fn send_small(
        &self,
        request: RequestBuilder,
        object: &Object,
    ) -> Result<Response, TransportError> {
        let started = Instant::now();
        let mut res = request
            .timeout(self.bounds.request)
            .send()
            .await
            .map_err(|e| self.request_error(object, &e, Some(started)))?;
        // For `read_capped`, to name the bound when reading the body times out.
        res.extensions_mut().insert(Started(started));
        Ok(res)
    }

    /// Sends a blob download: no deadline, only the idle timeout.
    pub async fn send_download(
        &self,
        request: RequestBuilder,
        object: &Object,
    ) -> Result<Response, TransportError> {
        request
            .send()
            .await
            .map_err(|e| self.request_error(object, &e, None))
    }

    /// Sends an upload of `size` bytes whose body calls [`UploadWatch::touch`]
    /// for every chunk it hands over: fails when the registry takes nothing for
    /// the idle time, or gives no answer after the last byte within the time a
    /// registry may need to commit the blob (object stores copy it: a request
    /// timeout plus a second per 64 MiB).
    pub async fn send_upload(
        &self,
        request: RequestBuilder,
        watch: &UploadWatch,
        size: u64,
        object: &Object,
    ) -> Result<Response, TransportError> {
        let idle = self.bounds.idle;
        let commit = self.bounds.request.max(idle) + Duration::from_secs(size / (64 << 20));
        // The clock starts now, not when the body was set up (a token fetch).
        watch.touch();
        let send = request.send();
        tokio::pin!(send);
        loop {
            let check = tokio::time::sleep(idle / 4);
            tokio::select! {
                res = &mut send => return res.map_err(|e| self.request_error(object, &e, None)),
                () = check => {
                    let (bound, what) = if watch.sent_all() {
                        (commit, "gave no answer after the last byte")
                    } else {
                        (idle, "took no data (idle-timeout)")
                    };
                    if watch.idle_for() >= bound {
                        return Err(TransportError::Transient {
                            location: self.location.clone(),
                            message: format!(
                                "{object}: the registry {what} for {} s",
                                bound.as_secs_f64()
                            ),
                            retry_after: None,
                        });
                    }
                }
            }
        }
    }

    /// The body of an answer, refused when it is larger than `limit`: read at
    /// most `limit + 1` bytes, whatever the server sends or announces.
    pub async fn read_capped(
        &self,
        mut res: Response,
        limit: u64,
        object: &Object,
    ) -> Result<Vec<u8>, TransportError> {
        let too_large = |seen: String| TransportError::Protocol {
            location: self.location.clone(),
            message: format!(
                "{object}: the answer is larger than {limit} bytes ({seen}), the most sarde reads for it: a broken or hostile registry or proxy"
            ),
        };
        if let Some(length) = content_length(&res) {
            if length > limit {
                return Err(too_large(format!("{length} announced")));
            }
        }
        let started = res.extensions().get::<Started>().map(|s| s.0);
        let mut body = Vec::new();
        loop {
            match res.chunk().await {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > limit {
                        return Err(too_large("more sent".to_string()));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => return Err(self.request_error(object, &e, started)),
            }
        }
    }

    /// Turns a failed answer into an error, reading at most
    /// `MAX_ERROR_BODY_SIZE` of its body for the message.
    pub async fn error(&self, object: &Object, mut res: Response) -> TransportError {
        let status = res.status().as_u16();
        let after = retry_after(res.headers());
        let mut body = Vec::new();
        // A registry (or a proxy) may send a large or endless body with an error.
        let read = async {
            while (body.len() as u64) < MAX_ERROR_BODY_SIZE {
                match res.chunk().await {
                    Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                    _ => break,
                }
            }
        };
        // Nor may it keep us waiting for the message: the status says enough.
        let _ = tokio::time::timeout(self.bounds.idle.min(Duration::from_secs(10)), read).await;
        error_answer(&self.location, object, status, after, body)
    }

    /// A failed request, naming the bound that ended it when it timed out.
    /// `deadline_from` is when a small request with the request deadline began.
    pub fn request_error(
        &self,
        object: &Object,
        e: &reqwest::Error,
        deadline_from: Option<Instant>,
    ) -> TransportError {
        if e.is_timeout() {
            let b = self.bounds;
            let bound = if e.is_connect() {
                format!(
                    "no connection within connect-timeout {} s",
                    b.connect.as_secs_f64()
                )
            } else if deadline_from.is_some_and(|t| t.elapsed() >= b.request) {
                format!(
                    "not done within request-timeout {} s",
                    b.request.as_secs_f64()
                )
            } else {
                format!("no byte for idle-timeout {} s", b.idle.as_secs_f64())
            };
            return TransportError::Transient {
                location: self.location.clone(),
                message: format!("{object}: timed out: {bound}"),
                retry_after: None,
            };
        }
        map_reqwest(&self.location, object, e)
    }
}

/// The announced length of an answer's body.
/// The error a failed answer's status, `Retry-After` and body (as read: at most
/// [`MAX_ERROR_BODY_SIZE`] of it is looked at) make.
pub(crate) fn error_answer(
    location: &str,
    object: &Object,
    status: u16,
    retry_after: Option<Duration>,
    mut body: Vec<u8>,
) -> TransportError {
    body.truncate(MAX_ERROR_BODY_SIZE as usize);
    let body = String::from_utf8_lossy(&body);
    map_status(location, object, Some(status), &body, retry_after)
}

pub(crate) fn content_length(res: &Response) -> Option<u64> {
    res.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Bounded redirects: no loops, no downgrade from https to http unless insecure.
fn redirect_policy(insecure: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let next = attempt.url().clone();
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!(
                "more than {MAX_REDIRECTS} redirects, the last to {next}"
            ));
        }
        if attempt.previous().contains(&next) {
            return attempt.error(format!("a redirect loop through {next}"));
        }
        let from_https = attempt
            .previous()
            .last()
            .is_some_and(|u| u.scheme() == "https");
        if from_https && next.scheme() != "https" && !insecure {
            return attempt.error(format!(
                "a redirect from https to {next}, which is not https: refused"
            ));
        }
        attempt.follow()
    })
}

/// When a small request began.
#[derive(Clone, Copy)]
struct Started(Instant);

/// When an upload last moved and whether its body is all out, for
/// [`Http::send_upload`].
#[derive(Clone)]
pub(crate) struct UploadWatch {
    start: Instant,
    last_ms: Arc<AtomicU64>,
    sent_all: Arc<AtomicBool>,
}

impl UploadWatch {
    pub fn new() -> UploadWatch {
        UploadWatch {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
            sent_all: Arc::default(),
        }
    }

    /// The body's last byte was handed over; from now on the registry commits.
    pub fn finish(&self) {
        self.touch();
        self.sent_all.store(true, Ordering::Relaxed);
    }

    fn sent_all(&self) -> bool {
        self.sent_all.load(Ordering::Relaxed)
    }

    /// Records progress now.
    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Whether a `host[:port]` location names its port (`[::1]` does not).
fn has_port(location: &str) -> bool {
    location.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':')
    })
}
