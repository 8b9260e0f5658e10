//! A registry with token authentication, as GitLab's, Harbor, Docker Hub and GHCR
//! have: Debian's `docker-registry` with `auth: token`, trusting a token server of
//! the tests crate that grants per repository. Proves that `login`, push, pull and
//! anonymous pulls work; that a push under a second name mounts every blob (the
//! registry's log shows the mounts accepted and no blob uploaded) because one token
//! covers the target and the mount's source; that every command asks the token
//! server once; that a private repository refuses an anonymous pull clearly; and
//! that a token the registry refuses is renewed once, not in a loop.

use std::path::Path;
use std::time::Duration;

use sarde_e2e::cache::run_with_stdin;
use sarde_e2e::hostile::{Action, Body, HostileServer, Matcher, Rule};
use sarde_e2e::registry::{RegistryOptions, TestRegistry, registry_tests_enabled};
use sarde_e2e::token::{Grant, TokenConfig, TokenRequest, TokenServer};
use sarde_e2e::vm::{self, TestVm, fill, fill_random, qcow2, same_guest_content};
use sarde_e2e::{fails, ok, sarde};
use serde_json::Value;

const USER: &str = "alice";
const PASSWORD: &str = "token-horse-battery-5521";

fn login(home: &Path, registry: &str) {
    let out = run_with_stdin(
        sarde(home).args([
            "login",
            "-u",
            USER,
            "--password-stdin",
            "--insecure",
            registry,
        ]),
        &format!("{PASSWORD}\n"),
    );
    assert!(
        out.status.success(),
        "login failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The token requests made while `f` ran.
fn token_requests_of(tokens: &TokenServer, f: impl FnOnce()) -> Vec<TokenRequest> {
    let before = tokens.requests().len();
    f();
    tokens.requests()[before..].to_vec()
}

/// The registry's access lines (every HTTP request it answered) after `from`.
fn access_lines(registry: &TestRegistry, from: usize) -> Vec<String> {
    // Its access line can trail the answer by a moment.
    let mut log = registry.log();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = registry.log();
        if now.len() == log.len() {
            break;
        }
        log = now;
    }
    log[from.min(log.len())..]
        .lines()
        .filter(|l| !l.starts_with("time=") && l.contains("] \"") && l.contains(" HTTP/"))
        .map(str::to_string)
        .collect()
}

#[test]
fn token_auth_push_mounts_pull_and_anonymous_access() {
    if !registry_tests_enabled("token_auth_push_mounts_pull_and_anonymous_access") {
        return;
    }
    let tokens = TokenServer::start(TokenConfig {
        users: vec![(USER.into(), PASSWORD.into())],
        grants: vec![
            Grant::user(USER, "private/*", &["pull", "push"]),
            Grant::user(USER, "public/*", &["pull", "push"]),
            Grant::everyone("public/*", &["pull"]),
        ],
        ..TokenConfig::default()
    });
    let registry = TestRegistry::start(RegistryOptions {
        token: Some(tokens.registry_auth()),
        ..RegistryOptions::default()
    });
    let address = registry.address();

    // A VM exported into alice's cache.
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "64M", None);
    fill_random(&disk, 0, 12, 5);
    fill(&disk, 0x3c, "20M", "2M");
    let name = vm::unique("sarde-token");
    let _vm = TestVm::define(&name, &[&disk], None);
    let alice = vm::workdir();
    let alice = alice.path();
    let image_a = format!("{address}/private/a:1");
    ok(sarde(alice).args(["export", "--chunksize", "4MiB", &name, &image_a]));

    // login: one token request for no scope, with the credentials.
    let asked = token_requests_of(&tokens, || login(alice, &address));
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(asked[0].authorized && asked[0].account.as_deref() == Some(USER));

    // push: one token request, for the target.
    let asked = token_requests_of(&tokens, || {
        ok(sarde(alice).args(["push", "-q", "--insecure", &image_a]));
    });
    eprintln!("push token requests: {asked:?}");
    assert_eq!(asked.len(), 1, "one token for the whole push: {asked:?}");
    assert_eq!(asked[0].scopes, ["repository:private/a:pull,push"]);

    // push under a second name: one token covering target and mount source, and
    // every blob mounted, none uploaded.
    let log_start = registry.log().len();
    let image_b = format!("{address}/private/b:1");
    let mut summary = String::new();
    let asked = token_requests_of(&tokens, || {
        summary = ok(sarde(alice).args([
            "push",
            "--insecure",
            "--format",
            "json",
            "-t",
            &image_b,
            &image_a,
        ]));
    });
    eprintln!("second push: {summary}\ntoken requests: {asked:?}");
    assert_eq!(asked.len(), 1, "one token for the whole push: {asked:?}");
    let mut scopes = asked[0].scopes.clone();
    scopes.sort();
    assert_eq!(
        scopes,
        [
            "repository:private/a:pull",
            "repository:private/b:pull,push"
        ]
    );
    let summary: Value = serde_json::from_str(&summary).expect("a JSON summary");
    let lines = access_lines(&registry, log_start);
    let mounts: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("POST /v2/private/b/blobs/uploads/?mount="))
        .collect();
    let uploads: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("PUT /v2/private/b/blobs/uploads/"))
        .collect();
    eprintln!("mount requests: {mounts:#?}");
    assert!(!mounts.is_empty(), "no mount was tried: {lines:#?}");
    assert!(
        mounts.iter().all(|l| l.contains("\" 201 ")),
        "a mount was refused: {mounts:#?}"
    );
    assert!(uploads.is_empty(), "blobs were uploaded: {uploads:#?}");
    assert_eq!(
        summary["bytes_sent"].as_u64().map(|b| b < 64 << 10),
        Some(true)
    );
    assert_eq!(summary["blobs_mounted"], summary["blobs_skipped"]);
    assert_eq!(summary["blobs_mounted"].as_u64(), Some(mounts.len() as u64));

    // pull with the credentials: one token request, pull only.
    let bob = vm::workdir();
    let bob = bob.path();
    login(bob, &address);
    let pulled = vm::unique("sarde-token-pulled");
    let asked = token_requests_of(&tokens, || {
        ok(sarde(bob).args(["pull", "-q", "--insecure", "-n", &pulled, &image_b]));
    });
    vm::undefine(&pulled);
    eprintln!("pull token requests: {asked:?}");
    assert_eq!(asked.len(), 1, "one token for the whole pull: {asked:?}");
    assert_eq!(asked[0].scopes, ["repository:private/b:pull"]);
    assert!(same_guest_content(
        &disk,
        &bob.join("VMs").join(&pulled).join("disk.qcow2")
    ));

    // A public repository: anyone may pull it, without credentials.
    let public = format!("{address}/public/x:1");
    ok(sarde(alice).args(["push", "-q", "--insecure", "-t", &public, &image_a]));
    let anonymous = vm::workdir();
    let anonymous = anonymous.path();
    let asked = token_requests_of(&tokens, || {
        ok(sarde(anonymous).args(["fetch", "-q", "--insecure", &public]));
    });
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(
        asked[0].account, None,
        "no credentials were sent: {asked:?}"
    );

    // A private one refuses them, saying what to do.
    let err = fails(sarde(anonymous).args(["fetch", "--insecure", &image_a]));
    eprintln!("anonymous fetch of a private image: {err}");
    assert!(
        err.contains(&address) && err.contains("private/a") && err.contains("sarde login"),
        "{err}"
    );
    let list = ok(sarde(anonymous).args(["list", "--format", "json"]));
    assert!(!list.contains("private/a"), "{list}");
}

/// A registry that answers 401 to a token it issued (revoked, or expired early):
/// sarde asks for a new token once and goes on; when the new one is refused too,
/// it stops with the credentials error instead of asking again and again.
#[test]
fn a_refused_token_is_renewed_once() {
    if !registry_tests_enabled("a_refused_token_is_renewed_once") {
        return;
    }
    let tokens = TokenServer::start(TokenConfig {
        users: vec![(USER.into(), PASSWORD.into())],
        grants: vec![Grant::user(USER, "private/*", &["pull", "push"])],
        ..TokenConfig::default()
    });
    let registry = TestRegistry::start(RegistryOptions {
        token: Some(tokens.registry_auth()),
        ..RegistryOptions::default()
    });
    let front = HostileServer::start(Some(registry.address()));
    let address = front.address();

    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "16M", None);
    fill_random(&disk, 0, 2, 9);
    let name = vm::unique("sarde-token-renew");
    let _vm = TestVm::define(&name, &[&disk], None);
    let alice = vm::workdir();
    let alice = alice.path();
    let image = format!("{address}/private/r:1");
    ok(sarde(alice).args(["export", &name, &image]));
    login(alice, &address);
    ok(sarde(alice).args(["push", "-q", "--insecure", &image]));

    let refusal = || Action::Respond {
        status: 401,
        headers: vec![(
            "WWW-Authenticate".into(),
            format!(
                "Bearer realm=\"{}\",service=\"{}\",error=\"invalid_token\"",
                tokens.realm(),
                tokens.service()
            ),
        )],
        body: Body::text(r#"{"errors":[{"code":"UNAUTHORIZED","message":"token revoked"}]}"#),
    };
    let reader = vm::workdir();
    let reader = reader.path();
    login(reader, &address);
    front.add_rule(Rule::first(
        1,
        Matcher::path_contains("GET", "/manifests/"),
        refusal(),
    ));
    let asked = token_requests_of(&tokens, || {
        ok(sarde(reader).args(["fetch", "-q", "--insecure", &image]));
    });
    assert_eq!(asked.len(), 2, "the first token and its renewal: {asked:?}");

    front.add_rule(Rule::always(
        Matcher::path_contains("GET", "/manifests/"),
        refusal(),
    ));
    let again = vm::workdir();
    let again = again.path();
    login(again, &address);
    let mut err = String::new();
    let asked = token_requests_of(&tokens, || {
        err = fails(sarde(again).args(["fetch", "--insecure", &image]));
    });
    assert_eq!(asked.len(), 2, "renewed once, not again: {asked:?}");
    assert!(
        err.contains("authentication required or refused") && err.contains("sarde login"),
        "{err}"
    );
}
