//! VM → export → push → registry → fetch/pull into an empty cache → VM, against
//! private instances of Debian's docker-registry (plain HTTP, htpasswd, TLS with a
//! private CA), real libvirt and qemu-img; and interop with skopeo and the Python
//! tool.

use std::path::{Path, PathBuf};
use std::process::Command;

use sarde_e2e::registry::{RegistryOptions, TestRegistry, registry_tests_enabled};
use sarde_e2e::vm::{self, TestVm, fill, fill_random, qcow2, same_guest_content, sha256};
use sarde_e2e::{fails, ok, sarde};
use serde_json::Value;

/// A VM with a backing chain: base (random and patterned data) and an overlay.
struct ChainVm {
    _work: tempfile::TempDir,
    vm: TestVm,
    name: String,
    base: PathBuf,
    top: PathBuf,
}

fn chain_vm(prefix: &str) -> ChainVm {
    let work = vm::workdir();
    let base = work.path().join("base.qcow2");
    qcow2(&base, "128M", None);
    fill_random(&base, 0, 6, 11);
    fill(&base, 0x42, "20M", "2M");
    let top = work.path().join("top.qcow2");
    qcow2(&top, "128M", Some(base.to_str().unwrap()));
    fill(&top, 0x7e, "1M", "1M");
    let name = vm::unique(prefix);
    let vm = TestVm::define(&name, &[&top], None);
    ChainVm {
        _work: work,
        vm,
        name,
        base,
        top,
    }
}

fn json(text: &str) -> Value {
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// The imported VM's disks hold what the source chain holds.
fn assert_imported(home: &Path, vm_name: &str, chain: &ChainVm) {
    let dir = home.join("VMs").join(vm_name);
    assert_eq!(
        sha256(&dir.join("base.qcow2")),
        sha256(&chain.base),
        "base differs"
    );
    assert!(
        same_guest_content(&dir.join("top.qcow2"), &chain.top),
        "guest content of the overlay differs"
    );
    assert!(vm::domain_exists(vm_name), "VM {vm_name} not defined");
}

#[test]
fn round_trip_through_a_plain_registry() {
    if !registry_tests_enabled("round_trip_through_a_plain_registry") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let mut chain = chain_vm("sarde-reg-plain");
    let image = format!("{addr}/e2e/chain:1");
    let home = vm::workdir();
    let id = ok(sarde(home.path()).args(["export", "--chunksize", "1MiB", &chain.name, &image]));

    // Plain HTTP only when asked for.
    let refused = fails(sarde(home.path()).args(["push", &image]));
    assert!(refused.contains(&addr), "{refused}");

    let pushed = json(&ok(sarde(home.path()).args([
        "push",
        "--insecure",
        "--format",
        "json",
        &image,
    ])));
    assert!(n(&pushed, "blobs_transferred") >= 5, "{pushed}");
    assert_eq!(pushed["targets"][0]["manifest_only"], false);

    // Several tags in one run: the image is there, so only manifests go up;
    // another repository of the same registry gets its blobs by mounts.
    let again = json(&ok(sarde(home.path()).args([
        "push",
        "--insecure",
        "--format",
        "json",
        "-t",
        &format!("{addr}/e2e/chain:2"),
        "-t",
        &format!("{addr}/e2e/other:1"),
        &image,
    ])));
    assert_eq!(again["targets"][0]["manifest_only"], true, "{again}");
    assert_eq!(n(&again, "blobs_transferred"), 0, "{again}");
    assert_eq!(
        n(&again, "blobs_mounted"),
        n(&pushed, "blobs_transferred"),
        "{again}"
    );

    // Fetch into an empty cache, then import: the same disks.
    let other = vm::workdir();
    let fetched = json(&ok(sarde(other.path()).args([
        "fetch",
        "--insecure",
        "--format",
        "json",
        &format!("{addr}/e2e/other:1"),
    ])));
    assert_eq!(fetched["up_to_date"], false);
    assert_eq!(
        n(&fetched, "blobs_transferred"),
        n(&pushed, "blobs_transferred")
    );
    let new_name = format!("{}-fetched", chain.name);
    chain.vm.cleanup_also(&new_name);
    ok(sarde(other.path()).args(["import", "-n", &new_name, &format!("{addr}/e2e/other:1")]));
    assert_imported(other.path(), &new_name, &chain);
    let config = ok(sarde(other.path()).args(["getconfig", &format!("{addr}/e2e/other:1")]));
    assert!(config.starts_with('{'), "{config}");

    // An unchanged tag costs one manifest request and no blob request (besides
    // the authentication handshake's `GET /v2/`).
    let before = registry.log().lines().count();
    let unchanged = json(&ok(sarde(other.path()).args([
        "fetch",
        "--insecure",
        "--format",
        "json",
        &format!("{addr}/e2e/other:1"),
    ])));
    assert_eq!(unchanged["up_to_date"], true, "{unchanged}");
    assert_eq!(n(&unchanged, "blobs_transferred"), 0);
    let requests: Vec<String> = registry
        .log()
        .lines()
        .skip(before)
        // Access lines only (the registry also logs each request through logrus).
        .filter(|l| l.starts_with("127.0.0.1 - "))
        .filter(|l| l.contains("/manifests/") || l.contains("/blobs/"))
        .map(str::to_string)
        .collect();
    assert_eq!(requests.len(), 1, "requests: {requests:#?}");
    assert!(requests[0].contains("/manifests/1"), "{requests:?}");

    // Pull under a new name in a third cache: fetch and import in one go; the
    // image id is the exported one.
    let third = vm::workdir();
    let pulled_name = format!("{}-pulled", chain.name);
    chain.vm.cleanup_also(&pulled_name);
    let pulled = json(&ok(sarde(third.path()).args([
        "pull",
        "--insecure",
        "--format",
        "json",
        "-n",
        &pulled_name,
        &image,
    ])));
    assert_eq!(pulled["import"]["image_id"], Value::String(id));
    assert_imported(third.path(), &pulled_name, &chain);
    let listed = ok(sarde(third.path()).args(["list"]));
    assert!(listed.contains("e2e/chain"), "{listed}");

    // Re-pull of the unchanged tag: nothing moves, the VM stays.
    let repull = json(&ok(sarde(third.path()).args([
        "pull",
        "--insecure",
        "--format",
        "json",
        "-n",
        &pulled_name,
        &image,
    ])));
    assert_eq!(repull["up_to_date"], true, "{repull}");
    assert_eq!(repull["import"]["created"], false, "{repull}");
}

#[test]
fn round_trip_with_basic_auth() {
    if !registry_tests_enabled("round_trip_with_basic_auth") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions {
        htpasswd: Some(("ci".into(), "s3cret:pass".into())),
        tls: false,
        token: None,
        proxy: None,
    });
    let addr = registry.address();
    let mut chain = chain_vm("sarde-reg-auth");
    let image = format!("{addr}/e2e/auth:1");
    let home = vm::workdir();
    ok(sarde(home.path()).args(["export", "--chunksize", "1MiB", &chain.name, &image]));

    let refused = fails(sarde(home.path()).args(["push", "--insecure", &image]));
    assert!(
        refused.contains("authentication") && refused.contains(&addr),
        "{refused}"
    );

    let mut login = sarde(home.path());
    login
        .args(["login", "--insecure", "-u", "ci", "--password-stdin", &addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = login.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret:pass\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cret"));
    ok(sarde(home.path()).args(["push", "--insecure", &image]));

    // Another host with credentials from the environment, scoped to this registry.
    let other = vm::workdir();
    let new_name = format!("{}-pulled", chain.name);
    chain.vm.cleanup_also(&new_name);
    ok(sarde(other.path())
        .env("SARDE_REGISTRY_USERNAME", "ci")
        .env("SARDE_REGISTRY_PASSWORD", "s3cret:pass")
        .env("SARDE_REGISTRY_HOSTNAME", &addr)
        .args(["pull", "--insecure", "-n", &new_name, &image]));
    assert_imported(other.path(), &new_name, &chain);
}

#[test]
fn round_trip_over_tls_with_a_private_ca() {
    if !registry_tests_enabled("round_trip_over_tls_with_a_private_ca") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions {
        htpasswd: None,
        tls: true,
        token: None,
        proxy: None,
    });
    let addr = registry.address();
    let mut chain = chain_vm("sarde-reg-tls");
    let image = format!("{addr}/e2e/tls:1");
    let home = vm::workdir();
    ok(sarde(home.path()).args(["export", "--chunksize", "1MiB", &chain.name, &image]));

    // An unknown CA is a TLS error that says what to do.
    let refused = fails(sarde(home.path()).args(["push", &image]));
    assert!(refused.contains("TLS"), "{refused}");

    // The CA in a certs.d directory, as podman and docker keep them.
    let certs = home.path().join("certs.d");
    std::fs::create_dir_all(certs.join(&addr)).unwrap();
    std::fs::copy(
        registry.ca_file().unwrap(),
        certs.join(&addr).join("ca.crt"),
    )
    .unwrap();
    ok(sarde(home.path())
        .env("SARDE_CERTS_DIR", &certs)
        .args(["push", &image]));
    let new_name = format!("{}-pulled", chain.name);
    chain.vm.cleanup_also(&new_name);
    let other = vm::workdir();
    ok(sarde(other.path())
        .env("SARDE_CERTS_DIR", &certs)
        .args(["pull", "-n", &new_name, &image]));
    assert_imported(other.path(), &new_name, &chain);
}

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn skopeo_reads_what_sarde_pushes() {
    if !registry_tests_enabled("skopeo_reads_what_sarde_pushes") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let chain = chain_vm("sarde-reg-skopeo");
    let image = format!("{addr}/e2e/skopeo:1");
    let home = vm::workdir();
    ok(sarde(home.path()).args(["export", "--chunksize", "1MiB", &chain.name, &image]));
    let pushed = json(&ok(sarde(home.path()).args([
        "push",
        "--insecure",
        "--format",
        "json",
        &image,
    ])));
    let inspect: Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]))
    .unwrap();
    assert_eq!(inspect["Digest"], pushed["manifest"], "{inspect}");
    assert_eq!(inspect["Architecture"], "amd64");
    let copy = home.path().join("skopeo-copy");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{image}"),
        &format!("oci:{}:1", copy.display()),
    ]);
    let index: Value =
        serde_json::from_slice(&std::fs::read(copy.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], pushed["manifest"]);
}

#[test]
fn sarde_pulls_an_image_the_python_tool_wrote() {
    if !registry_tests_enabled("sarde_pulls_an_image_the_python_tool_wrote") {
        return;
    }
    let Some(python) = vm::python_sarde("sarde_pulls_an_image_the_python_tool_wrote") else {
        return;
    };
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let work = vm::workdir();
    let top = vm::python_exportable_chain(work.path());
    let base = work.path().join("base.qcow2");
    let name = vm::unique("sarde-reg-py");
    let mut test_vm = TestVm::define(&name, &[&top], None);
    let home = vm::workdir();
    let layout = home.path().join("py-layout");
    let out = Command::new(&python)
        .args(["--connect", vm::LIBVIRT_URI, "export", "--raw"])
        .arg(&name)
        .arg(format!("{}:py", layout.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Python export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = format!("{addr}/python/vm:py");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:py", layout.display()),
        &format!("docker://{image}"),
    ]);
    let new_name = format!("{name}-pulled");
    test_vm.cleanup_also(&new_name);
    ok(sarde(home.path()).args(["pull", "--insecure", "-n", &new_name, &image]));
    let dir = home.path().join("VMs").join(&new_name);
    assert_eq!(sha256(&dir.join("base.qcow2")), sha256(&base));
    assert_eq!(sha256(&dir.join("top.qcow2")), sha256(&top));
}

/// The layer digests and sizes of a cached image.
fn cached_layers(home: &Path, addr: &str, repo: &str, tag: &str) -> Vec<(String, u64)> {
    let layout = home.join("OCI").join(addr).join(repo);
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in {index}"));
    let digest = entry["digest"].as_str().unwrap();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap(),
    )
    .unwrap();
    let mut out = vec![(
        manifest["config"]["digest"].as_str().unwrap().to_string(),
        manifest["config"]["size"].as_u64().unwrap(),
    )];
    for l in manifest["layers"].as_array().unwrap() {
        out.push((
            l["digest"].as_str().unwrap().to_string(),
            l["size"].as_u64().unwrap(),
        ));
    }
    out
}

#[test]
fn an_update_moves_only_the_changed_pieces() {
    if !registry_tests_enabled("an_update_moves_only_the_changed_pieces") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let addr = registry.address();
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "256M", None);
    fill_random(&disk, 0, 48, 3);
    let name = vm::unique("sarde-reg-update");
    let _vm = TestVm::define(&name, &[&disk], None);
    let image = format!("{addr}/e2e/update:latest");
    let publisher = vm::workdir();
    let export = |p: &Path| {
        ok(sarde(p).args([
            "export",
            "--chunksize",
            "4MiB",
            "--codec",
            "raw",
            &name,
            &image,
        ]))
    };
    export(publisher.path());
    ok(sarde(publisher.path()).args(["push", "--insecure", &image]));
    let runner = vm::workdir();
    ok(sarde(runner.path()).args(["fetch", "--insecure", &image]));
    let old = cached_layers(runner.path(), &addr, "e2e/update", "latest");

    // One 4 MiB region of 48 changes.
    fill_random(&disk, 20, 1, 99);
    export(publisher.path());
    let pushed = json(&ok(sarde(publisher.path()).args([
        "push",
        "--insecure",
        "--format",
        "json",
        &image,
    ])));
    let fetched = json(&ok(sarde(runner.path()).args([
        "fetch",
        "--insecure",
        "--format",
        "json",
        &image,
    ])));
    let new = cached_layers(runner.path(), &addr, "e2e/update", "latest");
    let changed: u64 = new
        .iter()
        .filter(|l| !old.contains(l))
        .map(|(_, size)| *size)
        .sum();
    let changed_count = new.iter().filter(|l| !old.contains(l)).count();
    // The changed piece, plus the config (it lists digests) and the domain XML
    // layer only if it changed: a handful of blobs, not the disk.
    assert!(changed_count <= 3, "{changed_count} blobs changed");
    assert!(changed >= 4 << 20, "the changed piece is in: {changed}");
    assert_eq!(n(&pushed, "blobs_transferred") as usize, changed_count);
    assert_eq!(n(&fetched, "blobs_transferred") as usize, changed_count);
    let received = n(&fetched, "bytes_received");
    let manifest_size = 64 << 10;
    assert!(
        received <= changed + changed / 5 + manifest_size,
        "received {received} for {changed} bytes of changed blobs"
    );
}
