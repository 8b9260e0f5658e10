//! The private-registry helper itself: plain, htpasswd and TLS registries answer as
//! configured, stop and restart on the same port, and count blob downloads.

use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sarde_e2e::registry::{RegistryOptions, TestRegistry, require_registry_tools};
use sarde_e2e::token::{Grant, TokenConfig, TokenServer};
use serde_json::{Value, json};

fn tools(test: &str) -> bool {
    require_registry_tools(test)
}

/// Runs curl with `args`; returns its exit code and the HTTP status it printed.
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(args)
        .output()
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn status(args: &[&str]) -> String {
    curl(args).1
}

/// Uploads `data` as a blob of repository `repo` (monolithic: POST, then PUT with
/// the digest); returns its digest. `extra` goes to every curl (credentials, CA).
fn push_blob(registry: &TestRegistry, extra: &[&str], repo: &str, data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, data).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&file));
    let out = Command::new("curl")
        .args(["-s", "-f", "-o", "/dev/null", "-D", "-", "-X", "POST"])
        .args(extra)
        .arg(format!("{}/v2/{repo}/blobs/uploads/", registry.url()))
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "POST uploads failed: {out:?}");
    let headers = String::from_utf8_lossy(&out.stdout).into_owned();
    let location = headers
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("location")
                .then(|| value.trim().to_string())
        })
        .expect("Location header");
    let location = if location.starts_with('/') {
        format!("{}{location}", registry.url())
    } else {
        location
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    let put = format!("{location}{separator}digest={digest}");
    let mut args = vec![
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
    ];
    let at_file = format!("@{}", file.display());
    args.push(&at_file);
    args.extend_from_slice(extra);
    args.push(&put);
    assert_eq!(status(&args), "201", "PUT of the blob");
    digest
}

fn sha256_hex(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn plain_registry_serves_stops_restarts_and_counts_blob_gets() {
    if !tools("plain_registry_serves_stops_restarts_and_counts_blob_gets") {
        return;
    }
    let mut registry = TestRegistry::start(RegistryOptions::default());
    assert!(registry.address().starts_with("127.0.0.1:"));
    assert_eq!(registry.ca_file(), None);
    let v2 = format!("{}/v2/", registry.url());
    assert_eq!(status(&[&v2]), "200");

    let data = b"sardines in a cake\n".repeat(1000);
    let digest = push_blob(&registry, &[], "t", &data);
    let stored = registry.blob_data_path(&digest);
    assert!(stored.starts_with(registry.storage()));
    assert_eq!(std::fs::read(&stored).unwrap(), data);
    assert_eq!(registry.blob_gets(&digest), 0, "pushing is no GET");

    let blob = format!("{}/v2/t/blobs/{digest}", registry.url());
    assert_eq!(status(&["-I", &blob]), "200");
    assert_eq!(registry.blob_gets(&digest), 0, "HEAD does not count");
    assert_eq!(status(&[&blob]), "200");
    assert_eq!(registry.blob_gets(&digest), 1);
    assert_eq!(status(&["-r", "0-9", &blob]), "206");
    assert_eq!(registry.blob_gets(&digest), 2, "ranged GETs count");
    let missing = format!("{}/v2/t/blobs/sha256:{}", registry.url(), "0".repeat(64));
    assert_eq!(status(&[&missing]), "404");
    assert_eq!(registry.blob_gets(&digest), 2);

    registry.stop();
    let (code, http) = curl(&[&v2]);
    assert_eq!((code, http.as_str()), (7, "000"), "connection refused");
    registry.stop(); // twice is fine

    let address = registry.address();
    registry.restart();
    assert_eq!(registry.address(), address, "same port");
    assert_eq!(status(&[&v2]), "200");
    assert_eq!(status(&[&blob]), "200", "same storage");
    assert_eq!(registry.blob_gets(&digest), 3, "counts span restarts");

    // Deletes are enabled.
    assert_eq!(status(&["-X", "DELETE", &blob]), "202");
    assert_eq!(status(&[&blob]), "404");
    assert!(registry.log().contains("\"GET /v2/ HTTP/1.1\" 200"));
}

#[test]
fn htpasswd_registry_requires_credentials() {
    if !tools("htpasswd_registry_requires_credentials") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions {
        htpasswd: Some(("sarde".into(), "cake:pass".into())),
        tls: false,
        token: None,
        proxy: None,
    });
    let v2 = format!("{}/v2/", registry.url());
    assert_eq!(status(&[&v2]), "401");
    assert_eq!(status(&["-u", "sarde:wrong", &v2]), "401");
    assert_eq!(status(&["-u", "sarde:cake:pass", &v2]), "200");

    let creds = ["-u", "sarde:cake:pass"];
    let digest = push_blob(&registry, &creds, "a/b", b"authenticated");
    let blob = format!("{}/v2/a/b/blobs/{digest}", registry.url());
    assert_eq!(status(&[&blob]), "401");
    assert_eq!(registry.blob_gets(&digest), 0, "refused GETs do not count");
    assert_eq!(status(&["-u", "sarde:cake:pass", &blob]), "200");
    assert_eq!(registry.blob_gets(&digest), 1);
}

#[test]
fn tls_registry_is_trusted_through_its_ca() {
    if !tools("tls_registry_is_trusted_through_its_ca") {
        return;
    }
    let mut registry = TestRegistry::start(RegistryOptions {
        htpasswd: None,
        tls: true,
        token: None,
        proxy: None,
    });
    assert!(registry.url().starts_with("https://127.0.0.1:"));
    let ca = registry.ca_file().expect("a CA when tls");
    let ca = ca.to_str().unwrap().to_string();
    let v2 = format!("{}/v2/", registry.url());
    assert_eq!(status(&["--cacert", &ca, &v2]), "200");
    let by_name = v2.replace("127.0.0.1", "localhost");
    assert_eq!(status(&["--cacert", &ca, &by_name]), "200");
    let (code, http) = curl(&[&v2]);
    assert_eq!(
        (code, http.as_str()),
        (60, "000"),
        "without the CA curl refuses the certificate"
    );
    let plain = v2.replace("https://", "http://");
    assert_eq!(status(&[&plain]), "400", "plain HTTP to the TLS port");

    // Over TLS curl speaks HTTP/2: its access lines read "HTTP/2.0".
    let digest = push_blob(&registry, &["--cacert", &ca], "t", b"over tls");
    let blob = format!("{}/v2/t/blobs/{digest}", registry.url());
    assert_eq!(status(&["--cacert", &ca, &blob]), "200");
    assert_eq!(registry.blob_gets(&digest), 1);
    assert!(registry.log().contains(" HTTP/2.0\" 200"));

    registry.restart();
    assert_eq!(status(&["--cacert", &ca, &v2]), "200", "same certificates");
}

#[test]
fn tls_and_htpasswd_together() {
    if !tools("tls_and_htpasswd_together") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions {
        htpasswd: Some(("u".into(), "p".into())),
        tls: true,
        token: None,
        proxy: None,
    });
    let ca = registry.ca_file().unwrap();
    let ca = ca.to_str().unwrap();
    let v2 = format!("{}/v2/", registry.url());
    assert_eq!(status(&["--cacert", ca, &v2]), "401");
    assert_eq!(status(&["--cacert", ca, "-u", "u:p", &v2]), "200");
}

#[test]
fn registries_run_side_by_side() {
    if !tools("registries_run_side_by_side") {
        return;
    }
    let registries: Vec<TestRegistry> = (0..3)
        .map(|_| TestRegistry::start(RegistryOptions::default()))
        .collect();
    let mut addresses: Vec<String> = registries.iter().map(|r| r.address()).collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), 3);
    for registry in &registries {
        assert_eq!(status(&[&format!("{}/v2/", registry.url())]), "200");
    }
}

/// A token server granting `alice`/`secret` pull and push below `private/`, and
/// everyone pull below `public/`; a registry trusting it.
fn token_registry() -> (TokenServer, TestRegistry) {
    let tokens = TokenServer::start(TokenConfig {
        users: vec![("alice".into(), "secret".into())],
        grants: vec![
            Grant::user("alice", "private/*", &["pull", "push"]),
            Grant::everyone("public/*", &["pull"]),
        ],
        ..TokenConfig::default()
    });
    let registry = TestRegistry::start(RegistryOptions {
        token: Some(tokens.registry_auth()),
        ..RegistryOptions::default()
    });
    (tokens, registry)
}

/// Asks the token server, as docker does (`GET` with one `scope` parameter per
/// scope, basic credentials when given); returns the HTTP status and the body.
fn request_token(tokens: &TokenServer, user: Option<&str>, scopes: &[&str]) -> (String, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", "--max-time", "10", "-G"])
        .arg(tokens.realm())
        .arg("--data-urlencode")
        .arg(format!("service={}", tokens.service()));
    for scope in scopes {
        cmd.arg("--data-urlencode").arg(format!("scope={scope}"));
    }
    if let Some(user) = user {
        cmd.args(["-u", user]);
    }
    let out = cmd.output().expect("curl runs");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = out.rsplit_once('\n').expect("curl printed the status");
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status.to_string(), body)
}

/// A token for `scopes`, asserting the server issued it.
fn token(tokens: &TokenServer, user: Option<&str>, scopes: &[&str]) -> String {
    let (status, body) = request_token(tokens, user, scopes);
    assert_eq!(status, "200", "token request: {body}");
    assert_eq!(body["token"], body["access_token"]);
    body["token"].as_str().expect("a token").to_string()
}

/// The decoded claims of a JWT.
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let json = URL_SAFE_NO_PAD.decode(payload).expect("base64url claims");
    serde_json::from_slice(&json).expect("JSON claims")
}

fn bearer(token: &str) -> [String; 2] {
    ["-H".into(), format!("Authorization: Bearer {token}")]
}

/// The response headers of curl `args` (status line included).
fn response_headers(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-D", "-", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|line| {
        let (n, value) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[test]
fn token_registry_challenges_and_honours_multi_scope_tokens() {
    if !tools("token_registry_challenges_and_honours_multi_scope_tokens") {
        return;
    }
    let (tokens, registry) = token_registry();
    assert!(tokens.realm().starts_with("http://127.0.0.1:"));
    assert!(tokens.realm().ends_with("/token"));
    let v2 = format!("{}/v2/", registry.url());
    let headers = response_headers(&[&v2]);
    assert!(headers.starts_with("HTTP/1.1 401"), "{headers}");
    assert_eq!(
        header(&headers, "www-authenticate"),
        Some(
            format!(
                "Bearer realm=\"{}\",service=\"{}\"",
                tokens.realm(),
                tokens.service()
            )
            .as_str()
        )
    );

    // A token without scopes opens /v2/ only.
    let plain = token(&tokens, Some("alice:secret"), &[]);
    let claims_plain = claims(&plain);
    assert_eq!(claims_plain["iss"], tokens.issuer());
    assert_eq!(claims_plain["sub"], "alice");
    assert_eq!(claims_plain["aud"], tokens.service());
    assert_eq!(claims_plain["access"], json!([]));
    let auth = bearer(&plain);
    assert_eq!(status(&[&auth[0], &auth[1], &v2]), "200");
    let stranger = TokenServer::start(TokenConfig {
        users: vec![("alice".into(), "secret".into())],
        ..TokenConfig::default()
    });
    let foreign = bearer(&token(&stranger, Some("alice:secret"), &[]));
    assert_eq!(
        status(&[&foreign[0], &foreign[1], &v2]),
        "401",
        "a token signed by another key"
    );

    let a = token(
        &tokens,
        Some("alice:secret"),
        &["repository:private/a:pull,push"],
    );
    let auth_a = bearer(&a);
    let auth_a = [auth_a[0].as_str(), auth_a[1].as_str()];
    let digest = push_blob(&registry, &auth_a, "private/a", b"mounted sardines");
    let blob_a = format!("{}/v2/private/a/blobs/{digest}", registry.url());
    assert_eq!(status(&[auth_a[0], auth_a[1], "-I", &blob_a]), "200");
    assert_eq!(status(&["-I", &blob_a]), "401", "no token, no blob");

    // Mounting into private/b needs push there and pull on private/a. distribution
    // refuses a token for private/b alone (it does not fall back to an upload) and
    // asks for both scopes, space-separated in one scope parameter.
    let mount = |digest: &str| {
        format!(
            "{}/v2/private/b/blobs/uploads/?mount={digest}&from=private/a",
            registry.url()
        )
    };
    let b_only = token(
        &tokens,
        Some("alice:secret"),
        &["repository:private/b:pull,push"],
    );
    let auth = bearer(&b_only);
    let refused = response_headers(&[&auth[0], &auth[1], "-X", "POST", &mount(&digest)]);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let challenge = header(&refused, "www-authenticate").expect("a challenge");
    // Both scopes, in whichever order the registry lists them and their actions
    // (a Go map's).
    let scope = challenge
        .split("scope=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no scope in {challenge}"));
    let mut listed: Vec<String> = scope
        .split(' ')
        .map(|one| match one.rsplit_once(':') {
            Some((resource, actions)) => {
                let mut actions: Vec<&str> = actions.split(',').collect();
                actions.sort();
                format!("{resource}:{}", actions.join(","))
            }
            None => one.to_string(),
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "repository:private/a:pull",
            "repository:private/b:pull,push"
        ],
        "{challenge}"
    );
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    // The same scopes, in the order `both` asks for them below.
    let wanted = "repository:private/b:pull,push repository:private/a:pull";

    // Two scope parameters in one request, as docker and containerd send them.
    let both = token(
        &tokens,
        Some("alice:secret"),
        &[
            "repository:private/b:pull,push",
            "repository:private/a:pull",
        ],
    );
    assert_eq!(
        claims(&both)["access"],
        json!([
            {"type": "repository", "name": "private/b", "actions": ["pull", "push"]},
            {"type": "repository", "name": "private/a", "actions": ["pull"]},
        ])
    );
    let auth = bearer(&both);
    assert_eq!(
        status(&[&auth[0], &auth[1], "-X", "POST", &mount(&digest)]),
        "201",
        "cross-repository mount"
    );
    let missing = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        status(&[&auth[0], &auth[1], "-X", "POST", &mount(&missing)]),
        "202",
        "nothing to mount: an upload starts instead"
    );
    // The challenge's scopes space-separated in one parameter, as it writes them.
    let spaced = token(&tokens, Some("alice:secret"), &[wanted]);
    assert_eq!(claims(&spaced)["access"], claims(&both)["access"]);
    let auth = bearer(&spaced);
    assert_eq!(
        status(&[&auth[0], &auth[1], "-X", "POST", &mount(&digest)]),
        "201"
    );
    let auth = bearer(&b_only);
    let blob_b = format!("{}/v2/private/b/blobs/{digest}", registry.url());
    assert_eq!(
        status(&[&auth[0], &auth[1], "-I", &blob_b]),
        "200",
        "mounted"
    );

    let asked: Vec<Vec<String>> = tokens.requests().into_iter().map(|r| r.scopes).collect();
    assert_eq!(
        asked,
        vec![
            vec![],
            vec!["repository:private/a:pull,push".to_string()],
            vec!["repository:private/b:pull,push".to_string()],
            vec![
                "repository:private/b:pull,push".to_string(),
                "repository:private/a:pull".to_string()
            ],
            vec![
                "repository:private/b:pull,push".to_string(),
                "repository:private/a:pull".to_string()
            ],
        ],
        "scopes are recorded one by one, however they were sent"
    );
    assert!(tokens.requests().iter().all(|r| r.authorized
        && r.account.as_deref() == Some("alice")
        && r.service.as_deref() == Some(tokens.service())));
}

#[test]
fn token_registry_grants_anonymous_pull_only() {
    if !tools("token_registry_grants_anonymous_pull_only") {
        return;
    }
    let (tokens, registry) = token_registry();
    let anonymous = token(&tokens, None, &["repository:public/x:pull,push"]);
    let claims_anonymous = claims(&anonymous);
    assert_eq!(claims_anonymous["sub"], "");
    assert_eq!(
        claims_anonymous["access"],
        json!([{"type": "repository", "name": "public/x", "actions": ["pull"]}]),
        "push is not granted, pull is"
    );
    let auth = bearer(&anonymous);
    let manifest = format!("{}/v2/public/x/manifests/latest", registry.url());
    assert_eq!(status(&[&auth[0], &auth[1], "-I", &manifest]), "404");
    assert_eq!(status(&["-I", &manifest]), "401", "no token");
    let upload = format!("{}/v2/public/x/blobs/uploads/", registry.url());
    assert_eq!(status(&[&auth[0], &auth[1], "-X", "POST", &upload]), "401");

    // Nothing granted below private/: the scope is left out of the token.
    let nothing = token(&tokens, None, &["repository:private/a:pull"]);
    assert_eq!(claims(&nothing)["access"], json!([]));
    let auth = bearer(&nothing);
    let private = format!("{}/v2/private/a/manifests/latest", registry.url());
    assert_eq!(status(&[&auth[0], &auth[1], "-I", &private]), "401");

    // alice may pull public repositories too, as everyone.
    let alice = token(
        &tokens,
        Some("alice:secret"),
        &["repository:public/x:pull,push"],
    );
    assert_eq!(
        claims(&alice)["access"],
        json!([{"type": "repository", "name": "public/x", "actions": ["pull"]}])
    );

    let requests = tokens.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].account, None);
    assert_eq!(requests[0].scopes, ["repository:public/x:pull,push"]);
    assert!(requests.iter().all(|r| r.authorized));
    assert_eq!(requests[2].account.as_deref(), Some("alice"));
}

#[test]
fn token_server_refuses_wrong_passwords() {
    if !tools("token_server_refuses_wrong_passwords") {
        return;
    }
    let tokens = TokenServer::start(TokenConfig {
        users: vec![("alice".into(), "secret".into())],
        grants: vec![Grant::user("alice", "*", &["*"])],
        expires_in: 42,
        ..TokenConfig::default()
    });
    let scope = ["repository:private/a:pull"];
    let (status, body) = request_token(&tokens, Some("alice:wrong"), &scope);
    assert_eq!(status, "401");
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "{body}");
    let (status, _) = request_token(&tokens, Some("mallory:secret"), &scope);
    assert_eq!(status, "401", "unknown users are refused, not anonymous");

    let (status, body) = request_token(&tokens, Some("alice:secret"), &scope);
    assert_eq!(status, "200");
    assert_eq!(body["expires_in"], 42);
    let issued_at = body["issued_at"].as_str().expect("issued_at");
    assert!(humantime::parse_rfc3339(issued_at).is_ok(), "{issued_at}");
    let claims = claims(body["token"].as_str().expect("token"));
    assert_eq!(
        claims["exp"].as_u64(),
        claims["iat"].as_u64().map(|t| t + 42)
    );
    let header = token_header(body["token"].as_str().expect("token"));
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["x5c"].as_array().map(Vec::len), Some(1));

    let requests = tokens.requests();
    let outcomes: Vec<(Option<&str>, bool)> = requests
        .iter()
        .map(|r| (r.account.as_deref(), r.authorized))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Some("alice"), false),
            (Some("mallory"), false),
            (Some("alice"), true)
        ]
    );

    // Dropping the server closes its port.
    let realm = tokens.realm();
    drop(tokens);
    let (code, http) = curl(&[&realm]);
    assert_eq!((code, http.as_str()), (7, "000"), "connection refused");
}

/// The decoded header of a JWT.
fn token_header(token: &str) -> Value {
    let header = token.split('.').next().expect("a JWT header");
    let json = URL_SAFE_NO_PAD.decode(header).expect("base64url header");
    serde_json::from_slice(&json).expect("JSON header")
}
