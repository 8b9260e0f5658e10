//! `sarde clone` on the real `qemu:///system`: overlays on the source's disks, a
//! source that is never written, names, MACs, the start modes.

use std::path::Path;

use sarde_e2e::vm::{self, TestVm, backing_reference, fill, fill_random, qcow2, sha256};
use sarde_e2e::{fails, ok, sarde};
use serde_json::Value;

fn mac_of(xml: &str) -> String {
    let at = xml.find("<mac address='").expect("a MAC") + "<mac address='".len();
    xml[at..at + 17].to_string()
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_clone_is_overlays_on_a_source_that_never_changes() {
    if !vm::libvirt_enabled("a_clone_is_overlays_on_a_source_that_never_changes") {
        return;
    }
    let work = vm::workdir();
    let base = work.path().join("base.qcow2");
    qcow2(&base, "256M", None);
    fill_random(&base, 0, 8, 1);
    let top = work.path().join("top.qcow2");
    qcow2(&top, "256M", Some(base.to_str().unwrap()));
    fill(&top, 0x33, "1M", "1M");
    let data = work.path().join("data.qcow2");
    qcow2(&data, "64M", None);
    fill(&data, 0x44, "0", "2M");
    let name = vm::unique("sarde-clone-src");
    let mut source = TestVm::define(&name, &[&top, &data], None);
    let before: Vec<String> = [&base, &top, &data].iter().map(|p| sha256(p)).collect();
    let home = vm::workdir();

    let first = format!("{name}-clone");
    let second = format!("{name}-clone-2");
    source.cleanup_also(&first);
    source.cleanup_also(&second);
    assert_eq!(ok(sarde(home.path()).args(["clone", &name])), first);
    let out: Value = serde_json::from_str(&ok(
        sarde(home.path()).args(["clone", "--format", "json", &name])
    ))
    .unwrap();
    assert_eq!(out["name"], Value::String(second.clone()));
    assert_eq!(out["overlays"].as_array().unwrap().len(), 2);

    // Each writable disk is an overlay whose backing file is the source's disk.
    let xml = vm::dumpxml(&first);
    let vda = work.path().join(format!("{first}-vda.qcow2"));
    let vdb = work.path().join(format!("{first}-vdb.qcow2"));
    assert!(xml.contains(vda.to_str().unwrap()), "{xml}");
    assert_eq!(backing_reference(&vda).as_deref(), top.to_str());
    assert_eq!(backing_reference(&vdb).as_deref(), data.to_str());
    assert_ne!(mac_of(&xml), mac_of(&vm::dumpxml(&name)), "a new MAC");
    assert!(
        !xml.contains(
            &vm::run("virsh", &["-c", vm::LIBVIRT_URI, "domuuid", &name])
                .trim()
                .to_string()
        )
    );
    // What the clone reads is the source's content.
    assert!(vm::same_guest_content(&vda, &top));

    // Writes go to the overlay; the source's files stay byte for byte.
    fill(&vda, 0x99, "0", "4M");
    assert!(!vm::same_guest_content(&vda, &top));
    let after: Vec<String> = [&base, &top, &data].iter().map(|p| sha256(p)).collect();
    assert_eq!(before, after, "the source's files changed");

    // A name that is taken is refused, naming it.
    let e = fails(sarde(home.path()).args(["clone", &name, &first]));
    assert!(e.contains(&first), "{e}");

    // print-xml defines nothing.
    let printed = ok(sarde(home.path()).args(["clone", "--start", "print-xml", &name, "pxml-x"]));
    assert!(printed.contains("<name>pxml-x</name>"), "{printed}");
    assert!(!vm::domain_exists("pxml-x"));
    for f in ["pxml-x-vda.qcow2", "pxml-x-vdb.qcow2"] {
        let _ = std::fs::remove_file(work.path().join(f));
    }
}

#[test]
fn overlays_cost_the_same_for_a_small_and_a_huge_disk() {
    if !vm::libvirt_enabled("overlays_cost_the_same_for_a_small_and_a_huge_disk") {
        return;
    }
    let work = vm::workdir();
    let small = work.path().join("small.qcow2");
    qcow2(&small, "1G", None);
    fill_random(&small, 0, 64, 2);
    let huge = work.path().join("huge.qcow2");
    qcow2(&huge, "60G", None);
    fill_random(&huge, 30_000, 64, 3);
    let a = vm::unique("sarde-clone-small");
    let b = vm::unique("sarde-clone-huge");
    let mut va = TestVm::define(&a, &[&small], None);
    let mut vb = TestVm::define(&b, &[&huge], None);
    va.cleanup_also(&format!("{a}-c"));
    vb.cleanup_also(&format!("{b}-c"));
    let clones = vm::workdir();
    let home = vm::workdir();
    for v in [&a, &b] {
        ok(sarde(home.path())
            .args(["clone", "--clonedir"])
            .arg(clones.path())
            .args([v.as_str(), &format!("{v}-c")]));
    }
    let sa = allocated(&clones.path().join(format!("{a}-c-vda.qcow2")));
    let sb = allocated(&clones.path().join(format!("{b}-c-vda.qcow2")));
    // A header and empty tables, whatever the disk's size or content.
    assert!(sa < 1 << 20 && sb < 1 << 20, "overlays {sa} and {sb} bytes");
}

#[test]
fn an_ephemeral_clone_disappears_with_its_overlays() {
    if !vm::libvirt_enabled("an_ephemeral_clone_disappears_with_its_overlays") {
        return;
    }
    let work = vm::workdir();
    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "64M", None);
    let name = vm::unique("sarde-clone-eph");
    let mut source = TestVm::define(&name, &[&disk], None);
    let clone = format!("{name}-e");
    source.cleanup_also(&clone);
    let home = vm::workdir();
    ok(sarde(home.path()).args(["clone", "--start", "ephemeral", &name, &clone]));
    let state = vm::run("virsh", &["-c", vm::LIBVIRT_URI, "domstate", &clone]);
    assert_eq!(state.trim(), "running");
    let info = vm::run("virsh", &["-c", vm::LIBVIRT_URI, "dominfo", &clone]);
    assert!(info.contains("Persistent:     no"), "{info}");
    // QEMU holds the overlay open; its name is gone already.
    assert!(!work.path().join(format!("{clone}-vda.qcow2")).exists());
    vm::run("virsh", &["-c", vm::LIBVIRT_URI, "destroy", &clone]);
    assert!(
        !vm::domain_exists(&clone),
        "a transient domain goes when stopped"
    );
    let leftovers: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(&clone))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A running source is refused: its disks would change under the clone.
    vm::run("virsh", &["-c", vm::LIBVIRT_URI, "start", &name]);
    let e = fails(sarde(home.path()).args(["clone", &name, &format!("{name}-r")]));
    assert!(e.contains("shut it down"), "{e}");
    vm::run("virsh", &["-c", vm::LIBVIRT_URI, "destroy", &name]);
}
