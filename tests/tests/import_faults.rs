//! Broken and hostile images: each import fails with a clear message, defines no VM
//! and leaves no partial files; an import killed half way is completed by a rerun.

use std::path::{Path, PathBuf};
use std::process::Command;

use sarde_e2e::vm::{self, TestVm, fill, fill_random, qcow2};
use sarde_e2e::{fails, ok, sarde};
use serde_json::Value;

/// A cache with one exported image `localhost/faults:1` of a VM with random data.
struct Fixture {
    home: tempfile::TempDir,
    _work: tempfile::TempDir,
    _vm: TestVm,
}

impl Fixture {
    fn new(random_mib: u64) -> Fixture {
        Fixture::exported_with(random_mib, &[])
    }

    /// Exports with extra `sarde export` arguments (`--codec raw`).
    fn exported_with(random_mib: u64, export_args: &[&str]) -> Fixture {
        let work = vm::workdir();
        let disk = work.path().join("disk.qcow2");
        qcow2(&disk, "512M", None);
        fill_random(&disk, 0, random_mib, 9);
        fill(&disk, 0x33, "300M", "1M");
        let name = vm::unique("sarde-faults");
        let test_vm = TestVm::define(&name, &[&disk], None);
        let home = vm::workdir();
        ok(sarde(home.path())
            .args(["export", "--chunksize", "1MiB"])
            .args(export_args)
            .args([&name, "localhost/faults:1"]));
        Fixture {
            home,
            _work: work,
            _vm: test_vm,
        }
    }

    fn layout(&self) -> PathBuf {
        self.home.path().join("OCI/localhost/faults")
    }

    fn blob(&self, digest: &str) -> PathBuf {
        self.layout()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn manifest(&self) -> Value {
        let index: Value = read_json(&self.layout().join("index.json"));
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        read_json(&self.blob(&digest))
    }

    /// The first disk piece layer.
    fn piece(&self) -> Value {
        self.manifest()["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["mediaType"].as_str().unwrap().contains("disk.piece"))
            .unwrap()
            .clone()
    }

    /// Stores a changed manifest, with a config whose `rootfs.diff_ids` list
    /// its layers again (as a crafted image would), and points the tag at it.
    fn rewrite_manifest(&self, change: impl FnOnce(&mut Value)) {
        self.rewrite_manifest_only(|manifest| {
            change(manifest);
            let mut config = read_json(&self.blob(manifest["config"]["digest"].as_str().unwrap()));
            config["rootfs"]["diff_ids"] = manifest["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    let piece = &l["annotations"]["org.sardinecake.piece.digest"];
                    if piece.is_string() {
                        piece.clone()
                    } else {
                        l["digest"].clone()
                    }
                })
                .collect();
            let bytes = serde_json::to_vec(&config).unwrap();
            manifest["config"]["digest"] = Value::String(self.store(&bytes));
            manifest["config"]["size"] = Value::from(bytes.len());
        });
    }

    /// Stores a changed manifest as it is (its config untouched) and points
    /// the tag at it.
    fn rewrite_manifest_only(&self, change: impl FnOnce(&mut Value)) {
        let mut manifest = self.manifest();
        change(&mut manifest);
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let digest = self.store(&bytes);
        let index_path = self.layout().join("index.json");
        let mut index = read_json(&index_path);
        index["manifests"][0]["digest"] = Value::String(digest);
        index["manifests"][0]["size"] = Value::from(bytes.len());
        std::fs::write(index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    }

    /// Stores a blob; returns its digest.
    fn store(&self, bytes: &[u8]) -> String {
        let tmp = self.layout().join("blobs/sha256/.test-tmp");
        std::fs::write(&tmp, bytes).unwrap();
        let hex = vm::sha256(&tmp);
        std::fs::rename(&tmp, self.layout().join("blobs/sha256").join(&hex)).unwrap();
        format!("sha256:{hex}")
    }

    /// Imports as `name`, expecting failure; checks nothing was left behind.
    fn import_fails(&self, name: &str) -> String {
        let err = fails(sarde(self.home.path()).args(["import", "-n", name, "localhost/faults:1"]));
        assert!(
            !vm::domain_exists(name),
            "{name} was defined despite: {err}"
        );
        let vms = self.home.path().join("VMs");
        let left: Vec<String> = std::fs::read_dir(&vms)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.ends_with(".lock"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "left behind in {}: {left:?}",
            vms.display()
        );
        err
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn corrupt_truncated_and_missing_blobs_are_refused() {
    if !vm::libvirt_enabled("corrupt_truncated_and_missing_blobs_are_refused") {
        return;
    }
    let f = Fixture::new(3);
    let piece = f.piece();
    let path = f.blob(piece["digest"].as_str().unwrap());
    let original = std::fs::read(&path).unwrap();

    let mut corrupt = original.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x40;
    std::fs::write(&path, &corrupt).unwrap();
    let err = f.import_fails(&vm::unique("corrupt"));
    assert!(
        err.contains("sha256:") && (err.contains("corrupt") || err.contains("digest")),
        "{err}"
    );

    std::fs::write(&path, &original[..original.len() - 10]).unwrap();
    let err = f.import_fails(&vm::unique("truncated"));
    assert!(err.contains("bytes") || err.contains("size"), "{err}");

    std::fs::remove_file(&path).unwrap();
    let err = f.import_fails(&vm::unique("missing"));
    assert!(
        err.contains(
            piece["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
        ),
        "{err}"
    );

    // Repaired, the same image imports.
    std::fs::write(&path, &original).unwrap();
    let name = vm::unique("repaired");
    ok(sarde(f.home.path()).args(["import", "-n", &name, "localhost/faults:1"]));
    vm::undefine(&name);
}

#[test]
fn hostile_xml_and_file_names_are_refused() {
    if !vm::libvirt_enabled("hostile_xml_and_file_names_are_refused") {
        return;
    }
    let f = Fixture::new(1);
    let original = f.manifest();

    // Domain XML that passes a host device through.
    let xml_digest = original["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let xml = std::fs::read_to_string(f.blob(&xml_digest)).unwrap();
    let hostile = xml.replace("</devices>", "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0' slot='1' function='0'/></source></hostdev></devices>");
    assert_ne!(hostile, xml);
    let hostile_digest = f.store(hostile.as_bytes());
    f.rewrite_manifest(|m| {
        m["layers"][0]["digest"] = Value::String(hostile_digest.clone());
        m["layers"][0]["size"] = Value::from(hostile.len());
    });
    let err = f.import_fails(&vm::unique("hostile"));
    assert!(
        err.contains("hostdev") && err.contains("--allow-unsafe-xml"),
        "{err}"
    );

    // A file name that climbs out of the VM directory.
    f.rewrite_manifest(|m| *m = original.clone());
    f.rewrite_manifest(|m| {
        for layer in m["layers"].as_array_mut().unwrap() {
            if let Some(a) = layer.get_mut("annotations") {
                a["org.sardinecake.file.name"] = Value::String("../../escape.qcow2".into());
            }
        }
    });
    let err = f.import_fails(&vm::unique("traversal"));
    assert!(
        err.contains("../../escape.qcow2") && err.contains("path separator"),
        "{err}"
    );
    assert!(!f.home.path().join("escape.qcow2").exists());
}

#[test]
fn a_piece_that_inflates_beyond_its_size_is_refused() {
    if !vm::libvirt_enabled("a_piece_that_inflates_beyond_its_size_is_refused") {
        return;
    }
    let f = Fixture::new(1);
    // 64 MiB of zeros compress to a few KiB: a bomb for a piece announced as 1 MiB.
    let zeros = f.home.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 64 << 20]).unwrap();
    let out = Command::new("zstd")
        .args(["-q", "-c"])
        .arg(&zeros)
        .output()
        .unwrap();
    assert!(out.status.success());
    let bomb = f.store(&out.stdout);
    let piece_digest = f.piece()["digest"].as_str().unwrap().to_string();
    f.rewrite_manifest(|m| {
        for layer in m["layers"].as_array_mut().unwrap() {
            if layer["digest"] == piece_digest.as_str() {
                layer["digest"] = Value::String(bomb.clone());
                layer["size"] = Value::from(out.stdout.len());
            }
        }
    });
    let err = f.import_fails(&vm::unique("bomb"));
    assert!(
        err.contains("more") || err.contains("larger") || err.contains("long"),
        "{err}"
    );
}

#[test]
fn a_stored_piece_that_differs_from_its_announced_digest_is_refused() {
    // Compressed pieces are vouched for by the codec's own checksum; an uncompressed
    // one is hashed on import, and its bytes must be what the manifest announces.
    if !vm::libvirt_enabled("a_stored_piece_that_differs_from_its_announced_digest_is_refused") {
        return;
    }
    let f = Fixture::exported_with(1, &["--codec", "raw"]);
    let piece = f.piece();
    assert_eq!(
        piece["annotations"]["org.sardinecake.piece.digest"], piece["digest"],
        "a stored piece is its own blob"
    );
    let piece_digest = piece["digest"].as_str().unwrap().to_string();
    let lie = format!("sha256:{}", "ab".repeat(32));
    f.rewrite_manifest(|m| {
        for layer in m["layers"].as_array_mut().unwrap() {
            if layer["digest"] == piece_digest.as_str() {
                layer["annotations"]["org.sardinecake.piece.digest"] = Value::String(lie.clone());
            }
        }
    });
    let err = f.import_fails(&vm::unique("lying-piece"));
    assert!(err.contains(&lie) && err.contains("disk.qcow2"), "{err}");
}

/// The bytes allocated on disk by the files under `dir` (0 when it is missing):
/// what an import has written so far, however large its files' apparent sizes.
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn an_import_killed_half_way_leaves_nothing_and_a_rerun_completes() {
    if !vm::libvirt_enabled("an_import_killed_half_way_leaves_nothing_and_a_rerun_completes") {
        return;
    }
    let f = Fixture::new(160);
    let name = vm::unique("killed");
    let staging = f.home.path().join("VMs").join(format!(".staging-{name}"));
    let mut child = sarde(f.home.path())
        .args(["import", "-n", &name, "localhost/faults:1"])
        .spawn()
        .unwrap();
    // Wait until 32 MiB of the disk are written, then kill without warning.
    let start = std::time::Instant::now();
    while allocated_bytes(&staging) < 32 << 20 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "import finished before it could be killed; make the disk bigger"
        );
        assert!(start.elapsed().as_secs() < 60, "nothing written in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "import finished before it could be killed; make the disk bigger"
    );
    assert!(!vm::domain_exists(&name));
    assert!(
        !f.home.path().join("VMs").join(&name).exists(),
        "a partial VM directory is in place"
    );

    // The rerun resumes the staging directory (when the kill left its stamp).
    let stamped = staging.join(".sarde-staging").exists();
    eprintln!("killed with the staging stamp in place: {stamped}");
    let out = sarde(f.home.path())
        .args(["-v", "import", "-n", &name, "localhost/faults:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rerun failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
    if stamped {
        assert!(
            stderr.contains("resuming the interrupted import"),
            "{stderr}"
        );
    }
    assert!(vm::domain_exists(&name));
    assert!(
        !staging.exists(),
        "the staging directory was not cleaned up"
    );
    vm::undefine(&name);
}

/// The image id (the config digest) names the base VM that later imports of
/// the same id reuse: a config that does not list the image's layers could
/// put one image's disks under another's id, so it is refused.
#[test]
fn a_config_that_does_not_name_the_layers_is_refused() {
    if !vm::libvirt_enabled("a_config_that_does_not_name_the_layers_is_refused") {
        return;
    }
    let f = Fixture::new(3);
    f.rewrite_manifest_only(|m| {
        let layers = m["layers"].as_array_mut().unwrap();
        let pieces: Vec<usize> = (0..layers.len())
            .filter(|i| {
                layers[*i]["mediaType"]
                    .as_str()
                    .unwrap()
                    .contains("disk.piece")
            })
            .collect();
        // The first piece's layer names the second piece's data.
        let second = layers[pieces[1]]["annotations"]["org.sardinecake.piece.digest"].clone();
        layers[pieces[0]]["annotations"]["org.sardinecake.piece.digest"] = second;
    });
    let err = f.import_fails(&vm::unique("diffids"));
    assert!(err.contains("rootfs.diff_ids"), "{err}");
}
