//! A token server for registries with token authentication (the "Docker registry v2
//! auth" of GitLab, Harbor, Docker Hub): `GET /token?service=S&scope=...` answers a
//! JWT signed with ES256 by a key generated per server, whose certificate a
//! [`TestRegistry`](crate::registry::TestRegistry) trusts through
//! [`RegistryOptions::token`](crate::registry::RegistryOptions::token).
//!
//! ```no_run
//! use sarde_e2e::registry::{RegistryOptions, TestRegistry};
//! use sarde_e2e::token::{Grant, TokenConfig, TokenServer};
//!
//! let tokens = TokenServer::start(TokenConfig {
//!     users: vec![("alice".into(), "secret".into())],
//!     grants: vec![
//!         Grant::user("alice", "private/*", &["pull", "push"]),
//!         Grant::everyone("public/*", &["pull"]),
//!     ],
//!     ..TokenConfig::default()
//! });
//! let registry = TestRegistry::start(RegistryOptions {
//!     token: Some(tokens.registry_auth()),
//!     ..RegistryOptions::default()
//! });
//! ```
//!
//! Plain HTTP/1.1 on std threads, one per connection, `Connection: close`. Every
//! request is recorded ([`TokenServer::requests`]). Dropping the server stops it.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use serde_json::{Value, json};

use crate::registry::{TokenAuth, openssl};

/// How a [`TokenServer`] authenticates and what it grants.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Accounts for HTTP basic authentication: (name, password).
    pub users: Vec<(String, String)>,
    /// What may be granted; a requested action is granted when any grant for the
    /// account (or for everyone) covers the repository and the action.
    pub grants: Vec<Grant>,
    /// `expires_in` of the answers and `exp - iat` of the tokens, in seconds.
    /// distribution accepts a token until 60 s after its `exp` (clock leeway).
    pub expires_in: u64,
    /// The `service` the registry announces. Tokens get the requested `service` as
    /// their `aud` (this one when none is given): distribution rejects others.
    pub service: String,
    /// The tokens' `iss`, which the registry requires to match its `issuer`.
    pub issuer: String,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            users: Vec::new(),
            grants: Vec::new(),
            expires_in: 300,
            service: "sarde-test-registry".into(),
            issuer: "sarde-test-issuer".into(),
        }
    }
}

/// Actions on repositories that one account (or everyone) may be granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `Some(name)`: only that authenticated user; `None`: everyone, anonymous
    /// requests included.
    pub account: Option<String>,
    /// An exact repository name, `prefix/*` for every repository below `prefix/`,
    /// or `*` for all.
    pub repository: String,
    /// `pull`, `push`, `delete`, ...; `*` grants whatever is asked.
    pub actions: Vec<String>,
}

impl Grant {
    /// A grant for the authenticated user `account`.
    pub fn user(account: &str, repository: &str, actions: &[&str]) -> Grant {
        Grant {
            account: Some(account.into()),
            repository: repository.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// A grant for everyone, anonymous requests included.
    pub fn everyone(repository: &str, actions: &[&str]) -> Grant {
        Grant {
            account: None,
            ..Grant::user("", repository, actions)
        }
    }

    fn applies_to(&self, account: Option<&str>, repository: &str) -> bool {
        let for_account = match &self.account {
            None => true,
            Some(name) => account == Some(name.as_str()),
        };
        let for_repository = match self.repository.strip_suffix('*') {
            Some("") => true,
            Some(prefix) if prefix.ends_with('/') => repository.starts_with(prefix),
            _ => self.repository == repository,
        };
        for_account && for_repository
    }

    fn allows(&self, action: &str) -> bool {
        self.actions.iter().any(|a| a == action || a == "*")
    }
}

/// One request the token server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The user name of the basic `Authorization` header; `None` for anonymous
    /// requests (no header, or not a basic one).
    pub account: Option<String>,
    /// The `service` parameter.
    pub service: Option<String>,
    /// Every single scope asked for (`repository:NAME:ACTIONS`), as sent, in order:
    /// repeated `scope` parameters and space-separated scopes in one parameter alike.
    pub scopes: Vec<String>,
    /// Whether a token was issued (false: wrong credentials, answered 401; or not
    /// `GET /token`).
    pub authorized: bool,
}

/// A running token server on 127.0.0.1, with its signing key and certificate in a
/// temporary directory (`signer.key`, `signer.pem`). Stops on drop.
pub struct TokenServer {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the connection threads need.
struct Shared {
    config: TokenConfig,
    signing_key: SigningKey,
    /// Base64 (standard, padded) DER of the signing certificate: the `x5c` chain.
    certificate: String,
    requests: Mutex<Vec<TokenRequest>>,
    next_token: AtomicU64,
}

impl TokenServer {
    /// Generates a P-256 key and a self-signed certificate for it (openssl CLI),
    /// binds a free port of 127.0.0.1 and serves until dropped.
    pub fn start(config: TokenConfig) -> TokenServer {
        let dir = tempfile::Builder::new()
            .prefix("sarde-token-")
            .tempdir()
            .expect("temporary directory for the token server");
        let (signing_key, certificate) = make_signer(dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port on 127.0.0.1");
        let addr = listener.local_addr().expect("token server address");
        let shared = Arc::new(Shared {
            config,
            signing_key,
            certificate,
            requests: Mutex::new(Vec::new()),
            next_token: AtomicU64::new(1),
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (shared, stopping) = (shared.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("token-server".into())
                .spawn(move || accept_loop(listener, shared, stopping))
                .expect("token server thread")
        };
        TokenServer {
            dir,
            addr,
            shared,
            stopping,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT/token`, the registry's `realm`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The service name: the registry's `service`, the tokens' `aud`.
    pub fn service(&self) -> &str {
        &self.shared.config.service
    }

    /// The tokens' `iss`.
    pub fn issuer(&self) -> &str {
        &self.shared.config.issuer
    }

    /// The PEM certificate of the signing key: the registry's `rootcertbundle`.
    pub fn root_cert_bundle(&self) -> PathBuf {
        self.dir.path().join("signer.pem")
    }

    /// What a registry needs to trust this server's tokens. The registry reads the
    /// certificate when it starts: keep the server alive as long as the registry.
    pub fn registry_auth(&self) -> TokenAuth {
        TokenAuth {
            realm: self.realm(),
            service: self.service().to_string(),
            issuer: self.issuer().to_string(),
            root_cert_bundle: self.root_cert_bundle(),
        }
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so that the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stopping: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("token-connection".into())
            .spawn(move || serve_connection(stream, &shared));
    }
}

/// Reads one request, answers it and closes the connection.
fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(request) = read_request(&stream) else {
        return;
    };
    let response = shared.answer(&request);
    let _ = write_response(&mut stream, &response);
}

/// The parts of an HTTP request the server looks at.
struct HttpRequest {
    method: String,
    path: String,
    /// Decoded query parameters, in order, repeated ones included.
    query: Vec<(String, String)>,
    /// The `Authorization` header.
    authorization: Option<String>,
}

impl HttpRequest {
    /// The values of query parameter `name`, in order.
    fn params<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.query
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct HttpResponse {
    status: u16,
    reason: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Value,
}

impl HttpResponse {
    fn json(status: u16, reason: &'static str, body: Value) -> HttpResponse {
        HttpResponse {
            status,
            reason,
            headers: Vec::new(),
            body,
        }
    }

    /// A body as distribution's errors look.
    fn error(status: u16, reason: &'static str, code: &str, message: &str) -> HttpResponse {
        let body = json!({"errors": [{"code": code, "message": message}]});
        HttpResponse::json(status, reason, body)
    }
}

fn read_request(stream: &TcpStream) -> Option<HttpRequest> {
    // Request line and headers only: tokens are fetched with GET, and the
    // connection closes after the answer, so a body can stay unread.
    let mut reader = BufReader::new(stream.take(64 * 1024));
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = path.to_string();
    let query = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(name), form_decode(value))
        })
        .collect();
    let mut authorization = None;
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(value.trim().to_string());
        }
    }
    Some(HttpRequest {
        method,
        path,
        query,
        authorization,
    })
}

fn write_response(stream: &mut TcpStream, response: &HttpResponse) -> std::io::Result<()> {
    let body = response.body.to_string();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.reason,
        body.len()
    );
    for (name, value) in &response.headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// Decodes `application/x-www-form-urlencoded`: `%XX` escapes and `+` for space
/// (clients encode the space between scopes either way).
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(byte) => {
                    out.push(byte);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Who asked: `Ok(None)` anonymous, `Ok(Some(user))` a user whose password
/// matched, `Err(user)` wrong credentials.
fn authenticate(
    authorization: Option<&str>,
    users: &[(String, String)],
) -> Result<Option<String>, String> {
    let Some(encoded) = authorization.and_then(basic_credentials) else {
        return Ok(None);
    };
    let Some(decoded) = STANDARD
        .decode(encoded)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
    else {
        return Ok(None);
    };
    // The password may contain ':', the user name may not (RFC 7617).
    let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
    if users.iter().any(|(u, p)| u == user && p == password) {
        Ok(Some(user.to_string()))
    } else {
        Err(user.to_string())
    }
}

/// The credentials of a `Basic` authorization (the scheme is case-insensitive).
fn basic_credentials(authorization: &str) -> Option<&str> {
    let (scheme, credentials) = authorization.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("basic")
        .then(|| credentials.trim())
}

/// `repository:NAME:ACTIONS` → (NAME, ACTIONS). Names have no ':' but the type may
/// carry a class (`repository(plugin)`); other types (`registry:catalog:*`) give
/// `None`.
fn parse_repository_scope(scope: &str) -> Option<(&str, Vec<&str>)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let is_repository = kind == "repository" || kind.starts_with("repository(");
    (is_repository && !name.is_empty()).then(|| {
        let actions = actions.split(',').filter(|a| !a.is_empty()).collect();
        (name, actions)
    })
}

impl Shared {
    fn answer(&self, request: &HttpRequest) -> HttpResponse {
        let service = request.params("service").next().map(str::to_string);
        let scopes: Vec<String> = request
            .params("scope")
            .flat_map(|value| value.split_whitespace())
            .map(str::to_string)
            .collect();
        let authentication = authenticate(request.authorization.as_deref(), &self.config.users);
        let mut record = TokenRequest {
            account: match &authentication {
                Ok(account) => account.clone(),
                Err(user) => Some(user.clone()),
            },
            service: service.clone(),
            scopes: scopes.clone(),
            authorized: false,
        };
        let response = if request.path != "/token" {
            HttpResponse::error(404, "Not Found", "NOT_FOUND", "only /token is served")
        } else if request.method != "GET" {
            // containerd tries the OAuth2 POST first and falls back to GET on 405.
            let mut response = HttpResponse::error(
                405,
                "Method Not Allowed",
                "UNSUPPORTED",
                "tokens are fetched with GET",
            );
            response.headers.push(("Allow", "GET".into()));
            response
        } else {
            match authentication {
                Err(user) => {
                    let mut response = HttpResponse::error(
                        401,
                        "Unauthorized",
                        "UNAUTHORIZED",
                        &format!("wrong user name or password for {user:?}"),
                    );
                    response.headers.push((
                        "WWW-Authenticate",
                        "Basic realm=\"sarde-test token server\"".into(),
                    ));
                    response
                }
                Ok(account) => {
                    record.authorized = true;
                    let access = self.granted_access(account.as_deref(), &scopes);
                    let audience = service.unwrap_or_else(|| self.config.service.clone());
                    self.token_response(account.as_deref(), &audience, access)
                }
            }
        };
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
        response
    }

    /// The `access` claim: per requested repository (in order of first request),
    /// the requested actions some grant allows; repositories with none are left out.
    fn granted_access(&self, account: Option<&str>, scopes: &[String]) -> Vec<Value> {
        let mut granted: Vec<(String, Vec<String>)> = Vec::new();
        for (name, actions) in scopes.iter().filter_map(|s| parse_repository_scope(s)) {
            let grants: Vec<&Grant> = self
                .config
                .grants
                .iter()
                .filter(|g| g.applies_to(account, name))
                .collect();
            let index = match granted.iter().position(|(n, _)| n == name) {
                Some(index) => index,
                None => {
                    granted.push((name.to_string(), Vec::new()));
                    granted.len() - 1
                }
            };
            let allowed = &mut granted[index].1;
            for action in actions {
                if grants.iter().any(|g| g.allows(action)) && !allowed.iter().any(|a| a == action) {
                    allowed.push(action.to_string());
                }
            }
        }
        granted
            .into_iter()
            .filter(|(_, actions)| !actions.is_empty())
            .map(|(name, actions)| json!({"type": "repository", "name": name, "actions": actions}))
            .collect()
    }

    fn token_response(
        &self,
        account: Option<&str>,
        audience: &str,
        access: Vec<Value>,
    ) -> HttpResponse {
        let issued_at = SystemTime::now();
        let now = issued_at
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_secs();
        let expires_in = self.config.expires_in;
        let serial = self.next_token.fetch_add(1, Ordering::SeqCst);
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [self.certificate]});
        let claims = json!({
            "iss": self.config.issuer,
            "sub": account.unwrap_or_default(),
            // distribution 2.8 reads `aud` as one string, not a list.
            "aud": audience,
            "exp": now + expires_in,
            "nbf": now,
            "iat": now,
            "jti": format!("sarde-test-{}-{now}-{serial}", std::process::id()),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        // JWS ES256 signatures are r || s, 64 bytes, not DER.
        let signature: Signature = self.signing_key.sign(signing_input.as_bytes());
        let token = format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        );
        HttpResponse::json(
            200,
            "OK",
            json!({
                "token": token,
                "access_token": token,
                "expires_in": expires_in,
                "issued_at": humantime::format_rfc3339_seconds(issued_at).to_string(),
            }),
        )
    }
}

/// A P-256 key (`signer.key`) and a self-signed certificate for it (`signer.pem`)
/// in `dir`: the key signs tokens, the certificate is both the registry's root
/// bundle and the tokens' `x5c` leaf. Returns the key and the certificate's DER in
/// base64.
fn make_signer(dir: &Path) -> (SigningKey, String) {
    let path = |name: &str| dir.join(name).to_str().expect("UTF-8 path").to_string();
    let (key, cert, der) = (path("signer.key"), path("signer.pem"), path("signer.der"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &cert,
        "-days",
        "3650",
        "-subj",
        "/CN=sarde-test token signer",
    ]);
    openssl(&["x509", "-in", &cert, "-outform", "DER", "-out", &der]);
    let pem = fs::read_to_string(&key).expect("signing key readable");
    // OpenSSL 3 writes PKCS#8 ("BEGIN PRIVATE KEY").
    let signing_key = SigningKey::from_pkcs8_pem(&pem).expect("signing key is PKCS#8 P-256");
    let certificate = STANDARD.encode(fs::read(&der).expect("certificate DER readable"));
    (signing_key, certificate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_form_values() {
        assert_eq!(
            form_decode("repository%3Aa%2Fb%3Apull%2Cpush+repository:c:pull"),
            "repository:a/b:pull,push repository:c:pull"
        );
        assert_eq!(form_decode("100%"), "100%");
        assert_eq!(form_decode("%zz"), "%zz");
    }

    #[test]
    fn parses_scopes() {
        assert_eq!(
            parse_repository_scope("repository:private/a:pull,push"),
            Some(("private/a", vec!["pull", "push"]))
        );
        assert_eq!(
            parse_repository_scope("repository(plugin):p:pull"),
            Some(("p", vec!["pull"]))
        );
        assert_eq!(parse_repository_scope("registry:catalog:*"), None);
        assert_eq!(parse_repository_scope("repository::pull"), None);
    }

    #[test]
    fn grants_match_accounts_and_prefixes() {
        let alice = Grant::user("alice", "private/*", &["pull", "push"]);
        assert!(alice.applies_to(Some("alice"), "private/a/b"));
        assert!(!alice.applies_to(Some("bob"), "private/a"));
        assert!(!alice.applies_to(None, "private/a"));
        assert!(!alice.applies_to(Some("alice"), "privateer"));
        let public = Grant::everyone("public/x", &["pull"]);
        assert!(public.applies_to(None, "public/x"));
        assert!(public.applies_to(Some("alice"), "public/x"));
        assert!(!public.applies_to(None, "public/y"));
        assert!(Grant::everyone("*", &["*"]).applies_to(None, "any/thing"));
    }

    #[test]
    fn authenticates_basic_credentials() {
        let users = vec![("alice".to_string(), "se:cret".to_string())];
        let basic = |s: &str| format!("Basic {}", STANDARD.encode(s));
        assert_eq!(
            authenticate(Some(&basic("alice:se:cret")), &users),
            Ok(Some("alice".into()))
        );
        assert_eq!(
            authenticate(Some(&basic("alice:wrong")), &users),
            Err("alice".into())
        );
        assert_eq!(
            authenticate(Some(&basic("bob:x")), &users),
            Err("bob".into())
        );
        assert_eq!(authenticate(Some("Bearer abc"), &users), Ok(None));
        assert_eq!(authenticate(None, &users), Ok(None));
    }
}
