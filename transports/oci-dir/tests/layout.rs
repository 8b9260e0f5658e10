//! The synchronous layout API on a real filesystem.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use sarde_api::oci::{Descriptor, ImageIndex, ImageManifest, media_types};
use sarde_api::{Digest, ImageReference};
use sarde_transport_oci_dir::{Layout, LayoutError, MAX_IN_MEMORY_BLOB, OciDir};
use tempfile::TempDir;

/// Stores a config and a manifest naming it; returns the manifest descriptor.
fn store_manifest(layout: &Layout, seed: &str) -> Descriptor {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":"{seed}"}}"#);
    let (digest, size) = layout.write_blob(config.as_bytes()).unwrap();
    let manifest = ImageManifest::new(
        Descriptor::new(media_types::IMAGE_CONFIG, digest, size),
        vec![],
    );
    layout
        .put_manifest(&manifest.to_bytes(), media_types::IMAGE_MANIFEST)
        .unwrap()
}

/// Names in `blobs/sha256` (temporary files included).
fn blob_dir_entries(layout: &Layout) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(layout.path().join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name.starts_with(".tmp-") {
            out.push(entry.path().display().to_string());
        }
        if entry.file_type().unwrap().is_dir() {
            out.extend(temp_files(&entry.path()));
        }
    }
    out
}

fn ref_name_count(layout: &Layout, tag: &str) -> usize {
    layout
        .index()
        .unwrap()
        .manifests
        .iter()
        .filter(|d| d.annotation(media_types::ANNOTATION_REF_NAME) == Some(tag))
        .count()
}

#[test]
fn create_is_idempotent_and_open_finds_it() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("127.0.0.1:5000/sardines/debian");

    let err = Layout::open(&path).unwrap_err();
    assert!(matches!(err, LayoutError::NotFound { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    let layout = Layout::create(&path).unwrap();
    assert_eq!(layout.path(), path);
    let marker: serde_json::Value =
        serde_json::from_slice(&fs::read(path.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(marker, serde_json::json!({"imageLayoutVersion": "1.0.0"}));
    assert!(path.join("blobs/sha256").is_dir());
    assert_eq!(layout.index().unwrap(), ImageIndex::default());

    // Creating again keeps what is there.
    let manifest = store_manifest(&layout, "a");
    layout.set_tag("v1", &manifest).unwrap();
    let again = Layout::create(&path).unwrap();
    assert_eq!(again.resolve("v1").unwrap().digest, manifest.digest);
    assert_eq!(Layout::open(&path).unwrap(), layout);
    assert!(temp_files(tmp.path()).is_empty());
}

#[test]
fn open_refuses_other_layout_versions() {
    let tmp = TempDir::new().unwrap();
    fs::write(
        tmp.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"2.0.0"}"#,
    )
    .unwrap();
    let err = Layout::open(tmp.path()).unwrap_err();
    assert!(
        matches!(err, LayoutError::UnsupportedVersion { .. }),
        "{err:?}"
    );
    fs::write(tmp.path().join("oci-layout"), "not json").unwrap();
    let err = Layout::open(tmp.path()).unwrap_err();
    assert!(matches!(err, LayoutError::BadJson { .. }), "{err:?}");
}

#[test]
fn set_tag_replaces_the_entry_and_keeps_the_others() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let first = store_manifest(&layout, "first");
    let other = store_manifest(&layout, "other");
    let second = store_manifest(&layout, "second");

    layout.set_tag("latest", &first).unwrap();
    layout.set_tag("stable", &other).unwrap();
    // Exporting the same tag again (defect 2 of the Python tool appended here).
    layout.set_tag("latest", &second).unwrap();
    layout.set_tag("latest", &second).unwrap();

    assert_eq!(ref_name_count(&layout, "latest"), 1);
    assert_eq!(ref_name_count(&layout, "stable"), 1);
    assert_eq!(layout.index().unwrap().manifests.len(), 2);
    let tags = layout.tags().unwrap();
    let names: Vec<&str> = tags.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(names, ["latest", "stable"], "re-tagging keeps the order");
    assert_eq!(layout.resolve("latest").unwrap().digest, second.digest);
    assert_eq!(layout.resolve("stable").unwrap().digest, other.digest);

    assert!(layout.remove_tag("stable").unwrap());
    assert!(!layout.remove_tag("stable").unwrap());
    assert_eq!(layout.tags().unwrap().len(), 1);
}

#[test]
fn duplicate_tags_from_the_python_tool_resolve_to_the_newest_and_collapse() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let old = store_manifest(&layout, "old");
    let new = store_manifest(&layout, "new");
    let keep = store_manifest(&layout, "keep");
    let tagged = |d: &Descriptor, tag: &str| {
        let mut d = d.clone();
        d.annotations
            .insert(media_types::ANNOTATION_REF_NAME.into(), tag.into());
        d
    };
    let index = ImageIndex {
        manifests: vec![tagged(&old, "t"), tagged(&keep, "k"), tagged(&new, "t")],
        ..ImageIndex::default()
    };
    fs::write(
        tmp.path().join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();

    assert_eq!(layout.resolve("t").unwrap().digest, new.digest);
    assert_eq!(layout.tags().unwrap().len(), 2);
    layout.set_tag("t", &new).unwrap();
    assert_eq!(ref_name_count(&layout, "t"), 1);
    assert_eq!(layout.resolve("k").unwrap().digest, keep.digest);
}

#[test]
fn set_tag_refuses_bad_tags_and_missing_manifests() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let manifest = store_manifest(&layout, "x");
    for bad in ["", "a:b", "../x", "-x"] {
        let err = layout.set_tag(bad, &manifest).unwrap_err();
        assert!(
            matches!(err, LayoutError::InvalidTag { .. }),
            "{bad:?}: {err:?}"
        );
    }
    let absent = Descriptor::of(media_types::IMAGE_MANIFEST, b"{}");
    let err = layout.set_tag("v1", &absent).unwrap_err();
    assert!(matches!(err, LayoutError::BlobMissing { .. }), "{err:?}");
    assert!(layout.tags().unwrap().is_empty());
}

#[test]
fn resolve_by_tag_and_by_digest() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let tagged = store_manifest(&layout, "tagged");
    let unlisted = store_manifest(&layout, "unlisted");
    layout.set_tag("v1", &tagged).unwrap();

    let by_tag = layout.resolve("v1").unwrap();
    assert_eq!(by_tag.digest, tagged.digest);
    assert_eq!(by_tag.size, tagged.size);
    assert_eq!(by_tag.media_type, media_types::IMAGE_MANIFEST);

    let by_digest = layout.resolve(&tagged.digest.to_string()).unwrap();
    assert_eq!(by_digest.digest, tagged.digest);

    // Stored but not in the index: found through the blob, media type from its JSON.
    let found = layout.resolve(&unlisted.digest.to_string()).unwrap();
    assert_eq!(found.digest, unlisted.digest);
    assert_eq!(found.size, unlisted.size);
    assert_eq!(found.media_type, media_types::IMAGE_MANIFEST);

    let missing = Digest::sha256_of(b"nothing");
    let err = layout.resolve(&missing.to_string()).unwrap_err();
    assert!(
        matches!(err, LayoutError::ManifestNotFound { .. }),
        "{err:?}"
    );
    let err = layout.resolve("sha256:abc").unwrap_err();
    assert!(
        matches!(err, LayoutError::InvalidReference { .. }),
        "{err:?}"
    );

    layout.add_untagged(&unlisted).unwrap();
    layout.add_untagged(&unlisted).unwrap();
    let index = layout.index().unwrap();
    assert_eq!(index.manifests.len(), 2);
    assert_eq!(layout.tags().unwrap().len(), 1);
}

#[test]
fn unknown_tag_error_lists_the_available_tags() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let err = layout.resolve("nope").unwrap_err();
    assert!(err.to_string().contains("the layout has no tags"), "{err}");

    let manifest = store_manifest(&layout, "m");
    layout.set_tag("bookworm", &manifest).unwrap();
    layout.set_tag("trixie", &manifest).unwrap();
    let err = layout.resolve("bullseye").unwrap_err();
    match &err {
        LayoutError::TagNotFound { tag, available, .. } => {
            assert_eq!(tag, "bullseye");
            assert_eq!(available, &["bookworm", "trixie"]);
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("\"bullseye\""), "{text}");
    assert!(text.contains("available tags: bookworm, trixie"), "{text}");
    assert!(text.contains(&tmp.path().display().to_string()), "{text}");
}

#[test]
fn write_blob_stores_verifiable_content_once() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let data = b"<domain type='kvm'/>";
    let (digest, size) = layout.write_blob(data).unwrap();
    assert_eq!(digest, Digest::sha256_of(data));
    assert_eq!(size, data.len() as u64);
    assert_eq!(
        layout.blob_path(&digest),
        tmp.path().join("blobs/sha256").join(digest.hex())
    );
    assert_eq!(fs::read(layout.blob_path(&digest)).unwrap(), data);

    let descriptor = Descriptor::new(media_types::DOMAIN_XML, digest.clone(), size);
    assert!(layout.has_blob(&descriptor));
    assert!(!layout.has_blob(&Descriptor::new("", digest.clone(), size + 1)));
    assert_eq!(layout.read_blob(&descriptor).unwrap(), data);

    use std::os::unix::fs::MetadataExt;
    let before = fs::metadata(layout.blob_path(&digest)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(layout.write_blob(data).unwrap(), (digest.clone(), size));
    let after = fs::metadata(layout.blob_path(&digest)).unwrap();
    assert_eq!(
        before.ino(),
        after.ino(),
        "an existing blob is not rewritten"
    );
    // Its times are refreshed: a collector spares blobs a live writer reused.
    assert!(after.modified().unwrap() > before.modified().unwrap());
    assert_eq!(blob_dir_entries(&layout), [digest.hex().to_string()]);
}

#[test]
fn blob_writer_streams_and_commits() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut writer = layout.blob_writer().unwrap();
    for chunk in data.chunks(65_537) {
        writer.write_all(chunk).unwrap();
    }
    assert_eq!(writer.written(), data.len() as u64);
    let digest = Digest::sha256_of(&data);
    let (got, size) = writer.commit(Some((&digest, data.len() as u64))).unwrap();
    assert_eq!((got.clone(), size), (digest.clone(), data.len() as u64));
    let mut file = layout
        .open_blob(&Descriptor::new("", digest.clone(), size))
        .unwrap();
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut back).unwrap();
    assert_eq!(back, data);

    // Committing the same content again keeps one blob and no temporary file.
    let mut writer = layout.blob_writer().unwrap();
    writer.write_all(&data).unwrap();
    assert_eq!(writer.commit(None).unwrap(), (digest.clone(), size));
    assert_eq!(blob_dir_entries(&layout), [digest.hex().to_string()]);
}

#[test]
fn blob_writer_dropped_without_commit_leaves_nothing() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let mut writer = layout.blob_writer().unwrap();
    writer.write_all(&vec![1u8; 1 << 20]).unwrap();
    let temp = writer.temp_path().to_path_buf();
    assert!(temp.exists(), "the temporary file is where it says");
    assert!(temp.starts_with(tmp.path().join("blobs/sha256")));
    drop(writer);
    assert!(!temp.exists());
    assert!(blob_dir_entries(&layout).is_empty());
}

#[test]
fn commit_with_the_wrong_digest_or_size_stores_nothing() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let data = b"the real content";
    let wrong = Digest::sha256_of(b"something else");

    let mut writer = layout.blob_writer().unwrap();
    writer.write_all(data).unwrap();
    let err = writer
        .commit(Some((&wrong, data.len() as u64)))
        .unwrap_err();
    assert!(matches!(err, LayoutError::VerifyFailed { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&wrong.to_string()) && text.contains("nothing was stored"),
        "{text}"
    );
    assert!(blob_dir_entries(&layout).is_empty());

    let right = Digest::sha256_of(data);
    let mut writer = layout.blob_writer().unwrap();
    writer.write_all(data).unwrap();
    let err = writer
        .commit(Some((&right, data.len() as u64 + 1)))
        .unwrap_err();
    assert!(matches!(err, LayoutError::VerifyFailed { .. }), "{err:?}");
    assert!(blob_dir_entries(&layout).is_empty());
    assert!(!layout.has_blob(&Descriptor::new("", right, data.len() as u64)));
}

#[test]
fn damaged_blobs_are_detected() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let data = b"{\"schemaVersion\":2}";
    let (digest, size) = layout.write_blob(data).unwrap();
    let descriptor = Descriptor::new(media_types::IMAGE_MANIFEST, digest.clone(), size);
    let path = layout.blob_path(&digest);

    // Same size, other content.
    let mut flipped = data.to_vec();
    flipped[0] ^= 1;
    fs::write(&path, &flipped).unwrap();
    assert!(layout.has_blob(&descriptor), "size alone still matches");
    let err = layout.read_blob(&descriptor).unwrap_err();
    assert!(matches!(err, LayoutError::BlobDigest { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&digest.to_string()), "{text}");
    assert!(text.contains("delete it and fetch again"), "{text}");

    // Truncated.
    fs::write(&path, &data[..10]).unwrap();
    assert!(!layout.has_blob(&descriptor));
    let err = layout.read_blob(&descriptor).unwrap_err();
    match &err {
        LayoutError::BlobSize {
            expected, actual, ..
        } => assert_eq!((*expected, *actual), (size, 10)),
        other => panic!("unexpected {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&format!("has 10 bytes, the manifest says {size}")),
        "{text}"
    );
    assert!(text.contains(&tmp.path().join("blobs/sha256").display().to_string()));
    assert!(matches!(
        layout.open_blob(&descriptor).unwrap_err(),
        LayoutError::BlobSize { .. }
    ));

    // Writing the blob again repairs it.
    layout.write_blob(data).unwrap();
    assert_eq!(layout.read_blob(&descriptor).unwrap(), data);

    // Missing altogether.
    fs::remove_file(&path).unwrap();
    let err = layout.open_blob(&descriptor).unwrap_err();
    assert!(matches!(err, LayoutError::BlobMissing { .. }), "{err:?}");
}

#[test]
fn read_blob_refuses_large_blobs() {
    let tmp = TempDir::new().unwrap();
    let layout = Layout::create(tmp.path()).unwrap();
    let huge = Descriptor::new(
        media_types::IMAGE_CONFIG,
        Digest::sha256_of(b"x"),
        MAX_IN_MEMORY_BLOB + 1,
    );
    let err = layout.read_blob(&huge).unwrap_err();
    assert!(matches!(err, LayoutError::BlobTooLarge { .. }), "{err:?}");
}

#[test]
fn unsafe_repository_paths_are_refused() {
    let tmp = TempDir::new().unwrap();
    let cache = OciDir::new(tmp.path());
    for bad in [
        "127.0.0.1:5000/../etc",
        "../x/y",
        "host/a/../../..",
        "host/./a",
        "host//a",
        "/host/a",
        "host/a/",
        "",
        "host/a\0b",
    ] {
        let err = cache.layout_for_repository(bad).unwrap_err();
        assert!(
            matches!(err, LayoutError::UnsafePath { .. }),
            "{bad:?}: {err:?}"
        );
    }
    // One component: a Docker Hub image at its familiar path (`debian`).
    assert_eq!(
        cache.layout_for_repository("debian").unwrap(),
        tmp.path().join("debian")
    );
    assert_eq!(
        cache
            .layout_for_repository("127.0.0.1:5000/sardines/debian")
            .unwrap(),
        tmp.path()
            .join("127.0.0.1:5000")
            .join("sardines")
            .join("debian")
    );
}

#[test]
fn layout_for_keeps_the_port_in_the_host_directory() {
    let cache = OciDir::new("/cache");
    let r: ImageReference = "127.0.0.1:5000/sardines/debian:bookworm".parse().unwrap();
    assert_eq!(
        cache.layout_for(&r),
        Path::new("/cache/127.0.0.1:5000/sardines/debian")
    );
    // Docker Hub images where the Python tool puts names without a host.
    let r: ImageReference = "debian:12".parse().unwrap();
    assert_eq!(cache.layout_for(&r), Path::new("/cache/debian"));
    let r: ImageReference = "docker.io/sardines/debian:12".parse().unwrap();
    assert_eq!(cache.layout_for(&r), Path::new("/cache/sardines/debian"));
}

/// A layout at `root/<dir>` listing `tag` for a one-byte manifest.
fn tagged_layout(root: &Path, dir: &str, tag: &str) {
    let layout = Layout::create(root.join(dir)).unwrap();
    let (digest, size) = layout.write_blob(b"{}").unwrap();
    let mut descriptor =
        sarde_api::oci::Descriptor::new(sarde_api::oci::media_types::IMAGE_MANIFEST, digest, size);
    descriptor.annotations.insert(
        sarde_api::oci::media_types::ANNOTATION_REF_NAME.to_string(),
        tag.to_string(),
    );
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [descriptor]});
    fs::write(root.join(dir).join("index.json"), index.to_string()).unwrap();
}

#[test]
fn locate_finds_what_the_python_tool_and_earlier_versions_wrote() {
    let tmp = TempDir::new().unwrap();
    let cache = OciDir::new(tmp.path());
    let parse = |s: &str| s.parse::<ImageReference>().unwrap();
    // Nothing cached: where it would be written.
    assert_eq!(
        cache.locate(&parse("sardines/debian:stable")),
        (tmp.path().join("sardines/debian"), "stable".to_string())
    );
    // An earlier sarde's (or `docker.io/…` as the Python tool wrote it).
    tagged_layout(tmp.path(), "docker.io/sardines/debian", "old");
    assert_eq!(
        cache.locate(&parse("sardines/debian:old")),
        (
            tmp.path().join("docker.io/sardines/debian"),
            "old".to_string()
        )
    );
    // The Python tool's `host:port` layout: the port went into the tag.
    tagged_layout(tmp.path(), "127.0.0.1", "5000/sardines/x:latest");
    assert_eq!(
        cache.locate(&parse("127.0.0.1:5000/sardines/x")),
        (
            tmp.path().join("127.0.0.1"),
            "5000/sardines/x:latest".to_string()
        )
    );
    // Where both hold it, the layout sarde writes wins.
    tagged_layout(tmp.path(), "127.0.0.1:5000/sardines/x", "latest");
    assert_eq!(
        cache.locate(&parse("127.0.0.1:5000/sardines/x:latest")),
        (
            tmp.path().join("127.0.0.1:5000/sardines/x"),
            "latest".to_string()
        )
    );
    let listed: Vec<String> = cache
        .repositories()
        .unwrap()
        .into_iter()
        .map(|e| {
            e.path
                .strip_prefix(tmp.path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert!(listed.contains(&"127.0.0.1".to_string()), "{listed:?}");
}

#[test]
fn repositories_lists_layouts_without_following_symlinks() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path().join("cache");
    let cache = OciDir::new(&root);
    assert!(
        cache.repositories().unwrap().is_empty(),
        "a missing root is empty"
    );
    for repo in [
        "127.0.0.1:5000/sardines/debian",
        "registry.example.org/a/b",
        "registry.example.org/a/b/c",
    ] {
        Layout::create(cache.layout_for_repository(repo).unwrap()).unwrap();
    }
    // A layout outside the cache, reachable only through a symbolic link.
    let outside = tmp.path().join("outside/x");
    Layout::create(&outside).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("linked.example")).unwrap();
    // Not a layout.
    fs::create_dir_all(root.join("empty.example/nothing")).unwrap();

    let found: Vec<(String, String)> = cache
        .repositories()
        .unwrap()
        .into_iter()
        .map(|e| {
            assert_eq!(e.path, root.join(&e.location).join(&e.repository), "{e:?}");
            (e.location, e.repository)
        })
        .collect();
    assert_eq!(
        found,
        [
            ("127.0.0.1:5000".to_string(), "sardines/debian".to_string()),
            ("registry.example.org".to_string(), "a/b".to_string()),
            ("registry.example.org".to_string(), "a/b/c".to_string()),
        ]
    );
}

#[test]
fn concurrent_set_tag_loses_no_update() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("host/repo");
    let threads = 8;
    let rounds = 10;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let path = path.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                // Every thread creates the layout too: creation races as well.
                let layout = Layout::create(&path).unwrap();
                let mut last = None;
                for round in 0..rounds {
                    let manifest = store_manifest(&layout, &format!("{i}-{round}"));
                    layout.set_tag(&format!("t{i}"), &manifest).unwrap();
                    last = Some(manifest);
                }
                last.unwrap()
            })
        })
        .collect();
    // Readers need no lock: they always see a whole index, old or new.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(layout) = Layout::open(&path) {
                    layout.tags().unwrap();
                    reads += 1;
                }
            }
            reads
        })
    };
    let expected: Vec<Descriptor> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0, "the reader ran");

    let layout = Layout::open(&path).unwrap();
    let tags = layout.tags().unwrap();
    assert_eq!(tags.len(), threads, "{tags:?}");
    assert_eq!(layout.index().unwrap().manifests.len(), threads);
    for (i, manifest) in expected.iter().enumerate() {
        assert_eq!(
            layout.resolve(&format!("t{i}")).unwrap().digest,
            manifest.digest
        );
    }
    assert!(temp_files(tmp.path()).is_empty());
}

#[test]
fn mount_blob_from_hard_links_within_the_cache() {
    let tmp = TempDir::new().unwrap();
    let a = Layout::create(tmp.path().join("h/a")).unwrap();
    let b = Layout::create(tmp.path().join("h/b")).unwrap();
    let (digest, size) = a.write_blob(b"shared layer").unwrap();
    let descriptor = Descriptor::new("application/octet-stream", digest.clone(), size);

    assert!(b.mount_blob_from(&a, &descriptor).unwrap());
    assert!(b.has_blob(&descriptor));
    let ino_a = fs::metadata(a.blob_path(&digest)).unwrap().ino();
    let ino_b = fs::metadata(b.blob_path(&digest)).unwrap().ino();
    assert_eq!(ino_a, ino_b, "a hard link, not a copy");
    assert_eq!(b.read_blob(&descriptor).unwrap(), b"shared layer");
    assert!(
        b.mount_blob_from(&a, &descriptor).unwrap(),
        "again: already there"
    );

    let absent = Descriptor::new("", Digest::sha256_of(b"absent"), 6);
    assert!(!b.mount_blob_from(&a, &absent).unwrap());
    assert!(temp_files(tmp.path()).is_empty());
}
