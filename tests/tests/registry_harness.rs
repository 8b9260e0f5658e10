//! The private-registry helper itself: plain, htpasswd and TLS registries answer as
//! configured, stop and restart on the same port, and count blob downloads.

use std::path::Path;
use std::process::Command;

use sarde_e2e::registry::{RegistryOptions, TestRegistry, registry_tools_available};

fn tools(test: &str) -> bool {
    if registry_tools_available() {
        true
    } else {
        eprintln!(
            "SKIPPED {test}: docker-registry, htpasswd, openssl or curl missing (scripts/install-deps.sh)"
        );
        false
    }
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
