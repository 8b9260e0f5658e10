//! Writes the seeds of the targets whose inputs are made by sarde itself
//! (manifests, configs, layouts, archives, compressed pieces, v1 gzip files)
//! or by qemu-img (disk headers) into `fuzz/corpus/<target>/seed-*`:
//!
//! ```text
//! cargo test -p sarde-fuzz-targets --test seeds -- --ignored
//! ```
//!
//! The text targets' seeds were taken from the crates' own tests once and are
//! committed as they are (see `fuzz/README.md`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sarde_api::codec::{EncodeOptions, encode_to_vec};
use sarde_api::oci::{Descriptor, ImageIndex, ImageManifest, media_types};
use sarde_api::transport::{Access, RawManifest, Transport};
use sarde_api::{Codec, Digest};
use sarde_format::FileRole;
use sarde_format::native::{self, FileSpec, ImageMeta, NativeFile, Piece};
use sarde_format::v1::{self, V1FileOut};
use sarde_fuzz_targets::block_on;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn put(target: &str, name: &str, data: &[u8]) {
    fs::write(corpus(target).join(format!("seed-{name}")), data).unwrap();
}

/// `a`, a NUL, `b`: two parts of one input.
fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, b"\0", b].concat()
}

fn meta() -> ImageMeta {
    ImageMeta {
        architecture: "amd64".into(),
        os: "linux".into(),
        created: "2024-05-01T10:00:00Z".into(),
    }
}

/// Zeros, text and noise, like a small disk.
fn sample(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..len)
        .map(|i| match (i / 512) % 3 {
            0 => 0,
            1 => b"sardine cake qemu disk\n"[i % 23],
            _ => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

fn piece(offset: u64, size: u64, n: u8, suffix: Option<&str>) -> Piece {
    Piece {
        offset,
        size,
        digest: Digest::sha256_of(&[n]),
        blob: Digest::sha256_of(&[n, n]),
        blob_size: size / 2 + 1,
        suffix: suffix.map(str::to_string),
    }
}

fn file(name: &str, role: FileRole, backing: Option<&str>, pieces: Vec<Piece>) -> NativeFile {
    NativeFile {
        spec: FileSpec {
            name: name.into(),
            role,
            format: if role == FileRole::Nvram {
                "raw"
            } else {
                "qcow2"
            }
            .into(),
            size: 3 << 20,
            backing: backing.map(str::to_string),
        },
        pieces,
    }
}

/// Manifests and configs as sarde's exporters write them.
fn images() -> Vec<(&'static str, native::Built)> {
    let xml = Descriptor::of(media_types::DOMAIN_XML, b"<domain><name>x</name></domain>");
    let json = Descriptor::of(media_types::VM_CONFIG, br#"{"username":"vagrant"}"#);
    let chain = vec![
        file(
            "VARS.fd",
            FileRole::Nvram,
            None,
            vec![piece(0, 1 << 20, 1, None)],
        ),
        file(
            "base.qcow2",
            FileRole::Disk,
            None,
            vec![
                piece(0, 1 << 20, 2, Some("+zstd")),
                piece(2 << 20, 1 << 20, 3, Some("+zstd")),
            ],
        ),
        file(
            "top.qcow2",
            FileRole::Disk,
            Some("base.qcow2"),
            vec![piece(1 << 20, 1 << 20, 4, Some("+xz"))],
        ),
    ];
    let single = vec![file(
        "disk.qcow2",
        FileRole::Disk,
        None,
        vec![piece(0, 1 << 20, 5, Some("+gzip"))],
    )];
    let v1_files = vec![
        V1FileOut {
            name: "base.qcow2".into(),
            pieces: vec![(Digest::sha256_of(b"1"), 10), (Digest::sha256_of(b"2"), 10)],
            diff_id: Digest::sha256_of(b"base"),
        },
        V1FileOut {
            name: "top.qcow2".into(),
            pieces: vec![(Digest::sha256_of(b"3"), 7)],
            diff_id: Digest::sha256_of(b"top"),
        },
    ];
    vec![
        (
            "native-chain",
            native::build(&meta(), &xml, Some(&json), &chain).unwrap(),
        ),
        (
            "native-single",
            native::build(&meta(), &xml, None, &single).unwrap(),
        ),
        ("v1", v1::build(&meta(), &xml, Some(&json), &v1_files)),
        ("v1-no-json", v1::build(&meta(), &xml, None, &v1_files[1..])),
    ]
}

const PYTHON_CONFIG: &str = r#"{"architecture":"amd64","os":"linux","created":"2024-05-01T10:00:00Z","rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},"history":[{"created":1714557600.25,"created_by":"sarde export"}]}"#;

fn index_of(entries: &[(&str, &Descriptor)]) -> Vec<u8> {
    let mut index = ImageIndex::default();
    for (tag, manifest) in entries {
        let mut entry = (*manifest).clone();
        if !tag.is_empty() {
            entry
                .annotations
                .insert(media_types::ANNOTATION_REF_NAME.into(), tag.to_string());
        }
        index.manifests.push(entry);
    }
    serde_json::to_vec(&index).unwrap()
}

fn metadata_seeds() {
    let images = images();
    for (name, built) in &images {
        put(
            "manifest",
            name,
            &join(&built.manifest_bytes, &built.config),
        );
        put("image_config", name, &built.config);
    }
    put("image_config", "python", PYTHON_CONFIG.as_bytes());
    let (_, native) = &images[0];
    let mut docker = native.manifest.clone();
    docker.media_type = Some(media_types::DOCKER_MANIFEST.into());
    docker.config.media_type = "application/vnd.docker.container.image.v1+json".into();
    put(
        "manifest",
        "docker",
        &join(&docker.to_bytes(), &native.config),
    );
    let descriptors: Vec<Descriptor> = images
        .iter()
        .map(|(_, b)| Descriptor::of(media_types::IMAGE_MANIFEST, &b.manifest_bytes))
        .collect();
    let index = index_of(&[("", &descriptors[0]), ("", &descriptors[1])]);
    put("manifest", "index", &index);
    put("index", "untagged", &index);
    put(
        "index",
        "tags",
        &index_of(&[
            ("latest", &descriptors[0]),
            ("v1", &descriptors[2]),
            // The Python tool appended on re-export: the last one wins.
            ("latest", &descriptors[1]),
        ]),
    );
    put("index", "one", &index_of(&[("12", &descriptors[3])]));
    put("index", "empty", br#"{"schemaVersion":2,"manifests":[]}"#);
}

/// An archive written by sarde's own `oci-archive` writer.
fn archive(tags: &[&str], built: &native::Built, layer: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.tar");
    let archive = sarde_transport_oci_archive::OciArchiveTransport::new(&path);
    let layer_descriptor = Descriptor::of(media_types::DOMAIN_XML, layer);
    let mut manifest: ImageManifest = built.manifest.clone();
    manifest.layers = vec![layer_descriptor.clone()];
    let bytes = manifest.to_bytes();
    block_on(async {
        archive.will_access("", Access::Push);
        for (descriptor, data) in [
            (&built.config_descriptor, built.config.clone()),
            (&layer_descriptor, layer.to_vec()),
        ] {
            let reader: sarde_api::transport::BlobReader = Box::pin(std::io::Cursor::new(data));
            archive.put_blob("", descriptor, reader).await.unwrap();
        }
        let raw = RawManifest {
            media_type: media_types::IMAGE_MANIFEST.into(),
            digest: Digest::sha256_of(&bytes),
            bytes: bytes.clone(),
        };
        for tag in tags {
            archive.put_manifest("", tag, &raw).await.unwrap();
        }
        archive.finish_image("", "").await.unwrap();
    });
    fs::read(&path).unwrap()
}

fn archive_seeds() {
    let images = images();
    let xml = b"<domain><name>x</name></domain>";
    put(
        "oci_archive",
        "tagged",
        &archive(&["v1"], &images[1].1, xml),
    );
    put(
        "oci_archive",
        "two-tags",
        &archive(&["latest", "12"], &images[3].1, xml),
    );
    let digest_only = Digest::sha256_of(&images[0].1.manifest_bytes).to_string();
    put(
        "oci_archive",
        "by-digest",
        &archive(&[&digest_only], &images[0].1, &sample(2000)),
    );
}

fn codec_seeds(target: &str, codec: &dyn Codec, threads: &[usize]) {
    for len in [0usize, 1, 1000, 70_000] {
        let data = sample(len);
        for &t in threads {
            let stream =
                encode_to_vec(codec, &data, &EncodeOptions::default().with_threads(t)).unwrap();
            let announced = u32::try_from(len).unwrap();
            put(
                target,
                &format!("{len}-t{t}"),
                &[&announced.to_le_bytes()[..], &stream].concat(),
            );
            if t == threads[0] && len > 0 {
                // The announced size one short: the guard must refuse it.
                let short = (announced - 1).to_le_bytes();
                put(
                    target,
                    &format!("{len}-t{t}-short"),
                    &[&short[..], &stream].concat(),
                );
            }
        }
    }
}

fn v1_seeds() {
    let gzip = sarde_codec_gzip::Gzip;
    for (name, len, first) in [
        ("disk.qcow2", 5000, 64u16),
        ("base.qcow2", 100, 10),
        ("VARS.fd", 3000, u16::MAX),
        ("../escape.qcow2", 10, 100),
    ] {
        let options = EncodeOptions {
            file_name: Some(name.into()),
            mtime: Some(1_714_557_600),
            ..EncodeOptions::default()
        };
        let stream = encode_to_vec(&gzip, &sample(len), &options).unwrap();
        let seed = name.trim_start_matches("../");
        put(
            "v1_gzip",
            seed,
            &[&first.to_le_bytes()[..], &stream].concat(),
        );
    }
}

/// The first `keep` bytes of a file qemu-img made.
fn qemu_img(name: &str, args: &[&str], keep: usize) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("base.raw"), [0u8; 4096]).unwrap();
    let out = dir.path().join("disk");
    let status = Command::new("qemu-img")
        .args(args)
        .arg(&out)
        .arg("64M")
        .current_dir(dir.path())
        .status()
        .expect("qemu-img runs");
    assert!(status.success(), "qemu-img {args:?}");
    let mut data = fs::read(&out).unwrap();
    data.truncate(keep);
    put("qcow2_probe", name, &data);
}

fn disk_seeds() {
    let q = ["create", "-q", "-f", "qcow2"];
    qemu_img("qcow2", &q, 4096);
    qemu_img("qcow2-v2", &[&q[..], &["-o", "compat=0.10"]].concat(), 4096);
    qemu_img(
        "qcow2-backing",
        &[&q[..], &["-b", "base.raw", "-F", "raw"]].concat(),
        4096,
    );
    qemu_img(
        "qcow2-data-file",
        &[&q[..], &["-o", "data_file=data.raw"]].concat(),
        4096,
    );
    qemu_img(
        "qcow2-extended-l2",
        &[&q[..], &["-o", "extended_l2=on,cluster_size=64k"]].concat(),
        4096,
    );
    qemu_img("vmdk", &["create", "-q", "-f", "vmdk"], 4096);
    qemu_img("vdi", &["create", "-q", "-f", "vdi"], 4096);
    qemu_img("qed", &["create", "-q", "-f", "qed"], 4096);
    qemu_img("vpc", &["create", "-q", "-f", "vpc"], 4096);
    put("qcow2_probe", "raw", &sample(4096));
}

#[test]
#[ignore = "writes the seed corpora; run by hand"]
fn write_seeds() {
    metadata_seeds();
    archive_seeds();
    codec_seeds("codec_zstd", &sarde_codec_zstd::Zstd, &[0, 2]);
    codec_seeds("codec_xz", &sarde_codec_xz::Xz, &[0, 2]);
    codec_seeds("codec_gzip", &sarde_codec_gzip::Gzip, &[0, 2]);
    codec_seeds("codec_raw", &sarde_codec_raw::Raw, &[0]);
    codec_seeds("codec_lz4", &sarde_plugin_example_lz4::Lz4, &[0]);
    v1_seeds();
    disk_seeds();
}
