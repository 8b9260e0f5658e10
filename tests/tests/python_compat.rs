//! The v1 format both ways against the Python tool (PyPI sardinecake 0.4.2, installed
//! by scripts/install-python-tool.sh): it imports what sarde writes, sarde imports
//! what it writes; disks compared byte for byte and by guest content.

use std::path::PathBuf;
use std::process::Command;

use sarde_e2e::vm::{
    self, TestVm, fill, fill_random, python_sarde, qcow2, same_guest_content, sha256,
};
use sarde_e2e::{ok, sarde};

#[test]
fn python_tool_imports_what_sarde_exports_as_v1() {
    let Some(python) = python_sarde("python_tool_imports_what_sarde_exports_as_v1") else {
        return;
    };
    let work = vm::workdir();
    let elsewhere = work.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let base = elsewhere.join("base.qcow2");
    qcow2(&base, "64M", None);
    fill_random(&base, 0, 4, 3);
    let top = work.path().join("top.qcow2");
    // An absolute reference in another directory: the Python tool could not export
    // this; sarde's v1 output must still be importable by it.
    qcow2(&top, "64M", Some(base.to_str().unwrap()));
    fill(&top, 0x42, "10M", "2M");
    let name = vm::unique("sarde-py-in");
    let mut test_vm = TestVm::define(&name, &[&top], None);
    let imported = format!("{name}-by-python");
    test_vm.cleanup_also(&imported);

    let home = vm::workdir();
    let layout = home.path().join("layout");
    ok(sarde(home.path()).args([
        "export",
        "--raw",
        "--image-format",
        "v1",
        "--codec",
        "gzip",
        "--chunksize",
        "1MiB",
        &name,
        &format!("{}:v1", layout.display()),
    ]));
    let vmdir = home.path().join("py-vms");
    let out = Command::new(&python)
        .args([
            "--connect",
            vm::LIBVIRT_URI,
            "import",
            "--raw",
            "-n",
            &imported,
        ])
        .arg(format!("--vmdir={}/", vmdir.display()))
        .arg(format!("{}:v1", layout.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Python import failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(vm::domain_exists(&imported));
    // The Python tool puts the files in <vmdir>/<something>/; find them.
    let found_base = find(&vmdir, "base.qcow2").expect("Python extracted base.qcow2");
    let found_top = find(&vmdir, "top.qcow2").expect("Python extracted top.qcow2");
    assert_eq!(sha256(&found_base), sha256(&base), "base bytes differ");
    assert!(
        same_guest_content(&found_top, &top),
        "top guest content differs"
    );
    assert_eq!(
        vm::backing_reference(&found_top).as_deref(),
        Some("base.qcow2")
    );
}

#[test]
fn sarde_imports_what_the_python_tool_exports() {
    let Some(python) = python_sarde("sarde_imports_what_the_python_tool_exports") else {
        return;
    };
    let work = vm::workdir();
    let top = vm::python_exportable_chain(work.path());
    let base = work.path().join("base.qcow2");
    let name = vm::unique("sarde-py-out");
    let mut test_vm = TestVm::define(&name, &[&top], None);
    let imported = format!("{name}-by-sarde");
    test_vm.cleanup_also(&imported);
    let access = work.path().join("access.json");
    std::fs::write(
        &access,
        r#"{"users":[{"username":"vagrant","password":"vagrant"}]}"#,
    )
    .unwrap();

    let home = vm::workdir();
    let layout = home.path().join("py-layout");
    let out = Command::new(&python)
        .args([
            "--connect",
            vm::LIBVIRT_URI,
            "export",
            "--raw",
            "--chunksize",
            "1MiB",
        ])
        .arg("--vmconfig")
        .arg(&access)
        .arg(&name)
        .arg(format!("{}:py", layout.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Python export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = ok(sarde(home.path()).args([
        "import",
        "--raw",
        "-n",
        &imported,
        &format!("{}:py", layout.display()),
    ]));
    assert_eq!(printed, imported);
    let dir = home.path().join("VMs").join(&imported);
    assert_eq!(sha256(&dir.join("base.qcow2")), sha256(&base));
    assert_eq!(sha256(&dir.join("top.qcow2")), sha256(&top));
    assert!(same_guest_content(&dir.join("top.qcow2"), &top));
    let config =
        ok(sarde(home.path()).args(["getconfig", "--raw", &format!("{}:py", layout.display())]));
    assert!(config.contains("vagrant"), "{config}");
}

fn find(dir: &std::path::Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir() {
            if let Some(found) = find(&path, name) {
                return Some(found);
            }
        }
    }
    None
}

/// Runs the Python tool with `args` (its global options first), asserting success.
fn python_ok(python: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(python)
        .args(["--connect", vm::LIBVIRT_URI])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Python {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sarde_and_the_python_tool_share_one_cache() {
    let Some(python) = python_sarde("sarde_and_the_python_tool_share_one_cache") else {
        return;
    };
    let work = vm::workdir();
    let top = vm::python_exportable_chain(work.path());
    let base = work.path().join("base.qcow2");
    let name = vm::unique("sarde-py-cache");
    let mut test_vm = TestVm::define(&name, &[&top], None);
    let home = vm::workdir();
    let ocidir = home.path().join("OCI");
    let ocidir_flag = format!("--ocidir={}/", ocidir.display());
    let vmdir_flag = format!("--vmdir={}/", home.path().join("py-vms").display());

    // The Python tool exports under a short name, a qualified one, and a
    // host:port one (its layout takes the port for the start of the tag).
    let python_names = [
        "sardines/pyshort:1",
        "localhost/sardines/pyfull:1",
        "127.0.0.1:5000/sardines/pyport:1",
    ];
    for image in python_names {
        python_ok(&python, &["export", &ocidir_flag, &name, image]);
    }
    let listed = ok(sarde(home.path()).args(["list", "--format", "json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let names: Vec<String> = listed["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}:{}",
                i["name"].as_str().unwrap(),
                i["tag"].as_str().unwrap()
            )
        })
        .collect();
    for image in python_names {
        assert!(
            names.contains(&image.to_string()),
            "{image} not in {names:?}"
        );
        // getconfig, import agree with list on every name.
        ok(sarde(home.path()).args(["getconfig", image]));
        let vm_name = format!("{name}-{}", image.replace(['/', ':', '.'], "-"));
        test_vm.cleanup_also(&vm_name);
        ok(sarde(home.path()).args(["import", "-n", &vm_name, image]));
        let dir = home.path().join("VMs").join(&vm_name);
        assert_eq!(sha256(&dir.join("base.qcow2")), sha256(&base), "{image}");
        assert!(same_guest_content(&dir.join("top.qcow2"), &top), "{image}");
    }
    // list shows the VMs that exist, under the names they were imported as,
    // and no "(missing)" default name for images nobody imported that way.
    let listed: serde_json::Value =
        serde_json::from_str(&ok(sarde(home.path()).args(["list", "--format", "json"]))).unwrap();
    for image in listed["images"].as_array().unwrap() {
        let vms = image["vms"].as_array().unwrap();
        assert!(!vms.is_empty(), "{image}");
        for vm in vms {
            assert_ne!(vm["state"], "missing", "{image}");
            assert!(vm::domain_exists(vm["name"].as_str().unwrap()), "{image}");
        }
    }
    // The broken layout is read, never written: nothing new next to it.
    assert!(!ocidir.join("127.0.0.1:5000").exists());

    // sarde exports (the Python tool reads v1) where the Python tool looks.
    for image in ["sardines/sardeshort:1", "localhost/sardines/sardefull:1"] {
        // The Python tool's own spelling of the name: --tag.
        ok(sarde(home.path()).args(["export", "--image-format", "v1", "--tag", image, &name]));
        let vm_name = format!("{name}-py-{}", image.replace(['/', ':', '.'], "-"));
        test_vm.cleanup_also(&vm_name);
        python_ok(
            &python,
            &["import", &ocidir_flag, &vmdir_flag, "-n", &vm_name, image],
        );
        assert!(vm::domain_exists(&vm_name), "{image}");
    }
    assert!(ocidir.join("sardines/sardeshort/index.json").is_file());
    assert!(
        ocidir
            .join("localhost/sardines/sardefull/index.json")
            .is_file()
    );
}
