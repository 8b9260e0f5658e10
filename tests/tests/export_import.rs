//! VM → local OCI layout → VM on the real `qemu:///system`, with real qemu-img:
//! disks compared byte for byte and by guest content, domain XML checked.

use std::path::{Path, PathBuf};

use sarde_e2e::vm::{self, TestVm, fill, fill_random, qcow2, same_guest_content, sha256};
use sarde_e2e::{fails, ok, sarde};

/// Exports `vm` as `image` with extra args, imports it as `new_name`; returns the
/// directory of the imported VM.
fn round_trip(home: &Path, vm: &str, image: &str, export_args: &[&str], new_name: &str) -> PathBuf {
    let id = ok(sarde(home)
        .arg("export")
        .args(export_args)
        .args([vm, image]));
    assert!(
        id.starts_with("sha256:") && id.len() == 71,
        "image id {id:?}"
    );
    let printed = ok(sarde(home).args(["import", "-n", new_name, image]));
    assert_eq!(printed, new_name);
    home.join("VMs").join(new_name)
}

/// The imported file with this name must equal `source` byte for byte (when
/// `same_bytes`) and by guest content.
fn assert_same(imported_dir: &Path, name: &str, source: &Path, same_bytes: bool) {
    let imported = imported_dir.join(name);
    assert!(imported.is_file(), "{} missing", imported.display());
    assert!(
        same_guest_content(source, &imported),
        "{name}: guest content differs"
    );
    if same_bytes {
        assert_eq!(sha256(source), sha256(&imported), "{name}: bytes differ");
    }
}

#[test]
fn single_disk_round_trip_with_each_codec() {
    if !vm::libvirt_enabled("single_disk_round_trip_with_each_codec") {
        return;
    }
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "256M", None);
    fill(&disk, 0x5a, "0", "3M");
    fill_random(&disk, 100, 5, 7);
    let name = vm::unique("sarde-single");
    let mut test_vm = TestVm::define(&name, &[&disk], None);
    for codec in ["zstd", "xz", "gzip", "raw"] {
        let home = vm::workdir();
        let new = format!("{name}-{codec}");
        test_vm.cleanup_also(&new);
        let image = format!("localhost/e2e/{codec}:1");
        let dir = round_trip(
            home.path(),
            &name,
            &image,
            &["--codec", codec, "--chunksize", "1MiB"],
            &new,
        );
        assert_same(&dir, "disk.qcow2", &disk, true);
        let xml = vm::dumpxml(&new);
        assert!(xml.contains(&format!("<name>{new}</name>")), "{xml}");
        assert!(
            xml.contains(&format!("{}", dir.join("disk.qcow2").display())),
            "disk source not rewritten: {xml}"
        );
        assert!(!xml.contains("52:54:00:12:34:56"), "MAC kept: {xml}");
        // Import again: same image, intact disks → success, nothing redone.
        let again = ok(sarde(home.path()).args(["import", "-n", &new, &image]));
        assert_eq!(again, new);
        // getconfig of an image without access JSON prints {}; a missing tag fails.
        assert_eq!(ok(sarde(home.path()).args(["getconfig", &image])), "{}");
        let err = fails(sarde(home.path()).args(["getconfig", "localhost/e2e/none:1"]));
        assert!(err.contains("localhost/e2e/none"), "{err}");
    }
}

#[test]
fn backing_chains_anywhere_import_into_one_directory() {
    if !vm::libvirt_enabled("backing_chains_anywhere_import_into_one_directory") {
        return;
    }
    let work = vm::workdir();
    let other = work.path().join("elsewhere");
    std::fs::create_dir(&other).unwrap();
    // base (other dir, absolute) <- mid (./base form is not possible across dirs) <- top
    let base = other.join("base.qcow2");
    qcow2(&base, "128M", None);
    fill(&base, 0x11, "0", "2M");
    let mid = work.path().join("mid.qcow2");
    qcow2(&mid, "128M", Some(base.to_str().unwrap()));
    fill(&mid, 0x22, "1M", "2M");
    let local_base = work.path().join("base2.qcow2");
    qcow2(&local_base, "64M", None);
    fill(&local_base, 0x33, "0", "1M");
    let dot = work.path().join("dot.qcow2");
    qcow2(&dot, "64M", Some("./base2.qcow2"));
    fill(&dot, 0x44, "4M", "1M");
    let top = work.path().join("top.qcow2");
    qcow2(&top, "128M", Some("mid.qcow2"));
    fill(&top, 0x55, "2M", "1M");

    let name = vm::unique("sarde-chain");
    // vdc uses base2.qcow2 directly while dot.qcow2 (vdb) is an overlay of it.
    let mut test_vm = TestVm::define(&name, &[&top, &dot, &local_base], None);
    let new = format!("{name}-imported");
    test_vm.cleanup_also(&new);
    let home = vm::workdir();
    let dir = round_trip(
        home.path(),
        &name,
        "localhost/e2e/chain:1",
        &["--chunksize", "1MiB"],
        &new,
    );
    // Bases keep their bytes; overlays now reference the imported files.
    assert_same(&dir, "base.qcow2", &base, true);
    assert_same(&dir, "base2.qcow2", &local_base, true);
    assert_same(&dir, "top.qcow2", &top, false);
    assert_same(&dir, "dot.qcow2", &dot, false);
    assert_eq!(
        vm::backing_reference(&dir.join("top.qcow2")).as_deref(),
        Some("mid.qcow2")
    );
    assert_eq!(
        vm::backing_reference(&dir.join("mid.qcow2")).as_deref(),
        Some("base.qcow2")
    );
    assert_eq!(
        vm::backing_reference(&dir.join("dot.qcow2")).as_deref(),
        Some("base2.qcow2")
    );
    let entries: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(entries.len(), 5, "{entries:?}");
    let xml = vm::dumpxml(&new);
    assert!(
        xml.contains(&format!("{}", dir.join("base2.qcow2").display())),
        "{xml}"
    );

    // Importing the same image again finds the VM intact (overlays were rebased).
    assert_eq!(
        ok(sarde(home.path()).args(["import", "-n", &new, "localhost/e2e/chain:1"])),
        new
    );
    // A VM sarde did not import is never replaced.
    let err = fails(sarde(home.path()).args([
        "import",
        "--replace",
        "-n",
        &name,
        "localhost/e2e/chain:1",
    ]));
    assert!(err.contains("not imported by sarde"), "{err}");
    assert!(vm::domain_exists(&name));

    // `list` shows the image and the VM imported under an explicit name.
    let listed = ok(sarde(home.path()).args(["list", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let entry = &v["images"][0];
    assert_eq!(entry["name"], "localhost/e2e/chain");
    assert_eq!(entry["tag"], "1");
    assert_eq!(entry["vms"][0]["name"], new.as_str());
    assert_eq!(entry["vms"][0]["state"], "stopped");

    // Another image under the same VM name is refused unless --replace.
    ok(sarde(home.path()).args(["export", "--codec", "gzip", &name, "localhost/e2e/other:1"]));
    let err = fails(sarde(home.path()).args(["import", "-n", &new, "localhost/e2e/other:1"]));
    assert!(
        err.contains("already exists") && err.contains("--replace"),
        "{err}"
    );
    ok(sarde(home.path()).args(["import", "--replace", "-n", &new, "localhost/e2e/other:1"]));
    assert!(same_guest_content(&dir.join("top.qcow2"), &top));
    ok(sarde(home.path()).args(["import", "--replace", "-n", &new, "localhost/e2e/chain:1"]));

    // Re-exporting the same tag replaces it (no duplicate entries).
    ok(sarde(home.path()).args([
        "export",
        "--chunksize",
        "1MiB",
        &name,
        "localhost/e2e/chain:1",
    ]));
    let listed = ok(sarde(home.path()).args(["list", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let chains = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "localhost/e2e/chain")
        .count();
    assert_eq!(chains, 1, "{v}");
}

#[test]
fn export_is_deterministic_and_refuses_a_running_vm() {
    if !vm::libvirt_enabled("export_is_deterministic_and_refuses_a_running_vm") {
        return;
    }
    let work = vm::workdir();
    let disk = work.path().join("d.qcow2");
    qcow2(&disk, "64M", None);
    fill(&disk, 0x77, "0", "2M");
    let name = vm::unique("sarde-det");
    let _vm = TestVm::define(&name, &[&disk], None);
    let home = vm::workdir();
    let a = ok(sarde(home.path()).args(["export", &name, "localhost/e2e/det:a"]));
    let b = ok(sarde(home.path()).args(["export", &name, "localhost/e2e/det:b"]));
    assert_eq!(a, b, "same VM, same image id");
    let listed = ok(sarde(home.path()).args(["list", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v["images"][0]["manifest"], v["images"][1]["manifest"]);

    // Other OCI tools read the image: skopeo inspects the layout.
    let layout = home.path().join("OCI/localhost/e2e/det");
    let inspected = vm::run(
        "skopeo",
        &["inspect", &format!("oci:{}:a", layout.display())],
    );
    let v: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(v["Architecture"], "amd64", "{inspected}");
    assert_eq!(v["Os"], "linux", "{inspected}");
    assert!(v["Layers"].as_array().unwrap().len() >= 2, "{inspected}");

    // A VM that is not stopped is refused, and says why and what to do.
    vm::run(
        "virsh",
        &["-q", "-c", vm::LIBVIRT_URI, "start", "--paused", &name],
    );
    let err = fails(sarde(home.path()).args(["export", &name, "localhost/e2e/det:c"]));
    assert!(err.contains("paused") && err.contains("--force"), "{err}");
    vm::run("virsh", &["-q", "-c", vm::LIBVIRT_URI, "destroy", &name]);
}

#[test]
fn v1_format_round_trip() {
    if !vm::libvirt_enabled("v1_format_round_trip") {
        return;
    }
    let work = vm::workdir();
    let base = work.path().join("base.qcow2");
    qcow2(&base, "64M", None);
    fill_random(&base, 0, 3, 11);
    let top = work.path().join("top.qcow2");
    qcow2(&top, "64M", Some(base.to_str().unwrap()));
    fill(&top, 0x66, "8M", "1M");
    let name = vm::unique("sarde-v1");
    let mut test_vm = TestVm::define(&name, &[&top], None);
    let new = format!("{name}-imported");
    test_vm.cleanup_also(&new);
    let home = vm::workdir();
    let config = work.path().join("access.json");
    std::fs::write(
        &config,
        r#"{"users":[{"username":"vagrant","password":"vagrant"}]}"#,
    )
    .unwrap();
    let dir = round_trip(
        home.path(),
        &name,
        "localhost/e2e/v1:1",
        &[
            // v1 means gzip: no --codec needed.
            "--image-format",
            "v1",
            "--chunksize",
            "1MiB",
            "--vmconfig",
            config.to_str().unwrap(),
        ],
        &new,
    );
    assert_same(&dir, "base.qcow2", &base, true);
    assert_same(&dir, "top.qcow2", &top, false);
    // The absolute reference became the plain name the Python tool needs.
    assert_eq!(
        vm::backing_reference(&dir.join("top.qcow2")).as_deref(),
        Some("base.qcow2")
    );
    let got = ok(sarde(home.path()).args(["getconfig", "localhost/e2e/v1:1"]));
    assert!(got.contains("vagrant"), "{got}");
}

#[test]
fn uefi_vm_with_nvram_and_access_json_round_trips() {
    if !vm::libvirt_enabled("uefi_vm_with_nvram_and_access_json_round_trips") {
        return;
    }
    let work = vm::workdir();
    let disk = work.path().join("uefi.qcow2");
    qcow2(&disk, "64M", None);
    fill(&disk, 0x99, "0", "1M");
    let nvram = work.path().join("uefi_VARS.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS.fd", &nvram).unwrap();
    // Make the variable store differ from the template, as a used one does.
    let mut vars = std::fs::read(&nvram).unwrap();
    vars[4096..4100].copy_from_slice(b"sard");
    std::fs::write(&nvram, &vars).unwrap();
    let name = vm::unique("sarde-uefi");
    let mut test_vm = TestVm::define(&name, &[&disk], Some(&nvram));
    let new = format!("{name}-imported");
    test_vm.cleanup_also(&new);
    let access = work.path().join("access.json");
    std::fs::write(&access, r#"{"users":[{"username":"ci","password":"secret"}],"services":[{"service":"ssh","port":22,"protocol":"tcp"}]}"#).unwrap();
    let home = vm::workdir();
    let dir = round_trip(
        home.path(),
        &name,
        "localhost/e2e/uefi:1",
        &["--vmconfig", access.to_str().unwrap()],
        &new,
    );
    assert_same(&dir, "uefi.qcow2", &disk, true);
    assert_eq!(
        sha256(&dir.join("uefi_VARS.fd")),
        sha256(&nvram),
        "NVRAM differs"
    );
    let xml = vm::dumpxml(&new);
    assert!(
        xml.contains(&format!("{}</nvram>", dir.join("uefi_VARS.fd").display())),
        "NVRAM not rewritten: {xml}"
    );
    assert!(xml.contains("/usr/share/OVMF/OVMF_CODE.fd"), "{xml}");
    let config = ok(sarde(home.path()).args(["getconfig", "localhost/e2e/uefi:1"]));
    let v: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(v["users"][0]["username"], "ci");
    // The default name is the image id, and --print-uuid prints a UUID.
    let id = ok(sarde(home.path()).args(["export", &name, "localhost/e2e/uefi:2"]));
    test_vm.cleanup_also(&id);
    let uuid = ok(sarde(home.path()).args(["import", "--print-uuid", "localhost/e2e/uefi:2"]));
    assert_eq!(uuid.len(), 36, "{uuid}");
    assert!(vm::domain_exists(&id));
}
