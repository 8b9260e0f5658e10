//! Updates that cost what changed, on the real `qemu:///system` with real qemu-img:
//! an incremental export gives exactly the image a full export gives.

use std::path::Path;

use sarde_e2e::vm::{self, TestVm, fill_random, qcow2};
use sarde_e2e::{ok, sarde};

/// Exports `vm` as `image` with 1 MiB pieces; returns the export's JSON summary.
fn export(home: &Path, vm: &str, image: &str) -> serde_json::Value {
    let out = ok(sarde(home).args([
        "export",
        "--chunksize",
        "1MiB",
        "--format",
        "json",
        vm,
        image,
    ]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("export said {out:?}: {e}"))
}

/// A full export of `vm` in a cache of its own (no record of an earlier export).
fn full_export(vm: &str, image: &str) -> serde_json::Value {
    let home = vm::workdir();
    let summary = export(home.path(), vm, image);
    assert_eq!(summary["pieces_reused"], 0, "{summary}");
    summary
}

#[test]
fn incremental_export_gives_the_manifest_of_a_full_export() {
    if !vm::libvirt_enabled("incremental_export_gives_the_manifest_of_a_full_export") {
        return;
    }
    let work = vm::workdir();
    let base = work.path().join("base.qcow2");
    let top = work.path().join("top.qcow2");
    qcow2(&base, "64M", None);
    fill_random(&base, 0, 24, 1);
    qcow2(&top, "64M", Some(base.to_str().unwrap()));
    fill_random(&top, 8, 6, 2);
    let name = vm::unique("sarde-inc");
    let mut test_vm = TestVm::define(&name, &[&top], None);
    let home = vm::workdir();
    let image = "localhost/e2e/inc:latest";

    let first = export(home.path(), &name, image);
    assert_eq!(first["pieces_reused"], 0, "{first}");
    assert_eq!(first["files_unchanged"], 0, "{first}");

    // Nothing changed: neither file is read, every piece is reused.
    let again = export(home.path(), &name, image);
    assert_eq!(again["files_unchanged"], 2, "{again}");
    assert_eq!(again["bytes_read"], 0, "{again}");
    assert_eq!(again["manifest"], first["manifest"], "{again}");

    // Random edits of the top: the base is not read, the top's unchanged pieces
    // are reused, and the image is the one a full export makes.
    fill_random(&top, 10, 1, 3);
    fill_random(&top, 40, 2, 4);
    let after_top = export(home.path(), &name, image);
    assert_eq!(after_top["files_unchanged"], 1, "{after_top}");
    let reused = after_top["pieces_reused"].as_u64().unwrap();
    assert!(
        reused > 24,
        "the base's pieces and most of the top's: {after_top}"
    );
    assert_ne!(after_top["manifest"], first["manifest"]);
    let full = full_export(&name, image);
    assert_eq!(
        after_top["manifest"], full["manifest"],
        "{after_top} vs {full}"
    );
    assert_eq!(after_top["image_id"], full["image_id"]);

    // Random edits of the base (qemu-io on the base itself): the base is read
    // again and its changed pieces compressed; the top, untouched, is not read.
    fill_random(&base, 3, 1, 5);
    fill_random(&base, 50, 3, 6);
    let after_base = export(home.path(), &name, image);
    assert_eq!(after_base["files_unchanged"], 1, "{after_base}");
    let full = full_export(&name, image);
    assert_eq!(
        after_base["manifest"], full["manifest"],
        "{after_base} vs {full}"
    );

    // The image imports and holds what the VM holds.
    test_vm.cleanup_also(&format!("{name}-imp"));
    ok(sarde(home.path()).args(["import", "-n", &format!("{name}-imp"), image]));
    let dir = home.path().join("VMs").join(format!("{name}-imp"));
    assert!(vm::same_guest_content(&top, &dir.join("top.qcow2")));
}

#[test]
fn an_export_record_of_a_collected_blob_is_not_trusted() {
    if !vm::libvirt_enabled("an_export_record_of_a_collected_blob_is_not_trusted") {
        return;
    }
    let work = vm::workdir();
    let disk = work.path().join("d.qcow2");
    qcow2(&disk, "32M", None);
    fill_random(&disk, 0, 12, 7);
    let name = vm::unique("sarde-incgc");
    let mut test_vm = TestVm::define(&name, &[&disk], None);
    let home = vm::workdir();
    let first = export(home.path(), &name, "localhost/e2e/incgc:a");
    // The image goes, and its blobs with it: the record now names blobs that are gone.
    ok(sarde(home.path()).args(["rm", "localhost/e2e/incgc:a"]));
    let again = export(home.path(), &name, "localhost/e2e/incgc:a");
    assert_eq!(again["files_unchanged"], 0, "{again}");
    assert_eq!(again["pieces_reused"], 0, "{again}");
    assert_eq!(again["manifest"], first["manifest"]);
    // And the image is whole: it imports.
    test_vm.cleanup_also(&format!("{name}-imp"));
    ok(sarde(home.path()).args([
        "import",
        "-n",
        &format!("{name}-imp"),
        "localhost/e2e/incgc:a",
    ]));
}
