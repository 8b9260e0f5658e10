//! Real VMs and disks for end-to-end tests: qcow2 chains made with qemu-img and
//! filled with qemu-io, domains defined on the real `qemu:///system`, removed again
//! when the test ends.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libvirt URI the end-to-end tests use.
pub const LIBVIRT_URI: &str = "qemu:///system";

/// Whether tests that need the real libvirtd should run (CI sets
/// `SARDE_TEST_LIBVIRT=1` after starting the daemons). Prints why when not.
pub fn libvirt_enabled(test: &str) -> bool {
    sarde_test_prerequisite::require(
        test,
        std::env::var("SARDE_TEST_LIBVIRT").as_deref() == Ok("1"),
        "SARDE_TEST_LIBVIRT=1 with libvirtd running (scripts/start-services.sh)",
    )
}

/// Runs a command and panics with its stderr when it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
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

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The Python tool's `sarde` (`SARDE_TEST_PYTHON_SARDE`), when libvirt tests are
/// on and it is set; prints why `test` is skipped otherwise.
pub fn python_sarde(test: &str) -> Option<PathBuf> {
    if !libvirt_enabled(test) {
        return None;
    }
    sarde_test_prerequisite::env(
        test,
        "SARDE_TEST_PYTHON_SARDE",
        "the Python tool's sarde, which scripts/install-python-tool.sh prints",
    )
    .map(PathBuf::from)
}

/// A backing chain the Python tool can export: `<dir>/top.qcow2` over
/// `<dir>/base.qcow2` by relative name (it wants backing files next to their
/// overlays), both 64 MiB with some data. Returns the top file.
pub fn python_exportable_chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    qcow2(&base, "64M", None);
    fill_random(&base, 0, 3, 5);
    let top = dir.join("top.qcow2");
    qcow2(&top, "64M", Some("base.qcow2"));
    fill(&top, 0x24, "5M", "1M");
    top
}

/// Creates a qcow2 file of `size` (e.g. "64M"), optionally on top of `backing` as
/// referenced by `reference` (the string stored in the header).
pub fn qcow2(path: &Path, size: &str, backing: Option<&str>) {
    match backing {
        None => run("qemu-img", &["create", "-q", "-f", "qcow2", s(path), size]),
        Some(reference) => {
            // Relative references resolve against the overlay's directory.
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
                    reference,
                    s(path),
                    size,
                ],
            )
        }
    };
}

/// Writes `len` bytes of `pattern` at `offset` through qemu-io (guest view).
pub fn fill(path: &Path, pattern: u8, offset: &str, len: &str) {
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern:#x} {offset} {len}"),
            s(path),
        ],
    );
}

/// Writes pseudo-random data (incompressible) into the guest view of `path`.
pub fn fill_random(path: &Path, offset_mib: u64, len_mib: u64, seed: u64) {
    let dir = path.parent().expect("file in a directory");
    let raw = dir.join(format!(".random-{seed}"));
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut data = vec![0u8; (len_mib << 20) as usize];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&raw, &data).expect("write random data");
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -s {} {}M {}M", s(&raw), offset_mib, len_mib),
            s(path),
        ],
    );
    std::fs::remove_file(raw).ok();
}

/// Whether two images show the guest the same content (`qemu-img compare`).
pub fn same_guest_content(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-U", s(a), s(b)])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// sha256 of a file's bytes, as `sha256sum` prints it.
pub fn sha256(path: &Path) -> String {
    run("sha256sum", &[s(path)])
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_string()
}

/// The backing reference stored in a qcow2 header.
pub fn backing_reference(path: &Path) -> Option<String> {
    let info = run("qemu-img", &["info", "-U", "--output=json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("qemu-img prints JSON");
    v["backing-filename"].as_str().map(str::to_string)
}

/// A domain defined on the real libvirtd; undefined (with the imports named in
/// `also`) when dropped.
pub struct TestVm {
    pub name: String,
    pub also: Vec<String>,
}

impl TestVm {
    /// Defines a small TCG domain with `disks` (top files) and optionally NVRAM.
    pub fn define(name: &str, disks: &[&Path], nvram: Option<&Path>) -> TestVm {
        let mut devices = String::new();
        for (i, disk) in disks.iter().enumerate() {
            let dev = format!("vd{}", (b'a' + i as u8) as char);
            devices.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='{dev}' bus='virtio'/></disk>",
                disk.display()
            ));
        }
        let os = match nvram {
            Some(path) => format!(
                "<os><type arch='x86_64' machine='pc'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>{}</nvram></os><features><acpi/></features>",
                path.display()
            ),
            None => "<os><type arch='x86_64' machine='pc'>hvm</type></os>".to_string(),
        };
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>{os}\
             <metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'><libosinfo:os id='http://debian.org/debian/12'/></libosinfo:libosinfo></metadata>\
             <devices>{devices}<interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/><model type='virtio'/></interface>\
             <serial type='pty'/><console type='pty'/></devices></domain>"
        );
        let dir = std::env::temp_dir().join(format!("sarde-e2e-xml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write XML");
        run("virsh", &["-q", "-c", LIBVIRT_URI, "define", s(&file)]);
        TestVm {
            name: name.to_string(),
            also: Vec::new(),
        }
    }

    /// Also undefine `name` (a VM a test imported) when this one goes.
    pub fn cleanup_also(&mut self, name: &str) {
        self.also.push(name.to_string());
    }
}

/// Undefines a domain if it exists (ignores errors).
pub fn undefine(name: &str) {
    let _ = Command::new("virsh")
        .args(["-q", "-c", LIBVIRT_URI, "destroy", name])
        .output();
    let _ = Command::new("virsh")
        .args(["-q", "-c", LIBVIRT_URI, "undefine", "--nvram", name])
        .output();
    let _ = Command::new("virsh")
        .args(["-q", "-c", LIBVIRT_URI, "undefine", name])
        .output();
}

/// Whether a domain is defined.
pub fn domain_exists(name: &str) -> bool {
    Command::new("virsh")
        .args(["-q", "-c", LIBVIRT_URI, "dominfo", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The inactive XML of a domain.
pub fn dumpxml(name: &str) -> String {
    run("virsh", &["-c", LIBVIRT_URI, "dumpxml", "--inactive", name])
}

impl Drop for TestVm {
    fn drop(&mut self) {
        undefine(&self.name);
        for name in &self.also {
            undefine(name);
        }
    }
}

/// A unique name for this test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Paths inside a fresh temporary directory that the libvirt-qemu user can reach.
pub fn workdir() -> tempfile::TempDir {
    workdir_in(Path::new("/var/tmp"))
}

/// [`workdir`] inside `parent` (a file system of its own, say).
pub fn workdir_in(parent: &Path) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sarde-e2e-")
        .tempdir_in(parent)
        .expect("temp dir");
    // qemu runs as libvirt-qemu; let it traverse.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).ok();
    dir
}

/// `PathBuf` helper for readability in tests.
pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
