//! The async `oci-dir` transport on a real filesystem.

use std::fs;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use sarde_api::oci::{Descriptor, ImageManifest, media_types};
use sarde_api::transport::{BlobReader, RawManifest, TransportOptions};
use sarde_api::{Digest, Origin, Registry, Transport, TransportError};
use sarde_transport_oci_dir::{Layout, OciDirTransport, register};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

const REPO: &str = "127.0.0.1:5000/sardines/debian";

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn reader(data: Vec<u8>) -> BlobReader {
    Box::pin(io::Cursor::new(data))
}

/// Delivers `data` a few bytes at a time, then fails: a connection cut mid-blob.
struct Failing {
    data: Vec<u8>,
    at: usize,
}

impl AsyncRead for Failing {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at >= self.data.len() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset",
            )));
        }
        let n = (self.data.len() - self.at).min(buf.remaining()).min(1000);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

async fn read_all(mut r: BlobReader) -> Vec<u8> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    out
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            out.push(entry.path().display().to_string());
        }
        if entry.file_type().unwrap().is_dir() {
            out.extend(temp_files(&entry.path()));
        }
    }
    out
}

/// A layer bigger than the transport's 1 MiB pieces, with an odd length.
fn layer_bytes() -> Vec<u8> {
    (0..(3 << 20) + 17u32).map(|i| (i % 253) as u8).collect()
}

#[test]
fn round_trip_through_the_transport() {
    let tmp = TempDir::new().unwrap();
    let t = OciDirTransport::new(tmp.path());
    assert_eq!(t.location(), tmp.path().display().to_string());
    run(async {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let config_d = Descriptor::of(media_types::IMAGE_CONFIG, &config);
        let layer = layer_bytes();
        let layer_d = Descriptor::of(media_types::DOMAIN_XML, &layer);

        assert!(!t.blob_exists(REPO, &layer_d).await.unwrap());
        t.put_blob(REPO, &config_d, reader(config.clone()))
            .await
            .unwrap();
        t.put_blob(REPO, &layer_d, reader(layer.clone()))
            .await
            .unwrap();
        assert!(t.blob_exists(REPO, &layer_d).await.unwrap());
        // Storing it again is a no-op.
        t.put_blob(REPO, &layer_d, reader(layer.clone()))
            .await
            .unwrap();

        // The blob sits in the layout the port did not break.
        let layout = Layout::open(tmp.path().join("127.0.0.1:5000/sardines/debian")).unwrap();
        assert_eq!(fs::read(layout.blob_path(&layer_d.digest)).unwrap(), layer);

        // Whole and from an offset.
        assert_eq!(
            read_all(t.get_blob(REPO, &layer_d, 0).await.unwrap()).await,
            layer
        );
        let offset = (1 << 20) + 5;
        assert_eq!(
            read_all(t.get_blob(REPO, &layer_d, offset).await.unwrap()).await,
            layer[offset as usize..]
        );
        assert!(
            read_all(t.get_blob(REPO, &layer_d, layer_d.size).await.unwrap())
                .await
                .is_empty()
        );
        assert!(t.get_blob(REPO, &layer_d, layer_d.size + 1).await.is_err());

        // Manifests by tag and by digest.
        let manifest = ImageManifest::new(config_d.clone(), vec![layer_d.clone()]).to_bytes();
        let raw = RawManifest {
            media_type: media_types::IMAGE_MANIFEST.to_string(),
            digest: Digest::sha256_of(&manifest),
            bytes: manifest.clone(),
        };
        t.put_manifest(REPO, "bookworm", &raw).await.unwrap();
        t.put_manifest(REPO, "bookworm", &raw).await.unwrap();
        t.put_manifest(REPO, "stable", &raw).await.unwrap();
        assert_eq!(t.get_manifest(REPO, "bookworm").await.unwrap(), raw);
        assert_eq!(
            t.get_manifest(REPO, &raw.digest.to_string()).await.unwrap(),
            raw
        );
        assert_eq!(
            t.list_tags(REPO).await.unwrap(),
            ["bookworm".to_string(), "stable".to_string()]
        );
        assert_eq!(layout.index().unwrap().manifests.len(), 2);

        // Pushed by digest: listed untagged, once.
        t.put_manifest(REPO, &raw.digest.to_string(), &raw)
            .await
            .unwrap();
        assert_eq!(layout.index().unwrap().manifests.len(), 2, "already listed");

        // Mount into another repository of the same cache.
        let other = "127.0.0.1:5000/sardines/other";
        assert!(t.mount_blob(other, REPO, &layer_d).await.unwrap());
        assert!(t.blob_exists(other, &layer_d).await.unwrap());
        assert_eq!(
            read_all(t.get_blob(other, &layer_d, 0).await.unwrap()).await,
            layer
        );
        // Nothing to mount from a repository that does not exist or lacks the blob.
        assert!(
            !t.mount_blob(other, "127.0.0.1:5000/none", &layer_d)
                .await
                .unwrap()
        );
        let absent = Descriptor::of(media_types::DOMAIN_XML, b"absent");
        assert!(!t.mount_blob(other, REPO, &absent).await.unwrap());
    });
    assert!(temp_files(tmp.path()).is_empty());
}

#[test]
fn put_blob_refuses_wrong_content_and_stores_nothing() {
    let tmp = TempDir::new().unwrap();
    let t = OciDirTransport::new(tmp.path());
    run(async {
        let layer = layer_bytes();
        let good = Descriptor::of(media_types::DOMAIN_XML, &layer);

        // Other content, same size.
        let mut other = layer.clone();
        other[12345] ^= 0xff;
        let err = t.put_blob(REPO, &good, reader(other)).await.unwrap_err();
        assert!(matches!(err, TransportError::Mismatch { .. }), "{err:?}");

        // Too short.
        let err = t
            .put_blob(REPO, &good, reader(layer[..1000].to_vec()))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Mismatch { .. }), "{err:?}");

        // Too long: refused as soon as it runs past the size.
        let mut longer = layer.clone();
        longer.extend_from_slice(&[0; 10]);
        let err = t.put_blob(REPO, &good, reader(longer)).await.unwrap_err();
        assert!(matches!(err, TransportError::Mismatch { .. }), "{err:?}");

        // Cut mid-transfer.
        let cut = Box::pin(Failing {
            data: layer[..(2 << 20)].to_vec(),
            at: 0,
        });
        let err = t.put_blob(REPO, &good, cut).await.unwrap_err();
        match &err {
            TransportError::Io { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::ConnectionReset)
            }
            other => panic!("unexpected {other:?}"),
        }

        assert!(!t.blob_exists(REPO, &good).await.unwrap());
        let err = t.get_blob(REPO, &good, 0).await.err().unwrap();
        assert!(matches!(err, TransportError::BlobUnknown { .. }), "{err:?}");
    });
    let blobs = tmp
        .path()
        .join("127.0.0.1:5000/sardines/debian/blobs/sha256");
    assert_eq!(fs::read_dir(&blobs).unwrap().count(), 0, "nothing stored");
}

#[test]
fn manifests_need_their_blobs_and_the_right_digest() {
    let tmp = TempDir::new().unwrap();
    let t = OciDirTransport::new(tmp.path());
    run(async {
        let config = b"{}".to_vec();
        let config_d = Descriptor::of(media_types::IMAGE_CONFIG, &config);
        let manifest = ImageManifest::new(config_d.clone(), vec![]).to_bytes();
        let raw = RawManifest {
            media_type: media_types::IMAGE_MANIFEST.to_string(),
            digest: Digest::sha256_of(&manifest),
            bytes: manifest,
        };
        let err = t.put_manifest(REPO, "v1", &raw).await.unwrap_err();
        match &err {
            TransportError::BlobUnknown { digest, .. } => assert_eq!(digest, &config_d.digest),
            other => panic!("unexpected {other:?}"),
        }

        t.put_blob(REPO, &config_d, reader(config)).await.unwrap();
        let mut lying = raw.clone();
        lying.digest = Digest::sha256_of(b"other");
        let err = t.put_manifest(REPO, "v1", &lying).await.unwrap_err();
        assert!(matches!(err, TransportError::Mismatch { .. }), "{err:?}");
        let err = t
            .put_manifest(REPO, &Digest::sha256_of(b"x").to_string(), &raw)
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Mismatch { .. }), "{err:?}");
        assert!(t.list_tags(REPO).await.unwrap().is_empty());

        t.put_manifest(REPO, "v1", &raw).await.unwrap();
        let err = t.get_manifest(REPO, "v2").await.unwrap_err();
        match &err {
            TransportError::ManifestUnknown { reference, .. } => assert_eq!(reference, "v2"),
            other => panic!("unexpected {other:?}"),
        }
        let err = t
            .get_manifest("127.0.0.1:5000/nothing/here", "v1")
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::ManifestUnknown { .. }),
            "{err:?}"
        );
        let err = t
            .list_tags("127.0.0.1:5000/nothing/here")
            .await
            .unwrap_err();
        match &err {
            TransportError::Io { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("unexpected {other:?}"),
        }
    });
}

#[test]
fn repositories_with_unsafe_components_are_refused() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path().join("cache");
    let t = OciDirTransport::new(&root);
    run(async {
        let blob = Descriptor::of(media_types::IMAGE_CONFIG, b"{}");
        // (One component is a repository now: a Docker Hub image's familiar path.)
        for bad in ["host/../../escape", "..", "host//x", "host/x/..", "", "/x"] {
            let err = t
                .put_blob(bad, &blob, reader(b"{}".to_vec()))
                .await
                .unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("unsafe path component") || text.contains("no path"),
                "{bad:?}: {text}"
            );
            assert!(t.list_tags(bad).await.is_err(), "{bad:?}");
            assert!(t.mount_blob(bad, REPO, &blob).await.is_err(), "{bad:?}");
        }
    });
    assert!(!tmp.path().join("escape").exists());
    assert!(!root.exists(), "nothing was created");
}

#[test]
fn the_factory_registers_and_opens_the_cache() {
    let tmp = TempDir::new().unwrap();
    let mut registry = Registry::new();
    register(&mut registry.registrar(Origin::BuiltIn)).unwrap();
    let factory = registry.transport("oci-dir").unwrap();
    assert_eq!(factory.scheme(), "oci-dir");
    assert!(factory.open("", &TransportOptions::default()).is_err());
    let location = tmp.path().display().to_string();
    let t = factory
        .open(&location, &TransportOptions::default())
        .unwrap();
    assert_eq!(t.location(), location);
    run(async {
        let blob = Descriptor::of(media_types::IMAGE_CONFIG, b"{}");
        t.put_blob("localhost/x", &blob, reader(b"{}".to_vec()))
            .await
            .unwrap();
        assert!(t.blob_exists("localhost/x", &blob).await.unwrap());
    });
    assert!(tmp.path().join("localhost/x/oci-layout").is_file());
}
