//! Registries that misbehave on purpose: a [`HostileServer`] in front of a private
//! `docker-registry` (or on its own) answers with endless manifests, config blobs,
//! tokens and error bodies, more bytes than a blob's descriptor, stalls before the
//! headers or in the middle of a blob, a drip, redirects to another host and in a
//! loop, and tag lists whose `Link` pages loop or never end.
//!
//! Each case runs `sarde fetch` or `sarde pull` from a fresh cache with small bounds
//! (`SARDE_IDLE_TIMEOUT=2s`, `SARDE_RETRIES=1`, …) and checks that the command ends
//! within a bound it can state, with a clear error naming the registry and what
//! broke (or with the right image when the fault is one a client must get over),
//! that the sarde process never held more than 256 MiB (its `VmHWM`, polled while
//! it runs, and its `ru_maxrss` when it ends), and that nothing half-written is
//! left: no image in `sarde list`, no VM. The tag-list cases run at the transport
//! level, since no command lists a registry's tags.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sarde_api::Transport;
use sarde_api::transport::TransportOptions;
use sarde_e2e::cache::{Blob, CachedImage, PushedVm, assert_no_vm, listed, run_with_stdin};
use sarde_e2e::hostile::{Action, Body, HostileServer, Matcher, Mutation, Rule, SeenRequest};
use sarde_e2e::registry::{RegistryOptions, TestRegistry, registry_tests_enabled};
use sarde_e2e::vm::{self, same_guest_content};
use sarde_e2e::{ok, sarde};
use sarde_transport_registry::RegistryTransport;

const MIB: u64 = 1 << 20;
/// The most memory a sarde process may hold, whatever the registry does.
const MAX_RSS_KIB: u64 = 256 * 1024;
/// A sarde command still running after this is killed and the test fails.
const HARD_LIMIT: Duration = Duration::from_secs(120);
/// The bounds every sarde command here runs with (environment variables).
const IDLE: Duration = Duration::from_secs(2);
const RETRIES: usize = 1;
const BOUNDS: &[(&str, &str)] = &[
    ("SARDE_IDLE_TIMEOUT", "2s"),
    ("SARDE_REQUEST_TIMEOUT", "5s"),
    ("SARDE_CONNECT_TIMEOUT", "2s"),
    ("SARDE_MIN_RATE", "64KiB"),
    ("SARDE_RETRIES", "1"),
    ("SARDE_RETRY_BUDGET", "3"),
];
/// Random data on the source VM's disk, and how it is exported.
const RANDOM_MIB: u64 = 8;
const EXPORT_ARGS: &[&str] = &["--chunksize", "8MiB", "--codec", "raw"];

/// A failed fetch or pull left no image `image` in `home`'s cache.
fn assert_nothing_cached(home: &Path, image: &str, err: &str) {
    assert!(
        CachedImage::new(home, image).tagged().is_none(),
        "{image} tagged in the cache despite: {err}"
    );
    assert!(!listed(home, image), "{image} listed despite: {err}");
}

/// Matches the GETs of `blob`, in any repository.
fn is_get_of(blob: &Blob, request: &SeenRequest) -> bool {
    request.method == "GET" && request.path().ends_with(&format!("/blobs/{}", blob.digest))
}

/// A private registry with a [`Source`] image, a hostile server in front of it and
/// an empty cache to fetch into.
struct Scene {
    _registry: TestRegistry,
    source: PushedVm,
    hostile: HostileServer,
    home: tempfile::TempDir,
    /// The image as the hostile server serves it.
    image: String,
}

impl Scene {
    fn new(repository: &str) -> Scene {
        let registry = TestRegistry::start(RegistryOptions::default());
        let source = PushedVm::new(&registry, repository, RANDOM_MIB, EXPORT_ARGS);
        let hostile = HostileServer::start(Some(registry.address()));
        let image = source.image_via(&hostile.address());
        Scene {
            _registry: registry,
            source,
            hostile,
            home: vm::workdir(),
            image,
        }
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    /// `sarde fetch` of the image through the hostile server, measured.
    fn fetch(&self) -> Outcome {
        measured(bounded(self.home()).args(["fetch", "-q", "--insecure", &self.image]))
    }

    /// `sarde pull -n name` of the image through the hostile server, measured.
    fn pull(&mut self, name: &str) -> Outcome {
        self.source.vm.cleanup_also(name);
        measured(bounded(self.home()).args(["pull", "-q", "-n", name, "--insecure", &self.image]))
    }

    fn requests_matching(&self, f: impl Fn(&SeenRequest) -> bool) -> Vec<SeenRequest> {
        self.hostile.requests().into_iter().filter(f).collect()
    }
}

/// `sarde` for `home` with the small bounds of [`BOUNDS`].
fn bounded(home: &Path) -> Command {
    let mut cmd = sarde(home);
    for (key, value) in BOUNDS {
        cmd.env(key, value);
    }
    cmd
}

/// How a sarde command went.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    /// The largest resident set the process had, KiB.
    peak_rss_kib: u64,
}

impl Outcome {
    /// The command failed, within `bound`, in bounded memory; returns stderr.
    fn failed_within(&self, case: &str, bound: Duration) -> &str {
        self.report(case);
        assert!(
            !self.status.success(),
            "{case}: succeeded unexpectedly:\n{}",
            self.stdout
        );
        self.common(case, bound);
        &self.stderr
    }

    /// The command succeeded, within `bound`, in bounded memory; returns stdout.
    fn succeeded_within(&self, case: &str, bound: Duration) -> &str {
        self.report(case);
        assert!(
            self.status.success(),
            "{case}: failed ({}):\n{}",
            self.status,
            self.stderr
        );
        self.common(case, bound);
        self.stdout.trim()
    }

    fn common(&self, case: &str, bound: Duration) {
        assert!(
            self.elapsed < bound,
            "{case}: took {:.1}s, more than {bound:?}: {}",
            self.elapsed.as_secs_f64(),
            self.stderr
        );
        assert!(self.peak_rss_kib > 0, "{case}: no memory measured");
        assert!(
            self.peak_rss_kib < MAX_RSS_KIB,
            "{case}: sarde held {} KiB at its peak: {}",
            self.peak_rss_kib,
            self.stderr
        );
    }

    fn report(&self, case: &str) {
        eprintln!(
            "[{case}] {} in {:.2}s, peak RSS {:.1} MiB, stderr: {}",
            if self.status.success() {
                "succeeded"
            } else {
                "failed"
            },
            self.elapsed.as_secs_f64(),
            self.peak_rss_kib as f64 / 1024.0,
            self.stderr.trim()
        );
    }
}

/// `VmHWM` of a running process, KiB.
fn high_water_mark(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Reads a pipe to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `cmd`, polling its peak memory every 20 ms until it exits (and taking its
/// `ru_maxrss` then); kills it after [`HARD_LIMIT`].
// The child is reaped by `wait4` (for its `ru_maxrss`), which clippy can't see.
#[allow(clippy::zombie_processes)]
fn measured(cmd: &mut Command) -> Outcome {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sarde starts");
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let pid = child.id();
    let mut peak = 0u64;
    let status = loop {
        if let Some(kib) = high_water_mark(pid) {
            peak = peak.max(kib);
        }
        let mut raw = 0;
        // SAFETY: plain syscall on our own child; `usage` is a valid out-pointer.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let reaped = unsafe { libc::wait4(pid as i32, &mut raw, libc::WNOHANG, &mut usage) };
        assert!(reaped >= 0, "wait4: {}", std::io::Error::last_os_error());
        if reaped == pid as i32 {
            // ru_maxrss is in KiB on Linux.
            peak = peak.max(usage.ru_maxrss as u64);
            break ExitStatus::from_raw(raw);
        }
        if started.elapsed() > HARD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still ran after {HARD_LIMIT:?}: {}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    Outcome {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed,
        peak_rss_kib: peak,
    }
}

/// Asserts that `text` contains every one of `words`, naming those it lacks.
fn assert_mentions(case: &str, text: &str, words: &[&str]) {
    let missing: Vec<&&str> = words.iter().filter(|w| !text.contains(**w)).collect();
    assert!(
        missing.is_empty(),
        "{case}: {missing:?} missing from: {text}"
    );
}

fn header(name: &str, value: &str) -> (String, String) {
    (name.to_string(), value.to_string())
}

fn is_manifest_get(request: &SeenRequest) -> bool {
    request.method == "GET" && request.path().contains("/manifests/")
}

#[test]
fn an_endless_manifest_is_refused_at_4_mib() {
    let case = "endless manifest";
    if !registry_tests_enabled("an_endless_manifest_is_refused_at_4_mib") {
        return;
    }
    let scene = Scene::new("hostile/manifest");
    scene.hostile.add_rule(Rule::always(
        Matcher::path_contains("GET", "/manifests/"),
        Action::Respond {
            status: 200,
            headers: vec![header(
                "Content-Type",
                "application/vnd.oci.image.manifest.v1+json",
            )],
            body: Body::Endless,
        },
    ));
    let run = scene.fetch();
    let err = run.failed_within(case, Duration::from_secs(30));
    assert_mentions(
        case,
        err,
        &[&scene.hostile.address(), "manifest", "4194304"],
    );
    assert_nothing_cached(scene.home(), &scene.image, err);
    // Not worth a retry: the same request would bring the same answer.
    let gets = scene.requests_matching(is_manifest_get);
    assert_eq!(gets.len(), 1, "{gets:#?}");
}

#[test]
fn an_endless_config_blob_is_not_cached() {
    let case = "endless config blob";
    if !registry_tests_enabled("an_endless_config_blob_is_not_cached") {
        return;
    }
    let mut scene = Scene::new("hostile/config");
    let config = scene.source.cached().blobs()[0].clone();
    assert!(config.media_type.contains("config"), "{config:?}");
    scene.hostile.add_rule(Rule::always(
        Matcher::blob_get(&config.digest),
        Action::Respond {
            status: 200,
            headers: vec![header("Content-Type", "application/octet-stream")],
            body: Body::Endless,
        },
    ));
    let name = vm::unique("sarde-hostile-config");
    let run = scene.pull(&name);
    let err = run.failed_within(case, Duration::from_secs(30));
    assert_mentions(
        case,
        err,
        &[&scene.hostile.address(), &config.digest, "digest"],
    );
    assert_nothing_cached(scene.home(), &scene.image, err);
    assert_no_vm(scene.home(), &name, err);
    let target = CachedImage::new(scene.home(), &scene.image);
    assert!(
        !target.blob_path(&config.digest).exists(),
        "the made-up config entered the layout"
    );
    let partial = scene
        .home()
        .join("OCI/.sarde/partial")
        .join(format!("sha256-{}", config.hex()));
    assert!(!partial.exists(), "kept as {}", partial.display());
}

#[test]
fn an_endless_token_answer_is_refused_at_1_mib() {
    let case = "endless token";
    if !registry_tests_enabled("an_endless_token_answer_is_refused_at_1_mib") {
        return;
    }
    let scene = Scene::new("hostile/token");
    let realm = format!("{}/token", scene.hostile.url());
    scene.hostile.add_rule(Rule::always(
        Matcher::new("GET", |path| path == "/v2/" || path == "/v2"),
        Action::Respond {
            status: 401,
            headers: vec![header(
                "WWW-Authenticate",
                &format!("Bearer realm=\"{realm}\",service=\"x\""),
            )],
            body: Body::text("{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}"),
        },
    ));
    scene.hostile.add_rule(Rule::always(
        Matcher::path_ends_with("GET", "/token"),
        Action::Respond {
            status: 200,
            headers: vec![header("Content-Type", "application/json")],
            body: Body::Endless,
        },
    ));
    let run = scene.fetch();
    let err = run.failed_within(case, Duration::from_secs(30));
    assert_mentions(case, err, &[&scene.hostile.address(), "token", "1048576"]);
    assert_nothing_cached(scene.home(), &scene.image, err);
    let tokens = scene.requests_matching(|r| r.path() == "/token");
    assert_eq!(tokens.len(), 1, "{tokens:#?}");
    assert!(
        scene.requests_matching(is_manifest_get).is_empty(),
        "a manifest request went out without a token"
    );
}

#[test]
fn an_error_with_an_endless_body_ends_within_seconds() {
    let case = "HTTP 500, endless body";
    if !registry_tests_enabled("an_error_with_an_endless_body_ends_within_seconds") {
        return;
    }
    let scene = Scene::new("hostile/error");
    scene.hostile.add_rule(Rule::always(
        Matcher::path_contains("GET", "/manifests/"),
        Action::Respond {
            status: 500,
            headers: vec![header("Content-Type", "text/plain")],
            body: Body::EndlessUntilClose,
        },
    ));
    let run = scene.fetch();
    let err = run.failed_within(case, Duration::from_secs(15));
    assert_mentions(
        case,
        err,
        &[&scene.hostile.address(), "manifest", "HTTP 500"],
    );
    // The body is cut for the message.
    assert!(err.len() < 4096, "{} bytes of error", err.len());
    assert_nothing_cached(scene.home(), &scene.image, err);
    let gets = scene.requests_matching(is_manifest_get);
    assert_eq!(gets.len(), RETRIES + 1, "{gets:#?}");
}

#[test]
fn a_blob_longer_than_its_descriptor_is_refused() {
    let case = "blob with 10 bytes more";
    if !registry_tests_enabled("a_blob_longer_than_its_descriptor_is_refused") {
        return;
    }
    let mut scene = Scene::new("hostile/longer");
    let piece = scene.source.largest_piece();
    scene.hostile.add_rule(Rule::always(
        Matcher::blob_get(&piece.digest),
        Action::ForwardThen(Mutation::AppendBytes(10)),
    ));
    let name = vm::unique("sarde-hostile-longer");
    let run = scene.pull(&name);
    let err = run.failed_within(case, Duration::from_secs(30));
    assert_mentions(
        case,
        err,
        &[
            &scene.hostile.address(),
            &piece.digest,
            &(piece.size + 10).to_string(),
        ],
    );
    assert_nothing_cached(scene.home(), &scene.image, err);
    assert_no_vm(scene.home(), &name, err);
    assert!(
        !CachedImage::new(scene.home(), &scene.image)
            .blob_path(&piece.digest)
            .exists(),
        "the longer blob entered the layout"
    );
    // Refused from its headers: no retry, the same answer would come again.
    let gets = scene.requests_matching(|r| is_get_of(&piece, r));
    assert_eq!(gets.len(), 1, "{gets:#?}");
}

#[test]
fn a_stall_before_the_headers_times_out() {
    let case = "stall before the headers";
    if !registry_tests_enabled("a_stall_before_the_headers_times_out") {
        return;
    }
    let scene = Scene::new("hostile/stall");
    scene.hostile.add_rule(Rule::always(
        Matcher::path_contains("GET", "/manifests/"),
        Action::ForwardThen(Mutation::StallBeforeHeaders(Duration::from_secs(60))),
    ));
    let run = scene.fetch();
    // (retries + 1) idle timeouts and a backoff of 0.5 s (+25% jitter).
    let expected = IDLE * (RETRIES as u32 + 1) + Duration::from_millis(625);
    let err = run.failed_within(case, expected + Duration::from_secs(15));
    assert!(
        run.elapsed >= IDLE * (RETRIES as u32 + 1),
        "{case}: gave up after {:?}, before the idle timeouts: {err}",
        run.elapsed
    );
    assert_mentions(
        case,
        err,
        &[
            &scene.hostile.address(),
            "manifest",
            "timed out",
            "idle-timeout",
        ],
    );
    assert_nothing_cached(scene.home(), &scene.image, err);
    let gets = scene.requests_matching(is_manifest_get);
    assert_eq!(gets.len(), RETRIES + 1, "{gets:#?}");
}

#[test]
fn a_stall_in_the_middle_of_a_blob_is_resumed() {
    let case = "stall mid-blob, once";
    if !registry_tests_enabled("a_stall_in_the_middle_of_a_blob_is_resumed") {
        return;
    }
    let mut scene = Scene::new("hostile/resume");
    let piece = scene.source.largest_piece();
    scene.hostile.add_rule(Rule::first(
        1,
        Matcher::blob_get(&piece.digest),
        Action::ForwardThen(Mutation::StallAfter {
            bytes: MIB,
            for_: Duration::from_secs(60),
        }),
    ));
    let name = vm::unique("sarde-hostile-resume");
    let run = scene.pull(&name);
    let out = run.succeeded_within(case, Duration::from_secs(60));
    assert_eq!(out, name);
    assert!(run.elapsed >= IDLE, "{case}: no idle timeout in between?");
    let gets = scene.requests_matching(|r| is_get_of(&piece, r));
    assert_eq!(gets.len(), 2, "{gets:#?}");
    assert_eq!(gets[0].header("range"), None, "{gets:#?}");
    let range = gets[1]
        .header("range")
        .unwrap_or_else(|| panic!("{case}: the second GET has no Range: {gets:#?}"));
    let resumed_at: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{case}: Range {range:?}"));
    eprintln!("[{case}] resumed with Range: {range}");
    assert!(
        resumed_at > 0 && resumed_at <= MIB,
        "{case}: resumed at {resumed_at}"
    );
    assert!(listed(scene.home(), &scene.image));
    let disk = scene.home().join("VMs").join(&name).join("disk.qcow2");
    assert!(
        same_guest_content(&scene.source.disk, &disk),
        "{}: guest content differs from {}",
        disk.display(),
        scene.source.disk.display()
    );
}

#[test]
fn a_drip_ends_below_the_minimum_rate() {
    let case = "1 byte/s drip";
    if !registry_tests_enabled("a_drip_ends_below_the_minimum_rate") {
        return;
    }
    let scene = Scene::new("hostile/drip");
    let piece = scene.source.largest_piece();
    scene.hostile.add_rule(Rule::always(
        Matcher::blob_get(&piece.digest),
        Action::ForwardThen(Mutation::Drip {
            bytes_per_second: 1,
        }),
    ));
    let run = scene.fetch();
    let err = run.failed_within(case, Duration::from_secs(15));
    assert_mentions(
        case,
        err,
        &[&scene.hostile.address(), &piece.digest, "min-rate"],
    );
    assert_nothing_cached(scene.home(), &scene.image, err);
    let gets = scene.requests_matching(|r| is_get_of(&piece, r));
    assert_eq!(gets.len(), RETRIES + 1, "{gets:#?}");
}

#[test]
fn a_redirect_to_another_host_gets_no_credentials() {
    let case = "redirect to another host";
    if !registry_tests_enabled("a_redirect_to_another_host_gets_no_credentials") {
        return;
    }
    let (user, password) = ("sardeuser", "hostile-horse-battery-5521");
    // A: the registry with the password; B: the same image, anonymous, "a CDN".
    let registry_a = TestRegistry::start(RegistryOptions {
        htpasswd: Some((user.into(), password.into())),
        tls: false,
        token: None,
        proxy: None,
    });
    let registry_b = TestRegistry::start(RegistryOptions::default());
    let source = PushedVm::new(&registry_b, "hostile/redirect", RANDOM_MIB, EXPORT_ARGS);
    let image_a = format!("{}/{}:1", registry_a.address(), source.repository());
    ok(sarde(source.home.path())
        .env("SARDE_REGISTRY_USERNAME", user)
        .env("SARDE_REGISTRY_PASSWORD", password)
        .env("SARDE_REGISTRY_HOSTNAME", registry_a.address())
        .args(["push", "-q", "--insecure", "-t", &image_a, &source.image]));
    let front = HostileServer::start(Some(registry_a.address()));
    let other = HostileServer::start(Some(registry_b.address()));
    front.add_rule(Rule::always(
        Matcher::path_contains("GET", "/blobs/sha256:"),
        Action::Redirect {
            status: 307,
            location: format!("{}{{path}}", other.url()),
        },
    ));
    let image = source.image_via(&front.address());
    let home = vm::workdir();
    let home = home.path();
    let run = measured(
        bounded(home)
            .env("SARDE_REGISTRY_USERNAME", user)
            .env("SARDE_REGISTRY_PASSWORD", password)
            .env("SARDE_REGISTRY_HOSTNAME", front.address())
            .args(["fetch", "-q", "--insecure", &image]),
    );
    let out = run.succeeded_within(case, Duration::from_secs(30));
    assert!(!out.contains(password) && !run.stderr.contains(password));
    assert!(listed(home, &image));
    assert_eq!(
        CachedImage::new(home, &image).manifest_descriptor().0,
        source.cached().manifest_descriptor().0
    );
    let blobs = source.cached().blobs();
    let at_other = other.requests();
    for blob in &blobs {
        assert!(
            at_other.iter().any(|r| is_get_of(blob, r)),
            "{case}: {} never reached the other host: {at_other:#?}",
            blob.digest
        );
    }
    assert!(
        !other.saw_header("authorization"),
        "{case}: credentials reached the other host: {at_other:#?}"
    );
    let at_front = front.requests();
    assert!(
        at_front
            .iter()
            .any(|r| is_manifest_get(r) && r.header("authorization").is_some()),
        "{case}: the front host never saw the credentials: {at_front:#?}"
    );
    eprintln!(
        "[{case}] {} requests at the front host, {} at the other (none with Authorization)",
        at_front.len(),
        at_other.len()
    );
}

#[test]
fn a_redirect_loop_is_refused_at_once() {
    let case = "redirect loop";
    if !registry_tests_enabled("a_redirect_loop_is_refused_at_once") {
        return;
    }
    let scene = Scene::new("hostile/loop");
    scene.hostile.add_rule(Rule::always(
        Matcher::path_contains("GET", "/blobs/sha256:"),
        Action::Redirect {
            status: 307,
            location: "{path}".into(),
        },
    ));
    let run = scene.fetch();
    let err = run.failed_within(case, Duration::from_secs(20));
    assert_mentions(case, err, &[&scene.hostile.address(), "redirect loop"]);
    assert_nothing_cached(scene.home(), &scene.image, err);
    // At most one request and its one redirect per blob: no retries.
    let blobs = scene.source.cached().blobs();
    let gets = scene.requests_matching(|r| blobs.iter().any(|b| is_get_of(b, r)));
    assert!(gets.len() <= 2 * blobs.len(), "{gets:#?}");
}

/// A host the registry redirects a blob to answers 401 with a challenge of its
/// own: sarde neither adopts that challenge (whose realm would get the user's
/// credentials) nor blames the user's credentials; it names the host.
#[test]
fn a_401_from_a_redirect_target_is_not_the_registrys_challenge() {
    let case = "401 from a redirect target";
    if !registry_tests_enabled("a_401_from_a_redirect_target_is_not_the_registrys_challenge") {
        return;
    }
    let scene = Scene::new("hostile/storage");
    let storage = HostileServer::start(None);
    let realm = format!("{}/token", storage.url());
    storage.add_rule(Rule::always(
        Matcher::path_contains("GET", "/blobs/sha256:"),
        Action::Respond {
            status: 401,
            headers: vec![header(
                "WWW-Authenticate",
                &format!("Bearer realm=\"{realm}\",service=\"storage\""),
            )],
            body: Body::text("denied"),
        },
    ));
    scene.hostile.add_rule(Rule::always(
        Matcher::path_contains("GET", "/blobs/sha256:"),
        Action::Redirect {
            status: 307,
            location: format!("{}{{path}}", storage.url()),
        },
    ));
    let run = measured(
        bounded(scene.home())
            .env("SARDE_REGISTRY_USERNAME", "someone")
            .env("SARDE_REGISTRY_PASSWORD", "a-secret-for-the-registry")
            .args(["fetch", "-q", "--insecure", &scene.image]),
    );
    let err = run.failed_within(case, Duration::from_secs(20));
    assert_mentions(case, err, &[&storage.address(), "redirected", "401"]);
    assert!(
        !err.contains("sarde login"),
        "the credentials are not the problem: {err}"
    );
    assert_nothing_cached(scene.home(), &scene.image, err);
    let asked_realm = storage.requests().iter().any(|r| r.path() == "/token");
    assert!(
        !asked_realm,
        "the redirect target's realm got a token request"
    );
    assert!(
        !storage.saw_header("authorization"),
        "the redirect target saw credentials"
    );
}

/// A registry that takes a whole upload and never answers: the push ends once
/// the commit time after the last byte is over (request-timeout plus a second
/// per 64 MiB), and asks whether the blob landed before sending it again.
#[test]
fn an_upload_that_is_never_answered_ends() {
    let case = "upload never answered";
    if !registry_tests_enabled("an_upload_that_is_never_answered_ends") {
        return;
    }
    let scene = Scene::new("hostile/upload");
    scene.hostile.add_rule(Rule::always(
        Matcher::path_contains("PUT", "/blobs/uploads/"),
        Action::Stall(Duration::from_secs(120)),
    ));
    let target = format!("{}/hostile/pushed:1", scene.hostile.address());
    // One blob at a time, so its retry runs before anything else gives up.
    let run = measured(
        bounded(scene.source.home.path())
            .env("SARDE_CONCURRENCY", "1")
            .args([
                "push",
                "-q",
                "--insecure",
                "-t",
                &target,
                &scene.source.image,
            ]),
    );
    // Two attempts (retries = 1) of 5 s each, plus backoff.
    let err = run.failed_within(case, Duration::from_secs(25));
    assert_mentions(
        case,
        err,
        &[&scene.hostile.address(), "no answer after the last byte"],
    );
    // Every retry asked first: some blob was asked about twice (once before its
    // first upload, once before the retry).
    let heads = scene.requests_matching(|r| r.method == "HEAD" && r.path().contains("/blobs/"));
    let asked_twice = heads
        .iter()
        .any(|h| heads.iter().filter(|o| o.path() == h.path()).count() >= 2);
    assert!(
        asked_twice,
        "a retried upload did not ask first: {heads:#?}"
    );
}

/// `sarde login` to a web server that is not a registry (`/v2/` is 404) fails
/// and stores nothing.
#[test]
fn login_to_a_host_without_the_registry_api_fails() {
    if !registry_tests_enabled("login_to_a_host_without_the_registry_api_fails") {
        return;
    }
    let web = HostileServer::start(None);
    web.add_rule(Rule::always(
        Matcher::new("*", |_| true),
        Action::Respond {
            status: 404,
            headers: Vec::new(),
            body: Body::text("<html>not found</html>"),
        },
    ));
    let home = vm::workdir();
    let out = run_with_stdin(
        bounded(home.path()).args([
            "login",
            "-u",
            "someone",
            "--password-stdin",
            "--insecure",
            &web.address(),
        ]),
        "a-password\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "login succeeded: {err}");
    assert!(
        err.contains(&web.address()) && err.contains("not an OCI registry"),
        "{err}"
    );
    assert!(
        !home.path().join("auth.json").exists(),
        "credentials stored"
    );
}

/// A tiny HTTP server for [`tag_pages_that_never_end_stop_at_1000`]: `/v2/`
/// answers 200, and every tag page a new tag with a `Link` to the page after it
/// (`last=` the tag), forever. One connection at a time, closed after the answer.
struct EndlessPages {
    address: String,
    pages: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EndlessPages {
    fn start() -> EndlessPages {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let pages = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counted, stopping) = (pages.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for connection in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = connection {
                    let _ = EndlessPages::answer(stream, &counted);
                }
            }
        });
        EndlessPages {
            address,
            pages,
            stop,
            thread: Some(thread),
        }
    }

    fn answer(mut stream: TcpStream, pages: &AtomicUsize) -> std::io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
        }
        let target = request_line.split(' ').nth(1).unwrap_or("");
        let path = target.split('?').next().unwrap_or("");
        let (body, link) = if path.ends_with("/tags/list") {
            let page = pages.fetch_add(1, Ordering::SeqCst);
            let tag = format!("t{page}");
            (
                format!("{{\"name\":\"x\",\"tags\":[\"{tag}\"]}}"),
                format!("Link: </v2/x/tags/list?n=1000&last={tag}>; rel=\"next\"\r\n"),
            )
        } else {
            ("{}".to_string(), String::new())
        };
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{link}Connection: close\r\n\r\n{body}",
            body.len()
        )?;
        stream.flush()?;
        stream.shutdown(Shutdown::Both)
    }
}

impl Drop for EndlessPages {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.address);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn insecure() -> TransportOptions {
    TransportOptions {
        insecure: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn tag_pages_that_loop_are_refused() {
    let hostile = HostileServer::start(None);
    hostile.add_rule(Rule::always(
        Matcher::new("GET", |path| path == "/v2/"),
        Action::Respond {
            status: 200,
            headers: vec![header("Content-Type", "application/json")],
            body: Body::text("{}"),
        },
    ));
    hostile.add_rule(Rule::always(
        Matcher::path_ends_with("GET", "/tags/list"),
        Action::Respond {
            status: 200,
            headers: vec![
                header("Content-Type", "application/json"),
                header("Link", "</v2/x/tags/list?n=1000&last=a>; rel=\"next\""),
            ],
            body: Body::text(r#"{"name":"x","tags":["a"]}"#),
        },
    ));
    let transport = RegistryTransport::new(&hostile.address(), &insecure()).unwrap();
    let started = Instant::now();
    let err = transport.list_tags("x").await.unwrap_err().to_string();
    let elapsed = started.elapsed();
    eprintln!(
        "[tag list loop] failed in {:.2}s: {err}",
        elapsed.as_secs_f64()
    );
    assert_mentions("tag list loop", &err, &[&hostile.address(), "loop"]);
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    let pages: Vec<String> = hostile
        .requests()
        .into_iter()
        .filter(|r| r.path().ends_with("/tags/list"))
        .map(|r| r.target)
        .collect();
    assert_eq!(
        pages,
        ["/v2/x/tags/list?n=1000", "/v2/x/tags/list?n=1000&last=a"]
    );
}

#[tokio::test]
async fn tag_pages_that_never_end_stop_at_1000() {
    let server = EndlessPages::start();
    let transport = RegistryTransport::new(&server.address, &insecure()).unwrap();
    let started = Instant::now();
    let err = transport.list_tags("x").await.unwrap_err().to_string();
    let elapsed = started.elapsed();
    let pages = server.pages.load(Ordering::SeqCst);
    eprintln!(
        "[endless tag pages] failed after {pages} pages in {:.2}s: {err}",
        elapsed.as_secs_f64()
    );
    assert_mentions("endless tag pages", &err, &[&server.address, "1000 pages"]);
    assert_eq!(pages, 1000);
    // Ends, in far less than the test harness's patience; 1000 is the real check.
    assert!(elapsed < Duration::from_secs(90), "{elapsed:?}");
}
