use super::*;

const UEFI_VM: &str = r#"<domain type='kvm' id='7'>
  <name>win-builder</name>
  <uuid>2f6e3a4e-1b1c-4d3e-8a5b-1234567890ab</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://microsoft.com/win/11"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/win-builder_VARS.fd</nvram>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/vms/a/disk.qcow2'/>
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
    </interface>
    <serial type='pty'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+994</label></seclabel>
</domain>"#;

#[test]
fn export_strips_host_ties_and_names_files() {
    let e = prepare_export(UEFI_VM).unwrap();
    assert_eq!(e.name, "win-builder");
    assert_eq!(e.architecture, "amd64");
    assert_eq!(e.os, "windows");
    assert_eq!(e.disks.len(), 2, "the empty cdrom is not a file");
    assert_eq!(e.disks[0].target, "vda");
    assert_eq!(e.disks[0].source, PathBuf::from("/srv/vms/a/disk.qcow2"));
    assert_eq!(e.disks[0].image_name, "disk.qcow2");
    assert_eq!(e.disks[1].image_name, "disk-1.qcow2");
    assert_eq!(e.disks[1].driver_type.as_deref(), Some("qcow2"));
    let nvram = e.nvram.as_ref().unwrap();
    assert_eq!(nvram.image_name, "win-builder_VARS.fd");
    assert_eq!(
        e.loader,
        Some(PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"))
    );
    for gone in [
        "<uuid>",
        "52:54:00",
        "backingStore",
        "seclabel",
        "/srv/",
        "id='7'",
        "/var/lib/libvirt",
    ] {
        assert!(!e.xml.contains(gone), "{gone} survived:\n{}", e.xml);
    }
    for kept in [
        "libosinfo:os",
        "<source file=\"disk.qcow2\"/>",
        "win-builder_VARS.fd",
        "/dev/urandom",
        "org.qemu.guest_agent.0",
    ] {
        assert!(e.xml.contains(kept), "{kept} lost:\n{}", e.xml);
    }
    // Deterministic, and what it produces passes the import checks.
    assert_eq!(prepare_export(UEFI_VM).unwrap().xml, e.xml);
    check_untrusted(
        &e.xml,
        &["disk.qcow2", "disk-1.qcow2", "win-builder_VARS.fd"],
    )
    .unwrap();
}

#[test]
fn import_rewrites_name_disks_and_nvram() {
    let e = prepare_export(UEFI_VM).unwrap();
    let spec = ImportSpec {
        name: "job-1".into(),
        files: [
            (
                "disk.qcow2".to_string(),
                PathBuf::from("/vms/job-1/disk.qcow2"),
            ),
            (
                "disk-1.qcow2".to_string(),
                PathBuf::from("/vms/job-1/disk-1.qcow2"),
            ),
        ]
        .into_iter()
        .collect(),
        nvram: Some(PathBuf::from("/vms/job-1/win-builder_VARS.fd")),
        keep_uuid: false,
    };
    let xml = prepare_import(&e.xml, &spec).unwrap();
    assert!(xml.contains("<name>job-1</name>"), "{xml}");
    assert!(xml.contains("/vms/job-1/disk.qcow2") && xml.contains("/vms/job-1/disk-1.qcow2"));
    assert!(
        xml.contains(">/vms/job-1/win-builder_VARS.fd</nvram>"),
        "{xml}"
    );
    let mut missing = spec.clone();
    missing.files.remove("disk-1.qcow2");
    let err = prepare_import(&e.xml, &missing).unwrap_err().to_string();
    assert!(err.contains("vdb") && err.contains("disk-1.qcow2"), "{err}");
    let mut no_nvram = spec;
    no_nvram.nvram = None;
    assert!(matches!(
        prepare_import(&e.xml, &no_nvram),
        Err(DomainError::NoNvram)
    ));
}

#[test]
fn non_file_disks_cannot_be_exported() {
    let xml = "<domain><name>x</name><devices><disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vda'/></disk></devices></domain>";
    let err = prepare_export(xml).unwrap_err().to_string();
    assert!(err.contains("\"block\""), "{err}");
}

fn violations(body: &str) -> Vec<Violation> {
    let xml = format!(
        "<domain xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'><name>x</name>{body}</domain>"
    );
    match check_untrusted(&xml, &["disk.qcow2", "VARS.fd"]) {
        Ok(()) => Vec::new(),
        Err(e) => e.violations,
    }
}

#[test]
fn hostile_xml_is_refused_naming_the_element() {
    let cases = [
        (
            "<q:commandline><q:arg value='-x'/></q:commandline>",
            "domain/commandline",
            "QEMU",
        ),
        (
            "<devices><hostdev mode='subsystem' type='pci'/></devices>",
            "domain/devices/hostdev",
            "host device",
        ),
        (
            "<devices><filesystem type='mount'><source dir='/'/><target dir='r'/></filesystem></devices>",
            "domain/devices/filesystem",
            "host directory",
        ),
        (
            "<devices><disk type='block'><source dev='/dev/sda'/></disk></devices>",
            "domain/devices/disk",
            "host storage",
        ),
        (
            "<devices><disk type='file'><source file='/etc/shadow'/></disk></devices>",
            "domain/devices/disk/source",
            "not a file of the image",
        ),
        (
            "<devices><disk type='file'><source file='../x.qcow2'/></disk></devices>",
            "domain/devices/disk/source",
            "not a file of the image",
        ),
        (
            "<devices><serial type='file'><source path='/root/.ssh/authorized_keys'/></serial></devices>",
            "domain/devices/serial",
            "reaches the host",
        ),
        (
            "<devices><channel type='unix'><source mode='bind' path='/run/x.sock'/></channel></devices>",
            "domain/devices/channel/source",
            "on the host",
        ),
        (
            "<devices><serial type='dev'><source path='/dev/ttyS0'/></serial></devices>",
            "domain/devices/serial",
            "reaches the host",
        ),
        (
            "<os><kernel>/boot/vmlinuz</kernel></os>",
            "domain/os/kernel",
            "host file",
        ),
        (
            "<os><initrd>/boot/initrd.img</initrd></os>",
            "domain/os/initrd",
            "host file",
        ),
        (
            "<os><loader>/home/x/evil.fd</loader></os>",
            "domain/os/loader",
            "/usr/share",
        ),
        (
            "<os><nvram>/etc/passwd</nvram></os>",
            "domain/os/nvram",
            "not a file of the image",
        ),
        (
            "<os><nvram template='/etc/shadow'>VARS.fd</nvram></os>",
            "domain/os/nvram",
            "template",
        ),
        (
            "<devices><emulator>/bin/sh</emulator></devices>",
            "domain/devices/emulator",
            "emulator",
        ),
        (
            "<devices><interface type='direct'><source dev='eth0'/></interface></devices>",
            "domain/devices/interface",
            "interface",
        ),
        (
            "<devices><redirdev bus='usb' type='spicevmc'/></devices>",
            "domain/devices/redirdev",
            "USB",
        ),
        (
            "<devices><shmem name='x'/></devices>",
            "domain/devices/shmem",
            "shared memory",
        ),
        (
            "<devices><input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input></devices>",
            "domain/devices/input",
            "input",
        ),
        (
            "<memoryBacking><source type='file'/></memoryBacking>",
            "domain/memoryBacking/source",
            "host file",
        ),
        (
            "<devices><rng model='virtio'><backend model='random'>/dev/sda</backend></rng></devices>",
            "domain/devices/rng/backend",
            "random",
        ),
        (
            "<devices><smartcard mode='host'/></devices>",
            "domain/devices/smartcard",
            "smartcard",
        ),
    ];
    for (body, element, reason) in cases {
        let found = violations(body);
        assert!(
            found
                .iter()
                .any(|v| v.element == element && v.reason.contains(reason)),
            "{body}: expected <{element}> {reason:?}, got {found:?}"
        );
    }
}

#[test]
fn benign_devices_pass_and_all_violations_are_listed() {
    let ok = "<os><type arch='x86_64'>hvm</type><loader readonly='yes'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>VARS.fd</nvram></os>\
        <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><disk type='file' device='disk'><source file='disk.qcow2'/></disk>\
        <disk type='file' device='cdrom'/><serial type='pty'/><console type='pty'/><channel type='unix'><target type='virtio'/></channel>\
        <interface type='network'><source network='default'/></interface><rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\
        <graphics type='vnc' port='-1'/><video><model type='virtio'/></video></devices>";
    assert_eq!(violations(ok), Vec::new());
    let many = violations("<devices><hostdev/><shmem/></devices><os><kernel>/k</kernel></os>");
    assert_eq!(many.len(), 3, "{many:?}");
    let err = check_untrusted(
        "<domain><name>x</name><devices><hostdev/></devices></domain>",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--allow-unsafe-xml") && err.contains("hostdev"),
        "{err}"
    );
}

#[test]
fn doctype_oversize_and_broken_xml_are_refused() {
    let bomb = "<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]><domain><name>&b;</name></domain>";
    assert!(matches!(prepare_export(bomb), Err(DomainError::Doctype)));
    assert!(
        check_untrusted(bomb, &[])
            .unwrap_err()
            .to_string()
            .contains("DOCTYPE")
    );
    let huge = format!(
        "<domain><name>x</name><description>{}</description></domain>",
        "a".repeat(MAX_XML_SIZE)
    );
    assert!(matches!(
        prepare_export(&huge),
        Err(DomainError::TooLarge(_))
    ));
    assert!(check_untrusted(&huge, &[]).is_err());
    assert!(matches!(
        prepare_export("<domain><name>x</name>"),
        Err(DomainError::Parse(_))
    ));
    assert!(matches!(
        prepare_export("<domain><name>x</wrong></domain>"),
        Err(DomainError::Parse(_))
    ));
    assert!(matches!(
        prepare_export("<domain/>"),
        Err(DomainError::NoName)
    ));
}

#[test]
fn architecture_and_os_names_follow_go() {
    assert_eq!(go_architecture("aarch64"), "arm64");
    assert_eq!(go_architecture("i686"), "386");
    assert_eq!(go_architecture("riscv64"), "riscv64");
    assert_eq!(go_os("http://freebsd.org/freebsd/14.0"), "freebsd");
    assert_eq!(go_os("http://debian.org/debian/12"), "linux");
    assert_eq!(go_os("http://microsoft.com/win/2k22"), "windows");
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
