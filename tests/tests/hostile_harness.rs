//! The hostile HTTP server itself, checked with curl: it forwards to a real registry
//! (pushes included, chunked ones too, over kept-alive connections) and every
//! scripted misbehaviour does on the wire what it says.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sarde_e2e::hostile::{Action, Body, HostileServer, Matcher, Mutation, Rule};
use sarde_e2e::registry::{RegistryOptions, TestRegistry, require_registry_tools};

/// Whether the registry tools are there. Skips (false) when they are not, except on
/// CI (`CI=true`), where a missing tool is a failure.
fn tools(test: &str) -> bool {
    require_registry_tools(test)
}

/// Whether curl is there (for tests that need no registry).
fn curl_tool(test: &str) -> bool {
    sarde_test_prerequisite::require(
        test,
        Command::new("curl").arg("--version").output().is_ok(),
        "curl (scripts/install-deps.sh)",
    )
}

/// What curl got.
struct Transfer {
    /// curl's exit code: 0, 28 (timeout), 18 (partial body), 47 (too many
    /// redirects), 52 (empty reply), …
    exit: i32,
    /// The HTTP status of the last answer ("000": none).
    status: String,
    /// All response heads, as `-D` writes them.
    headers: String,
    body: Vec<u8>,
    elapsed: Duration,
}

impl Transfer {
    /// The value of the last header `name` curl received.
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().rev().find_map(|line| {
            let (candidate, value) = line.split_once(':')?;
            candidate
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

/// Runs `curl -s` with `args`, the body and headers into temporary files.
fn curl(args: &[&str]) -> Transfer {
    let dir = tempfile::tempdir().expect("temporary directory for curl");
    let body = dir.path().join("body");
    let headers = dir.path().join("headers");
    let started = Instant::now();
    let out = Command::new("curl")
        .arg("-s")
        .arg("-o")
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    Transfer {
        exit: out.status.code().unwrap_or(-1),
        status: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

/// Runs `curl -s` with `args`, the body thrown away; returns its exit code and how
/// many body bytes it received. For bodies too big to keep.
fn curl_counting(args: &[&str]) -> (i32, u64) {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{size_download}"])
        .args(args)
        .output()
        .expect("curl runs");
    let size = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("curl prints the downloaded size");
    (out.status.code().unwrap_or(-1), size)
}

/// A registry holding `data` as a blob of repository `t`, a rule-less hostile
/// server in front of it, and the blob's URL through that server.
fn proxied_blob(data: &[u8]) -> (TestRegistry, HostileServer, String) {
    let registry = TestRegistry::start(RegistryOptions::default());
    let (digest, _) = push_blob(&registry.url(), "t", data, false);
    let hostile = HostileServer::start(Some(registry.address()));
    let blob_url = format!("{}/v2/t/blobs/{digest}", hostile.url());
    (registry, hostile, blob_url)
}

/// Pushes `data` as a blob of repository `repo` at `base` (`http://HOST:PORT`):
/// POST an upload session, then PUT the data with the digest, chunked or with a
/// Content-Length. Returns the digest and the session's Location.
fn push_blob(base: &str, repo: &str, data: &[u8], chunked: bool) -> (String, String) {
    let dir = tempfile::tempdir().expect("temporary directory for the blob");
    let file = dir.path().join("blob");
    std::fs::write(&file, data).expect("blob written");
    let digest = format!("sha256:{}", sha256_hex(&file));
    let post = curl(&[
        "-X",
        "POST",
        "--max-time",
        "10",
        &format!("{base}/v2/{repo}/blobs/uploads/"),
    ]);
    assert_eq!(post.status, "202", "POST of an upload session");
    let location = post.header("location").expect("a Location for the session");
    let absolute = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location.clone()
    };
    let separator = if absolute.contains('?') { '&' } else { '?' };
    let put_url = format!("{absolute}{separator}digest={digest}");
    let data_arg = format!("@{}", file.display());
    let mut args = vec![
        "-X",
        "PUT",
        "--max-time",
        "10",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &data_arg,
    ];
    if chunked {
        args.extend(["-H", "Transfer-Encoding: chunked"]);
    }
    args.push(&put_url);
    let put = curl(&args);
    assert_eq!(put.status, "201", "PUT of the blob: {}", put.headers);
    (digest, location)
}

fn sha256_hex(file: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_string()
}

/// Data that is not all the same byte, so that shifted or padded copies differ.
fn sample(length: usize) -> Vec<u8> {
    (0..length).map(|i| (i % 251) as u8).collect()
}

#[test]
fn forwards_pushes_and_pulls_to_the_registry() {
    if !tools("forwards_pushes_and_pulls_to_the_registry") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let hostile = HostileServer::start(Some(registry.address()));
    assert!(hostile.address().starts_with("127.0.0.1:"));
    let base = hostile.url();

    let v2 = curl(&["--max-time", "10", &format!("{base}/v2/")]);
    assert_eq!((v2.exit, v2.status.as_str()), (0, "200"));
    assert_eq!(
        v2.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );

    // Upload sessions come back pointing at the hostile server, not the registry.
    let small = sample(10_000);
    let (digest, location) = push_blob(&base, "t", &small, false);
    assert!(
        location.starts_with(&format!("{base}/v2/t/blobs/uploads/")) || location.starts_with('/'),
        "Location {location} leads around the hostile server"
    );
    assert!(!location.contains(&registry.address()));
    let stored = std::fs::read(registry.blob_data_path(&digest)).expect("blob stored");
    assert_eq!(stored, small);

    // A chunked upload of 2 MB (curl also sends Expect: 100-continue).
    let big = sample(2_000_000);
    let (big_digest, _) = push_blob(&base, "t", &big, true);
    let stored = std::fs::read(registry.blob_data_path(&big_digest)).expect("blob stored");
    assert_eq!(stored, big);
    let chunked_put = hostile
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT" && r.target.contains(&big_digest))
        .expect("the chunked PUT was recorded");
    assert_eq!(chunked_put.header("transfer-encoding"), Some("chunked"));

    let blob_url = format!("{base}/v2/t/blobs/{big_digest}");
    let get = curl(&["--max-time", "10", &blob_url]);
    assert_eq!((get.exit, get.status.as_str()), (0, "200"));
    assert!(get.body == big, "the blob comes back intact");
    let head = curl(&["--max-time", "10", "-I", &blob_url]);
    assert_eq!((head.exit, head.status.as_str()), (0, "200"));
    assert_eq!(head.header("content-length"), Some(big.len().to_string()));
    assert_eq!(registry.blob_gets(&big_digest), 1);

    // Keep-alive: curl fetches both URLs over one connection.
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "%{num_connects} "])
        .args(["-o", "/dev/null", "-o", "/dev/null"])
        .arg(format!("{base}/v2/t/blobs/{digest}"))
        .arg(format!("{base}/v2/"))
        .output()
        .expect("curl runs");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1 0 ",
        "one connection"
    );

    let seen = hostile.requests();
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path(), "/v2/");
    assert_eq!(
        seen.last().expect("requests recorded").target,
        "/v2/",
        "the second request of the kept-alive connection"
    );
}

#[test]
fn made_up_answers_endless_bodies_closes_and_redirect_loops() {
    if !curl_tool("made_up_answers_endless_bodies_closes_and_redirect_loops") {
        return;
    }
    // No upstream: everything below is answered by rules alone.
    let hostile = HostileServer::start(None);
    let base = hostile.url();
    hostile.add_rule(Rule::always(
        Matcher::path_contains("GET", "/manifests/"),
        Action::Respond {
            status: 200,
            headers: vec![(
                "Content-Type".into(),
                "application/vnd.oci.image.manifest.v1+json".into(),
            )],
            body: Body::Endless,
        },
    ));
    hostile.add_rule(Rule::always(
        Matcher::path_contains("GET", "/blobs/"),
        Action::Respond {
            status: 500,
            headers: Vec::new(),
            body: Body::EndlessUntilClose,
        },
    ));
    let link = "</v2/t/tags/list?n=1&last=a>; rel=\"next\"";
    hostile.add_rule(Rule::always(
        Matcher::path_ends_with("GET", "/tags/list"),
        Action::Respond {
            status: 200,
            headers: vec![("Link".into(), link.into())],
            body: Body::text(r#"{"name":"t","tags":["a"]}"#),
        },
    ));
    hostile.add_rule(Rule::always(
        Matcher::path_contains("*", "/loop"),
        Action::Redirect {
            status: 307,
            location: "{path}".into(),
        },
    ));
    hostile.add_rule(Rule::always(
        Matcher::path_contains("GET", "/close"),
        Action::Close,
    ));
    hostile.add_rule(Rule::first(
        1,
        Matcher::new("GET", |path| path == "/v2/"),
        Action::Respond {
            status: 503,
            headers: Vec::new(),
            body: Body::text("busy"),
        },
    ));

    // An endless manifest: more than 1 MB in a second, and no end.
    let (exit, size) = curl_counting(&["--max-time", "3", &format!("{base}/v2/t/manifests/a")]);
    assert_eq!(exit, 28, "curl timed out");
    assert!(size > 1_000_000, "only {size} bytes");
    let start = curl(&["--max-time", "3", &format!("{base}/v2/t/manifests/a")]);
    assert_eq!(
        start.header("transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert!(start.body.starts_with(br#"{"a":"aaaa"#));

    // An error status with an endless, close-delimited body.
    let (exit, size) = curl_counting(&["--max-time", "3", &format!("{base}/v2/t/blobs/x")]);
    assert_eq!(exit, 28, "curl timed out");
    assert!(size > 1_000_000, "only {size} bytes");
    let error = curl(&["--max-time", "3", &format!("{base}/v2/t/blobs/x")]);
    assert_eq!(error.status, "500");
    assert_eq!(error.header("content-length"), None);
    assert_eq!(error.header("connection").as_deref(), Some("close"));

    // A tag list whose next page is itself, every time.
    for _ in 0..2 {
        let tags = curl(&[
            "--max-time",
            "5",
            &format!("{base}/v2/t/tags/list?n=1&last=a"),
        ]);
        assert_eq!((tags.exit, tags.status.as_str()), (0, "200"));
        assert_eq!(tags.header("link").as_deref(), Some(link));
        assert_eq!(tags.body, br#"{"name":"t","tags":["a"]}"#);
    }

    // A redirect loop: curl gives up after its limit.
    let looping = curl(&[
        "--max-time",
        "5",
        "-L",
        "--max-redirs",
        "5",
        &format!("{base}/v2/loop/x?y=1"),
    ]);
    assert_eq!(looping.exit, 47, "too many redirects");
    assert_eq!(
        looping.header("location").as_deref(),
        Some("/v2/loop/x?y=1")
    );
    let loops = hostile
        .requests()
        .iter()
        .filter(|r| r.path() == "/v2/loop/x")
        .count();
    assert_eq!(loops, 6, "the first request and five redirects");

    let closed = curl(&["--max-time", "5", &format!("{base}/v2/close")]);
    assert_eq!(closed.exit, 52, "empty reply from server");

    // `times: Some(1)`: the first GET /v2/ is refused, the next one falls through
    // to forwarding, which without upstream is a 502.
    let first = curl(&["--max-time", "5", &format!("{base}/v2/")]);
    assert_eq!(
        (first.status.as_str(), first.body.as_slice()),
        ("503", &b"busy"[..])
    );
    let second = curl(&["--max-time", "5", &format!("{base}/v2/")]);
    assert_eq!(second.status, "502");
}

#[test]
fn forwarded_answers_spoiled_and_first_time_only() {
    if !tools("forwarded_answers_spoiled_and_first_time_only") {
        return;
    }
    let data = sample(100_000);
    let (_registry, hostile, blob_url) = proxied_blob(&data);

    // `times: Some(1)`, then a normal forward.
    hostile.add_rule(Rule::first(
        1,
        Matcher::path_contains("GET", "/blobs/"),
        Action::Respond {
            status: 503,
            headers: Vec::new(),
            body: Body::text("later"),
        },
    ));
    assert_eq!(curl(&["--max-time", "5", &blob_url]).status, "503");
    let forwarded = curl(&["--max-time", "5", &blob_url]);
    assert_eq!(forwarded.status, "200");
    assert!(forwarded.body == data);
    hostile.clear_rules();

    // More bytes than the descriptor says, with a Content-Length to match.
    hostile.add_rule(Rule::first(
        1,
        Matcher::path_contains("GET", "/blobs/"),
        Action::ForwardThen(Mutation::AppendBytes(10)),
    ));
    let longer = curl(&["--max-time", "5", &blob_url]);
    assert_eq!((longer.exit, longer.status.as_str()), (0, "200"));
    assert_eq!(longer.header("content-length"), Some("100010".into()));
    assert_eq!(longer.body.len(), data.len() + 10);
    assert!(longer.body.starts_with(&data));

    // A stall after 1000 bytes, the first time only: curl times out with exactly
    // those bytes, and the retry gets everything.
    hostile.add_rule(Rule::first(
        1,
        Matcher::path_contains("GET", "/blobs/"),
        Action::ForwardThen(Mutation::StallAfter {
            bytes: 1000,
            for_: Duration::from_secs(30),
        }),
    ));
    let stalled = curl(&["--max-time", "5", &blob_url]);
    assert_eq!((stalled.exit, stalled.status.as_str()), (28, "200"));
    assert_eq!(stalled.body, data[..1000]);
    let resumed = curl(&["--max-time", "5", "-r", "1000-", &blob_url]);
    assert_eq!((resumed.exit, resumed.status.as_str()), (0, "206"));
    assert!(resumed.body == data[1000..]);

    // A short stall ends with the connection closed: a partial body for curl.
    hostile.add_rule(Rule::first(
        1,
        Matcher::path_contains("GET", "/blobs/"),
        Action::ForwardThen(Mutation::StallAfter {
            bytes: 500,
            for_: Duration::from_millis(300),
        }),
    ));
    let cut = curl(&["--max-time", "5", &blob_url]);
    assert_eq!(cut.exit, 18, "partial file");
    assert_eq!(cut.body, data[..500]);
    assert!(cut.elapsed >= Duration::from_millis(300));

    // A drip: 12 bytes at 8 bytes a second take about 1.5 s.
    hostile.add_rule(Rule::first(
        1,
        Matcher::path_contains("GET", "/blobs/"),
        Action::ForwardThen(Mutation::Drip {
            bytes_per_second: 8,
        }),
    ));
    let dripped = curl(&["--max-time", "10", "-r", "0-11", &blob_url]);
    assert_eq!((dripped.exit, dripped.status.as_str()), (0, "206"));
    assert_eq!(dripped.body, data[..12]);
    assert!(
        dripped.elapsed >= Duration::from_millis(1200) && dripped.elapsed < Duration::from_secs(9),
        "the drip took {:?}",
        dripped.elapsed
    );
    let full_speed = curl(&["--max-time", "5", &blob_url]);
    assert!(full_speed.body == data);
}

#[test]
fn cut_connections_ends_a_stall_at_once_and_the_server_goes_on() {
    if !tools("cut_connections_ends_a_stall_at_once_and_the_server_goes_on") {
        return;
    }
    let data = sample(100_000);
    let (_registry, hostile, blob_url) = proxied_blob(&data);
    hostile.add_rule(Rule::first(
        1,
        Matcher::path_contains("GET", "/blobs/"),
        Action::ForwardThen(Mutation::StallAfter {
            bytes: 700,
            for_: Duration::from_secs(60),
        }),
    ));
    let stalled = std::thread::spawn({
        let blob_url = blob_url.clone();
        move || curl(&["--max-time", "20", &blob_url])
    });
    // Wait until the stall holds the answer, then cut.
    let waiting = Instant::now();
    while hostile.pauses() == 0 {
        assert!(waiting.elapsed() < Duration::from_secs(30), "no stall");
        std::thread::sleep(Duration::from_millis(10));
    }
    let cutting = Instant::now();
    hostile.cut_connections();
    let cut = stalled.join().expect("curl thread");
    assert_eq!(cut.exit, 18, "partial file, not a timeout");
    assert_eq!(cut.body, data[..700]);
    // At the cut, not at curl's --max-time (exit 28) nor the stall's end.
    assert!(
        cutting.elapsed() < Duration::from_secs(10),
        "ended {:?} after the cut",
        cutting.elapsed()
    );
    // New connections are still served.
    let after = curl(&["--max-time", "5", &blob_url]);
    assert_eq!((after.exit, after.status.as_str()), (0, "200"));
    assert!(after.body == data);
}

#[test]
fn stalls_before_the_headers_end_with_the_server() {
    if !tools("stalls_before_the_headers_end_with_the_server") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let hostile = HostileServer::start(Some(registry.address()));
    hostile.add_rule(Rule::first(
        1,
        Matcher::new("GET", |path| path == "/v2/"),
        Action::ForwardThen(Mutation::StallBeforeHeaders(Duration::from_secs(60))),
    ));
    hostile.add_rule(Rule::first(
        1,
        Matcher::new("GET", |path| path == "/v2/"),
        Action::Stall(Duration::from_secs(60)),
    ));
    let v2 = format!("{}/v2/", hostile.url());
    let test_started = Instant::now();
    for _ in 0..2 {
        let silent = curl(&["--max-time", "1", &v2]);
        assert_eq!((silent.exit, silent.status.as_str()), (28, "000"));
        assert!(silent.headers.is_empty(), "not a byte of answer");
    }
    assert_eq!(curl(&["--max-time", "5", &v2]).status, "200", "then normal");

    // Stalled handlers and a client that keeps its connection open without a
    // request do not hold up the drop.
    hostile.add_rule(Rule::always(
        Matcher::path_contains("*", "/"),
        Action::Stall(Duration::from_secs(60)),
    ));
    let idle = std::net::TcpStream::connect(hostile.address()).expect("connects");
    let never_answered = std::thread::spawn({
        let v2 = v2.clone();
        move || {
            Command::new("curl")
                .args(["-s", "--max-time", "20", &v2])
                .output()
                .expect("curl runs")
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let dropping = Instant::now();
    drop(hostile);
    assert!(
        dropping.elapsed() < Duration::from_secs(10),
        "dropping took {:?}",
        dropping.elapsed()
    );
    let out = never_answered.join().expect("curl thread");
    assert!(!out.status.success(), "curl got no answer");
    drop(idle);
    assert!(
        test_started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        test_started.elapsed()
    );
}

#[test]
fn redirects_blob_downloads_to_another_host() {
    if !tools("redirects_blob_downloads_to_another_host") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let data = sample(50_000);
    let (digest, _) = push_blob(&registry.url(), "t", &data, false);
    let other = HostileServer::start(Some(registry.address()));
    let hostile = HostileServer::start(Some(registry.address()));
    hostile.add_rule(Rule::always(
        Matcher::path_contains("GET", "/blobs/sha256:"),
        Action::Redirect {
            status: 307,
            location: format!("{}{{path}}", other.url()),
        },
    ));
    let blob_url = format!("{}/v2/t/blobs/{digest}", hostile.url());

    let redirected = curl(&["--max-time", "5", "-u", "sarde:secret", "-L", &blob_url]);
    assert_eq!((redirected.exit, redirected.status.as_str()), (0, "200"));
    assert!(
        redirected.body == data,
        "the real blob, through the other host"
    );
    assert_eq!(
        redirected.headers.lines().next(),
        Some("HTTP/1.1 307 Temporary Redirect")
    );
    assert!(hostile.saw_header("authorization"));
    let seen = other.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, format!("/v2/t/blobs/{digest}"));
    assert!(
        !other.saw_header("Authorization"),
        "curl drops credentials on a redirect to another host"
    );

    // The recorder does notice credentials when they do arrive.
    let trusted = curl(&[
        "--max-time",
        "5",
        "-u",
        "sarde:secret",
        "--location-trusted",
        &blob_url,
    ]);
    assert_eq!(trusted.status, "200");
    assert!(other.saw_header("Authorization"));
    assert_eq!(other.requests().len(), 2);
}
