use super::*;

/// Real `virsh dumpxml --inactive` output (libvirt 9.0), captured once.
const DEBIAN: &str = include_str!("../tests/data/virsh-debian12.xml");
const WIN11_UEFI: &str = include_str!("../tests/data/virsh-win11-uefi.xml");

const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Hand-written: two disks with the same base name, an empty CD-ROM, a backing
/// chain, security labels, a live `id`, QEMU pass-through under an unusual prefix
/// and an unknown namespace that must survive.
const MIXED: &str = r#"<domain type='kvm' id='7' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>mixed</name>
  <uuid>2f6e3a4e-1b1c-4d3e-8a5b-1234567890ab</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://freebsd.org/freebsd/14.0"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <os>
    <type arch='aarch64' machine='virt'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-aarch64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/vms/a/disk.qcow2'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <backingStore type='file'><format type='qcow2'/><source file='/srv/base.qcow2'/><backingStore/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/vms/b/disk.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
      <ext:tuning xmlns:ext='urn:example:ext' ext:level='3'>kept</ext:tuning>
    </interface>
    <serial type='pty'/>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+994</label></seclabel>
  <q:commandline>
    <q:arg value='-s'/>
  </q:commandline>
</domain>"#;

fn disk(target: &str, source: &str, image_name: &str) -> (String, PathBuf, String) {
    (target.into(), PathBuf::from(source), image_name.into())
}

struct ExportCase {
    what: &'static str,
    xml: &'static str,
    name: &'static str,
    architecture: &'static str,
    os: &'static str,
    disks: Vec<(String, PathBuf, String)>,
    nvram: Option<(&'static str, &'static str)>,
    loader: Option<&'static str>,
    gone: &'static [&'static str],
    kept: &'static [&'static str],
}

fn export_cases() -> Vec<ExportCase> {
    vec![
        ExportCase {
            what: "virsh: Debian, BIOS, two files and an empty CD-ROM",
            xml: DEBIAN,
            name: "debian12-builder",
            architecture: "amd64",
            os: "linux",
            disks: vec![
                disk(
                    "vda",
                    "/var/lib/libvirt/images/debian12-builder.qcow2",
                    "debian12-builder.qcow2",
                ),
                disk("vdb", "/srv/scratch/data.img", "data.img"),
            ],
            nvram: None,
            loader: None,
            gone: &["<uuid>", "52:54:00:12:34:56", "/var/lib/libvirt", "/srv/"],
            kept: &[
                "<source file='debian12-builder.qcow2'/>",
                "<source file='data.img'/>",
                "<libosinfo:os id=\"http://debian.org/debian/12\"/>",
                "org.qemu.guest_agent.0",
                "<backend model='random'>/dev/urandom</backend>",
                "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
            ],
        },
        ExportCase {
            what: "virsh: Windows 11, UEFI loader and NVRAM, an ISO",
            xml: WIN11_UEFI,
            name: "win11-ci",
            architecture: "amd64",
            os: "windows",
            disks: vec![
                disk(
                    "sda",
                    "/var/lib/libvirt/images/win11-ci.qcow2",
                    "win11-ci.qcow2",
                ),
                disk(
                    "sdb",
                    "/var/lib/libvirt/iso/virtio-win.iso",
                    "virtio-win.iso",
                ),
            ],
            nvram: Some((
                "/var/lib/libvirt/qemu/nvram/win11-ci_VARS.fd",
                "win11-ci_VARS.fd",
            )),
            loader: Some("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"),
            gone: &["<uuid>", "52:54:00:ab:cd:ef", "/var/lib/libvirt"],
            kept: &[
                "<loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>",
                "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>win11-ci_VARS.fd</nvram>",
                "<description>built by packer; /var/lib/whatever is just text</description>",
            ],
        },
        ExportCase {
            what: "hand-written: same base names, chain, labels, pass-through",
            xml: MIXED,
            name: "mixed",
            architecture: "arm64",
            os: "freebsd",
            disks: vec![
                disk("vda", "/srv/vms/a/disk.qcow2", "disk.qcow2"),
                disk("vdb", "/srv/vms/b/disk.qcow2", "disk-1.qcow2"),
            ],
            nvram: None,
            loader: None,
            gone: &[
                "id='7'",
                "<uuid>",
                "52:54:00",
                "backingStore",
                "seclabel",
                "/srv/",
                "+64055",
            ],
            kept: &[
                "<domain type='kvm' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>",
                "<q:commandline>\n    <q:arg value='-s'/>\n  </q:commandline>",
                "<ext:tuning xmlns:ext='urn:example:ext' ext:level='3'>kept</ext:tuning>",
                "<source file='disk.qcow2'>",
                "<source file='disk-1.qcow2'/>",
                "<disk type='file' device='cdrom'>\n      <target dev='sda' bus='sata'/>",
            ],
        },
    ]
}

#[test]
fn export_table() {
    for case in export_cases() {
        let what = case.what;
        let e = prepare_export(case.xml).unwrap_or_else(|err| panic!("{what}: {err}"));
        assert_eq!(e.name, case.name, "{what}");
        assert_eq!(e.architecture, case.architecture, "{what}");
        assert_eq!(e.os, case.os, "{what}");
        let disks: Vec<_> = e
            .disks
            .iter()
            .map(|d| (d.target.clone(), d.source.clone(), d.image_name.clone()))
            .collect();
        assert_eq!(disks, case.disks, "{what}");
        assert_eq!(
            e.nvram
                .as_ref()
                .map(|n| (n.source.to_str().unwrap(), n.image_name.as_str())),
            case.nvram,
            "{what}"
        );
        assert_eq!(e.loader.as_deref(), case.loader.map(Path::new), "{what}");
        for gone in case.gone {
            assert!(!e.xml.contains(gone), "{what}: {gone} survived:\n{}", e.xml);
        }
        for kept in case.kept {
            assert!(e.xml.contains(kept), "{what}: {kept} lost:\n{}", e.xml);
        }
        // Same input, same bytes; exporting the export changes nothing more.
        assert_eq!(prepare_export(case.xml).unwrap().xml, e.xml, "{what}");
        assert_eq!(prepare_export(&e.xml).unwrap().xml, e.xml, "{what}");
    }
}

use std::path::Path;

#[test]
fn exported_real_xml_passes_the_import_checks() {
    for xml in [DEBIAN, WIN11_UEFI] {
        let e = prepare_export(xml).unwrap();
        let mut names: Vec<&str> = e.disks.iter().map(|d| d.image_name.as_str()).collect();
        names.extend(e.nvram.iter().map(|n| n.image_name.as_str()));
        check_untrusted(&e.xml, &names).unwrap_or_else(|err| panic!("{err}\n{}", e.xml));
        // Without the files the same XML is refused: the check looks at the names.
        assert!(check_untrusted(&e.xml, &[]).is_err());
    }
}

#[test]
fn export_names_files_uniquely_and_reuses_a_shared_file() {
    let xml = "<domain><name>n</name>
      <os><nvram>/var/nv/disk.qcow2</nvram></os>
      <devices>
        <disk type='file'><source file='/a/disk.qcow2'/><target dev='vda'/></disk>
        <disk type='file'><source file='/b/disk.qcow2'/><target dev='vdb'/></disk>
        <disk type='file' device='disk'><source file='/a/disk.qcow2'/><target dev='vdc'/></disk>
        <disk type='file'><source file='/c/disk-1.qcow2'/><target dev='vdd'/></disk>
        <disk type='file'><source file='/d/README'/><target dev='vde'/></disk>
        <disk type='file'><source file='/e/README'/><target dev='vdf'/></disk>
      </devices></domain>";
    let e = prepare_export(xml).unwrap();
    let names: Vec<&str> = e.disks.iter().map(|d| d.image_name.as_str()).collect();
    // The NVRAM comes first in the document, so it keeps the plain name.
    assert_eq!(e.nvram.unwrap().image_name, "disk.qcow2");
    assert_eq!(
        names,
        [
            "disk-1.qcow2",
            "disk-2.qcow2",
            "disk-1.qcow2",
            "disk-1-1.qcow2",
            "README",
            "README-1"
        ]
    );
}

#[test]
fn export_reads_new_style_nvram_and_leaves_a_template_only_nvram() {
    let xml = "<domain><name>n</name><os><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>\
        <nvram type='file'><source file='/var/lib/libvirt/qemu/nvram/n_VARS.fd'/></nvram></os></domain>";
    let e = prepare_export(xml).unwrap();
    let nvram = e.nvram.unwrap();
    assert_eq!(
        nvram.source,
        PathBuf::from("/var/lib/libvirt/qemu/nvram/n_VARS.fd")
    );
    assert!(
        e.xml
            .contains("<nvram type='file'><source file='n_VARS.fd'/></nvram>"),
        "{}",
        e.xml
    );
    let xml =
        "<domain><name>n</name><os><nvram template='/usr/share/OVMF/OVMF_VARS.fd'/></os></domain>";
    let e = prepare_export(xml).unwrap();
    assert_eq!(e.nvram, None);
    assert_eq!(e.xml, xml);
}

#[test]
fn non_file_disks_cannot_be_exported() {
    for (kind, source) in [
        ("block", "<source dev='/dev/sdb'/>"),
        (
            "network",
            "<source protocol='nbd' name='x'><host name='h' port='1'/></source>",
        ),
        ("volume", "<source pool='default' volume='v'/>"),
        ("dir", "<source dir='/srv/share'/>"),
    ] {
        // The target comes after the source, as libvirt writes it.
        let xml = format!(
            "<domain><name>x</name><devices><disk type='{kind}' device='disk'>{source}<target dev='vdq'/></disk></devices></domain>"
        );
        match prepare_export(&xml) {
            Err(DomainError::NotExportable {
                target, kind: k, ..
            }) => {
                assert_eq!((target.as_str(), k.as_str()), ("vdq", kind));
            }
            other => panic!("{kind}: {other:?}"),
        }
        let message = prepare_export(&xml).unwrap_err().to_string();
        assert!(
            message.contains("vdq") && message.contains(kind),
            "{message}"
        );
    }
    // A host CD drive with no medium names no host file: nothing to refuse.
    let xml = "<domain><name>x</name><devices><disk type='block' device='cdrom'><target dev='hdc'/></disk></devices></domain>";
    assert!(prepare_export(xml).unwrap().disks.is_empty());
}

#[test]
fn os_and_architecture_follow_go() {
    let with_os = |id: &str| {
        format!(
            "<domain><name>x</name><metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\
             <libosinfo:os id='{id}'/></libosinfo:libosinfo></metadata></domain>"
        )
    };
    for (id, os) in [
        ("http://microsoft.com/win/2k22", "windows"),
        ("http://freebsd.org/freebsd/14.0", "freebsd"),
        ("http://openbsd.org/openbsd/7.4", "openbsd"),
        ("http://netbsd.org/netbsd/9.3", "netbsd"),
        ("http://apple.com/macosx/10.15", "darwin"),
        ("http://dragonflybsd.org/dragonflybsd/6.4", "dragonfly"),
        ("http://omnios.org/omnios/r151044", "illumos"),
        ("http://oracle.com/solaris/11", "solaris"),
        ("http://sun.com/solaris/10", "solaris"),
        ("http://haiku-os.org/haiku/r1beta4", "haiku"),
        ("http://debian.org/debian/12", "linux"),
        ("http://ubuntu.com/ubuntu/24.04", "linux"),
    ] {
        assert_eq!(prepare_export(&with_os(id)).unwrap().os, os, "{id}");
    }
    assert_eq!(
        prepare_export("<domain><name>x</name></domain>")
            .unwrap()
            .os,
        "linux"
    );
    for (arch, go) in [
        ("x86_64", "amd64"),
        ("i686", "386"),
        ("aarch64", "arm64"),
        ("armv7l", "arm"),
        ("armv6l", "arm"),
        ("ppc64le", "ppc64le"),
        ("ppc64", "ppc64"),
        ("s390x", "s390x"),
        ("mips64el", "mips64le"),
        ("mipsel", "mipsle"),
        ("riscv64", "riscv64"),
        ("loongarch64", "loongarch64"),
    ] {
        let xml = format!("<domain><name>x</name><os><type arch='{arch}'>hvm</type></os></domain>");
        assert_eq!(prepare_export(&xml).unwrap().architecture, go, "{arch}");
    }
}

#[test]
fn names_with_references_and_cdata_are_read_whole() {
    let xml = "<domain><name>a&amp;b&#x20;<![CDATA[c<d]]></name></domain>";
    assert_eq!(domain_name(xml).unwrap(), "a&b c<d");
    assert_eq!(prepare_export(xml).unwrap().name, "a&b c<d");
    let imported = prepare_import(
        xml,
        &ImportSpec {
            name: "job <1>".into(),
            ..ImportSpec::default()
        },
    )
    .unwrap();
    assert_eq!(imported, "<domain><name>job &lt;1&gt;</name></domain>");
    assert_eq!(domain_name(&imported).unwrap(), "job <1>");
}

fn import_spec() -> ImportSpec {
    ImportSpec {
        name: "job-1".into(),
        files: [
            ("disk.qcow2", "/vms/job-1/disk.qcow2"),
            ("disk-1.qcow2", "/vms/job-1/disk-1.qcow2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
        .collect(),
        nvram: None,
        keep_uuid: false,
    }
}

#[test]
fn import_rewrites_name_disks_and_strips_host_identity() {
    let xml = "<domain type='kvm'>
  <name>mixed</name>
  <uuid>2f6e3a4e-1b1c-4d3e-8a5b-1234567890ab</uuid>
  <devices>
    <disk type='file' device='disk'><source file='disk.qcow2'/><backingStore type='file'><source file='/etc/shadow'/></backingStore><target dev='vda'/></disk>
    <disk type='file' device='disk'><source file='disk-1.qcow2'/><target dev='vdb'/></disk>
    <disk type='file' device='cdrom'><target dev='sda'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
  </devices>
</domain>";
    let out = prepare_import(xml, &import_spec()).unwrap();
    assert_eq!(
        out,
        "<domain type='kvm'>
  <name>job-1</name>
  <devices>
    <disk type='file' device='disk'><source file='/vms/job-1/disk.qcow2'/><target dev='vda'/></disk>
    <disk type='file' device='disk'><source file='/vms/job-1/disk-1.qcow2'/><target dev='vdb'/></disk>
    <disk type='file' device='cdrom'><target dev='sda'/></disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>"
    );
    let kept = prepare_import(
        xml,
        &ImportSpec {
            keep_uuid: true,
            ..import_spec()
        },
    )
    .unwrap();
    assert!(kept.contains("<uuid>2f6e3a4e-1b1c-4d3e-8a5b-1234567890ab</uuid>"));

    let mut missing = import_spec();
    missing.files.remove("disk-1.qcow2");
    match prepare_import(xml, &missing) {
        Err(DomainError::UnknownFile { target, name }) => {
            assert_eq!((target.as_str(), name.as_str()), ("vdb", "disk-1.qcow2"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn import_points_nvram_at_the_imported_file_or_lets_libvirt_make_one() {
    let old = "<domain><name>w</name><os><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\
        <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>w_VARS.fd</nvram></os></domain>";
    let new = "<domain><name>w</name><os><nvram type='file'><source file='w_VARS.fd'/></nvram></os></domain>";
    let with = ImportSpec {
        nvram: Some(PathBuf::from("/vms/job-1/w_VARS.fd")),
        ..import_spec()
    };
    assert!(prepare_import(old, &with).unwrap().contains(
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/vms/job-1/w_VARS.fd</nvram>"
    ));
    assert!(
        prepare_import(new, &with)
            .unwrap()
            .contains("<nvram type='file'><source file='/vms/job-1/w_VARS.fd'/></nvram>")
    );
    // No NVRAM file in the image (a v1 image): the path goes, the template stays.
    assert!(
        prepare_import(old, &import_spec())
            .unwrap()
            .contains("<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'></nvram>")
    );
    assert!(
        prepare_import(new, &import_spec())
            .unwrap()
            .contains("<nvram></nvram>")
    );
}

#[test]
fn import_reads_v1_images_and_drops_the_declaration() {
    // As the Python tool stores it: a declaration, double quotes, no newline at the end.
    let v1 = "<?xml version=\"1.0\" ?><domain type=\"kvm\"><name>deb</name><devices>\
        <disk type=\"file\" device=\"disk\"><driver name=\"qemu\" type=\"qcow2\"/><source file=\"disk.qcow2\"/><target dev=\"vda\" bus=\"virtio\"/></disk>\
        <interface type=\"network\"><source network=\"default\"/></interface></devices></domain>";
    check_untrusted(v1, &["disk.qcow2", "base.qcow2"]).unwrap();
    let disks = file_disk_sources(v1).unwrap();
    assert_eq!(disks.len(), 1);
    assert_eq!(
        (disks[0].target.as_str(), disks[0].image_name.as_str()),
        ("vda", "disk.qcow2")
    );
    assert_eq!(disks[0].driver_type.as_deref(), Some("qcow2"));
    let out = prepare_import(v1, &import_spec()).unwrap();
    assert!(
        out.starts_with("<domain type=\"kvm\"><name>job-1</name>"),
        "{out}"
    );
    assert!(out.contains("<source file=\"/vms/job-1/disk.qcow2\"/>"));
}

#[test]
fn import_refuses_names_libvirt_would_refuse() {
    for name in ["", "  ", "a/b", "a\nb"] {
        let spec = ImportSpec {
            name: name.into(),
            ..import_spec()
        };
        assert!(
            matches!(
                prepare_import("<domain><name>x</name></domain>", &spec),
                Err(DomainError::InvalidName { .. })
            ),
            "{name:?}"
        );
    }
    assert!(matches!(
        prepare_import("<domain/>", &import_spec()),
        Err(DomainError::NoName)
    ));
    assert!(matches!(
        prepare_import("<vm><name>x</name></vm>", &import_spec()),
        Err(DomainError::NotADomain(_))
    ));
}

fn violations(body: &str) -> Vec<Violation> {
    let xml = format!("<domain xmlns:q='{QEMU_NS}'><name>x</name>{body}</domain>");
    match check_untrusted(&xml, &["disk.qcow2", "VARS.fd"]) {
        Ok(()) => Vec::new(),
        Err(e) => e.violations,
    }
}

#[test]
fn hostile_xml_is_refused_naming_the_element() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "<q:commandline><q:arg value='-x'/></q:commandline>",
            "q:commandline",
            "QEMU",
        ),
        (
            "<capabilities xmlns='http://libvirt.org/schemas/domain/qemu/1.0'><del capability='sandbox'/></capabilities>",
            "capabilities",
            "QEMU",
        ),
        (
            "<qq:commandline xmlns:qq='http://libvirt.org/schemas/domain/qemu/1.0'/>",
            "qq:commandline",
            "QEMU",
        ),
        (
            "<z:commandline><z:arg value='-x'/></z:commandline>",
            "z:commandline",
            "not declared",
        ),
        (
            "<devices><hostdev mode='subsystem' type='pci'/></devices>",
            "devices/hostdev",
            "host device",
        ),
        (
            "<devices><filesystem type='mount'><source dir='/'/><target dir='r'/></filesystem></devices>",
            "devices/filesystem",
            "host directory",
        ),
        (
            "<devices><disk type='block'><source dev='/dev/sda'/></disk></devices>",
            "devices/disk",
            "\"block\" disk",
        ),
        (
            "<devices><disk type='network'><source protocol='nbd' name='x'><host name='10.0.0.1'/></source></disk></devices>",
            "devices/disk",
            "\"network\" disk",
        ),
        (
            "<devices><disk type='volume'><source pool='p' volume='v'/></disk></devices>",
            "devices/disk",
            "\"volume\" disk",
        ),
        (
            "<devices><disk type='dir'><source dir='/etc'/></disk></devices>",
            "devices/disk",
            "\"dir\" disk",
        ),
        (
            "<devices><disk type='file'><source file='/etc/shadow'/></disk></devices>",
            "devices/disk/source",
            "not a file of the image",
        ),
        (
            "<devices><disk><source file='../disk.qcow2'/></disk></devices>",
            "devices/disk/source",
            "not a file of the image",
        ),
        (
            "<devices><disk><source file='disk.qcow2'/><backingStore type='file'><format type='qcow2'/><source file='/etc/shadow'/></backingStore></disk></devices>",
            "devices/disk/backingStore",
            "backing chain",
        ),
        (
            "<devices><disk><source file='disk.qcow2'/><mirror type='file' file='/tmp/m'/></disk></devices>",
            "devices/disk/mirror",
            "mirror",
        ),
        (
            "<devices><serial type='file'><source path='/root/.ssh/authorized_keys'/></serial></devices>",
            "devices/serial",
            "\"file\" character device",
        ),
        (
            "<devices><console type='dev'><source path='/dev/ttyS0'/></console></devices>",
            "devices/console",
            "\"dev\" character device",
        ),
        (
            "<devices><parallel type='pipe'><source path='/tmp/p'/></parallel></devices>",
            "devices/parallel",
            "\"pipe\" character device",
        ),
        (
            "<devices><channel type='tcp'><source mode='connect' host='10.0.0.1' service='22'/></channel></devices>",
            "devices/channel",
            "\"tcp\" character device",
        ),
        (
            "<devices><channel type='unix'><source mode='bind' path='/run/x.sock'/></channel></devices>",
            "devices/channel/source",
            "on the host",
        ),
        (
            "<devices><serial type='pty'><log file='/etc/motd' append='on'/></serial></devices>",
            "devices/serial/log",
            "log file",
        ),
        (
            "<os><kernel>/boot/vmlinuz</kernel></os>",
            "os/kernel",
            "host file",
        ),
        (
            "<os><initrd>initrd.img</initrd></os>",
            "os/initrd",
            "host file",
        ),
        ("<os><dtb>/boot/x.dtb</dtb></os>", "os/dtb", "host file"),
        (
            "<os><kernel><![CDATA[/boot/vmlinuz]]></kernel></os>",
            "os/kernel",
            "/boot/vmlinuz",
        ),
        (
            "<os><loader>/home/x/evil.fd</loader></os>",
            "os/loader",
            "/usr/share",
        ),
        (
            "<os><loader>/usr/share/OVMF/../../../home/x/evil.fd</loader></os>",
            "os/loader",
            "/usr/share",
        ),
        (
            "<os><loader>/usr/share/OVMF/&#46;&#46;/&#46;&#46;/home/evil.fd</loader></os>",
            "os/loader",
            "/usr/share",
        ),
        (
            "<os><nvram>/etc/passwd</nvram></os>",
            "os/nvram",
            "not a file of the image",
        ),
        (
            "<os><nvram template='/etc/shadow'>VARS.fd</nvram></os>",
            "os/nvram",
            "template",
        ),
        (
            "<os><nvram type='file'><source file='/var/lib/libvirt/qemu/nvram/other_VARS.fd'/></nvram></os>",
            "os/nvram/source",
            "not a file of the image",
        ),
        (
            "<os><nvram type='block'><source dev='/dev/sdb'/></nvram></os>",
            "os/nvram",
            "\"block\" NVRAM",
        ),
        (
            "<os><acpi><table type='slic'>/etc/slic.bin</table></acpi></os>",
            "os/acpi/table",
            "ACPI",
        ),
        (
            "<bootloader>/usr/bin/pygrub</bootloader>",
            "bootloader",
            "host program",
        ),
        (
            "<devices><emulator>/bin/sh</emulator></devices>",
            "devices/emulator",
            "emulator",
        ),
        (
            "<devices><emulator><![CDATA[/bin/sh]]></emulator></devices>",
            "devices/emulator",
            "emulator",
        ),
        (
            "<devices><emulator>/usr/bin/qemu-system-x/../../../bin/sh</emulator></devices>",
            "devices/emulator",
            "emulator",
        ),
        (
            "<devices><interface type='direct'><source dev='eth0' mode='bridge'/></interface></devices>",
            "devices/interface",
            "\"direct\" interface",
        ),
        (
            "<devices><interface type='hostdev'><source><address type='pci' bus='1'/></source></interface></devices>",
            "devices/interface",
            "\"hostdev\" interface",
        ),
        (
            "<devices><interface type='vhostuser'><source type='unix' path='/run/v.sock' mode='client'/></interface></devices>",
            "devices/interface",
            "\"vhostuser\" interface",
        ),
        (
            "<devices><interface type='network'><source network='default'/><script path='/tmp/evil.sh'/></interface></devices>",
            "devices/interface/script",
            "host script",
        ),
        (
            "<devices><interface type='user'><backend type='passt'/><portForward proto='tcp'><range start='2222' to='22'/></portForward></interface></devices>",
            "devices/interface/portForward",
            "host ports",
        ),
        (
            "<devices><interface type='user'><backend type='passt' logFile='/etc/cron.d/x'/></interface></devices>",
            "devices/interface/backend",
            "logFile",
        ),
        (
            "<devices><smartcard mode='host'/></devices>",
            "devices/smartcard",
            "smartcard",
        ),
        (
            "<devices><redirdev bus='usb' type='spicevmc'/></devices>",
            "devices/redirdev",
            "USB",
        ),
        (
            "<devices><shmem name='x'><server path='/tmp/ivshmem'/></shmem></devices>",
            "devices/shmem",
            "shared memory",
        ),
        (
            "<devices><input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input></devices>",
            "devices/input",
            "input",
        ),
        (
            "<devices><tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm></devices>",
            "devices/tpm/backend",
            "TPM",
        ),
        (
            "<memoryBacking><source type='file'/></memoryBacking>",
            "memoryBacking/source",
            "host file",
        ),
        (
            "<devices><memory model='nvdimm'><source><path>/dev/pmem0</path></source><target><size unit='KiB'>1</size></target></memory></devices>",
            "devices/memory/source/path",
            "host path",
        ),
        (
            "<devices><rng model='virtio'><backend model='random'>/dev/sda</backend></rng></devices>",
            "devices/rng/backend",
            "random",
        ),
        (
            "<devices><rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' host='1.2.3.4' service='1'/></backend></rng></devices>",
            "devices/rng/backend",
            "entropy",
        ),
        (
            "<sysinfo type='fwcfg'><entry name='opt/x' file='etc/shadow'/></sysinfo>",
            "sysinfo/entry",
            "file=\"etc/shadow\"",
        ),
        ("<seclabel type='none'/>", "seclabel", "security label"),
        (
            "<devices><graphics type='vnc' port='5900' listen='0.0.0.0'/></devices>",
            "devices/graphics",
            "0.0.0.0",
        ),
        (
            "<devices><graphics type='spice'><listen type='address' address='::'/></graphics></devices>",
            "devices/graphics/listen",
            "beyond this host",
        ),
        (
            "<devices><graphics type='vnc'><listen type='socket' socket='/run/other/vnc.sock'/></graphics></devices>",
            "devices/graphics/listen",
            "socket=",
        ),
        (
            "<devices><graphics type='egl-headless'><gl rendernode='/dev/dri/renderD128'/></graphics></devices>",
            "devices/graphics/gl",
            "rendernode",
        ),
        (
            "<devices><audio id='1' type='file' path='/etc/audio.wav'/></devices>",
            "devices/audio",
            "audio",
        ),
        (
            "<blkiotune><device><path>/dev/sda</path><weight>1</weight></device></blkiotune>",
            "blkiotune/device/path",
            "host path",
        ),
    ];
    for (body, element, reason) in cases {
        let found = violations(body);
        assert!(
            found
                .iter()
                .any(|v| v.element == *element && v.reason.contains(reason)),
            "{body}: expected {element}: {reason:?}, got {found:?}"
        );
    }
}

#[test]
fn what_libvirt_itself_manages_passes() {
    let ok = "<title>t</title><description>/not/a/path/to/anything</description>\
        <metadata><app:x xmlns:app='urn:app' file='/srv/whatever'>/etc/passwd</app:x></metadata>\
        <resource><partition>/machine</partition></resource>\
        <sysinfo type='smbios'><system><entry name='serial'>/ABC</entry></system></sysinfo>\
        <os><type arch='x86_64'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>\
        <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>VARS.fd</nvram></os>\
        <devices><emulator>/usr/bin/qemu-system-x86_64-microvm</emulator>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='disk.qcow2' index='1'/><backingStore/><target dev='vda'/></disk>\
        <disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>\
        <disk device='disk'><source file='disk.qcow2'/><target dev='vdb'/></disk>\
        <serial type='pty'/><console type='pty'/>\
        <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
        <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>\
        <channel type='qemu-vdagent'><target type='virtio' name='com.redhat.spice.0'/></channel>\
        <interface type='network'><source network='default'/><model type='virtio'/></interface>\
        <interface type='bridge'><source bridge='br0'/></interface>\
        <interface type='user'/>\
        <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\
        <graphics type='vnc' port='-1' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>\
        <graphics type='spice' autoport='yes'><listen type='address'/></graphics>\
        <smartcard mode='passthrough' type='spicevmc'/>\
        <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\
        <audio id='1' type='spice'/><video><model type='virtio'/></video></devices>";
    assert_eq!(violations(ok), Vec::new());
    check_untrusted(MIXED_IMPORTABLE, &["disk.qcow2"]).unwrap();
}

/// Pass-through under a namespace that is not QEMU's is just unknown XML.
const MIXED_IMPORTABLE: &str = "<domain xmlns:q='urn:not-qemu'><name>x</name><q:commandline/>\
    <devices><disk><source file='disk.qcow2'/></disk></devices></domain>";

#[test]
fn all_violations_are_listed_with_the_way_out() {
    let many = violations(
        "<devices><hostdev/><shmem/></devices><os><kernel>/k</kernel></os><q:commandline/>",
    );
    let elements: Vec<&str> = many.iter().map(|v| v.element.as_str()).collect();
    assert_eq!(
        elements,
        [
            "devices/hostdev",
            "devices/shmem",
            "os/kernel",
            "q:commandline"
        ]
    );
    let err = check_untrusted(
        "<domain><name>x</name><devices><hostdev/><filesystem/></devices></domain>",
        &[],
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("2 problems"), "{text}");
    assert!(
        text.contains("devices/hostdev: passes a host device through"),
        "{text}"
    );
    assert!(text.contains("devices/filesystem: shares"), "{text}");
    assert!(
        text.contains("use --allow-unsafe-xml to import it anyway"),
        "{text}"
    );
}

#[test]
fn allowed_files_must_be_plain_names() {
    let xml = "<domain><name>x</name><devices><disk><source file='/etc/shadow'/></disk></devices></domain>";
    assert!(check_untrusted(xml, &["/etc/shadow"]).is_err());
    let xml = "<domain><name>x</name><devices><disk><source file='..'/></disk></devices></domain>";
    assert!(check_untrusted(xml, &[".."]).is_err());
}

/// Every way of parsing differently from libvirt is refused by all three entry points.
#[test]
fn xml_libvirt_would_read_differently_is_refused() {
    let cases: &[(&str, &str)] = &[
        (
            "<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]><domain><name>&b;</name></domain>",
            "DOCTYPE",
        ),
        (
            "<!DOCTYPE domain SYSTEM 'file:///etc/passwd'><domain><name>x</name></domain>",
            "DOCTYPE",
        ),
        ("<domain><name>&ext;</name></domain>", "undefined entity"),
        ("<domain><name>&#1;</name></domain>", "U+0001"),
        (
            "<?xml version='1.0' encoding='UTF-7'?><domain><name>x</name>+ADw-hostdev/+AD4-</domain>",
            "UTF-7",
        ),
        (
            "<?xml version='1.1'?><domain><name>x</name></domain>",
            "XML 1.0",
        ),
        (
            "<domain xmlns:x='urn:x'><name>x</name><devices><disk><source file='disk.qcow2' x:file='/etc/shadow'/></disk></devices></domain>",
            "twice",
        ),
        (
            "<domain><name>x</name><devices><disk><source file='disk.qcow2' file='/etc/shadow'/></disk></devices></domain>",
            "ttribute",
        ),
        ("<domain><name>x</name>", "ends inside"),
        ("<domain><name>x</wrong></domain>", "wrong"),
        (
            "<domain><name>x</name></domain><domain/>",
            "more than one root",
        ),
        (
            "<domain><name>x</name></domain>trailing",
            "outside the root",
        ),
        ("", "no root"),
    ];
    for (xml, why) in cases {
        let export = prepare_export(xml).unwrap_err().to_string();
        assert!(export.contains(why), "{xml}: {export}");
        let import = prepare_import(xml, &import_spec()).unwrap_err().to_string();
        assert!(import.contains(why), "{xml}: {import}");
        let check = check_untrusted(xml, &["disk.qcow2"]).unwrap_err();
        assert_eq!(check.violations.len(), 1, "{xml}");
        assert!(check.to_string().contains(why), "{xml}: {check}");
    }
}

#[test]
fn oversized_and_deeply_nested_xml_is_refused() {
    let huge = format!(
        "<domain><name>x</name><description>{}</description></domain>",
        "a".repeat(MAX_XML_SIZE)
    );
    assert!(matches!(
        prepare_export(&huge),
        Err(DomainError::TooLarge(_))
    ));
    assert!(matches!(
        prepare_import(&huge, &import_spec()),
        Err(DomainError::TooLarge(_))
    ));
    assert!(
        check_untrusted(&huge, &[])
            .unwrap_err()
            .to_string()
            .contains("at most")
    );
    // Deep enough to overflow a recursive walker if it were let through.
    let deep = format!(
        "<domain><name>x</name>{}{}</domain>",
        "<a>".repeat(100_000),
        "</a>".repeat(100_000)
    );
    for err in [
        prepare_export(&deep).unwrap_err().to_string(),
        check_untrusted(&deep, &[]).unwrap_err().to_string(),
    ] {
        assert!(err.contains("nested deeper"), "{err}");
    }
    // libvirt's own depth is fine.
    let ok = format!(
        "<domain><name>x</name>{}{}</domain>",
        "<a>".repeat(200),
        "</a>".repeat(200)
    );
    prepare_export(&ok).unwrap();
}

#[test]
fn helpers_read_name_and_disks() {
    assert_eq!(domain_name(DEBIAN).unwrap(), "debian12-builder");
    assert!(matches!(
        domain_name("<domain><name> </name></domain>"),
        Err(DomainError::NoName)
    ));
    let disks = file_disk_sources(WIN11_UEFI).unwrap();
    let summary: Vec<_> = disks
        .iter()
        .map(|d| (d.target.as_str(), d.device.as_str(), d.image_name.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("sda", "disk", "win11-ci.qcow2"),
            ("sdb", "cdrom", "virtio-win.iso")
        ]
    );
    assert_eq!(
        disks[1].source,
        PathBuf::from("/var/lib/libvirt/iso/virtio-win.iso")
    );
}

#[test]
fn bypasses_found_in_review_are_caught_by_one_of_the_checks() {
    let own = ["/vms/x/disk.qcow2"];
    let cases = [
        "<devices><emulator><![CDATA[/tmp/evil]]></emulator></devices>",
        "<devices><emulator>&#47;tmp&#47;evil</emulator></devices>",
        "<os><kernel><x></x>/etc/shadow</kernel></os>",
        "<os><loader>/usr/share/../../etc/shadow</loader></os>",
        "<os><nvram template='/usr/share/../../etc/shadow'>/vms/x/disk.qcow2</nvram></os>",
        "<devices><serial type='pty'><log file='/etc/cron.d/x'/></serial></devices>",
        "<os><acpi><table type='slic'>/etc/shadow</table></acpi></os>",
        "<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>",
        "<devices><memory model='nvdimm'><source><path>/dev/sda</path></source></memory></devices>",
        "<os><nvram type='file'><source file='/etc/x'/></nvram></os>",
        "<devices><audio id='1' type='file' path='/etc/x'/></devices>",
        "<devices><graphics type='vnc' socket='/run/x.sock'/></devices>",
        "<devices><interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface></devices>",
        "<devices><disk type='file'><source file='/vms/x/disk.qcow2'><dataStore type='file'><source file='/etc/x'/></dataStore></source></disk></devices>",
        "<seclabel type='none'/>",
    ];
    for body in cases {
        let xml = format!("<domain><name>x</name>{body}</domain>");
        let untrusted = check_untrusted(&xml, &["disk.qcow2"]).is_err();
        let host_paths = check_host_paths(&xml, &own).is_err();
        assert!(untrusted || host_paths, "not caught: {body}");
    }
    // What sarde itself produces passes: own files, firmware, emulator, urandom.
    let fine = "<domain><name>x</name><os><loader>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>/vms/x/VARS.fd</nvram></os>\
        <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><disk type='file'><source file='/vms/x/disk.qcow2'/></disk>\
        <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng></devices></domain>";
    check_host_paths(fine, &["/vms/x/disk.qcow2", "/vms/x/VARS.fd"]).unwrap();
}

#[test]
fn host_path_scan_allows_host_paths_only_where_libvirt_expects_them() {
    let own = ["/vms/x/disk.qcow2", "/vms/x/VARS.fd"];
    let refused: &[(&str, &str)] = &[
        // Allowed host paths, but in the wrong place.
        (
            "<devices><disk><source file='/usr/share/OVMF/OVMF_CODE.fd'/></disk></devices>",
            "devices/disk/source",
        ),
        (
            "<devices><disk><source file='/dev/urandom'/></disk></devices>",
            "devices/disk/source",
        ),
        (
            "<os><kernel>/usr/bin/qemu-system-x86_64</kernel></os>",
            "os/kernel",
        ),
        // Relative names in path attributes resolve against QEMU's directory.
        (
            "<sysinfo type='fwcfg'><entry name='opt/x' file='etc/shadow'/></sysinfo>",
            "sysinfo/entry",
        ),
        (
            "<os><loader><![CDATA[/home/x/evil.fd]]></loader></os>",
            "os/loader",
        ),
        (
            "<devices><emulator>/usr/bin/qemu-system-x/../../bin/sh</emulator></devices>",
            "devices/emulator",
        ),
        (
            "<devices><rng model='virtio'><backend model='random'>/dev/sda</backend></rng></devices>",
            "devices/rng/backend",
        ),
        (
            "<devices><channel type='unix'><source mode='bind' path='/run/x.sock'/></channel></devices>",
            "devices/channel/source",
        ),
    ];
    for (body, element) in refused {
        let xml = format!("<domain><name>x</name>{body}</domain>");
        let err = check_host_paths(&xml, &own).unwrap_err();
        assert!(
            err.violations.iter().any(|v| v.element == *element),
            "{body}: {err}"
        );
    }
    // Real XML after export and import passes; so does text libvirt never reads.
    let e = prepare_export(WIN11_UEFI).unwrap();
    let spec = ImportSpec {
        name: "w".into(),
        files: e
            .disks
            .iter()
            .map(|d| {
                (
                    d.image_name.clone(),
                    PathBuf::from("/vms/w").join(&d.image_name),
                )
            })
            .collect(),
        nvram: Some(PathBuf::from("/vms/w/win11-ci_VARS.fd")),
        keep_uuid: false,
    };
    let xml = prepare_import(&e.xml, &spec).unwrap();
    let own = spec.own_paths();
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    check_host_paths(&xml, &own).unwrap_or_else(|err| panic!("{err}\n{xml}"));
    assert!(check_host_paths(&xml, &own[1..]).is_err());
    check_host_paths(
        "<domain><name>x</name><description>/a</description><metadata><m:x xmlns:m='urn:m' file='/etc/x'>/etc/y</m:x></metadata>\
         <resource><partition>/machine</partition></resource></domain>",
        &[],
    )
    .unwrap();
    // Parsing is as strict as for the other checks.
    assert!(
        check_host_paths(
            "<!DOCTYPE d [<!ENTITY e '/etc/shadow'>]><domain><name>&e;</name></domain>",
            &[]
        )
        .is_err()
    );
}

#[test]
fn a_clone_gets_overlays_a_new_name_and_mac_and_shares_read_only_disks() {
    let spec = CloneSpec {
        name: "debian-clone".into(),
        overlays: [
            (
                "vda".to_string(),
                PathBuf::from("/clones/debian-clone-vda.qcow2"),
            ),
            (
                "vdb".to_string(),
                PathBuf::from("/clones/debian-clone-vdb.qcow2"),
            ),
        ]
        .into(),
        nvram: None,
        mac: Some("52:54:00:ab:cd:ef".into()),
    };
    let out = prepare_clone(DEBIAN, &spec).unwrap();
    assert!(out.contains("<name>debian-clone</name>"), "{out}");
    assert!(!out.contains("<uuid>"), "{out}");
    assert!(out.contains("/clones/debian-clone-vda.qcow2"), "{out}");
    assert!(out.contains("52:54:00:ab:cd:ef"), "{out}");
    assert!(
        !out.contains("52:54:00:12:34:56"),
        "the source's MAC is gone: {out}"
    );
    assert_eq!(out.matches("<mac ").count(), 1, "{out}");
    let sources = file_disk_sources(&out).unwrap();
    for target in ["vda", "vdb"] {
        let d = sources.iter().find(|d| d.target == target).unwrap();
        assert_eq!(d.driver_type.as_deref(), Some("qcow2"), "{target}");
        assert!(d.source.starts_with("/clones"), "{target}");
    }
    assert!(out.contains("<readonly/>"), "the CD-ROM stays: {out}");

    // A writable disk without an overlay is refused: a clone never writes its source.
    let mut missing = spec.clone();
    missing.overlays.remove("vdb");
    let e = prepare_clone(DEBIAN, &missing).unwrap_err().to_string();
    assert!(e.contains("vdb"), "{e}");
}

#[test]
fn backing_store_files_follow_the_live_chains() {
    assert_eq!(
        backing_store_files(MIXED).unwrap(),
        vec![PathBuf::from("/srv/base.qcow2")]
    );
    let live = "<domain><name>c</name><devices><disk type='file' device='disk'>\
        <source file='/c/top.qcow2' index='1'/>\
        <backingStore type='file' index='2'><format type='qcow2'/><source file='/v/mid.qcow2'/>\
        <backingStore type='file' index='3'><format type='qcow2'/><source file='/v/base.qcow2'/><backingStore/></backingStore>\
        </backingStore><target dev='vda'/></disk></devices></domain>";
    assert_eq!(
        backing_store_files(live).unwrap(),
        vec![
            PathBuf::from("/v/mid.qcow2"),
            PathBuf::from("/v/base.qcow2")
        ]
    );
    assert!(backing_store_files(DEBIAN).unwrap().is_empty());
}
