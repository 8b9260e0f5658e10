//! Authentication as docker and containerd do it.
//!
//! The registry says how in its `WWW-Authenticate` challenge (learned once per
//! registry from `GET /v2/`, or from any 401): `Basic`, then credentials go with
//! every request; `Bearer`, then a token server (the challenge's realm) issues
//! tokens scoped to repositories and actions. One token request carries every
//! scope the operation declared (a push's target and the repositories it mounts
//! from, see `Transport::will_access`): a token for the target alone makes
//! every cross-repository mount fail and re-sends the blob. Tokens are cached in
//! memory until shortly before `expires_in`, renewed once on a 401, and fetched
//! by one request at a time, so parallel blob transfers share one token.
//!
//! Credentials go only to the registry's own host and to its token realm, and to
//! a realm on another host only over TLS (unless the registry is insecure).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use sarde_api::TransportError;
use sarde_api::limits::MAX_TOKEN_RESPONSE_SIZE;
use sarde_api::transport::{Access, Credentials};
use serde::Deserialize;

use crate::error::Object;
use crate::http::Http;

/// Tokens without `expires_in` live 60 s (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A token is renewed this long before it expires, so it never expires in flight.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// The longest a token is kept, whatever its server says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Access to one repository, as a token scope.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Scope {
    pub repository: String,
    pub access: Access,
}

impl Scope {
    pub fn new(repository: &str, access: Access) -> Scope {
        Scope {
            repository: repository.to_string(),
            access,
        }
    }

    /// `repository:NAME:ACTIONS` as a challenge names it; other resource types
    /// (`registry:catalog:*`) are not scopes sarde asks for.
    fn parse(text: &str) -> Option<Scope> {
        let rest = text.strip_prefix("repository:")?;
        let (repository, actions) = rest.rsplit_once(':')?;
        if repository.is_empty() {
            return None;
        }
        let push = actions.split(',').any(|a| a == "push" || a == "*");
        Some(Scope::new(
            repository,
            if push { Access::Push } else { Access::Pull },
        ))
    }

    /// `repository:NAME:pull` or `repository:NAME:pull,push`.
    pub fn param(&self) -> String {
        let actions = match self.access {
            Access::Pull => "pull",
            Access::Push => "pull,push",
        };
        format!("repository:{}:{actions}", self.repository)
    }

    /// Whether a token for `scopes` also allows this.
    fn covered_by(&self, scopes: &BTreeSet<Scope>) -> bool {
        scopes.iter().any(|s| {
            s.repository == self.repository && (s.access == Access::Push || self.access == s.access)
        })
    }
}

/// Adds `scope` to `set`, a push scope replacing a pull scope of the same repository.
fn insert_scope(set: &mut BTreeSet<Scope>, scope: Scope) {
    if scope.covered_by(set) {
        return;
    }
    set.retain(|s| s.repository != scope.repository);
    set.insert(scope);
}

/// How the registry wants to be authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// No challenge: anonymous access works.
    None,
    Basic,
    Bearer {
        realm: reqwest::Url,
        service: Option<String>,
    },
}

/// What one request carries.
#[derive(Clone)]
pub(crate) enum Authorization {
    None,
    Header(HeaderValue),
}

pub(crate) struct Token {
    header: HeaderValue,
    scopes: BTreeSet<Scope>,
    renew_at: Instant,
}

#[derive(Default)]
struct State {
    challenge: Option<Challenge>,
    token: Option<Token>,
}

/// The authentication state of one registry.
pub(crate) struct Authenticator {
    location: String,
    credentials: Option<Credentials>,
    insecure: bool,
    /// Scopes the current operations declared.
    declared: Mutex<BTreeSet<Scope>>,
    /// Held while a challenge is learned or a token fetched: one at a time.
    state: tokio::sync::Mutex<State>,
}

impl Authenticator {
    pub fn new(location: &str, credentials: Option<Credentials>, insecure: bool) -> Self {
        Authenticator {
            location: location.to_string(),
            credentials,
            insecure,
            declared: Mutex::new(BTreeSet::new()),
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    pub fn declare(&self, scope: Scope) {
        if let Ok(mut declared) = self.declared.lock() {
            insert_scope(&mut declared, scope);
        }
    }

    /// The `Authorization` for a request needing `scope`. `stale` is the header a
    /// request just sent and got 401 for: that token is dropped and a new one
    /// fetched (once; the caller does not ask again).
    pub async fn authorization(
        &self,
        http: &Http,
        scope: &Scope,
        object: &Object,
        stale: Option<&HeaderValue>,
    ) -> Result<Authorization, TransportError> {
        let mut state = self.state.lock().await;
        if state.challenge.is_none() {
            state.challenge = Some(self.ping(http, object).await?.1);
        }
        // A refused token goes; what it covered is asked for again.
        let mut carried = BTreeSet::new();
        if let (Some(stale), Some(token)) = (stale, &state.token) {
            if token.header == stale {
                carried = token.scopes.clone();
                state.token = None;
            }
        }
        match state.challenge.clone().unwrap_or(Challenge::None) {
            Challenge::None => Ok(Authorization::None),
            Challenge::Basic => Ok(match &self.credentials {
                Some(c) => Authorization::Header(basic(c)),
                None => Authorization::None,
            }),
            Challenge::Bearer { realm, service } => {
                if let Some(token) = &state.token {
                    if scope.covered_by(&token.scopes) && Instant::now() < token.renew_at {
                        return Ok(Authorization::Header(token.header.clone()));
                    }
                }
                // Everything declared, everything the last token had, and this.
                let mut scopes = self.declared.lock().map(|d| d.clone()).unwrap_or_default();
                let last = state.token.as_ref().map(|t| &t.scopes).unwrap_or(&carried);
                for s in last {
                    insert_scope(&mut scopes, s.clone());
                }
                insert_scope(&mut scopes, scope.clone());
                let token = match self
                    .fetch_token(http, &realm, service.as_deref(), &scopes)
                    .await
                {
                    Ok(token) => token,
                    // Some token servers refuse a whole request for one scope
                    // they won't grant: ask again for this request's own. (A 401
                    // means the credentials: asking again would only count
                    // twice towards a lockout.)
                    Err(TransportError::Forbidden { .. }) if scopes.len() > 1 => {
                        let own = BTreeSet::from([scope.clone()]);
                        self.fetch_token(http, &realm, service.as_deref(), &own)
                            .await?
                    }
                    Err(e) => return Err(e),
                };
                let header = token.header.clone();
                state.token = Some(token);
                Ok(Authorization::Header(header))
            }
        }
    }

    /// Learns the challenge of a 401 answer of the registry itself (never of a
    /// host it redirected to), and the repository scopes it says it wants.
    /// Returns whether the scheme differs from what was known (then the request is
    /// worth sending again with the new scheme).
    pub async fn learn(&self, headers: &reqwest::header::HeaderMap) -> bool {
        let header = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // `scope="repository:a:pull repository:b:pull,push"`, as containerd uses it.
        if let Some(wanted) = parse_challenge(header).1.get("scope") {
            for scope in wanted.split(' ').filter_map(Scope::parse) {
                self.declare(scope);
            }
        }
        let Ok(challenge) = self.challenge_of(header) else {
            return false;
        };
        let mut state = self.state.lock().await;
        let changed = state.challenge.as_ref() != Some(&challenge);
        state.challenge = Some(challenge);
        changed
    }

    /// `GET /v2/`: 200 means anonymous access, 401 carries the challenge. Also
    /// returns the status, for the login check.
    async fn ping(
        &self,
        http: &Http,
        object: &Object,
    ) -> Result<(StatusCode, Challenge), TransportError> {
        let url = http.url("/v2/");
        let res = http.send_small(http.client().get(url), object).await?;
        let status = res.status();
        if !http.is_registry_url(res.url()) && !status.is_success() {
            // A redirect elsewhere: its challenge is not the registry's.
            return Err(http.error(object, res).await);
        }
        let challenge = match status {
            StatusCode::UNAUTHORIZED => {
                let header = res
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                self.challenge_of(&header)?
            }
            s if s.is_success() => Challenge::None,
            // Some registries have no /v2/ answer of their own (a proxy's 404):
            // requests go anonymous and learn from their 401s.
            StatusCode::NOT_FOUND => Challenge::None,
            _ => return Err(http.error(object, res).await),
        };
        Ok((status, challenge))
    }

    fn challenge_of(&self, header: &str) -> Result<Challenge, TransportError> {
        let (scheme, params) = parse_challenge(header);
        if scheme.eq_ignore_ascii_case("basic") {
            return Ok(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(TransportError::Protocol {
                location: self.location.clone(),
                message: format!(
                    "the registry asks for authentication sarde does not speak: {header:?}"
                ),
            });
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| TransportError::Protocol {
                location: self.location.clone(),
                message: format!("a Bearer challenge without realm: {header:?}"),
            })?;
        let realm = reqwest::Url::parse(realm).map_err(|e| TransportError::Protocol {
            location: self.location.clone(),
            message: format!("the token realm {realm:?} is not a URL: {e}"),
        })?;
        if realm.scheme() != "https" && !(realm.scheme() == "http" && self.insecure) {
            return Err(TransportError::Protocol {
                location: self.location.clone(),
                message: format!(
                    "the token realm {realm} is not HTTPS: sarde sends no credentials or token requests there (if this registry is meant to be reached without TLS, add it to `insecure`)"
                ),
            });
        }
        Ok(Challenge::Bearer {
            realm,
            service: params.get("service").cloned(),
        })
    }

    /// One token request for `scopes`, with the credentials when there are some.
    async fn fetch_token(
        &self,
        http: &Http,
        realm: &reqwest::Url,
        service: Option<&str>,
        scopes: &BTreeSet<Scope>,
    ) -> Result<Token, TransportError> {
        let object = Object::Token {
            scopes: scopes.iter().map(Scope::param).collect(),
        };
        let mut url = realm.clone();
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for s in scopes {
                query.append_pair("scope", &s.param());
            }
            if let Some(c) = &self.credentials {
                query.append_pair("account", &c.username);
            }
        }
        let mut request = http.client().get(url);
        if let Some(c) = &self.credentials {
            request = request.header(AUTHORIZATION, basic(c));
        }
        tracing::debug!("{}: token request for {object}", self.location);
        let res = http.send_small(request, &object).await?;
        match res.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED => {
                return Err(TransportError::Unauthorized {
                    location: self.location.clone(),
                    object: object.to_string(),
                });
            }
            StatusCode::FORBIDDEN => {
                return Err(TransportError::Forbidden {
                    location: self.location.clone(),
                    object: object.to_string(),
                });
            }
            _ => return Err(http.error(&object, res).await),
        }
        let body = http
            .read_capped(res, MAX_TOKEN_RESPONSE_SIZE, &object)
            .await?;
        self.token_from_answer(&object, &body, scopes)
    }

    /// The token in a token server's answer (`body`, read whole and capped).
    pub(crate) fn token_from_answer(
        &self,
        object: &Object,
        body: &[u8],
        scopes: &BTreeSet<Scope>,
    ) -> Result<Token, TransportError> {
        let answer: TokenAnswer =
            serde_json::from_slice(body).map_err(|e| TransportError::Protocol {
                location: self.location.clone(),
                message: format!("{object}: the token server's answer is not a token: {e}"),
            })?;
        let non_empty = |t: Option<String>| t.filter(|t| !t.is_empty());
        let token = non_empty(answer.token)
            .or_else(|| non_empty(answer.access_token))
            .ok_or_else(|| TransportError::Protocol {
                location: self.location.clone(),
                message: format!("{object}: the token server's answer has no token"),
            })?;
        let mut header = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            TransportError::Protocol {
                location: self.location.clone(),
                message: format!("{object}: the token has characters a header can't carry"),
            }
        })?;
        header.set_sensitive(true);
        let lifetime = answer
            .expires_in
            .filter(|s| *s > 0)
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs)
            .min(MAX_TOKEN_LIFETIME);
        Ok(Token {
            header,
            scopes: scopes.clone(),
            renew_at: Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN.min(lifetime / 2)),
        })
    }

    /// The login check as `docker login` does it: a token request for no scope
    /// (Bearer) or `GET /v2/` with the credentials (Basic).
    pub async fn check_credentials(&self, http: &Http) -> Result<(), TransportError> {
        let object = Object::Login;
        let (status, challenge) = self.ping(http, &object).await?;
        if status == StatusCode::NOT_FOUND {
            return Err(TransportError::Protocol {
                location: self.location.clone(),
                message:
                    "`GET /v2/` answered 404: this is not an OCI registry (check the host and port)"
                        .to_string(),
            });
        }
        let Some(c) = &self.credentials else {
            return match challenge {
                Challenge::None => Ok(()),
                _ => Err(TransportError::Unauthorized {
                    location: self.location.clone(),
                    object: object.to_string(),
                }),
            };
        };
        let res = match &challenge {
            Challenge::None => return Ok(()),
            Challenge::Basic => {
                let request = http
                    .client()
                    .get(http.url("/v2/"))
                    .header(AUTHORIZATION, basic(c));
                http.send_small(request, &object).await?
            }
            Challenge::Bearer { realm, service } => {
                let mut url = realm.clone();
                url.query_pairs_mut().append_pair("account", &c.username);
                if let Some(service) = service {
                    url.query_pairs_mut().append_pair("service", service);
                }
                let request = http.client().get(url).header(AUTHORIZATION, basic(c));
                let token = Object::Token { scopes: Vec::new() };
                let res = http.send_small(request, &token).await?;
                let refused = matches!(
                    res.status(),
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
                );
                if !res.status().is_success() && !refused {
                    // The token server's own failure, not the registry's.
                    return Err(http.error(&token, res).await);
                }
                res
            }
        };
        match res.status() {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(TransportError::Unauthorized {
                location: self.location.clone(),
                object: object.to_string(),
            }),
            _ => Err(http.error(&object, res).await),
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

fn basic(c: &Credentials) -> HeaderValue {
    use base64::Engine as _;
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
    let mut value =
        HeaderValue::from_str(&format!("Basic {encoded}")).expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

/// `Bearer realm="…",service="…"` → (`Bearer`, {realm, service}).
pub(crate) fn parse_challenge(header: &str) -> (String, HashMap<String, String>) {
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
mod tests {
    use super::*;

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

    #[test]
    fn push_scopes_cover_pull_and_replace_it() {
        let mut set = BTreeSet::new();
        insert_scope(&mut set, Scope::new("a", Access::Pull));
        insert_scope(&mut set, Scope::new("b", Access::Pull));
        insert_scope(&mut set, Scope::new("a", Access::Push));
        insert_scope(&mut set, Scope::new("a", Access::Pull));
        let params: Vec<_> = set.iter().map(Scope::param).collect();
        assert_eq!(params, ["repository:a:pull,push", "repository:b:pull"]);
        assert!(Scope::new("a", Access::Pull).covered_by(&set));
        assert!(!Scope::new("b", Access::Push).covered_by(&set));
        assert!(!Scope::new("c", Access::Pull).covered_by(&set));
    }

    #[test]
    fn challenge_scopes_parse() {
        assert_eq!(
            Scope::parse("repository:a/b:push,pull"),
            Some(Scope::new("a/b", Access::Push))
        );
        assert_eq!(
            Scope::parse("repository:host:5000/x:pull"),
            Some(Scope::new("host:5000/x", Access::Pull))
        );
        assert_eq!(Scope::parse("registry:catalog:*"), None);
        assert_eq!(Scope::parse("repository::pull"), None);
    }

    #[test]
    fn a_plain_http_realm_is_refused_unless_insecure() {
        let header = r#"Bearer realm="http://auth.example/token",service="r""#;
        let secure = Authenticator::new("r.example", None, false);
        let e = secure.challenge_of(header).unwrap_err();
        assert!(e.to_string().contains("not HTTPS"), "{e}");
        let insecure = Authenticator::new("r.example", None, true);
        assert!(matches!(
            insecure.challenge_of(header).unwrap(),
            Challenge::Bearer { .. }
        ));
        assert_eq!(
            secure.challenge_of("Basic realm=x").unwrap(),
            Challenge::Basic
        );
        assert!(secure.challenge_of("Negotiate").is_err());
    }
}
