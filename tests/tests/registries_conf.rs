//! containers-registries.conf(5) against real `docker-registry` instances on
//! loopback: a `location` rewrite, a mirror that serves the whole pull, a mirror
//! that is down, `pull-from-mirror = "digest-only"`, `blocked`, `insecure` from
//! the file, and a pull-through cache (distribution's proxy mode) in front of an
//! upstream with concurrent clients. Every command gets its own
//! `CONTAINERS_REGISTRIES_CONF` (the `sarde` helper points it into the test's
//! home), so the host's files never take part.

use std::path::Path;

use sarde_e2e::registry::{RegistryOptions, TestRegistry, registry_tests_enabled};
use sarde_e2e::vm::{self, TestVm, fill, fill_random, qcow2};
use sarde_e2e::{fails, ok, sarde};
use serde_json::Value;

/// A small exported image pushed to `upstream` as `e2e/conf:1`; returns its
/// manifest digest and the digests of its blobs (layers and config).
fn push_image(upstream: &TestRegistry, prefix: &str) -> (String, Vec<String>) {
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "32M", None);
    fill_random(&disk, 0, 4, 21);
    fill(&disk, 0x33, "8M", "1M");
    let name = vm::unique(prefix);
    let _vm = TestVm::define(&name, &[&disk], None);
    let home = vm::workdir();
    let image = format!("{}/e2e/conf:1", upstream.address());
    ok(sarde(home.path()).args(["export", "--chunksize", "1MiB", &name, &image]));
    let pushed = json(&ok(sarde(home.path()).args([
        "push",
        "--insecure",
        "--format",
        "json",
        &image,
    ])));
    let manifest = pushed["manifest"].as_str().expect("manifest").to_string();
    let layout = home
        .path()
        .join("OCI")
        .join(upstream.address())
        .join("e2e/conf");
    let blobs = blob_digests(&layout, &manifest);
    (manifest, blobs)
}

fn json(text: &str) -> Value {
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The config and layer digests of a manifest stored in a layout.
fn blob_digests(layout: &Path, manifest: &str) -> Vec<String> {
    let hex = manifest.strip_prefix("sha256:").expect("sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).expect("manifest blob");
    let manifest: Value = serde_json::from_slice(&bytes).expect("manifest JSON");
    std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().expect("layers"))
        .map(|d| d["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// Writes the home's registries.conf.
fn conf(home: &Path, text: &str) {
    std::fs::write(home.join("registries.conf"), text).expect("registries.conf written");
}

fn blob_gets(registry: &TestRegistry, blobs: &[String]) -> usize {
    blobs.iter().map(|b| registry.blob_gets(b)).sum()
}

/// A fetch into the home's empty cache; the JSON summary.
fn fetch(home: &Path, image: &str) -> Value {
    json(&ok(sarde(home).args(["fetch", "--format", "json", image])))
}

#[test]
fn a_location_rewrite_and_insecure_come_from_the_file() {
    if !registry_tests_enabled("a_location_rewrite_and_insecure_come_from_the_file") {
        return;
    }
    let upstream = TestRegistry::start(RegistryOptions::default());
    let (manifest, _) = push_image(&upstream, "sarde-conf-rewrite");
    let home = vm::workdir();
    conf(
        home.path(),
        &format!(
            "[[registry]]\nprefix = \"vms.example.com/ci\"\nlocation = \"{}/e2e\"\ninsecure = true\n",
            upstream.address()
        ),
    );
    // No --insecure: the plain-HTTP registry is insecure by the file.
    let fetched = fetch(home.path(), "vms.example.com/ci/conf:1");
    assert_eq!(fetched["manifest"], manifest.as_str());
    // Cached under the name the user gave, never the rewritten location.
    assert!(
        home.path()
            .join("OCI/vms.example.com/ci/conf/index.json")
            .is_file()
    );
    assert!(!home.path().join("OCI").join(upstream.address()).exists());
    let config = ok(sarde(home.path()).args(["config", "--for", "pull"]));
    assert!(config.contains("vms.example.com/ci"), "{config}");
}

#[test]
fn a_mirror_serves_the_whole_pull_and_one_that_is_down_is_passed_over() {
    if !registry_tests_enabled("a_mirror_serves_the_whole_pull_and_one_that_is_down_is_passed_over")
    {
        return;
    }
    let upstream = TestRegistry::start(RegistryOptions::default());
    let mirror = TestRegistry::start(RegistryOptions::default());
    let (manifest, blobs) = push_image(&upstream, "sarde-conf-mirror");
    let source = format!("{}/e2e/conf:1", upstream.address());
    let home = vm::workdir();
    ok(sarde(home.path()).args([
        "copy",
        "--insecure",
        &format!("docker://{source}"),
        &format!("docker://{}/e2e/conf:1", mirror.address()),
    ]));
    let upstream_before = blob_gets(&upstream, &blobs);

    // A dead mirror first (nothing listens there), then the one with the image.
    let dead = format!("127.0.0.1:{}", free_port());
    let client = vm::workdir();
    conf(
        client.path(),
        &format!(
            "[[registry]]\nlocation = \"{up}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{dead}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{m}\"\ninsecure = true\n",
            up = upstream.address(),
            m = mirror.address()
        ),
    );
    let fetched = fetch(client.path(), &source);
    assert_eq!(fetched["manifest"], manifest.as_str());
    assert_eq!(
        fetched["retries"], 0,
        "a dead mirror costs no retry: {fetched}"
    );
    assert_eq!(
        blob_gets(&upstream, &blobs),
        upstream_before,
        "the upstream served no blob"
    );
    assert!(
        blob_gets(&mirror, &blobs) >= blobs.len(),
        "the mirror served them"
    );
    // Cached under the upstream's name.
    assert!(
        client
            .path()
            .join("OCI")
            .join(upstream.address())
            .join("e2e/conf/index.json")
            .is_file()
    );

    // Only dead mirrors: the primary serves it.
    let fallback = vm::workdir();
    conf(
        fallback.path(),
        &format!(
            "[[registry]]\nlocation = \"{up}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{dead}\"\ninsecure = true\n",
            up = upstream.address()
        ),
    );
    let fetched = fetch(fallback.path(), &source);
    assert_eq!(fetched["manifest"], manifest.as_str());
    assert_eq!(fetched["retries"], 0, "{fetched}");
    assert!(blob_gets(&upstream, &blobs) >= upstream_before + blobs.len());
}

#[test]
fn a_digest_only_mirror_serves_digests_and_never_tags() {
    if !registry_tests_enabled("a_digest_only_mirror_serves_digests_and_never_tags") {
        return;
    }
    let upstream = TestRegistry::start(RegistryOptions::default());
    let mirror = TestRegistry::start(RegistryOptions::default());
    let (manifest, blobs) = push_image(&upstream, "sarde-conf-digest");
    let seed = vm::workdir();
    ok(sarde(seed.path()).args([
        "copy",
        "--insecure",
        &format!("docker://{}/e2e/conf:1", upstream.address()),
        &format!("docker://{}/e2e/conf:1", mirror.address()),
    ]));
    let text = format!(
        "[[registry]]\nlocation = \"{up}\"\ninsecure = true\n\
         [[registry.mirror]]\nlocation = \"{m}\"\ninsecure = true\npull-from-mirror = \"digest-only\"\n",
        up = upstream.address(),
        m = mirror.address()
    );
    let mirror_manifests = mirror.answered("GET", "/manifests/");

    let by_tag = vm::workdir();
    conf(by_tag.path(), &text);
    fetch(by_tag.path(), &format!("{}/e2e/conf:1", upstream.address()));
    assert_eq!(
        mirror.answered("GET", "/manifests/"),
        mirror_manifests,
        "a tag never goes to a digest-only mirror"
    );

    let upstream_blobs = blob_gets(&upstream, &blobs);
    let by_digest = vm::workdir();
    conf(by_digest.path(), &text);
    fetch(
        by_digest.path(),
        &format!("{}/e2e/conf@{manifest}", upstream.address()),
    );
    assert!(mirror.answered("GET", "/manifests/") > mirror_manifests);
    assert_eq!(
        blob_gets(&upstream, &blobs),
        upstream_blobs,
        "the mirror served the digest"
    );
}

#[test]
fn insecure_is_unverified_tls_where_there_is_tls_and_each_mirror_has_its_own_ca() {
    if !registry_tests_enabled(
        "insecure_is_unverified_tls_where_there_is_tls_and_each_mirror_has_its_own_ca",
    ) {
        return;
    }
    let upstream = TestRegistry::start(RegistryOptions::default());
    let mirror = TestRegistry::start(RegistryOptions {
        tls: true,
        ..RegistryOptions::default()
    });
    let (manifest, blobs) = push_image(&upstream, "sarde-conf-tls");
    let source = format!("{}/e2e/conf:1", upstream.address());
    let seed = vm::workdir();
    // --insecure on a TLS registry: https without verifying its certificate.
    ok(sarde(seed.path()).args([
        "copy",
        "--insecure",
        &format!("docker://{source}"),
        &format!("docker://{}/e2e/conf:1", mirror.address()),
    ]));
    let upstream_blobs = blob_gets(&upstream, &blobs);

    // The mirror marked insecure in the file: unverified TLS.
    let unverified = vm::workdir();
    conf(
        unverified.path(),
        &format!(
            "[[registry]]\nlocation = \"{up}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{m}\"\ninsecure = true\n",
            up = upstream.address(),
            m = mirror.address()
        ),
    );
    assert_eq!(
        fetch(unverified.path(), &source)["manifest"],
        manifest.as_str()
    );

    // The mirror verified with its own CA from certs.d (the upstream has none).
    let verified = vm::workdir();
    conf(
        verified.path(),
        &format!(
            "[[registry]]\nlocation = \"{up}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{m}\"\n",
            up = upstream.address(),
            m = mirror.address()
        ),
    );
    let certs = verified.path().join("certs.d");
    std::fs::create_dir_all(certs.join(mirror.address())).unwrap();
    std::fs::copy(
        mirror.ca_file().expect("a TLS registry has a CA"),
        certs.join(mirror.address()).join("ca.crt"),
    )
    .unwrap();
    let fetched = json(&ok(sarde(verified.path())
        .env("SARDE_CERTS_DIR", &certs)
        .args(["fetch", "--format", "json", &source])));
    assert_eq!(fetched["manifest"], manifest.as_str());
    assert_eq!(
        blob_gets(&upstream, &blobs),
        upstream_blobs,
        "the TLS mirror served both fetches"
    );
}

#[test]
fn a_blocked_prefix_is_refused_naming_the_file() {
    if !registry_tests_enabled("a_blocked_prefix_is_refused_naming_the_file") {
        return;
    }
    let upstream = TestRegistry::start(RegistryOptions::default());
    let home = vm::workdir();
    conf(
        home.path(),
        &format!(
            "[[registry]]\nprefix = \"{}/e2e\"\nblocked = true\n",
            upstream.address()
        ),
    );
    let err = fails(sarde(home.path()).args([
        "fetch",
        "--insecure",
        &format!("{}/e2e/conf:1", upstream.address()),
    ]));
    assert!(
        err.contains("blocked") && err.contains("registries.conf"),
        "{err}"
    );
    assert_eq!(
        upstream.answered("GET", "/manifests/"),
        0,
        "nothing was asked"
    );
    assert!(
        !home.path().join("OCI").join(upstream.address()).exists(),
        "nothing cached"
    );
}

#[test]
fn a_pull_through_cache_serves_concurrent_clients_and_then_alone() {
    if !registry_tests_enabled("a_pull_through_cache_serves_concurrent_clients_and_then_alone") {
        return;
    }
    let upstream = TestRegistry::start(RegistryOptions::default());
    let proxy = TestRegistry::start(RegistryOptions {
        proxy: Some(upstream.url()),
        ..RegistryOptions::default()
    });
    let (manifest, blobs) = push_image(&upstream, "sarde-conf-proxy");
    let pushed_gets = blob_gets(&upstream, &blobs);
    let text = format!(
        "[[registry]]\nlocation = \"{up}\"\ninsecure = true\n\
         [[registry.mirror]]\nlocation = \"{p}\"\ninsecure = true\n",
        up = upstream.address(),
        p = proxy.address()
    );
    let source = format!("{}/e2e/conf:1", upstream.address());
    const CLIENTS: usize = 4;
    let round = |label: &str| -> Vec<tempfile::TempDir> {
        let homes: Vec<tempfile::TempDir> = (0..CLIENTS).map(|_| vm::workdir()).collect();
        for home in &homes {
            conf(home.path(), &text);
        }
        let children: Vec<std::process::Child> = homes
            .iter()
            .map(|home| {
                sarde(home.path())
                    .args(["fetch", "--format", "json", &source])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("sarde starts")
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().expect("sarde ends");
            assert!(
                out.status.success(),
                "{label}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let summary = json(&String::from_utf8_lossy(&out.stdout));
            assert_eq!(summary["manifest"], manifest.as_str(), "{label}");
        }
        homes
    };

    let cold = round("cold round");
    // Byte-identical: every client holds every blob with its digest.
    for home in &cold {
        let layout = home
            .path()
            .join("OCI")
            .join(upstream.address())
            .join("e2e/conf");
        for blob in &blobs {
            let hex = blob.strip_prefix("sha256:").unwrap();
            assert_eq!(
                format!(
                    "sha256:{}",
                    vm::sha256(&layout.join("blobs/sha256").join(hex))
                ),
                *blob
            );
        }
    }
    for blob in &blobs {
        // Each client asked the mirror once per blob, never the upstream.
        assert_eq!(proxy.blob_gets(blob), CLIENTS, "{blob}");
        // distribution 2.8 streams every miss from the upstream and stores the
        // blob in a background task; its in-flight check races with requests
        // that arrive together, so a store can start more than once (measured
        // here: 6-7 upstream GETs of a 1 KiB blob for 4 clients): at most
        // twice per client, nothing sarde controls.
        let from_upstream = upstream.blob_gets(blob);
        let hex = blob.strip_prefix("sha256:").unwrap();
        assert!(
            from_upstream <= 2 * CLIENTS,
            "{blob}: the upstream served it {from_upstream} times for {CLIENTS} clients:\n{}\nproxy:\n{}",
            grep(&upstream.log(), hex),
            grep(&proxy.log(), hex)
        );
    }
    // The proxy stores what it streamed in the background: wait until every
    // blob is stored and linked in the repository, or the warm round could find
    // one still missing (and rightly go upstream) on a slow machine.
    let stored = |blob: &String| {
        let hex = blob.strip_prefix("sha256:").unwrap();
        proxy.blob_data_path(blob).exists()
            && proxy
                .storage()
                .join("docker/registry/v2/repositories/e2e/conf/_layers/sha256")
                .join(hex)
                .join("link")
                .exists()
    };
    let waiting = std::time::Instant::now();
    while !blobs.iter().all(stored) {
        assert!(
            waiting.elapsed().as_secs() < 60,
            "the proxy has not stored every blob after 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let after_cold = blob_gets(&upstream, &blobs);
    assert!(
        after_cold > pushed_gets,
        "the proxy fetched from the upstream"
    );
    let _warm = round("warm round");
    assert_eq!(
        blob_gets(&upstream, &blobs),
        after_cold,
        "a second round is served by the proxy alone"
    );
}

/// The lines of `log` that mention `needle`.
fn grep(log: &str, needle: &str) -> String {
    log.lines()
        .filter(|l| l.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
