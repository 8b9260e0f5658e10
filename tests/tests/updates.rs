//! Updates that cost what changed, on the real `qemu:///system` with real qemu-img:
//! an incremental export gives exactly the image a full export gives.

use std::path::Path;

use sarde_e2e::cache::{Blob, CachedImage};
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

/// (offset, piece digest) of each disk piece of a cached image.
fn pieces(image: &CachedImage) -> Vec<(u64, String)> {
    image.manifest()["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| {
            let a = &l["annotations"];
            Some((
                a["org.sardinecake.piece.offset"].as_str()?.parse().ok()?,
                a["org.sardinecake.piece.digest"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn import_json(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = ok(sarde(home).args(["import", "--format", "json"]).args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("import said {out:?}: {e}"))
}

#[test]
fn an_update_import_copies_unchanged_pieces_but_never_modified_bytes() {
    if !vm::libvirt_enabled("an_update_import_copies_unchanged_pieces_but_never_modified_bytes") {
        return;
    }
    let work = vm::workdir();
    let disk = work.path().join("d.qcow2");
    qcow2(&disk, "32M", None);
    fill_random(&disk, 0, 16, 11);
    let name = vm::unique("sarde-upd");
    let mut test_vm = TestVm::define(&name, &[&disk], None);
    let home = vm::workdir();
    let (a, b, full) = (
        format!("{name}-a"),
        format!("{name}-b"),
        format!("{name}-full"),
    );
    for vm in [&a, &b, &full] {
        test_vm.cleanup_also(vm);
    }
    export(home.path(), &name, "localhost/e2e/upd:1");
    fill_random(&disk, 4, 1, 12);
    export(home.path(), &name, "localhost/e2e/upd:2");
    let old = pieces(&CachedImage::new(home.path(), "localhost/e2e/upd:1"));
    let new = pieces(&CachedImage::new(home.path(), "localhost/e2e/upd:2"));
    let shared: Vec<&(u64, String)> = new.iter().filter(|p| old.contains(p)).collect();
    assert!(
        shared.len() > 4 && shared.len() < new.len(),
        "{old:?} {new:?}"
    );

    // Version 1 imported twice; A's file is then modified inside a piece that
    // version 2 shares (its stamp changes: its record is not trusted).
    for vm in [&a, &b] {
        import_json(home.path(), &["-n", vm, "localhost/e2e/upd:1"]);
    }
    let a_file = home.path().join("VMs").join(&a).join("d.qcow2");
    let (offset, _) = shared[shared.len() / 2];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&a_file)
            .unwrap();
        let mut byte = [0u8; 1];
        std::fs::File::open(&a_file)
            .unwrap()
            .read_exact_at(&mut byte, offset + 100)
            .unwrap();
        f.write_all_at(&[byte[0] ^ 0x5a], offset + 100).unwrap();
    }

    // The reference: version 2 imported from its blobs alone (in a VM directory
    // with no earlier version).
    let alone = home.path().join("alone");
    let reference = import_json(
        home.path(),
        &[
            "-n",
            &full,
            "--vmdir",
            alone.to_str().unwrap(),
            "localhost/e2e/upd:2",
        ],
    );
    let reference_file = alone.join(&full).join("d.qcow2");
    assert_eq!(reference["bytes_copied"], 0, "{reference}");

    // B's disk is untouched, but its record only repeats what version 1 claimed
    // (zstd pieces are checked by zstd's checksum, not hashed): here it claims
    // version 2's bytes where version 1 had others. The update hashes what it
    // copies and takes that piece from its blob instead.
    let marker_path = home.path().join("VMs").join(&b).join(".sarde-image.json");
    let mut marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&marker_path).unwrap()).unwrap();
    let (changed_offset, claimed) = new
        .iter()
        .find(|p| !old.contains(p) && old.iter().any(|(o, _)| o == &p.0))
        .expect("a piece that changed in place");
    for region in marker["files"][0]["regions"].as_array_mut().unwrap() {
        if region["offset"] == *changed_offset {
            // An image's claim, which no import hashed.
            region["digest"] = serde_json::json!(claimed);
            region.as_object_mut().unwrap().remove("verified");
        }
    }
    std::fs::write(&marker_path, serde_json::to_vec(&marker).unwrap()).unwrap();
    let updated = import_json(home.path(), &["-n", &b, "--replace", "localhost/e2e/upd:2"]);
    assert!(updated["bytes_copied"].as_u64().unwrap() > 0, "{updated}");
    assert_eq!(updated["copied_from"], serde_json::json!([b]), "{updated}");
    let b_file = home.path().join("VMs").join(&b).join("d.qcow2");
    assert_eq!(vm::sha256(&b_file), vm::sha256(&reference_file));

    // A was modified: its shared pieces are hashed, the modified one comes from its blob.
    let updated = import_json(home.path(), &["-n", &a, "--replace", "localhost/e2e/upd:2"]);
    assert!(updated["bytes_copied"].as_u64().unwrap() > 0, "{updated}");
    assert_eq!(updated["copied_from"], serde_json::json!([a]), "{updated}");
    assert_eq!(vm::sha256(&a_file), vm::sha256(&reference_file));
}

/// Every blob file of a cache layout.
fn stored_blobs(layout: &Path) -> Vec<String> {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                .filter(|name| !name.contains(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// The blob digests of a cached image's disk pieces.
fn piece_blobs(image: &CachedImage) -> Vec<String> {
    image
        .blobs()
        .into_iter()
        .filter(Blob::is_piece)
        .map(|b| b.digest)
        .collect()
}

#[test]
fn a_host_that_keeps_no_blobs_pulls_updates_and_repulls() {
    if !sarde_e2e::registry::registry_tests_enabled(
        "a_host_that_keeps_no_blobs_pulls_updates_and_repulls",
    ) {
        return;
    }
    let registry = sarde_e2e::registry::TestRegistry::start(Default::default());
    let image = format!("{}/e2e/keep:latest", registry.address());
    let work = vm::workdir();
    let disk = work.path().join("d.qcow2");
    qcow2(&disk, "32M", None);
    fill_random(&disk, 0, 16, 21);
    let name = vm::unique("sarde-keep");
    let mut test_vm = TestVm::define(&name, &[&disk], None);
    let pulled = format!("{name}-pulled");
    test_vm.cleanup_also(&pulled);
    let builder = vm::workdir();
    let built = CachedImage::new(builder.path(), &image);
    export(builder.path(), &name, &image);
    ok(sarde(builder.path()).args(["push", "--insecure", &image]));
    let v1_pieces = piece_blobs(&built);

    let runner = vm::workdir();
    let pull = || {
        let mut cmd = sarde(runner.path());
        cmd.env("SARDE_KEEP_BLOBS", "no").args([
            "pull",
            "--insecure",
            "--replace",
            "-n",
            &pulled,
            &image,
        ]);
        ok(&mut cmd)
    };
    let layout = CachedImage::new(runner.path(), &image).layout;
    let vm_file = runner.path().join("VMs").join(&pulled).join("d.qcow2");
    pull();
    assert_eq!(vm::sha256(&vm_file), vm::sha256(&disk));
    let kept = stored_blobs(&layout);
    assert!(
        kept.iter().all(|b| !v1_pieces.contains(b)),
        "the cache keeps no piece: {kept:?}"
    );
    assert!(!kept.is_empty());

    // The image counts as complete: prune keeps it; push says why it cannot.
    ok(sarde(runner.path()).args(["prune"]));
    let listed = ok(sarde(runner.path()).args(["list", "--format", "json"]));
    assert!(listed.contains("e2e/keep"), "{listed}");
    let refused = sarde_e2e::fails(sarde(runner.path()).args([
        "push",
        "--insecure",
        "-t",
        &format!("{}/e2e/elsewhere:1", registry.address()),
        &image,
    ]));
    assert!(refused.contains("keep-blobs"), "{refused}");

    // An update moves only the changed pieces: unchanged ones come from the VM.
    fill_random(&disk, 5, 1, 22);
    export(builder.path(), &name, &image);
    ok(sarde(builder.path()).args(["push", "--insecure", &image]));
    let v2_pieces = piece_blobs(&built);
    pull();
    assert_eq!(vm::sha256(&vm_file), vm::sha256(&disk));
    for piece in &v2_pieces {
        let fetched = registry.blob_gets(piece);
        if v1_pieces.contains(piece) {
            assert_eq!(
                fetched, 1,
                "{piece} is unchanged: fetched by the first pull only"
            );
        } else {
            assert_eq!(fetched, 1, "{piece} changed: fetched once, by the update");
        }
    }
    assert!(v2_pieces.iter().any(|p| !v1_pieces.contains(p)));
    let kept = stored_blobs(&layout);
    assert!(kept.iter().all(|b| !v2_pieces.contains(b)), "{kept:?}");

    // A re-pull of the unchanged tag fetches nothing and leaves the VM alone.
    let gets = registry.answered("GET", "/blobs/");
    pull();
    assert_eq!(registry.answered("GET", "/blobs/"), gets);
    assert_eq!(vm::sha256(&vm_file), vm::sha256(&disk));
}
