//! The `oci:` transport, an OCI image layout directory as skopeo names it
//! (`oci:PATH[:TAG]`): sarde pushes into one, skopeo copies it into another
//! (reading what sarde wrote, writing what sarde then reads), sarde pulls from
//! skopeo's copy into an empty cache and VM directory, and the guest sees the
//! same disk. No registry is involved: the air-gapped path.

use std::path::Path;
use std::process::Command;

use sarde_e2e::registry::{RegistryOptions, TestRegistry, registry_tests_enabled};
use sarde_e2e::vm::{self, TestVm, fill, fill_random, qcow2, same_guest_content};
use sarde_e2e::{fails, ok, sarde};
use serde_json::Value;

/// Whether the test can run here; fails under CI when skopeo is missing.
fn enabled(test: &str) -> bool {
    if !vm::libvirt_enabled(test) {
        return false;
    }
    let skopeo = Command::new("skopeo").arg("--version").output();
    sarde_test_prerequisite::require(test, skopeo.is_ok(), "skopeo (scripts/install-deps.sh)")
}

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("skopeo runs");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The manifest digest a layout's index tags `tag` with.
fn tagged(layout: &Path, tag: &str) -> String {
    let index = json(&std::fs::read_to_string(layout.join("index.json")).expect("index.json"));
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str())
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()))
        .to_string()
}

#[test]
fn push_to_a_layout_skopeo_copies_it_and_sarde_pulls_the_copy() {
    if !enabled("push_to_a_layout_skopeo_copies_it_and_sarde_pulls_the_copy") {
        return;
    }
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "48M", None);
    fill_random(&disk, 0, 6, 3);
    fill(&disk, 0x61, "12M", "1M");
    let name = vm::unique("sarde-oci");
    let mut source_vm = TestVm::define(&name, &[&disk], None);
    let home = vm::workdir();
    let image = "e2e/oci-layout:1";
    ok(sarde(home.path()).args(["export", "--chunksize", "4MiB", &name, image]));

    // sarde writes a layout…
    let ours = work.path().join("from-sarde");
    let pushed = json(&ok(sarde(home.path()).args([
        "push",
        "--format",
        "json",
        "-t",
        &format!("oci:{}:v1", ours.display()),
        image,
    ])));
    let manifest = pushed["manifest"]
        .as_str()
        .expect("manifest digest")
        .to_string();
    assert_eq!(tagged(&ours, "v1"), manifest);
    assert!(ours.join("oci-layout").is_file());

    // …skopeo reads it and writes another…
    let theirs = work.path().join("from-skopeo");
    skopeo(&[
        "copy",
        &format!("oci:{}:v1", ours.display()),
        &format!("oci:{}:v2", theirs.display()),
    ]);
    let raw = skopeo(&["inspect", "--raw", &format!("oci:{}:v2", theirs.display())]);
    let raw_file = work.path().join("raw-manifest");
    std::fs::write(&raw_file, &raw).expect("manifest written");
    assert_eq!(
        format!("sha256:{}", vm::sha256(&raw_file)),
        manifest,
        "skopeo kept the manifest byte for byte"
    );
    assert_eq!(tagged(&theirs, "v2"), manifest);

    // …which sarde pulls into an empty cache and VM directory.
    let other = vm::workdir();
    let pulled = vm::unique("sarde-oci-pulled");
    source_vm.cleanup_also(&pulled);
    let out = json(&ok(sarde(other.path()).args([
        "pull",
        "--format",
        "json",
        "-n",
        &pulled,
        "-s",
        &format!("oci:{}:v2", theirs.display()),
        "e2e/from-layout:1",
    ])));
    assert_eq!(out["manifest"], manifest.as_str());
    let imported = other.path().join("VMs").join(&pulled).join("disk.qcow2");
    assert!(
        same_guest_content(&disk, &imported),
        "guest content differs"
    );

    // A second push of the same image moves only the manifest.
    let again = json(&ok(sarde(home.path()).args([
        "push",
        "--format",
        "json",
        "-t",
        &format!("oci:{}:v1", ours.display()),
        image,
    ])));
    assert_eq!(again["targets"][0]["manifest_only"], true, "{again}");
    assert_eq!(again["blobs_transferred"], 0, "{again}");
    assert!(again["bytes_sent"].as_u64() < Some(4096), "{again}");

    // References in the wrong shape say the syntax.
    let err = fails(sarde(home.path()).args(["push", "-t", "oci::v1", image]));
    assert!(err.contains("oci:PATH[:TAG]"), "{err}");
    let err = fails(sarde(home.path()).args([
        "fetch",
        "-s",
        &format!("oci:{}:nosuch", theirs.display()),
        "e2e/x:1",
    ]));
    assert!(err.contains("nosuch"), "{err}");
}

/// `sarde copy` between any two transports: layout → layout, layout → registry,
/// registry → registry (blobs mounted), registry → layout; every copy keeps the
/// manifest's digest, a repeated copy moves only the manifest, and skopeo reads
/// what landed in the registry.
#[test]
fn copy_between_layouts_and_registries() {
    if !enabled("copy_between_layouts_and_registries") {
        return;
    }
    if !registry_tests_enabled("copy_between_layouts_and_registries") {
        return;
    }
    let registry = TestRegistry::start(RegistryOptions::default());
    let address = registry.address();
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "32M", None);
    fill_random(&disk, 0, 4, 8);
    let name = vm::unique("sarde-copy");
    let _vm = TestVm::define(&name, &[&disk], None);
    let home = vm::workdir();
    let home = home.path();
    ok(sarde(home).args(["export", "--chunksize", "2MiB", &name, "e2e/copy:1"]));
    let first = work.path().join("first");
    let pushed = json(&ok(sarde(home).args([
        "push",
        "--format",
        "json",
        "-t",
        &format!("oci:{}:1", first.display()),
        "e2e/copy:1",
    ])));
    let manifest = pushed["manifest"].as_str().expect("digest").to_string();
    let copy = |src: &str, dst: &str| -> Value {
        json(&ok(sarde(home).args([
            "copy",
            "--insecure",
            "--format",
            "json",
            src,
            dst,
        ])))
    };

    let second = format!("oci:{}:2", work.path().join("second").display());
    let out = copy(&format!("oci:{}:1", first.display()), &second);
    assert_eq!(out["manifest"], manifest.as_str(), "{out}");
    assert!(out["blobs_transferred"].as_u64() > Some(1), "{out}");
    let out = copy(&format!("oci:{}:1", first.display()), &second);
    assert_eq!(
        out["manifest_only"], true,
        "a second copy moves the manifest: {out}"
    );

    let in_registry = format!("docker://{address}/copy/a:1");
    let out = copy(&second, &in_registry);
    assert_eq!(out["manifest"], manifest.as_str(), "{out}");
    let inspect = json(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{address}/copy/a:1"),
    ]));
    assert_eq!(inspect["Digest"], manifest.as_str());

    let out = copy(&in_registry, &format!("{address}/copy/b:1"));
    assert_eq!(out["blobs_transferred"], 0, "mounted, not uploaded: {out}");
    assert!(out["blobs_mounted"].as_u64() > Some(1), "{out}");

    let back = work.path().join("back");
    let out = copy(
        &format!("{address}/copy/b:1"),
        &format!("oci:{}:3", back.display()),
    );
    assert_eq!(out["manifest"], manifest.as_str(), "{out}");
    assert_eq!(tagged(&back, "3"), manifest);

    // `--transport` names the transport of references without a scheme.
    let unprefixed = json(&ok(sarde(home).args([
        "copy",
        "--transport",
        "oci",
        "--format",
        "json",
        &format!("{}:1", first.display()),
        &format!("{}:5", work.path().join("fifth").display()),
    ])));
    assert_eq!(unprefixed["manifest"], manifest.as_str(), "{unprefixed}");
    let err = fails(sarde(home).args(["copy", "--transport", "nosuch", "a", "b"]));
    assert!(
        err.contains("nosuch") && err.contains("oci-archive"),
        "{err}"
    );

    // A source that does not exist: a clear error, nothing written.
    let err = fails(sarde(home).args([
        "copy",
        &format!("oci:{}:nosuch", first.display()),
        &format!("oci:{}:4", work.path().join("never").display()),
    ]));
    assert!(err.contains("nosuch"), "{err}");
    assert!(!work.path().join("never").join("index.json").exists());
}

/// The air-gapped path through one file: export → `push` to an `oci-archive:`
/// → the file moved → `pull` from it into an empty cache and VM directory, the
/// same guest disk; skopeo reads the archive sarde wrote and writes one sarde
/// reads; a truncated archive is refused, leaving no image and no VM.
#[test]
fn an_archive_carries_an_image_and_skopeo_agrees() {
    if !enabled("an_archive_carries_an_image_and_skopeo_agrees") {
        return;
    }
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "40M", None);
    fill_random(&disk, 0, 5, 12);
    fill(&disk, 0x77, "20M", "1M");
    let name = vm::unique("sarde-archive");
    let mut source_vm = TestVm::define(&name, &[&disk], None);
    let home = vm::workdir();
    ok(sarde(home.path()).args(["export", "--chunksize", "2MiB", &name, "e2e/archive:1"]));
    let usb = work.path().join("usb");
    std::fs::create_dir(&usb).unwrap();
    let archive = usb.join("image.tar");
    let pushed = json(&ok(sarde(home.path()).args([
        "push",
        "--format",
        "json",
        "-t",
        &format!("oci-archive:{}:v1", archive.display()),
        "e2e/archive:1",
    ])));
    let manifest = pushed["manifest"].as_str().expect("digest").to_string();
    let leftovers: Vec<_> = std::fs::read_dir(&usb)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["image.tar"], "only the archive is left");

    // Carried to the runner.
    let runner = work.path().join("runner");
    std::fs::create_dir(&runner).unwrap();
    let carried = runner.join("win.tar");
    std::fs::rename(&archive, &carried).unwrap();
    let other = vm::workdir();
    let pulled = vm::unique("sarde-archive-pulled");
    source_vm.cleanup_also(&pulled);
    ok(sarde(other.path()).args([
        "pull",
        "-n",
        &pulled,
        "-s",
        &format!("oci-archive:{}:v1", carried.display()),
        "e2e/carried:1",
    ]));
    let imported = other.path().join("VMs").join(&pulled).join("disk.qcow2");
    assert!(
        same_guest_content(&disk, &imported),
        "guest content differs"
    );

    // skopeo reads sarde's archive…
    let unpacked = work.path().join("unpacked");
    skopeo(&[
        "copy",
        &format!("oci-archive:{}:v1", carried.display()),
        &format!("oci:{}:v1", unpacked.display()),
    ]);
    assert_eq!(tagged(&unpacked, "v1"), manifest);
    // …and writes one sarde reads.
    let theirs = work.path().join("theirs.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:v1", unpacked.display()),
        &format!("oci-archive:{}:v2", theirs.display()),
    ]);
    let back = work.path().join("back");
    let out = json(&ok(sarde(home.path()).args([
        "copy",
        "--format",
        "json",
        &format!("oci-archive:{}:v2", theirs.display()),
        &format!("oci:{}:v2", back.display()),
    ])));
    assert_eq!(out["manifest"], manifest.as_str(), "{out}");

    // A truncated archive: a clear error, no image, no VM.
    let bytes = std::fs::read(&carried).unwrap();
    let cut = work.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let fresh = vm::workdir();
    let broken = vm::unique("sarde-archive-broken");
    source_vm.cleanup_also(&broken);
    let err = fails(sarde(fresh.path()).args([
        "pull",
        "-n",
        &broken,
        "-s",
        &format!("oci-archive:{}:v1", cut.display()),
        "e2e/cut:1",
    ]));
    assert!(err.contains(&cut.display().to_string()), "{err}");
    assert!(!vm::domain_exists(&broken), "a VM was defined: {err}");
    let list = ok(sarde(fresh.path()).args(["list", "--format", "json"]));
    assert!(!list.contains("e2e/cut"), "{list}");
}

#[test]
fn an_image_named_by_its_transport_is_cached_under_a_name_made_of_it() {
    if !enabled("an_image_named_by_its_transport_is_cached_under_a_name_made_of_it") {
        return;
    }
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "24M", None);
    fill_random(&disk, 0, 3, 7);
    let name = vm::unique("sarde-named");
    let mut source_vm = TestVm::define(&name, &[&disk], None);
    let home = vm::workdir();
    ok(sarde(home.path()).args(["export", "--chunksize", "2MiB", &name, "e2e/named:1"]));

    // An archive whose only image has no name, as `skopeo copy … oci-archive:F` writes one.
    let archive = work.path().join("Win 11.tar");
    let pushed = json(&ok(sarde(home.path()).args([
        "push",
        "--format",
        "json",
        "-t",
        &format!("oci-archive:{}", archive.display()),
        "e2e/named:1",
    ])));
    let manifest = pushed["manifest"].as_str().expect("digest").to_string();
    let index = json(&skopeo(&[
        "inspect",
        "--raw",
        &format!("oci-archive:{}", archive.display()),
    ]));
    assert!(
        index["layers"].is_array(),
        "skopeo reads its only image: {index}"
    );

    // IMAGE names the transport: no cache name given, the digest makes one.
    let runner = vm::workdir();
    let pulled = vm::unique("sarde-named-pulled");
    source_vm.cleanup_also(&pulled);
    let out = json(&ok(sarde(runner.path()).args([
        "pull",
        "--format",
        "json",
        "-n",
        &pulled,
        &format!("oci-archive:{}", archive.display()),
    ])));
    // The archive's path in the repository grammar ("Win 11" had to change, so
    // a hash of the path follows), and the digest.
    let cached = out["image"].as_str().unwrap_or_default().to_string();
    assert!(
        cached.starts_with("localhost/")
            && cached.contains("/win-11.tar-")
            && cached.ends_with(&format!("@{manifest}")),
        "{out}"
    );
    assert_eq!(out["manifest"], manifest.as_str(), "{out}");
    let imported = runner.path().join("VMs").join(&pulled).join("disk.qcow2");
    assert!(
        same_guest_content(&disk, &imported),
        "guest content differs"
    );
    let listed = ok(sarde(runner.path()).args(["list", "--format", "json"]));
    assert!(listed.contains("/win-11.tar-"), "{listed}");

    // Again: nothing moves.
    let again = json(&ok(sarde(runner.path()).args([
        "fetch",
        "--format",
        "json",
        &format!("oci-archive:{}", archive.display()),
    ])));
    assert_eq!(again["up_to_date"], true, "{again}");
    assert_eq!(again["blobs_transferred"], 0, "{again}");

    // A tagged source names the cache entry by its tag.
    let dir = work.path().join("layout");
    ok(sarde(home.path()).args([
        "copy",
        &format!("oci-archive:{}", archive.display()),
        &format!("oci:{}:v7", dir.display()),
    ]));
    let fetched = json(&ok(sarde(runner.path()).args([
        "fetch",
        "--format",
        "json",
        &format!("oci:{}:v7", dir.display()),
    ])));
    // The layout's path names it (lower-cased: the work directory's random
    // name has capitals, so a hash of the path follows).
    let cached = fetched["image"].as_str().unwrap_or_default();
    let path = dir.display().to_string().to_lowercase();
    assert!(
        cached.starts_with(&format!("localhost{path}")) && cached.ends_with(":v7"),
        "{fetched}"
    );
    // Both IMAGE and --source naming a place is refused; push reads the cache only.
    let err = fails(sarde(runner.path()).args([
        "fetch",
        "-s",
        &format!("oci:{}:v7", dir.display()),
        &format!("oci:{}:v7", dir.display()),
    ]));
    assert!(err.contains("--source"), "{err}");
    let err = fails(sarde(runner.path()).args(["push", &format!("oci:{}:v7", dir.display())]));
    assert!(err.contains("sarde copy"), "{err}");
}

/// The partial blob files of a layout directory, with their lengths.
fn layout_partials(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().ok()?.len();
            name.starts_with(".partial-").then_some((name, len))
        })
        .collect()
}

#[test]
fn a_copy_into_a_directory_killed_mid_blob_resumes_inside_it() {
    use sarde_e2e::cache::PushedVm;
    use sarde_e2e::hostile::{Action, HostileServer, Matcher, Mutation, Rule};
    if !enabled("a_copy_into_a_directory_killed_mid_blob_resumes_inside_it")
        || !registry_tests_enabled("a_copy_into_a_directory_killed_mid_blob_resumes_inside_it")
    {
        return;
    }
    const MIB: u64 = 1 << 20;
    let registry = TestRegistry::start(RegistryOptions::default());
    let source = PushedVm::new(
        &registry,
        "layout/killed",
        48,
        &["--chunksize", "16MiB", "--codec", "raw"],
    );
    let blobs = source.cached().blobs();
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    let home = vm::workdir();
    let work = vm::workdir();
    // The copy goes through a proxy that stalls the last whole piece half way, so
    // the kill always lands in the middle of a blob, however fast this machine.
    let stalled = source.largest_piece();
    assert!(stalled.size > 4 * MIB, "{blobs:?}");
    let hostile = HostileServer::start(Some(registry.address()));
    hostile.add_rule(Rule::first(
        1,
        Matcher::blob_get(&stalled.digest),
        Action::ForwardThen(Mutation::StallAfter {
            bytes: stalled.size / 2,
            for_: std::time::Duration::from_secs(300),
        }),
    ));
    let image = source.image_via(&hostile.address());
    // Killed (SIGKILL: no cleanup of its own) once more than 1 MiB of it is in.
    let dir = work.path().join("out");
    let partial_name = format!(".partial-{}", stalled.hex());
    let mut child = sarde(home.path())
        .args(["copy", "-q", "--concurrency", "1", "--insecure"])
        .arg(&image)
        .arg(format!("oci:{}:v1", dir.display()))
        .spawn()
        .expect("sarde copy starts");
    let started = std::time::Instant::now();
    while !layout_partials(&dir)
        .iter()
        .any(|(name, len)| *name == partial_name && *len > MIB)
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before {} was half copied",
            stalled.digest
        );
        assert!(
            started.elapsed().as_secs() < 120,
            "no MiB of {} in 120 s",
            stalled.digest
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partials = layout_partials(&dir);
    let [(_, partial)] = partials.as_slice() else {
        panic!("one partial file expected: {partials:?}");
    };
    let partial = *partial;
    assert!(partial > MIB && partial <= stalled.size / 2, "{partials:?}");
    let tags_now = std::fs::read_to_string(dir.join("index.json"))
        .map(|t| json(&t))
        .unwrap_or_default();
    let tagged_v1 = tags_now["manifests"].as_array().is_some_and(|m| {
        m.iter()
            .any(|d| d["annotations"]["org.opencontainers.image.ref.name"] == "v1")
    });
    assert!(!tagged_v1, "tagged after a killed copy: {tags_now}");
    // Again: only what is missing moves, the kept bytes included in the check.
    let again = json(&ok(sarde(home.path()).args([
        "copy",
        "--format",
        "json",
        "--insecure",
        &image,
        &format!("oci:{}:v1", dir.display()),
    ])));
    let received = again["bytes_received"].as_u64().unwrap();
    assert!(
        received + partial <= total + 64 * 1024,
        "received {received} of {total} with {partial} kept: {again}"
    );
    assert!(layout_partials(&dir).is_empty(), "a partial file is left");
    assert!(tagged(&dir, "v1").starts_with("sha256:"));
    // skopeo reads the resumed directory, every blob verified.
    let check = work.path().join("check");
    skopeo(&[
        "copy",
        &format!("oci:{}:v1", dir.display()),
        &format!("oci:{}:v1", check.display()),
    ]);
    // And once more: the manifest only.
    let once_more = json(&ok(sarde(home.path()).args([
        "copy",
        "--format",
        "json",
        "--insecure",
        &image,
        &format!("oci:{}:v1", dir.display()),
    ])));
    assert_eq!(once_more["manifest_only"], true, "{once_more}");
    assert_eq!(once_more["blobs_transferred"], 0, "{once_more}");
}
