//! A tiny bootable test guest for the end-to-end tests: Debian's cloud kernel, a
//! busybox userland and dropbear, built by `scripts/build-test-guest.sh` once per
//! machine (cached in [`guest_dir`]), booting to SSH in about 5-10 s under TCG.
//!
//! Log in as [`USER`] with the key [`GuestImage::key`] or the password [`PASSWORD`].
//! `/bin/sh` is busybox ash and `/bin/bash` a wrapper that runs it.
//!
//! ```no_run
//! use std::time::Duration;
//! use sarde_e2e::{guest, vm};
//! let image = guest::test_guest().expect("test guest");
//! let work = vm::workdir();
//! let vm = image.define(&vm::unique("demo"), work.path());
//! vm.start();
//! let ip = vm.wait_for_ip(Duration::from_secs(60)).expect("an address");
//! guest::wait_for_ssh(&ip, Duration::from_secs(60)).expect("SSH");
//! let out = sarde_e2e::ok(&mut image.ssh(&ip, "uname -r"));
//! ```

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::vm::{LIBVIRT_URI, run, undefine};

/// The user the guest lets in (by key and by password).
pub const USER: &str = "root";
/// [`USER`]'s password.
pub const PASSWORD: &str = "sarde";

/// Where the guest is built and cached: `$SARDE_TEST_GUEST_DIR`, else
/// `/var/lib/sardinecake-test/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("SARDE_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/sardinecake-test/guest"))
}

/// The built guest: the files `scripts/build-test-guest.sh` writes.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The cache directory holding all of the below.
    pub dir: PathBuf,
    /// `guest.qcow2`, the base disk. Never boot it: boot copies or overlays.
    pub disk: PathBuf,
    /// `id_ed25519`, the private key that logs in as [`USER`].
    pub key: PathBuf,
    /// `id_ed25519.pub`.
    pub public_key: PathBuf,
    /// `host_keys.pub`: the guest's SSH host keys, one `TYPE BASE64` a line.
    pub host_keys: PathBuf,
    /// `domain.xml.in`: a `type='qemu'` domain with `@NAME@`, `@DISK@`, `@MAC@`.
    pub template: PathBuf,
    /// `access.json`: `{"users":[{"username":"root","password":"sarde"}]}`.
    pub access: PathBuf,
}

/// The test guest, built on first use (a few seconds, plus ~30 MB of `.deb`s the
/// first time) and reused by every later call and test process. When it cannot
/// be built (tools or package mirror missing), a missing prerequisite: `None`
/// with SKIPPED on stderr by hand, a failure naming the reason under CI. A file
/// lock serialises concurrent builders.
pub fn test_guest() -> Option<GuestImage> {
    static GUEST: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    match GUEST.get_or_init(build) {
        Ok(image) => Some(image.clone()),
        Err(why) => {
            sarde_test_prerequisite::missing("test guest", why);
            None
        }
    }
}

fn build() -> Result<GuestImage, String> {
    let dir = guest_dir();
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if let Err(e) = std::fs::create_dir_all(parent) {
        return Err(format!(
            "test guest: cannot create {}: {e}",
            parent.display()
        ));
    }
    let script = crate::workspace_root().join("scripts/build-test-guest.sh");
    let lock = dir.with_extension("lock");
    // flock(1) holds the lock while the script runs; the script itself returns at
    // once when the cached guest is up to date.
    let out = Command::new("flock")
        .arg(&lock)
        .arg("bash")
        .arg(&script)
        .arg(&dir)
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(format!(
                "test guest: {} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Err(e) => {
            return Err(format!("test guest: cannot run flock/bash: {e}"));
        }
    }
    let image = GuestImage {
        disk: dir.join("guest.qcow2"),
        key: dir.join("id_ed25519"),
        public_key: dir.join("id_ed25519.pub"),
        host_keys: dir.join("host_keys.pub"),
        template: dir.join("domain.xml.in"),
        access: dir.join("access.json"),
        dir,
    };
    for file in [
        &image.disk,
        &image.key,
        &image.public_key,
        &image.host_keys,
        &image.template,
        &image.access,
    ] {
        if !file.is_file() {
            return Err(format!(
                "test guest: {} is missing after the build",
                file.display()
            ));
        }
    }
    Ok(image)
}

/// A MAC address for a domain name: `52:54:00` (QEMU's prefix) and 3 bytes of a
/// hash of the name. Every new name takes one of the `default` network's
/// addresses for the lease time (1 h) unless the guest powers off cleanly.
pub fn mac_for(name: &str) -> String {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

impl GuestImage {
    /// The domain XML from the template. `disk` is used as given (make it absolute).
    pub fn domain_xml(&self, name: &str, disk: &Path, mac: &str) -> String {
        let template = std::fs::read_to_string(&self.template).expect("read domain.xml.in");
        template
            .replace("@NAME@", name)
            .replace("@DISK@", path_str(disk))
            .replace("@MAC@", mac)
    }

    /// Copies the base disk to `disk_copy_dir/NAME.qcow2` and defines domain `name`
    /// on it (not started). The directory must be reachable by libvirt-qemu
    /// ([`crate::vm::workdir`] is).
    pub fn define(&self, name: &str, disk_copy_dir: &Path) -> GuestVm {
        let disk = disk_copy_dir.join(format!("{name}.qcow2"));
        std::fs::copy(&self.disk, &disk).expect("copy guest.qcow2");
        self.define_disk(name, &disk)
    }

    /// Defines domain `name` on an existing disk (a copy or an overlay of
    /// [`GuestImage::disk`], or a disk a test imported), with [`mac_for`]`(name)`.
    pub fn define_disk(&self, name: &str, disk: &Path) -> GuestVm {
        self.define_disks(name, disk, &[])
    }

    /// Like [`GuestImage::define_disk`], with `extra` qcow2 files attached after the
    /// boot disk as `vdb`, `vdc`, … (data disks the guest leaves alone).
    pub fn define_disks(&self, name: &str, disk: &Path, extra: &[&Path]) -> GuestVm {
        let disk = std::path::absolute(disk).expect("absolute disk path");
        let mac = mac_for(name);
        let mut xml = self.domain_xml(name, &disk, &mac);
        let mut disks = String::new();
        for (i, file) in extra.iter().enumerate() {
            let file = std::path::absolute(file).expect("absolute disk path");
            disks.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vd{}' bus='virtio'/></disk>",
                file.display(),
                (b'b' + i as u8) as char
            ));
        }
        let end = xml.find("</disk>").expect("the template has a disk") + "</disk>".len();
        xml.insert_str(end, &disks);
        let file = disk.with_file_name(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write domain XML");
        run(
            "virsh",
            &["-q", "-c", LIBVIRT_URI, "define", path_str(&file)],
        );
        GuestVm {
            name: name.to_string(),
            mac,
            disk,
        }
    }

    /// `known_hosts` lines that pin the guest's host keys for `ip`.
    pub fn known_hosts(&self, ip: &str) -> String {
        let keys = std::fs::read_to_string(&self.host_keys).expect("read host_keys.pub");
        keys.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("{ip} {l}\n"))
            .collect()
    }

    /// `ssh` as [`USER`] with the key, no host key checking, no prompts; runs
    /// `command` (stdin is the caller's to set).
    pub fn ssh(&self, ip: &str, command: &str) -> Command {
        self.ssh_key(ip, NO_HOST_KEY_CHECK, command)
    }

    /// Like [`GuestImage::ssh`] but checking the host key against `known_hosts` (a
    /// file with [`GuestImage::known_hosts`]`(ip)`).
    pub fn ssh_pinned(&self, ip: &str, known_hosts: &Path, command: &str) -> Command {
        let file = format!("UserKnownHostsFile={}", path_str(known_hosts));
        self.ssh_key(
            ip,
            &["-o", "StrictHostKeyChecking=yes", "-o", &file],
            command,
        )
    }

    // (ssh keeps the first value of each -o option: no defaults to override here.)
    fn ssh_key(&self, ip: &str, host_key_options: &[&str], command: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(host_key_options)
            .args(SSH_OPTIONS)
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"])
            .arg(&self.key)
            .arg(format!("{USER}@{ip}"))
            .arg(command);
        cmd
    }

    /// `ssh` as [`USER`] with the password and no key: through `sshpass` when
    /// installed, else through OpenSSH's `SSH_ASKPASS_REQUIRE=force` (OpenSSH 8.4+)
    /// and a tiny askpass script.
    pub fn ssh_password(&self, ip: &str, command: &str) -> Command {
        let auth = [
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "NumberOfPasswordPrompts=1",
        ];
        let mut cmd = if which("sshpass") {
            let mut c = Command::new("sshpass");
            c.arg("-e").arg("ssh").env("SSHPASS", PASSWORD);
            c
        } else {
            let mut c = Command::new("ssh");
            c.env("SSH_ASKPASS", askpass_script())
                .env("SSH_ASKPASS_REQUIRE", "force")
                .env("SARDE_E2E_PASSWORD", PASSWORD)
                .env("DISPLAY", ":0");
            c
        };
        cmd.args(NO_HOST_KEY_CHECK)
            .args(SSH_OPTIONS)
            .args(auth)
            .arg(format!("{USER}@{ip}"))
            .arg(command);
        cmd
    }
}

const NO_HOST_KEY_CHECK: &[&str] = &[
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
];
const SSH_OPTIONS: &[&str] = &["-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"];

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// An askpass program that prints `$SARDE_E2E_PASSWORD`, written once per process.
fn askpass_script() -> PathBuf {
    static SCRIPT: OnceLock<PathBuf> = OnceLock::new();
    SCRIPT
        .get_or_init(|| {
            use std::os::unix::fs::PermissionsExt;
            let path =
                std::env::temp_dir().join(format!("sarde-e2e-askpass-{}", std::process::id()));
            std::fs::write(&path, "#!/bin/sh\nprintf '%s\\n' \"$SARDE_E2E_PASSWORD\"\n")
                .expect("write askpass script");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .expect("chmod askpass script");
            path
        })
        .clone()
}

/// A domain defined from the test guest; destroyed and undefined when dropped (its
/// disk stays where the caller put it).
#[derive(Debug)]
pub struct GuestVm {
    pub name: String,
    pub mac: String,
    pub disk: PathBuf,
}

impl GuestVm {
    /// `virsh start`.
    pub fn start(&self) {
        run("virsh", &["-q", "-c", LIBVIRT_URI, "start", &self.name]);
    }

    /// [`wait_for_ip`] for this domain.
    pub fn wait_for_ip(&self, timeout: Duration) -> Option<String> {
        wait_for_ip(&self.name, timeout)
    }

    /// `virsh domstate`, e.g. `running`, `shut off`.
    pub fn state(&self) -> String {
        run("virsh", &["-q", "-c", LIBVIRT_URI, "domstate", &self.name])
            .trim()
            .to_string()
    }

    /// Waits until the domain is shut off (after a `poweroff` inside or a
    /// `virsh shutdown`); whether it did within `timeout`.
    pub fn wait_shut_off(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.state() == "shut off" {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        undefine(&self.name);
    }
}

/// The IPv4 address of domain `name`, polled every 200 ms until `timeout`: the DHCP
/// lease (`virsh domifaddr`), else the host's neighbour table (`ip -4 neigh`) for
/// the domain's MAC. (`virsh domifaddr --source arp` fails on these hosts with
/// "wrong nlmsg len".) A lease can be stale, left from an earlier boot with the same
/// MAC: wait for SSH ([`wait_for_ssh`]) before trusting the address.
pub fn wait_for_ip(name: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let mut macs: Vec<String> = Vec::new();
    loop {
        if let Some(ip) = lease_address(name) {
            return Some(ip);
        }
        if macs.is_empty() {
            macs = domain_macs(name);
        }
        if let Some(ip) = neighbour_address(&macs) {
            return Some(ip);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// ` vnet0      52:54:00:aa:00:01    ipv4         192.168.122.253/24`
fn lease_address(name: &str) -> Option<String> {
    let text = output("virsh", &["-q", "-c", LIBVIRT_URI, "domifaddr", name])?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let i = fields.iter().position(|f| *f == "ipv4")?;
        let addr = fields.get(i + 1)?;
        Some(addr.split('/').next()?.to_string())
    })
}

/// The MACs of a domain's interfaces (`virsh domiflist`, last column).
fn domain_macs(name: &str) -> Vec<String> {
    output("virsh", &["-q", "-c", LIBVIRT_URI, "domiflist", name])
        .map(|text| {
            text.lines()
                .filter_map(|l| l.split_whitespace().last())
                .filter(|m| m.len() == 17 && m.matches(':').count() == 5)
                .map(str::to_ascii_lowercase)
                .collect()
        })
        .unwrap_or_default()
}

/// `192.168.122.253 dev virbr0 lladdr 52:54:00:aa:00:01 REACHABLE`
fn neighbour_address(macs: &[String]) -> Option<String> {
    if macs.is_empty() {
        return None;
    }
    let text = output("ip", &["-4", "neigh", "show"])?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let i = fields.iter().position(|f| *f == "lladdr")?;
        let mac = fields.get(i + 1)?.to_ascii_lowercase();
        let state = fields.last()?;
        (macs.contains(&mac) && !matches!(*state, "FAILED" | "INCOMPLETE"))
            .then(|| fields[0].to_string())
    })
}

/// Waits until `ip`:22 accepts a connection and sends an `SSH-2.0-` banner; the
/// banner line, or `None` after `timeout`.
pub fn wait_for_ssh(ip: &str, timeout: Duration) -> Option<String> {
    let addr: SocketAddr = format!("{ip}:22").parse().ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(banner) = ssh_banner(&addr) {
            return Some(banner);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200).min(deadline - now));
    }
}

fn ssh_banner(addr: &SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // The server may send other lines before the version line (RFC 4253 4.2).
    while line.len() < 1024 {
        match stream.read(&mut byte) {
            Ok(1) => {
                if byte[0] == b'\n' {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    if text.starts_with("SSH-2.0-") {
                        return Some(text);
                    }
                    line.clear();
                } else {
                    line.push(byte[0]);
                }
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_and_local() {
        assert_eq!(mac_for("a"), mac_for("a"));
        assert_ne!(mac_for("a"), mac_for("b"));
        let mac = mac_for("sarde-guest-1");
        assert!(mac.starts_with("52:54:00:"));
        assert_eq!(mac.len(), 17);
    }
}
