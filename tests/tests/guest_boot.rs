//! The tiny test guest (scripts/build-test-guest.sh) boots under TCG on the real
//! `qemu:///system`, gets an address on the `default` network and lets root in over
//! SSH by key and by password; it powers off from inside.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sarde_e2e::guest::{self, GuestImage};
use sarde_e2e::{ok, vm};

const ADDRESS_TIMEOUT: Duration = Duration::from_secs(60);
const SSH_TIMEOUT: Duration = Duration::from_secs(60);

fn image() -> GuestImage {
    guest::test_guest()
        .expect("the test guest builds (see scripts/build-test-guest.sh's output above)")
}

/// Runs `cmd` with `input` on stdin; asserts success, returns stdout.
fn ok_with_input(cmd: &mut std::process::Command, input: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("command runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("command finishes");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn guest_boots_to_ssh() {
    if !vm::libvirt_enabled("guest_boots_to_ssh") {
        return;
    }
    let image = image();
    let template = std::fs::read_to_string(&image.template).unwrap();
    assert!(template.contains("type='qemu'"), "TCG domain: {template}");
    assert!(
        !template.contains("/var/") && !template.contains("/tmp/"),
        "no host path in the template: {template}"
    );
    let access: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&image.access).unwrap()).unwrap();
    assert_eq!(access["users"][0]["username"], guest::USER);
    assert_eq!(access["users"][0]["password"], guest::PASSWORD);

    let work = vm::workdir();
    let name = vm::unique("sarde-guest-boot");
    let guest_vm = image.define(&name, work.path());
    assert!(vm::dumpxml(&name).contains(&guest_vm.mac));

    let started = Instant::now();
    guest_vm.start();
    let ip = guest_vm
        .wait_for_ip(ADDRESS_TIMEOUT)
        .unwrap_or_else(|| panic!("{name}: no address within {ADDRESS_TIMEOUT:?}"));
    let to_address = started.elapsed();
    let banner = guest::wait_for_ssh(&ip, SSH_TIMEOUT)
        .unwrap_or_else(|| panic!("{name}: no SSH banner on {ip}:22 within {SSH_TIMEOUT:?}"));
    let to_banner = started.elapsed();
    assert!(banner.starts_with("SSH-2.0-"), "banner {banner:?}");

    // Key login.
    let out = ok(&mut image.ssh(&ip, "echo hello; uname -r"));
    let to_login = started.elapsed();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"hello"), "output {out:?}");
    assert!(
        lines.get(1).is_some_and(|r| r.ends_with("-cloud-amd64")),
        "kernel release in {out:?}"
    );
    eprintln!(
        "{name}: {ip}; address after {to_address:.1?}, SSH banner ({banner}) after {to_banner:.1?}, \
         first login after {to_login:.1?}"
    );

    // Pinned host keys: the ones the build wrote next to the image.
    let known_hosts = work.path().join("known_hosts");
    std::fs::write(&known_hosts, image.known_hosts(&ip)).unwrap();
    assert_eq!(
        ok(&mut image.ssh_pinned(&ip, &known_hosts, "hostname")),
        "sarde-guest"
    );

    // What the executor does: a script piped into `bash` (busybox sh behind a wrapper).
    let script = "set -e\ncd /tmp\necho \"$((6 * 7))\" > answer\ncat answer\nls -d /proc/1 /sys/kernel /dev/null\n";
    let out = ok_with_input(
        &mut image.ssh(&ip, "command -v bash >/dev/null && exec bash || exec sh"),
        script,
    );
    assert_eq!(out, "42\n/dev/null\n/proc/1\n/sys/kernel\n");

    // Password login (sshpass when installed, else OpenSSH's SSH_ASKPASS).
    let out = ok(&mut image.ssh_password(&ip, "echo password-ok"));
    assert_eq!(out, "password-ok");

    // busybox poweroff through init: the domain shuts off by itself.
    let _ = image.ssh(&ip, "poweroff").output();
    assert!(
        guest_vm.wait_shut_off(Duration::from_secs(30)),
        "{name} still {} 30 s after poweroff",
        guest_vm.state()
    );
}
