//! A transport from a plugin built out of tree as a third party would build it
//! (`plugins/example-files`: plain files, one per blob and per tag) is a
//! transport like the built-in ones: `sarde plugins` lists it with its syntax,
//! and `push`, `copy`, `fetch` and `pull` move an image through it.

use std::path::Path;

use sarde_e2e::vm::{self, TestVm, fill_random, qcow2, same_guest_content};
use sarde_e2e::{build_cdylib, fails, ok, sarde};
use serde_json::Value;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn with_plugin(home: &Path, lib: &Path) -> std::process::Command {
    let mut cmd = sarde(home);
    cmd.arg("--plugin").arg(lib);
    cmd
}

#[test]
fn a_plugin_transport_carries_an_image() {
    if !vm::libvirt_enabled("a_plugin_transport_carries_an_image") {
        return;
    }
    let lib = build_cdylib("sarde-plugin-example-files", &[]);
    let work = vm::workdir();
    let home = vm::workdir();
    let home = home.path();

    let plugins = ok(with_plugin(home, &lib).args(["plugins", "--format", "json"]));
    let listed = json(&plugins);
    let files = listed["factories"]
        .as_array()
        .expect("a list of factories")
        .iter()
        .find(|p| p["name"] == "files")
        .unwrap_or_else(|| panic!("no files transport in {plugins}"));
    assert_eq!(files["kind"], "transport", "{files}");
    assert_ne!(files["origin"], "built in", "{files}");
    assert!(
        files["description"]
            .as_str()
            .unwrap_or("")
            .contains("files:DIR[:TAG]"),
        "{files}"
    );

    let disk = work.path().join("disk.qcow2");
    qcow2(&disk, "32M", None);
    fill_random(&disk, 0, 4, 21);
    let name = vm::unique("sarde-files");
    let mut source_vm = TestVm::define(&name, &[&disk], None);
    ok(sarde(home).args(["export", "--chunksize", "2MiB", &name, "e2e/files:1"]));

    let store = work.path().join("store");
    let pushed = json(&ok(with_plugin(home, &lib).args([
        "push",
        "--format",
        "json",
        "-t",
        &format!("files:{}:v1", store.display()),
        "e2e/files:1",
    ])));
    let manifest = pushed["manifest"].as_str().expect("digest").to_string();
    assert!(store.join("tags").join("v1").is_file());

    // files → oci: the plugin as a copy's source.
    let layout = work.path().join("layout");
    let copied = json(&ok(with_plugin(home, &lib).args([
        "copy",
        "--format",
        "json",
        &format!("files:{}:v1", store.display()),
        &format!("oci:{}:v1", layout.display()),
    ])));
    assert_eq!(copied["manifest"], manifest.as_str(), "{copied}");

    // pull from the plugin into an empty cache and VM directory.
    let other = vm::workdir();
    let pulled = vm::unique("sarde-files-pulled");
    source_vm.cleanup_also(&pulled);
    ok(with_plugin(other.path(), &lib).args([
        "pull",
        "-n",
        &pulled,
        "-s",
        &format!("files:{}:v1", store.display()),
        "e2e/from-files:1",
    ]));
    let imported = other.path().join("VMs").join(&pulled).join("disk.qcow2");
    assert!(
        same_guest_content(&disk, &imported),
        "guest content differs"
    );

    // Without the plugin the scheme is unknown: a clear error, no guess.
    let err = fails(sarde(home).args([
        "copy",
        &format!("files:{}:v1", store.display()),
        &format!("oci:{}:v2", layout.display()),
    ]));
    assert!(err.contains("files"), "{err}");
}

#[test]
fn a_transport_plugin_of_the_previous_abi_is_refused() {
    let lib = build_cdylib("sarde-plugin-example-files", &["previous-abi"]);
    let home = vm::workdir();
    let err = fails(with_plugin(home.path(), &lib).args(["plugins"]));
    let host = sarde_api::plugin::ABI_VERSION;
    assert!(
        err.contains(&format!("plugin ABI {}", host - 1))
            && err.contains(&format!("this sarde uses ABI {host}"))
            && err.contains("example-files"),
        "{err}"
    );
    let store = home.path().join("store");
    let err = fails(with_plugin(home.path(), &lib).args([
        "copy",
        &format!("files:{}:1", store.display()),
        &format!("oci:{}:1", home.path().join("out").display()),
    ]));
    assert!(err.contains("incompatible"), "{err}");
}
