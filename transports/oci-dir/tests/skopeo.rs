//! Interoperability with skopeo's `oci:` transport, which reads and writes the
//! same layouts. Skipped (with a note) where skopeo is not installed.

use std::path::Path;
use std::process::Command;

use sarde_api::oci::{Descriptor, ImageManifest, media_types};
use sarde_transport_oci_dir::Layout;
use tempfile::TempDir;

fn skopeo_available() -> bool {
    Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn skopeo(args: &[&str]) -> Vec<u8> {
    let out = Command::new("skopeo")
        // A local copy between directories: no signature policy to consult.
        .arg("--insecure-policy")
        .args(args)
        .output()
        .expect("running skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn oci(path: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", path.display())
}

#[test]
fn skopeo_reads_our_layouts_and_we_read_its() {
    if !skopeo_available() {
        eprintln!("skopeo is not on PATH; skipping the interoperability test");
        return;
    }
    let tmp = TempDir::new().unwrap();
    let ours = tmp.path().join("ours");
    let layout = Layout::create(&ours).unwrap();

    let xml = br#"<?xml version="1.0" ?><domain type="kvm"><name>debian</name></domain>"#;
    let (layer_digest, layer_size) = layout.write_blob(xml).unwrap();
    let config = serde_json::json!({
        "created": "2024-05-01T10:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]},
        "history": [{"created": "2024-05-01T10:00:00Z", "created_by": "sarde export"}],
    });
    let config = serde_json::to_vec(&config).unwrap();
    let (config_digest, config_size) = layout.write_blob(&config).unwrap();
    let manifest = ImageManifest::new(
        Descriptor::new(media_types::IMAGE_CONFIG, config_digest, config_size),
        vec![Descriptor::new(
            media_types::DOMAIN_XML,
            layer_digest.clone(),
            layer_size,
        )],
    )
    .to_bytes();
    let descriptor = layout
        .put_manifest(&manifest, media_types::IMAGE_MANIFEST)
        .unwrap();
    layout.set_tag("bookworm", &descriptor).unwrap();
    // Re-exporting must not leave a second entry that confuses skopeo.
    layout.set_tag("bookworm", &descriptor).unwrap();

    let raw = skopeo(&["inspect", "--raw", &oci(&ours, "bookworm")]);
    assert_eq!(raw, manifest, "skopeo sees our manifest byte for byte");

    let theirs = tmp.path().join("theirs");
    skopeo(&[
        "copy",
        "--quiet",
        &oci(&ours, "bookworm"),
        &oci(&theirs, "bookworm"),
    ]);

    let copied = Layout::open(&theirs).unwrap();
    let resolved = copied.resolve("bookworm").unwrap();
    assert_eq!(resolved.digest, descriptor.digest, "copied unchanged");
    assert_eq!(copied.read_blob(&resolved).unwrap(), manifest);
    let layer = Descriptor::new(media_types::DOMAIN_XML, layer_digest, layer_size);
    assert_eq!(copied.read_blob(&layer).unwrap(), xml);

    // And a tag we add to skopeo's layout is one skopeo understands.
    copied.set_tag("stable", &resolved).unwrap();
    let raw = skopeo(&["inspect", "--raw", &oci(&theirs, "stable")]);
    assert_eq!(raw, manifest);
    let tags: Vec<String> = copied.tags().unwrap().into_iter().map(|(t, _)| t).collect();
    assert_eq!(tags, ["bookworm", "stable"]);
}
