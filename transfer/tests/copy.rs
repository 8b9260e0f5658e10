//! The copy engine between two transports that are neither a registry nor the
//! cache — OCI layout directories — with faults injected at the source: no
//! libvirt, no network. What `sarde copy` and `sarde push` run.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use sarde_api::oci::{Descriptor, ImageManifest, media_types};
use sarde_api::transport::{BlobReader, RawManifest};
use sarde_api::{Digest, Transport, TransportError};
use sarde_transfer::{NoProgress, PushRequest, PushTarget, TransferOptions};
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

fn request(source: Arc<dyn Transport>, destination: &Path) -> PushRequest {
    PushRequest {
        source,
        repository: String::new(),
        reference: "v1".into(),
        image: "source".into(),
        targets: vec![PushTarget {
            transport: Arc::new(OciDirTransport::layout(destination)),
            repository: String::new(),
            tag: Some("v1".into()),
            name: format!("oci:{}:v1", destination.display()),
        }],
        mount_from: Vec::new(),
    }
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

/// A source that hands out other bytes for one blob than its descriptor says.
struct Corrupting {
    inner: OciDirTransport,
    victim: Digest,
}

#[async_trait]
impl Transport for Corrupting {
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
        if blob.digest != self.victim {
            return self.inner.get_blob(r, blob, offset).await;
        }
        // Same size, one byte flipped in the middle.
        let mut data = Vec::new();
        let mut reader = self.inner.get_blob(r, blob, offset).await?;
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut data)
            .await
            .unwrap();
        let middle = data.len() / 2;
        data[middle] ^= 0xff;
        Ok(Pin::from(Box::new(std::io::Cursor::new(data)) as Box<_>))
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

#[tokio::test]
async fn a_wrong_blob_never_lands_and_the_tag_is_not_written() {
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let (_, layers) = make_image(&src);
    let victim = layers[1].clone();
    let source: Arc<dyn Transport> = Arc::new(Corrupting {
        inner: OciDirTransport::layout(&src),
        victim: victim.digest.clone(),
    });
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
