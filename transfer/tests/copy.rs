//! The copy engine between two transports that are neither a registry nor the
//! cache — OCI layout directories — with faults injected at the source: no
//! libvirt, no network. What `sarde copy` and `sarde push` run.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use sarde_api::oci::{Descriptor, ImageManifest, media_types};
use sarde_api::transport::{BlobReader, RawManifest};
use sarde_api::{Digest, Transport, TransportError, TransportFactory};
use sarde_transfer::{CopyRequest, Counting, Destination, NoProgress, TransferOptions};
use sarde_transport_oci_dir::{Layout, LayoutError, OciDirTransport};

/// An image of a config and three layers in a new layout at `dir`, tagged `v1`.
fn make_image(dir: &Path) -> (Descriptor, Vec<Descriptor>) {
    let layout = Layout::create(dir).expect("layout");
    let config = layout
        .write_blob(br#"{"architecture":"amd64","os":"linux"}"#)
        .unwrap();
    let layers: Vec<Descriptor> = (0u8..3)
        .map(|i| {
            let data: Vec<u8> = (0..200_000u32)
                .map(|n| (n as u8) ^ i.wrapping_mul(31))
                .collect();
            let (digest, size) = layout.write_blob(&data).unwrap();
            Descriptor::new("application/vnd.sardinecake.test.layer", digest, size)
        })
        .collect();
    let manifest = ImageManifest::new(
        Descriptor::new(media_types::IMAGE_CONFIG, config.0, config.1),
        layers.clone(),
    );
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let descriptor = layout
        .put_manifest(&bytes, media_types::IMAGE_MANIFEST)
        .unwrap();
    layout.set_tag("v1", &descriptor).unwrap();
    (descriptor, layers)
}

fn request(source: Arc<dyn Transport>, destination: &Path) -> CopyRequest {
    CopyRequest {
        source,
        repository: String::new(),
        reference: "v1".into(),
        image: "source".into(),
        destinations: vec![Destination {
            transport: Arc::new(OciDirTransport::layout(destination)),
            repository: String::new(),
            tag: Some("v1".into()),
            name: format!("oci:{}:v1", destination.display()),
        }],
        mount_from: Vec::new(),
        check_source_blobs: true,
        counting: Counting::Both,
        gate: None,
        withheld: Default::default(),
        blobs_only: false,
        attachments: None,
    }
}

/// The bytes of the config and layers of the image `make_image` made.
fn blob_bytes(dir: &Path) -> u64 {
    let layout = Layout::open(dir).unwrap();
    let manifest: ImageManifest =
        serde_json::from_slice(&layout.read_blob(&layout.resolve("v1").unwrap()).unwrap()).unwrap();
    manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>()
}

fn options() -> TransferOptions {
    TransferOptions {
        backoff: std::time::Duration::from_millis(1),
        ..TransferOptions::default()
    }
}

#[tokio::test]
async fn a_layout_is_copied_whole_then_only_its_manifest() {
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let (manifest, layers) = make_image(&src);
    let source: Arc<dyn Transport> = Arc::new(OciDirTransport::layout(&src));

    let copied = request(source.clone(), &dst)
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(copied.manifest.digest, manifest.digest);
    assert_eq!(copied.summary.blobs_transferred, 4);
    let target = Layout::open(&dst).unwrap();
    assert_eq!(target.resolve("v1").unwrap().digest, manifest.digest);
    for layer in &layers {
        assert_eq!(
            std::fs::read(target.blob_path(&layer.digest)).unwrap(),
            std::fs::read(Layout::open(&src).unwrap().blob_path(&layer.digest)).unwrap()
        );
    }

    let again = request(source, &dst)
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(
        again.targets,
        vec![(format!("oci:{}:v1", dst.display()), true)]
    );
    assert_eq!(again.summary.blobs_transferred, 0);
}

#[tokio::test]
async fn a_wrong_blob_never_lands_and_the_tag_is_not_written() {
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let (_, layers) = make_image(&src);
    let victim = layers[1].clone();
    let source: Arc<dyn Transport> = corrupting(&src, &victim);
    let e = request(source, &dst)
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap_err();
    let message = format!("{e:#}");
    assert!(
        message.contains(&victim.digest.to_string()) && message.contains("digest"),
        "{message}"
    );
    let target = Layout::open(&dst).unwrap();
    assert!(!target.has_blob(&victim), "the wrong blob was stored");
    assert!(target.resolve("v1").is_err(), "the tag was written");
}

#[tokio::test]
async fn a_truncated_source_blob_fails_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let (_, layers) = make_image(&src);
    let path = Layout::open(&src).unwrap().blob_path(&layers[2].digest);
    let data = std::fs::read(&path).unwrap();
    std::fs::write(&path, &data[..data.len() / 3]).unwrap();
    let source: Arc<dyn Transport> = Arc::new(OciDirTransport::layout(&src));
    let e = request(source, &dst)
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap_err();
    let message = format!("{e:#}");
    assert!(message.contains(&layers[2].digest.to_string()), "{message}");
    // Found before anything was sent: the destination was not even created.
    assert!(Layout::open(&dst).is_err_and(|e| matches!(e, LayoutError::NotFound { .. })));
}

/// What a [`Faulty`] source does to its victim blob.
enum Fault {
    /// Hands out other bytes of the same size (one flipped in the middle).
    Corrupt,
    /// Breaks off after `cut` bytes, `breaks` times, as a dropped connection.
    Break {
        cut: usize,
        breaks: std::sync::atomic::AtomicU32,
    },
}

/// A layout as a source, with a fault injected into one blob's stream.
struct Faulty {
    inner: OciDirTransport,
    victim: Digest,
    fault: Fault,
}

fn corrupting(src: &Path, victim: &Descriptor) -> Arc<dyn Transport> {
    Arc::new(Faulty {
        inner: OciDirTransport::layout(src),
        victim: victim.digest.clone(),
        fault: Fault::Corrupt,
    })
}

fn breaking(src: &Path, victim: &Descriptor, cut: usize, breaks: u32) -> Arc<dyn Transport> {
    Arc::new(Faulty {
        inner: OciDirTransport::layout(src),
        victim: victim.digest.clone(),
        fault: Fault::Break {
            cut,
            breaks: breaks.into(),
        },
    })
}

#[async_trait]
impl Transport for Faulty {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn get_manifest(&self, r: &str, reference: &str) -> Result<RawManifest, TransportError> {
        self.inner.get_manifest(r, reference).await
    }
    async fn put_manifest(
        &self,
        r: &str,
        reference: &str,
        m: &RawManifest,
    ) -> Result<(), TransportError> {
        self.inner.put_manifest(r, reference, m).await
    }
    async fn list_tags(&self, r: &str) -> Result<Vec<String>, TransportError> {
        self.inner.list_tags(r).await
    }
    async fn blob_exists(&self, r: &str, blob: &Descriptor) -> Result<bool, TransportError> {
        self.inner.blob_exists(r, blob).await
    }
    async fn get_blob(
        &self,
        r: &str,
        blob: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, TransportError> {
        use std::sync::atomic::Ordering;
        let mut reader = self.inner.get_blob(r, blob, offset).await?;
        if blob.digest != self.victim {
            return Ok(reader);
        }
        match &self.fault {
            Fault::Corrupt => {
                let mut data = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut data)
                    .await
                    .unwrap();
                let middle = data.len() / 2;
                data[middle] ^= 0xff;
                Ok(Pin::from(Box::new(std::io::Cursor::new(data)) as Box<_>))
            }
            Fault::Break { cut, breaks } => {
                if breaks
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_err()
                {
                    return Ok(reader);
                }
                let head = tokio::io::AsyncReadExt::take(reader, *cut as u64);
                let broken = tokio_io_error(std::io::ErrorKind::ConnectionReset);
                Ok(Box::pin(tokio::io::AsyncReadExt::chain(head, broken)))
            }
        }
    }
    async fn put_blob(
        &self,
        r: &str,
        blob: &Descriptor,
        data: BlobReader,
    ) -> Result<(), TransportError> {
        self.inner.put_blob(r, blob, data).await
    }
}

/// A reader that fails at once.
fn tokio_io_error(kind: std::io::ErrorKind) -> impl tokio::io::AsyncRead + Send + Unpin {
    struct Failing(std::io::ErrorKind);
    impl tokio::io::AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::Error::new(self.0, "connection dropped")))
        }
    }
    Failing(kind)
}

/// The cache (one layout per repository under a root) as the destination.
fn into_cache(source: Arc<dyn Transport>, cache: &Path, repository: &str) -> CopyRequest {
    let mut request = request(source, cache);
    request.destinations = vec![Destination {
        transport: Arc::new(OciDirTransport::new(cache)),
        repository: repository.into(),
        tag: Some("v1".into()),
        name: format!("cache {repository}"),
    }];
    request.counting = Counting::Received;
    request.check_source_blobs = false;
    request
}

#[tokio::test]
async fn an_interrupted_copy_into_the_cache_resumes_where_it_broke_off() {
    let work = tempfile::tempdir().unwrap();
    let (src, cache) = (work.path().join("src"), work.path().join("cache"));
    let (manifest, layers) = make_image(&src);
    let victim = layers[0].clone();
    let cut = 150_000;
    let source: Arc<dyn Transport> = breaking(&src, &victim, cut, 1);
    // No retries: the run ends at the break, as an interrupted command would.
    let no_retries = TransferOptions {
        retries: 0,
        concurrency: 1,
        ..options()
    };
    let e = into_cache(source.clone(), &cache, "h/x")
        .run(&no_retries, Arc::new(NoProgress))
        .await
        .unwrap_err();
    assert!(e.is_transient(), "a dropped connection is retried: {e:#}");
    let layout = Layout::open(cache.join("h/x")).unwrap();
    assert!(!layout.has_blob(&victim));
    assert!(layout.resolve("v1").is_err(), "no tag for a half image");

    // The next run sends only what is missing of that blob.
    let done = into_cache(source, &cache, "h/x")
        .run(&no_retries, Arc::new(NoProgress))
        .await
        .unwrap();
    let total = blob_bytes(&src);
    let before: u64 = done.summary.bytes_received;
    assert!(
        before < total - cut as u64 + 4096,
        "received {before} of {total} again"
    );
    assert_eq!(layout.resolve("v1").unwrap().digest, manifest.digest);
    for layer in &layers {
        layout.read_blob(layer).expect("every blob verifies");
    }
}

#[tokio::test]
async fn a_break_within_a_run_is_retried_from_the_partial_blob() {
    let work = tempfile::tempdir().unwrap();
    let (src, cache) = (work.path().join("src"), work.path().join("cache"));
    let (manifest, layers) = make_image(&src);
    let source: Arc<dyn Transport> = breaking(&src, &layers[2], 70_000, 2);
    let done = into_cache(source, &cache, "h/x")
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(done.summary.retries, 2, "{:?}", done.summary);
    // Each retry starts where the bytes stopped: nothing is received twice.
    let blobs = blob_bytes(&src);
    assert_eq!(
        done.summary.bytes_received,
        blobs + done.manifest.size,
        "{:?}",
        done.summary
    );
    let layout = Layout::open(cache.join("h/x")).unwrap();
    assert_eq!(layout.resolve("v1").unwrap().digest, manifest.digest);
}

#[tokio::test]
async fn a_damaged_partial_blob_is_written_again_from_the_start() {
    let work = tempfile::tempdir().unwrap();
    let (src, cache) = (work.path().join("src"), work.path().join("cache"));
    let (manifest, layers) = make_image(&src);
    let victim = &layers[1];
    // What an earlier run left, with a bit flipped (a disk, a crash mid-write).
    let partial = cache
        .join(".sarde/partial")
        .join(format!("sha256-{}", victim.digest.hex()));
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    let mut data = std::fs::read(Layout::open(&src).unwrap().blob_path(&victim.digest)).unwrap();
    data.truncate(120_000);
    data[10] ^= 1;
    std::fs::write(&partial, &data).unwrap();
    let source: Arc<dyn Transport> = Arc::new(OciDirTransport::layout(&src));
    into_cache(source, &cache, "h/x")
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    let layout = Layout::open(cache.join("h/x")).unwrap();
    assert_eq!(layout.resolve("v1").unwrap().digest, manifest.digest);
    layout.read_blob(victim).expect("the blob verifies");
    assert!(!partial.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_links_blobs_another_repository_holds_and_serialises_writers() {
    let work = tempfile::tempdir().unwrap();
    let (src, cache) = (work.path().join("src"), work.path().join("cache"));
    let (manifest, layers) = make_image(&src);
    let source: Arc<dyn Transport> = Arc::new(OciDirTransport::layout(&src));
    // Two copies of one image into one repository at once: each blob is
    // written once, both succeed.
    let (first, second) = (
        into_cache(source.clone(), &cache, "h/x"),
        into_cache(source.clone(), &cache, "h/x"),
    );
    let o = options();
    let (a, b) = tokio::join!(
        first.run(&o, Arc::new(NoProgress)),
        second.run(&o, Arc::new(NoProgress)),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.summary.blobs_transferred + b.summary.blobs_transferred,
        layers.len() + 1,
        "{:?} {:?}",
        a.summary,
        b.summary
    );
    // Another repository of the cache gets them by link, not by copy.
    let other = into_cache(source, &cache, "h/y")
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(other.summary.blobs_transferred, 0, "{:?}", other.summary);
    assert_eq!(other.summary.blobs_mounted, layers.len() + 1);
    let y = Layout::open(cache.join("h/y")).unwrap();
    assert_eq!(y.resolve("v1").unwrap().digest, manifest.digest);
    use std::os::unix::fs::MetadataExt;
    let x = Layout::open(cache.join("h/x")).unwrap();
    let inode = |l: &Layout| {
        std::fs::metadata(l.blob_path(&layers[0].digest))
            .unwrap()
            .ino()
    };
    assert_eq!(inode(&x), inode(&y), "one file, two links");
}

#[tokio::test]
async fn directory_archive_and_cache_carry_the_same_image() {
    let work = tempfile::tempdir().unwrap();
    let (src, cache) = (work.path().join("src"), work.path().join("cache"));
    let archive = work.path().join("usb/image.tar");
    std::fs::create_dir_all(archive.parent().unwrap()).unwrap();
    let (manifest, layers) = make_image(&src);
    let archive_transport = || -> Arc<dyn Transport> {
        Arc::from(
            sarde_transport_oci_archive::OciArchiveFactory
                .open(
                    &archive.to_string_lossy(),
                    &sarde_api::transport::TransportOptions::default(),
                )
                .unwrap(),
        )
    };
    // Directory → archive (untagged: the archive's only image).
    let mut to_archive = request(Arc::new(OciDirTransport::layout(&src)), &src);
    to_archive.destinations = vec![Destination {
        transport: archive_transport(),
        repository: String::new(),
        tag: None,
        name: "archive".into(),
    }];
    to_archive
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    // Archive (its only image, no tag named) → cache → directory.
    let mut from_archive = into_cache(archive_transport(), &cache, "h/x");
    from_archive.reference = String::new();
    from_archive
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    let out = work.path().join("out");
    let mut to_dir = request(Arc::new(OciDirTransport::new(&cache)), &out);
    to_dir.repository = "h/x".into();
    let copied = to_dir.run(&options(), Arc::new(NoProgress)).await.unwrap();
    assert_eq!(copied.manifest.digest, manifest.digest);
    let out = Layout::open(&out).unwrap();
    for layer in &layers {
        assert_eq!(
            std::fs::read(out.blob_path(&layer.digest)).unwrap(),
            std::fs::read(Layout::open(&src).unwrap().blob_path(&layer.digest)).unwrap()
        );
    }
}

#[tokio::test]
async fn a_wrong_blob_leaves_no_partial_blob_to_resume_from() {
    let work = tempfile::tempdir().unwrap();
    let (src, cache) = (work.path().join("src"), work.path().join("cache"));
    let (_, layers) = make_image(&src);
    let victim = layers[0].clone();
    let source: Arc<dyn Transport> = corrupting(&src, &victim);
    let e = into_cache(source, &cache, "h/x")
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "wrong content is final: {e:#}");
    let partial = cache
        .join(".sarde/partial")
        .join(format!("sha256-{}", victim.digest.hex()));
    assert!(!partial.exists(), "the wrong bytes were kept");
}

#[tokio::test]
async fn an_interrupted_copy_into_a_directory_resumes_and_leaves_it_clean() {
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let (manifest, layers) = make_image(&src);
    let victim = layers[2].clone();
    let source: Arc<dyn Transport> = breaking(&src, &victim, 120_000, 1);
    let no_retries = TransferOptions {
        retries: 0,
        concurrency: 1,
        ..options()
    };
    let mut first = request(source.clone(), &dst);
    first.counting = Counting::Received;
    first
        .run(&no_retries, Arc::new(NoProgress))
        .await
        .unwrap_err();
    let partial = dst
        .join("blobs/sha256")
        .join(format!(".partial-{}", victim.digest.hex()));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 120_000);
    let mut second = request(source, &dst);
    second.counting = Counting::Received;
    let done = second.run(&no_retries, Arc::new(NoProgress)).await.unwrap();
    assert!(
        done.summary.bytes_received < blob_bytes(&src) - 100_000,
        "{:?}",
        done.summary
    );
    let target = Layout::open(&dst).unwrap();
    assert_eq!(target.resolve("v1").unwrap().digest, manifest.digest);
    target
        .read_blob(&victim)
        .expect("the resumed blob verifies");
    // No partial file and no state directory are left (only the layout's own
    // lock files beside index.json and blobs/).
    let mut top: Vec<String> = std::fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(
        top,
        [
            "blobs",
            "blobs.lock",
            "index.json",
            "index.json.lock",
            "oci-layout"
        ]
    );
    assert!(!partial.exists());
}

/// An index of two image manifests (a config and a layer each) in a new
/// layout at `dir`, tagged `v1`: only the index is listed in `index.json`.
fn make_index_image(dir: &Path) -> Descriptor {
    let layout = Layout::create(dir).expect("layout");
    let children: Vec<Descriptor> = (0u8..2)
        .map(|i| {
            let config = layout
                .write_blob(
                    format!(r#"{{"architecture":"amd64","os":"linux","n":{i}}}"#).as_bytes(),
                )
                .unwrap();
            let layer = layout.write_blob(&vec![i; 50_000]).unwrap();
            let manifest = ImageManifest::new(
                Descriptor::new(media_types::IMAGE_CONFIG, config.0, config.1),
                vec![Descriptor::new(
                    "application/vnd.sardinecake.test.layer",
                    layer.0,
                    layer.1,
                )],
            );
            let bytes = serde_json::to_vec(&manifest).unwrap();
            let (digest, size) = layout.write_blob(&bytes).unwrap();
            Descriptor::new(media_types::IMAGE_MANIFEST, digest, size)
        })
        .collect();
    let index = sarde_api::oci::ImageIndex {
        media_type: Some(media_types::IMAGE_INDEX.to_string()),
        manifests: children,
        ..Default::default()
    };
    let bytes = serde_json::to_vec(&index).unwrap();
    let descriptor = layout
        .put_manifest(&bytes, media_types::IMAGE_INDEX)
        .unwrap();
    layout.set_tag("v1", &descriptor).unwrap();
    descriptor
}

#[tokio::test]
async fn an_index_is_the_only_image_its_copy_lists() {
    let work = tempfile::tempdir().unwrap();
    let (src, dst, cache) = (
        work.path().join("src"),
        work.path().join("dst"),
        work.path().join("cache"),
    );
    let index = make_index_image(&src);
    let source = || -> Arc<dyn Transport> { Arc::new(OciDirTransport::layout(&src)) };
    // Untagged into a directory: readable back as its only image.
    let mut untagged = request(source(), &dst);
    untagged.destinations[0].tag = None;
    untagged
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    let out = Layout::open(&dst).unwrap();
    assert_eq!(out.index().unwrap().manifests.len(), 1);
    assert_eq!(out.resolve("").unwrap().digest, index.digest);
    // Into the cache: one tagged entry, the children stored as blobs.
    into_cache(source(), &cache, "h/x")
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    let cached = Layout::open(cache.join("h/x")).unwrap();
    assert_eq!(cached.index().unwrap().manifests.len(), 1);
    assert_eq!(cached.resolve("v1").unwrap().digest, index.digest);
}

#[tokio::test]
async fn a_broken_tag_in_the_cache_is_repaired_by_the_next_copy() {
    let work = tempfile::tempdir().unwrap();
    let (src, cache) = (work.path().join("src"), work.path().join("cache"));
    let (manifest, _) = make_image(&src);
    let source: Arc<dyn Transport> = Arc::new(OciDirTransport::layout(&src));
    into_cache(source.clone(), &cache, "h/x")
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    let layout = Layout::open(cache.join("h/x")).unwrap();
    std::fs::remove_file(layout.blob_path(&manifest.digest)).unwrap();
    let again = into_cache(source, &cache, "h/x")
        .run(&options(), Arc::new(NoProgress))
        .await
        .unwrap();
    assert!(!again.targets[0].1, "not taken for up to date");
    assert_eq!(layout.resolve("v1").unwrap().digest, manifest.digest);
    layout.read_blob(&manifest).expect("the manifest is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_of_one_directory_take_turns_per_blob() {
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let (manifest, layers) = make_image(&src);
    let source: Arc<dyn Transport> = Arc::new(OciDirTransport::layout(&src));
    let copies: Vec<CopyRequest> = (0..4).map(|_| request(source.clone(), &dst)).collect();
    let o = options();
    let results =
        futures_util::future::join_all(copies.iter().map(|c| c.run(&o, Arc::new(NoProgress))))
            .await;
    for result in results {
        result.unwrap();
    }
    let out = Layout::open(&dst).unwrap();
    assert_eq!(out.resolve("v1").unwrap().digest, manifest.digest);
    for layer in &layers {
        out.read_blob(layer).expect("every blob verifies");
    }
}
