//! Registries that misbehave, each test with a private `docker-registry`: one that
//! dies in the middle of a download (the rerun resumes, downloading only what is
//! missing), one whose stored blob is damaged (nothing enters the cache, no VM), eight
//! pulls of one image into one cache at once (each blob downloaded once), and a
//! registry that refuses a password (no retry storm, credentials stored only when
//! they work).

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sarde_e2e::cache::{
    Blob, CachedImage, PushedVm, assert_no_vm, listed, read_json, run_with_stdin,
};
use sarde_e2e::hostile::{Action, HostileServer, Matcher, Mutation, Rule};
use sarde_e2e::registry::{RegistryOptions, TestRegistry, registry_tests_enabled};
use sarde_e2e::vm::{self, TestVm, fill_random, qcow2, same_guest_content};
use sarde_e2e::{fails, ok, sarde};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The piece size of the exported images.
const PIECE: u64 = 8 * MIB;

/// The cache-wide directory of partial downloads.
fn partial_dir(home: &Path) -> PathBuf {
    home.join("OCI/.sarde/partial")
}

/// The partial downloads of a cache: file name and length.
fn partials(home: &Path) -> Vec<(String, u64)> {
    fs::read_dir(partial_dir(home))
        .map(|dir| {
            dir.filter_map(|e| {
                let e = e.ok()?;
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().ok()?.len(),
                ))
            })
            .collect()
        })
        .unwrap_or_default()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The registry's log once it stopped growing (its access line can trail the
/// response by a moment).
fn settled_log(registry: &TestRegistry) -> String {
    let mut last = registry.log();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = registry.log();
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
}

/// The access lines (`HOST - USER [DATE] "METHOD PATH PROTO" STATUS ...`) of a piece
/// of the registry's log: every HTTP request it answered.
fn requests(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| !l.starts_with("time=") && l.contains("] \"") && l.contains(" HTTP/"))
        .collect()
}

/// Imports `image` from `home`'s cache as `name` and checks the disk shows the guest
/// what `source` does.
fn import_and_compare(home: &Path, image: &str, name: &str, source: &Path) {
    assert_eq!(ok(sarde(home).args(["import", "-n", name, image])), name);
    let imported = home.join("VMs").join(name).join("disk.qcow2");
    assert!(
        same_guest_content(source, &imported),
        "{}: guest content differs from {}",
        imported.display(),
        source.display()
    );
}

/// A fetch caught mid-way: the registry was stopped while a blob was on its way.
struct Interrupted {
    /// Blobs of the image complete in the layout.
    completed: Vec<Blob>,
    /// The blob with a partial download, and how many bytes it holds.
    partial: (Blob, u64),
}

/// Starts `sarde fetch --concurrency 1 --retries 0` of `image` (served through
/// `hostile`, whose rule stalls the download of `stalled` half way) into the empty
/// cache of `home`. Once more than 1 MiB of that blob is on disk, stops the
/// registry and cuts the connections, as a registry host that dies does, and checks
/// the fetch failed cleanly, leaving the blobs before it complete and that one
/// partial.
fn fetch_until_stopped(
    registry: &mut TestRegistry,
    hostile: &HostileServer,
    image: &str,
    blobs: &[Blob],
    stalled: &Blob,
    home: &Path,
) -> Interrupted {
    let target = CachedImage::new(home, image);
    let stderr_path = home.join("fetch.stderr");
    let mut child: Child = sarde(home)
        .args([
            "fetch",
            "--concurrency",
            "1",
            "--retries",
            "0",
            "--insecure",
            image,
        ])
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).unwrap())
        .spawn()
        .expect("sarde fetch starts");
    let partial_name = format!("sha256-{}", stalled.hex());
    let started = Instant::now();
    loop {
        if partials(home)
            .iter()
            .any(|(name, len)| *name == partial_name && *len > MIB)
        {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            panic!(
                "the fetch ended before {} was half downloaded: {}",
                stalled.digest,
                fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no MiB of {} within 120 s",
            stalled.digest
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    registry.stop();
    hostile.cut_connections();
    let status = child.wait().unwrap();
    let stderr = fs::read_to_string(&stderr_path).unwrap();
    assert!(!status.success(), "the fetch succeeded: {stderr}");
    eprintln!(
        "fetch stopped after {:.2}s: {}",
        started.elapsed().as_secs_f64(),
        stderr.trim()
    );
    // A clear error, naming the registry; no image in the cache.
    assert!(
        stderr.contains(&hostile.address()) && stderr.contains("error"),
        "{stderr}"
    );
    assert!(target.tagged().is_none(), "tagged after a failed fetch");
    assert!(!listed(home, image), "listed after a failed fetch");

    let completed: Vec<Blob> = blobs
        .iter()
        .filter(|b| target.blob_path(&b.digest).exists())
        .cloned()
        .collect();
    for blob in &completed {
        assert_eq!(
            vm::sha256(&target.blob_path(&blob.digest)),
            blob.hex(),
            "a blob entered the layout unverified"
        );
    }
    let left = partials(home);
    eprintln!(
        "{} of {} blobs complete, partial downloads: {left:?}",
        completed.len(),
        blobs.len()
    );
    assert_eq!(left.len(), 1, "one partial download, of {partial_name}");
    let (file, len) = left[0].clone();
    assert_eq!(file, partial_name);
    assert!(
        len > MIB && len <= stalled.size / 2,
        "{file}: {len} bytes, {} sent of {}",
        stalled.size / 2,
        stalled.size
    );
    assert!(!completed.iter().any(|b| b.digest == stalled.digest));
    Interrupted {
        completed,
        partial: (stalled.clone(), len),
    }
}

#[test]
fn registry_stopped_mid_fetch_then_resumes() {
    if !registry_tests_enabled("registry_stopped_mid_fetch_then_resumes") {
        return;
    }
    let mut registry = TestRegistry::start(RegistryOptions::default());
    let mut source = PushedVm::new(
        &registry,
        "faults/stopped",
        48,
        &["--chunksize", "8MiB", "--codec", "raw"],
    );
    let blobs = source.cached().blobs();
    let pieces: Vec<&Blob> = blobs.iter().filter(|b| b.is_piece()).collect();
    assert!(pieces.len() >= 6, "{blobs:?}");
    assert!(pieces.iter().all(|b| b.size <= PIECE), "{blobs:?}");
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    let (_, manifest_size) = source.cached().manifest_descriptor();

    // The fetch goes through a proxy that stalls the last whole piece half way, so
    // the registry always stops in the middle of a blob, however fast this machine.
    let hostile = HostileServer::start(Some(registry.address()));
    let image = source.image_via(&hostile.address());
    let stalled = source.largest_piece();
    assert!(stalled.size > 4 * MIB, "{stalled:?}");
    hostile.add_rule(Rule::first(
        1,
        Matcher::blob_get(&stalled.digest),
        Action::ForwardThen(Mutation::StallAfter {
            bytes: stalled.size / 2,
            for_: Duration::from_secs(300),
        }),
    ));
    let home = vm::workdir();
    let interrupted = fetch_until_stopped(
        &mut registry,
        &hostile,
        &image,
        &blobs,
        &stalled,
        home.path(),
    );
    let home = home.path();
    let (partial_blob, partial_len) = interrupted.partial.clone();
    let completed_bytes: u64 = interrupted.completed.iter().map(|b| b.size).sum();

    // Again, with the registry back: only what is missing moves.
    registry.restart();
    let log_before = registry.log().len();
    let out = ok(sarde(home).args(["fetch", "-q", "--format", "json", "--insecure", &image]));
    let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("rerun: {summary}");
    let received = summary["bytes_received"].as_u64().unwrap();
    assert_eq!(summary["up_to_date"], false, "{summary}");
    assert!(received < total, "{received} >= {total}: {summary}");
    assert_eq!(
        received,
        total - completed_bytes - partial_len + manifest_size,
        "downloaded again more than was missing ({completed_bytes} bytes complete, {partial_len} partial): {summary}"
    );
    let again = partial_blob.size - partial_len;
    assert!(
        again < PIECE,
        "{again} bytes of {} again",
        partial_blob.digest
    );
    assert_eq!(
        summary["blobs_skipped"].as_u64().unwrap() as usize,
        interrupted.completed.len(),
        "{summary}"
    );
    assert_eq!(
        summary["blobs_transferred"].as_u64().unwrap() as usize,
        blobs.len() - interrupted.completed.len(),
        "{summary}"
    );
    // The partial blob was asked for with a range (answered 206), the complete ones
    // not at all.
    let log = settled_log(&registry);
    let rerun = &log[log_before..];
    let gets = |blob: &Blob, status: &str| {
        requests(rerun)
            .into_iter()
            .filter(|l| {
                l.contains(&format!("\"GET /v2/faults/stopped/blobs/{} ", blob.digest))
                    && l.contains(&format!("\" {status} "))
            })
            .count()
    };
    assert_eq!(gets(&partial_blob, "206"), 1, "no range request:\n{rerun}");
    for blob in &interrupted.completed {
        assert_eq!(gets(blob, "200") + gets(blob, "206"), 0, "{rerun}");
    }
    assert!(partials(home).is_empty(), "{:?}", partials(home));
    assert!(listed(home, &image));

    let name = vm::unique("sarde-resumed");
    source.vm.cleanup_also(&name);
    import_and_compare(home, &image, &name, &source.disk);
}

#[test]
fn blob_corrupted_in_registry_storage() {
    if !registry_tests_enabled("blob_corrupted_in_registry_storage") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let mut source = PushedVm::new(
        &registry,
        "faults/corrupt",
        24,
        &["--chunksize", "8MiB", "--codec", "raw"],
    );
    let blobs = source.cached().blobs();
    let pieces: Vec<&Blob> = blobs.iter().filter(|b| b.is_piece()).collect();
    let damaged = pieces[pieces.len() / 2].clone();
    // A few bytes in the middle, same length: only the digest can tell.
    let path = registry.blob_data_path(&damaged.digest);
    let mut data = fs::read(&path).unwrap();
    assert_eq!(data.len() as u64, damaged.size);
    let middle = data.len() / 2;
    for b in &mut data[middle..middle + 4] {
        *b ^= 0xa5;
    }
    fs::write(&path, &data).unwrap();

    let home = vm::workdir();
    let home = home.path();
    let target = CachedImage::new(home, &source.image);
    let err = fails(sarde(home).args(["fetch", "-q", "--insecure", &source.image]));
    eprintln!("fetch: {}", err.trim());
    assert!(
        err.contains("digest") && err.contains(&damaged.digest),
        "{err}"
    );
    let nothing_kept = |what: &str| {
        assert!(target.tagged().is_none(), "{what}: tagged");
        assert!(!listed(home, &source.image), "{what}: listed");
        assert!(
            !target.blob_path(&damaged.digest).exists(),
            "{what}: the damaged blob entered the layout"
        );
        let partial = partial_dir(home).join(format!("sha256-{}", damaged.hex()));
        assert!(
            !partial.exists(),
            "{what}: the damaged download was kept as {}",
            partial.display()
        );
    };
    nothing_kept("fetch");

    let name = vm::unique("sarde-corrupt");
    source.vm.cleanup_also(&name);
    let err = fails(sarde(home).args(["pull", "-q", "-n", &name, "--insecure", &source.image]));
    eprintln!("pull: {}", err.trim());
    assert!(
        err.contains("digest") && err.contains(&damaged.digest),
        "{err}"
    );
    nothing_kept("pull");
    assert_no_vm(home, &name, &err);
    let left: Vec<String> = fs::read_dir(home.join("VMs"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    eprintln!("left in the VM directory: {left:?}");
}

#[test]
fn a_damaged_blob_already_in_the_cache_is_caught_by_a_pull() {
    // A pull hashes again only what it did not download itself: a blob it finds in
    // the cache (same size, other bytes) must not reach the VM's disk.
    if !registry_tests_enabled("a_damaged_blob_already_in_the_cache_is_caught_by_a_pull") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let mut source = PushedVm::new(
        &registry,
        "faults/rotten",
        24,
        &["--chunksize", "8MiB", "--codec", "raw"],
    );
    // The same image under a second tag: pulling it finds every blob cached.
    let second = source.image.replace(":1", ":2");
    ok(sarde(source.home.path()).args(["push", "-q", "--insecure", "-t", &second, &source.image]));
    let home = vm::workdir();
    let home = home.path();
    ok(sarde(home).args(["fetch", "-q", "--insecure", &source.image]));
    let cached = CachedImage::new(home, &source.image);
    let blobs = cached.blobs();
    let pieces: Vec<&Blob> = blobs.iter().filter(|b| b.is_piece()).collect();
    let damaged = pieces[pieces.len() / 2].clone();
    let path = cached.blob_path(&damaged.digest);
    let mut data = fs::read(&path).unwrap();
    let middle = data.len() / 2;
    for b in &mut data[middle..middle + 4] {
        *b ^= 0xa5;
    }
    // Blobs may be hard links shared with other layouts: write a new file.
    fs::remove_file(&path).unwrap();
    fs::write(&path, &data).unwrap();

    let name = vm::unique("sarde-rotten");
    source.vm.cleanup_also(&name);
    let err = fails(sarde(home).args(["pull", "-q", "-n", &name, "--insecure", &second]));
    eprintln!("pull: {}", err.trim());
    assert!(
        err.contains("corrupt") && err.contains(damaged.hex()),
        "{err}"
    );
    assert_no_vm(home, &name, &err);
}

#[test]
fn eight_concurrent_pulls_download_each_blob_once() {
    if !registry_tests_enabled("eight_concurrent_pulls_download_each_blob_once") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let mut source = PushedVm::new(&registry, "faults/crowd", 24, &["--chunksize", "4MiB"]);
    let home = vm::workdir();
    let home = home.path();
    let names: Vec<String> = (0..8)
        .map(|i| vm::unique(&format!("sarde-crowd{i}")))
        .collect();
    for name in &names {
        source.vm.cleanup_also(name);
    }
    let started = Instant::now();
    let children: Vec<(String, Child)> = names
        .iter()
        .map(|name| {
            let child = sarde(home)
                .args(["pull", "-q", "-n", name, "--insecure", &source.image])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("sarde pull starts");
            (name.clone(), child)
        })
        .collect();
    for (name, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "pull -n {name} failed ({}):\n{}",
            out.status,
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout).trim(), name);
    }
    eprintln!("8 pulls in {:.1}s", started.elapsed().as_secs_f64());
    let blobs = CachedImage::new(home, &source.image).blobs();
    assert_eq!(blobs.len(), source.cached().blobs().len());
    for blob in &blobs {
        assert_eq!(
            registry.blob_gets(&blob.digest),
            1,
            "{} ({}) downloaded more than once",
            blob.digest,
            blob.media_type
        );
    }
    for name in &names {
        assert!(vm::domain_exists(name), "{name} not defined");
        let disk = home.join("VMs").join(name).join("disk.qcow2");
        assert!(
            same_guest_content(&source.disk, &disk),
            "{}: guest content differs",
            disk.display()
        );
    }
    assert!(partials(home).is_empty(), "{:?}", partials(home));
}

#[test]
fn wrong_password_is_refused_without_retry_storm() {
    if !registry_tests_enabled("wrong_password_is_refused_without_retry_storm") {
        return;
    }
    let (user, password) = ("sardeuser", "right-horse-battery-7431");
    let wrong = "wrong-staple-2290";
    let registry = TestRegistry::start(RegistryOptions {
        htpasswd: Some((user.into(), password.into())),
        tls: false,
        token: None,
        proxy: None,
    });
    let address = registry.address();
    let home = vm::workdir();
    let home = home.path();
    let auth_file = home.join("auth.json");
    let login = |secret: &str| {
        run_with_stdin(
            sarde(home).args([
                "login",
                "-u",
                user,
                "--password-stdin",
                "--insecure",
                &address,
            ]),
            &format!("{secret}\n"),
        )
    };

    // A wrong password: refused at once, nothing stored.
    let before = settled_log(&registry).len();
    let out = login(wrong);
    let stderr = text(&out.stderr);
    eprintln!("wrong login: {}", stderr.trim());
    assert!(
        !out.status.success(),
        "login with a wrong password succeeded"
    );
    let lower = stderr.to_lowercase();
    let refusal = [
        "unauthorized",
        "refused",
        "denied",
        "rejected",
        "wrong",
        "invalid",
    ];
    assert!(
        stderr.contains(&address)
            && (lower.contains("credentials")
                || lower.contains("password")
                || lower.contains(user))
            && refusal.iter().any(|w| lower.contains(w)),
        "{stderr}"
    );
    assert!(!stderr.contains(wrong) && !text(&out.stdout).contains(wrong));
    assert!(!auth_file.exists(), "auth file written for a refused login");
    let log = settled_log(&registry);
    let asked = requests(&log[before..]);
    eprintln!("{} requests: {asked:#?}", asked.len());
    assert!(asked.len() <= 4, "{} requests: {asked:#?}", asked.len());

    // The right one: stored, private, never echoed.
    let out = login(password);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "login failed: {stderr}");
    assert!(!stdout.contains(password) && !stderr.contains(password));
    let mode = fs::metadata(&auth_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", auth_file.display());
    let stored = read_json(&auth_file);
    assert!(stored["auths"].get(&address).is_some(), "{stored}");

    // A push with the stored credentials.
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "64M", None);
    fill_random(&disk, 0, 2, 23);
    let name = vm::unique("sarde-regauth");
    let _vm = TestVm::define(&name, &[&disk], None);
    let image = format!("{address}/faults/auth:1");
    ok(sarde(home).args(["export", "--chunksize", "1MiB", &name, &image]));
    let out = ok(sarde(home).args(["push", "-q", "--insecure", "--format", "json", &image]));
    let summary: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        summary["bytes_sent"].as_u64().unwrap() > 2 * MIB,
        "{summary}"
    );

    // Credentials in the environment win over the file: a wrong one fails fast.
    let other = vm::workdir();
    let before = settled_log(&registry).len();
    let started = Instant::now();
    let out = sarde(other.path())
        .env("REGISTRY_AUTH_FILE", &auth_file)
        .env("SARDE_REGISTRY_USERNAME", user)
        .env("SARDE_REGISTRY_PASSWORD", wrong)
        .args(["fetch", "--insecure", &image])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stderr = text(&out.stderr);
    eprintln!(
        "fetch with a wrong password: {:.2}s: {}",
        elapsed.as_secs_f64(),
        stderr.trim()
    );
    assert!(
        !out.status.success(),
        "fetch with a wrong password succeeded"
    );
    let lower = stderr.to_lowercase();
    assert!(
        stderr.contains(&address)
            && (lower.contains("unauthorized")
                || lower.contains("authentication")
                || lower.contains("credentials")),
        "{stderr}"
    );
    assert!(!stderr.contains(wrong));
    // The request count below is the real check; this catches backoffs.
    assert!(
        elapsed < Duration::from_secs(20),
        "took {elapsed:?}: retried?"
    );
    let log = settled_log(&registry);
    let asked = requests(&log[before..]);
    eprintln!("{} requests: {asked:#?}", asked.len());
    assert!(asked.len() <= 4, "{} requests: {asked:#?}", asked.len());
    assert!(
        CachedImage::new(other.path(), &image).tagged().is_none(),
        "fetched without valid credentials"
    );

    // The stored credentials still work for the same fetch without the variables.
    let fetched = ok(sarde(other.path())
        .env("REGISTRY_AUTH_FILE", &auth_file)
        .args(["fetch", "-q", "--insecure", &image]));
    assert!(fetched.starts_with("sha256:"), "{fetched}");

    // logout removes them; a second logout has nothing to remove.
    ok(sarde(home).args(["logout", &address]));
    let stored = read_json(&auth_file);
    assert!(stored["auths"].get(&address).is_none(), "{stored}");
    let err = fails(sarde(home).args(["logout", &address]));
    assert!(err.contains(&address), "{err}");
    // Without credentials the registry refuses again.
    let third = vm::workdir();
    let err = fails(
        sarde(third.path())
            .env("REGISTRY_AUTH_FILE", &auth_file)
            .args(["fetch", "--insecure", &image]),
    );
    assert!(err.contains(&address), "{err}");
}
