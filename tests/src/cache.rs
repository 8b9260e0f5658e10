//! What a test sees of a sarde cache: an image's OCI layout and blobs, whether
//! `sarde list` shows it, and that a failed pull left no VM behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::registry::TestRegistry;
use crate::vm::{self, TestVm, fill, fill_random, qcow2};
use crate::{ok, sarde};

/// Reads a JSON file, panicking with its path when it can't.
pub fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{} cannot be read: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A blob of a manifest.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

impl Blob {
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    pub fn is_piece(&self) -> bool {
        self.media_type.contains("disk.piece")
    }
}

/// One OCI layout of a cache: `<ocidir>/<registry>/<repository>`.
pub struct CachedImage {
    pub layout: PathBuf,
    pub tag: String,
}

impl CachedImage {
    pub fn new(home: &Path, image: &str) -> CachedImage {
        let (name, tag) = image.rsplit_once(':').expect("image with a tag");
        CachedImage {
            layout: home.join("OCI").join(name),
            tag: tag.to_string(),
        }
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// The descriptor the tag points at, if the layout has the tag.
    pub fn tagged(&self) -> Option<Value> {
        let index = self.layout.join("index.json");
        if !index.exists() {
            return None;
        }
        read_json(&index)["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == self.tag.as_str())
            .cloned()
    }

    /// The manifest's digest and size.
    pub fn manifest_descriptor(&self) -> (String, u64) {
        let d = self
            .tagged()
            .unwrap_or_else(|| panic!("no tag {} in {}", self.tag, self.layout.display()));
        (
            d["digest"].as_str().unwrap().to_string(),
            d["size"].as_u64().unwrap(),
        )
    }

    /// The tagged manifest.
    pub fn manifest(&self) -> Value {
        let (digest, _) = self.manifest_descriptor();
        read_json(&self.blob_path(&digest))
    }

    /// Config and layers of the tagged manifest.
    pub fn blobs(&self) -> Vec<Blob> {
        let manifest = self.manifest();
        let blob = |v: &Value| Blob {
            digest: v["digest"].as_str().unwrap().to_string(),
            size: v["size"].as_u64().unwrap(),
            media_type: v["mediaType"].as_str().unwrap().to_string(),
        };
        let mut blobs = vec![blob(&manifest["config"])];
        blobs.extend(manifest["layers"].as_array().unwrap().iter().map(blob));
        blobs
    }
}

/// Whether `sarde list --format json` shows `image`'s tag.
pub fn listed(home: &Path, image: &str) -> bool {
    let (name, tag) = image.rsplit_once(':').unwrap();
    let out = ok(sarde(home).args(["list", "--format", "json"]));
    let list: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    list["images"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == name && i["tag"] == tag)
}

/// A failed pull left neither a domain `name` nor its directory under `home`.
pub fn assert_no_vm(home: &Path, name: &str, err: &str) {
    assert!(
        !vm::domain_exists(name),
        "{name} was defined despite: {err}"
    );
    assert!(
        !home.join("VMs").join(name).exists(),
        "a VM directory for {name} is in place"
    );
}

/// Runs `cmd` with `input` on stdin.
pub fn run_with_stdin(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sarde runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A VM with `random_mib` MiB of random data (and a little pattern) on its disk,
/// exported into a home of its own as `<registry>/<repository>:1` and pushed there.
pub struct PushedVm {
    _work: tempfile::TempDir,
    pub home: tempfile::TempDir,
    pub disk: PathBuf,
    pub vm: TestVm,
    pub image: String,
}

impl PushedVm {
    pub fn new(
        registry: &TestRegistry,
        repository: &str,
        random_mib: u64,
        export_args: &[&str],
    ) -> PushedVm {
        let work = vm::workdir();
        let disk = work.path().join("disk.qcow2");
        qcow2(&disk, &format!("{}M", random_mib + 64), None);
        fill_random(&disk, 0, random_mib, 17);
        fill(&disk, 0x5a, &format!("{}M", random_mib + 8), "1M");
        let name = vm::unique("sarde-pushed");
        let test_vm = TestVm::define(&name, &[&disk], None);
        let home = vm::workdir();
        let image = format!("{}/{repository}:1", registry.address());
        let id = ok(sarde(home.path())
            .arg("export")
            .args(export_args)
            .args([&name, &image]));
        assert!(id.starts_with("sha256:"), "image id {id:?}");
        ok(sarde(home.path()).args(["push", "-q", "--insecure", &image]));
        PushedVm {
            _work: work,
            home,
            disk,
            vm: test_vm,
            image,
        }
    }

    /// The image in its home's cache.
    pub fn cached(&self) -> CachedImage {
        CachedImage::new(self.home.path(), &self.image)
    }

    /// The image's repository, without registry and tag.
    pub fn repository(&self) -> &str {
        let (_, rest) = self.image.split_once('/').expect("registry/repository:tag");
        rest.rsplit_once(':').expect("a tag").0
    }

    /// The same image named at another server, `address` (`127.0.0.1:PORT` of a
    /// proxy in front of the registry, say).
    pub fn image_via(&self, address: &str) -> String {
        format!("{address}/{}:1", self.repository())
    }

    /// The largest disk piece (of several, the last in the manifest): a layer of
    /// several MiB.
    pub fn largest_piece(&self) -> Blob {
        let blobs = self.cached().blobs();
        let piece = blobs
            .iter()
            .filter(|b| b.is_piece())
            .max_by_key(|b| b.size)
            .unwrap_or_else(|| panic!("no disk piece in {blobs:?}"))
            .clone();
        assert!(piece.size > 2 << 20, "{piece:?}");
        piece
    }
}
