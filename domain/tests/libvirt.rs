//! Against the real `qemu:///system`: domains are only defined (never started),
//! dumped and undefined again. They run when libvirtd answers; with
//! `SARDE_TEST_LIBVIRT=1` (CI) an unreachable libvirtd is a failure, not a skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sarde_domain::{
    ImportSpec, check_host_paths, check_untrusted, file_disk_sources, prepare_export,
    prepare_import,
};

const URI: &str = "qemu:///system";

fn libvirt_reachable(test: &str) -> bool {
    let reachable = Command::new("virsh")
        .args(["-q", "-c", URI, "uri"])
        .output()
        .is_ok_and(|o| o.status.success());
    sarde_test_prerequisite::require(
        test,
        reachable,
        &format!("libvirtd at {URI} answering `virsh -c {URI} uri` (scripts/start-services.sh)"),
    )
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot run: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn virsh(args: &[&str]) -> String {
    let mut all = vec!["-q", "-c", URI];
    all.extend_from_slice(args);
    run("virsh", &all)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A defined domain, undefined however the test ends.
struct Defined(String);

impl Defined {
    fn new(xml: &str, dir: &Path) -> Defined {
        let file = dir.join(format!("{}.xml", std::process::id()));
        std::fs::write(&file, xml).unwrap();
        virsh(&["define", s(&file)]);
        Defined(sarde_domain::domain_name(xml).unwrap())
    }

    fn dumpxml(&self) -> String {
        virsh(&["dumpxml", "--inactive", &self.0])
    }
}

impl Drop for Defined {
    fn drop(&mut self) {
        // --nvram: the store, if any, is in the test's temporary directory.
        let _ = Command::new("virsh")
            .args(["-q", "-c", URI, "undefine", "--nvram", &self.0])
            .output();
    }
}

fn unique(what: &str) -> String {
    format!("sarde-domain-test-{what}-{}", std::process::id())
}

/// Disk files as a real VM has them: an overlay on a base, a second disk with the
/// same base name in another directory, an ISO.
fn make_disks(dir: &Path) -> [PathBuf; 3] {
    let a = dir.join("a");
    let b = dir.join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            s(&a.join("base.qcow2")),
            "64M",
        ],
    );
    let overlay = a.join("disk.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            s(&overlay),
        ],
    );
    let second = b.join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&second), "32M"],
    );
    let iso = dir.join("tools.iso");
    std::fs::write(&iso, vec![0u8; 2048]).unwrap();
    [overlay, second, iso]
}

/// What a user would write; libvirt fills in the rest (uuid, MACs, controllers…).
fn domain_xml(name: &str, disks: &[PathBuf; 3], uefi: Option<&Path>) -> String {
    let firmware = match uefi {
        Some(nvram) => format!(
            "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\
             <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{}</nvram>",
            s(nvram)
        ),
        None => String::new(),
    };
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>
      <libosinfo:os id='http://freebsd.org/freebsd/14.0'/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>{firmware}</os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{}'/><target dev='sda' bus='sata'/><readonly/></disk>
    <disk type='file' device='cdrom'><target dev='sdb' bus='sata'/><readonly/></disk>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <serial type='pty'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>",
        s(&disks[0]),
        s(&disks[1]),
        s(&disks[2]),
    )
}

/// The text of the first `<tag …>…</tag>` in libvirt's own output (test-side only).
fn first_value<'a>(xml: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = xml.find(open)? + open.len();
    let end = xml[start..].find(close)? + start;
    Some(&xml[start..end])
}

#[test]
fn real_dumpxml_is_exported_and_passes_the_import_checks() {
    if !libvirt_reachable("real_dumpxml_is_exported_and_passes_the_import_checks") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disks = make_disks(dir.path());
    let name = unique("export");
    let dumped = {
        let defined = Defined::new(&domain_xml(&name, &disks, None), dir.path());
        defined.dumpxml()
    };
    assert!(dumped.contains("<uuid>") && dumped.contains("<mac address="));

    let e = prepare_export(&dumped).unwrap();
    assert_eq!(e.name, name);
    assert_eq!(
        (e.architecture.as_str(), e.os.as_str()),
        ("amd64", "freebsd")
    );
    let summary: Vec<_> = e
        .disks
        .iter()
        .map(|d| {
            (
                d.target.as_str(),
                d.device.as_str(),
                d.source.clone(),
                d.image_name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("vda", "disk", disks[0].clone(), "disk.qcow2"),
            ("vdb", "disk", disks[1].clone(), "disk-1.qcow2"),
            ("sda", "cdrom", disks[2].clone(), "tools.iso"),
        ]
    );
    assert_eq!((e.nvram.clone(), e.loader.clone()), (None, None));
    for gone in ["<uuid>", "<mac ", s(dir.path())] {
        assert!(!e.xml.contains(gone), "{gone} survived:\n{}", e.xml);
    }
    let names: Vec<&str> = e.disks.iter().map(|d| d.image_name.as_str()).collect();
    check_untrusted(&e.xml, &names).unwrap_or_else(|err| panic!("{err}\n{}", e.xml));
    let violations = check_untrusted(&e.xml, &names[..2]).unwrap_err().violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].reason.contains("tools.iso"));
}

#[test]
fn exported_then_imported_xml_is_accepted_by_libvirt() {
    if !libvirt_reachable("exported_then_imported_xml_is_accepted_by_libvirt") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disks = make_disks(dir.path());
    let nvram = dir.path().join("source_VARS.fd");
    let original = {
        let defined = Defined::new(
            &domain_xml(&unique("source"), &disks, Some(&nvram)),
            dir.path(),
        );
        defined.dumpxml()
    };
    let uuid = first_value(&original, "<uuid>", "</uuid>")
        .unwrap()
        .to_string();
    let mac = first_value(&original, "<mac address='", "'")
        .unwrap()
        .to_string();

    let e = prepare_export(&original).unwrap();
    let nv = e.nvram.clone().unwrap();
    assert_eq!(
        (nv.source.as_path(), nv.image_name.as_str()),
        (nvram.as_path(), "source_VARS.fd")
    );
    assert_eq!(
        e.loader.as_deref(),
        Some(Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"))
    );
    let mut names: Vec<&str> = e.disks.iter().map(|d| d.image_name.as_str()).collect();
    names.push(&nv.image_name);
    check_untrusted(&e.xml, &names).unwrap_or_else(|err| panic!("{err}\n{}", e.xml));

    // Where an import would put the files.
    let target = dir.path().join("vms").join("imported");
    std::fs::create_dir_all(&target).unwrap();
    let mut files = BTreeMap::new();
    for d in &e.disks {
        let path = target.join(&d.image_name);
        std::fs::copy(&d.source, &path).unwrap();
        files.insert(d.image_name.clone(), path);
    }
    let name = unique("import");
    let spec = ImportSpec {
        name: name.clone(),
        files: files.clone(),
        nvram: Some(target.join(&nv.image_name)),
        keep_uuid: false,
    };
    let xml = prepare_import(&e.xml, &spec).unwrap();
    assert!(!xml.contains("<uuid>") && !xml.contains("<mac "), "{xml}");
    // The engine's last check on what it defines.
    let own: Vec<String> = files
        .values()
        .chain(spec.nvram.iter())
        .map(|p| s(p).to_string())
        .collect();
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    check_host_paths(&xml, &own).unwrap_or_else(|err| panic!("{err}\n{xml}"));

    let imported = Defined::new(&xml, dir.path());
    let dumped = imported.dumpxml();
    assert_eq!(sarde_domain::domain_name(&dumped).unwrap(), name);
    let sources: Vec<PathBuf> = file_disk_sources(&dumped)
        .unwrap()
        .into_iter()
        .map(|d| d.source)
        .collect();
    assert_eq!(
        sources,
        [
            files["disk.qcow2"].clone(),
            files["disk-1.qcow2"].clone(),
            files["tools.iso"].clone()
        ]
    );
    assert!(
        dumped.contains(&format!(
            "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{}</nvram>",
            s(&target.join("source_VARS.fd"))
        )),
        "{dumped}"
    );
    // libvirt gave the copy an identity of its own.
    let new_uuid = first_value(&dumped, "<uuid>", "</uuid>").unwrap();
    let new_mac = first_value(&dumped, "<mac address='", "'").unwrap();
    assert_ne!(new_uuid, uuid);
    assert_ne!(new_mac, mac);
}

#[test]
fn an_image_without_its_nvram_gets_a_fresh_one_from_libvirt() {
    if !libvirt_reachable("an_image_without_its_nvram_gets_a_fresh_one_from_libvirt") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disks = make_disks(dir.path());
    let name = unique("fresh-nvram");
    let image_xml = prepare_export(&domain_xml(
        "exported",
        &disks,
        Some(&dir.path().join("exported_VARS.fd")),
    ))
    .unwrap()
    .xml;
    let files = ["disk.qcow2", "disk-1.qcow2", "tools.iso"]
        .into_iter()
        .map(|n| (n.to_string(), dir.path().join(n)))
        .collect();
    let spec = ImportSpec {
        name: name.clone(),
        files,
        nvram: None,
        keep_uuid: false,
    };
    let imported = Defined::new(&prepare_import(&image_xml, &spec).unwrap(), dir.path());
    let dumped = imported.dumpxml();
    assert!(
        dumped.contains(&format!(
            "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/{name}_VARS.fd</nvram>"
        )),
        "{dumped}"
    );
}
