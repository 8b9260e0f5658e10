//! Against a real registry: `SARDE_TEST_REGISTRY=127.0.0.1:5000` (plain HTTP).
//! Without it the registry tests print SKIPPED and pass, or fail under CI.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use sarde_api::oci::{Descriptor, ImageManifest, media_types};
use sarde_api::transport::{BlobReader, RawManifest, TransportOptions};
use sarde_api::{Digest, Transport, TransportError};
use sarde_transport_registry::RegistryTransport;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn registry(test: &str) -> Option<RegistryTransport> {
    let location = sarde_test_prerequisite::env(
        test,
        "SARDE_TEST_REGISTRY",
        "host:port of a plain-HTTP registry; scripts/start-services.sh starts one on 127.0.0.1:5000",
    )?;
    let options = TransportOptions {
        insecure: true,
        ..Default::default()
    };
    Some(RegistryTransport::new(&location, &options).expect("open the registry"))
}

/// A repository no other run or test uses.
fn unique_repo() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "sarde-test/{}-{nanos}-{}/x",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Pseudo-random bytes made on the fly, so the upload really streams.
struct Generated {
    state: u64,
    remaining: u64,
}

impl Generated {
    fn new(seed: u64, len: u64) -> Self {
        Generated {
            state: seed | 1,
            remaining: len,
        }
    }

    fn next_byte(&mut self) -> u8 {
        // xorshift64
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state >> 24) as u8
    }

    fn all(seed: u64, len: u64) -> Vec<u8> {
        let mut g = Generated::new(seed, len);
        (0..len).map(|_| g.next_byte()).collect()
    }
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.remaining).min(64 * 1024) as usize;
        let bytes: Vec<u8> = (0..n).map(|_| self.next_byte()).collect();
        buf.put_slice(&bytes);
        self.remaining -= n as u64;
        Poll::Ready(Ok(()))
    }
}

fn descriptor_of_generated(seed: u64, len: u64) -> Descriptor {
    let mut g = Generated::new(seed, len);
    let mut h = Sha256::new();
    let mut chunk = Vec::with_capacity(65536);
    for _ in 0..len {
        chunk.push(g.next_byte());
        if chunk.len() == 65536 {
            h.update(&chunk);
            chunk.clear();
        }
    }
    h.update(&chunk);
    Descriptor::new(
        "application/vnd.sardinecake.test.v1",
        Digest::from_sha256(h.finalize().into()),
        len,
    )
}

fn reader(data: Vec<u8>) -> BlobReader {
    Box::pin(std::io::Cursor::new(data))
}

async fn read_all(mut r: BlobReader) -> Vec<u8> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.expect("read the blob");
    out
}

#[tokio::test]
async fn blob_and_manifest_round_trip() {
    let Some(t) = registry("blob_and_manifest_round_trip") else {
        return;
    };
    let repo = unique_repo();
    let len = 3 * 1024 * 1024 + 12_345;
    let layer = descriptor_of_generated(7, len);
    assert!(!t.blob_exists(&repo, &layer).await.unwrap());
    t.put_blob(&repo, &layer, Box::pin(Generated::new(7, len)))
        .await
        .expect("put the layer");
    assert!(t.blob_exists(&repo, &layer).await.unwrap());
    // Uploading a blob the registry already has succeeds.
    t.put_blob(&repo, &layer, Box::pin(Generated::new(7, len)))
        .await
        .expect("put the layer again");

    let expected = Generated::all(7, len);
    let full = read_all(t.get_blob(&repo, &layer, 0).await.unwrap()).await;
    assert!(full == expected, "full download differs");
    let offset = 1_000_003;
    let rest = read_all(t.get_blob(&repo, &layer, offset).await.unwrap()).await;
    assert!(
        rest == expected[offset as usize..],
        "download from offset differs"
    );
    let nothing = read_all(t.get_blob(&repo, &layer, len).await.unwrap()).await;
    assert!(nothing.is_empty());

    let config_bytes = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let config = Descriptor::of(media_types::IMAGE_CONFIG, &config_bytes);
    t.put_blob(&repo, &config, reader(config_bytes.clone()))
        .await
        .expect("put the config");

    let bytes = ImageManifest::new(config, vec![layer]).to_bytes();
    let manifest = RawManifest {
        media_type: media_types::IMAGE_MANIFEST.to_string(),
        digest: Digest::sha256_of(&bytes),
        bytes,
    };
    t.put_manifest(&repo, "v1", &manifest)
        .await
        .expect("push v1");
    t.put_manifest(&repo, "v2", &manifest)
        .await
        .expect("push v2");

    let by_tag = t.get_manifest(&repo, "v1").await.expect("get by tag");
    assert_eq!(by_tag, manifest);
    let by_digest = t
        .get_manifest(&repo, &manifest.digest.to_string())
        .await
        .expect("get by digest");
    assert_eq!(by_digest, manifest);

    let mut tags = t.list_tags(&repo).await.expect("list tags");
    tags.sort();
    assert_eq!(tags, vec!["v1".to_string(), "v2".to_string()]);
}

#[tokio::test]
async fn wrong_data_is_never_stored() {
    let Some(t) = registry("wrong_data_is_never_stored") else {
        return;
    };
    let repo = unique_repo();
    let data = Generated::all(11, 1024 * 1024);
    let other = Generated::all(12, 1024 * 1024);
    // Announced as `other`, but the bytes are `data`.
    let wrong = Descriptor::of("application/octet-stream", &other);
    let e = t
        .put_blob(&repo, &wrong, reader(data.clone()))
        .await
        .expect_err("a wrong digest must be refused");
    assert!(matches!(e, TransportError::Mismatch { .. }), "{e:?}");
    assert!(e.to_string().contains(&wrong.digest.to_string()), "{e}");
    assert!(!t.blob_exists(&repo, &wrong).await.unwrap());
    let right = Descriptor::of("application/octet-stream", &data);
    assert!(!t.blob_exists(&repo, &right).await.unwrap());

    // Shorter and longer than announced.
    let e = t
        .put_blob(&repo, &right, reader(data[..1000].to_vec()))
        .await
        .expect_err("a short stream must be refused");
    assert!(matches!(e, TransportError::Mismatch { .. }), "{e:?}");
    let mut longer = data.clone();
    longer.push(0);
    let e = t
        .put_blob(&repo, &right, reader(longer))
        .await
        .expect_err("a long stream must be refused");
    assert!(matches!(e, TransportError::Mismatch { .. }), "{e:?}");
    assert!(!t.blob_exists(&repo, &right).await.unwrap());
}

#[tokio::test]
async fn mount_between_repositories() {
    let Some(t) = registry("mount_between_repositories") else {
        return;
    };
    let (from, to) = (unique_repo(), unique_repo());
    let data = Generated::all(21, 200_000);
    let blob = Descriptor::of("application/octet-stream", &data);
    t.put_blob(&from, &blob, reader(data)).await.unwrap();
    assert!(!t.blob_exists(&to, &blob).await.unwrap());
    assert!(t.mount_blob(&to, &from, &blob).await.expect("mount"));
    assert!(t.blob_exists(&to, &blob).await.unwrap());

    // A blob the source lacks can't be mounted: the caller uploads instead.
    let absent = Descriptor::of("application/octet-stream", b"not uploaded anywhere");
    let other = unique_repo();
    assert!(!t.mount_blob(&other, &from, &absent).await.expect("mount"));
}

#[tokio::test]
async fn unknown_objects_are_named() {
    let Some(t) = registry("unknown_objects_are_named") else {
        return;
    };
    let repo = unique_repo();
    let e = t.get_manifest(&repo, "no-such-tag").await.unwrap_err();
    assert!(
        matches!(&e, TransportError::ManifestUnknown { reference, .. } if reference == "no-such-tag"),
        "{e:?}"
    );
    assert!(e.to_string().contains("no-such-tag") && e.to_string().contains(&repo));

    let absent = Descriptor::of("application/octet-stream", b"absent");
    let e = match t.get_blob(&repo, &absent, 0).await {
        Ok(_) => panic!("an unknown blob must not be readable"),
        Err(e) => e,
    };
    assert!(
        matches!(&e, TransportError::BlobUnknown { digest, .. } if *digest == absent.digest),
        "{e:?}"
    );
    assert!(e.to_string().contains(&absent.digest.to_string()));
    assert!(!t.blob_exists(&repo, &absent).await.unwrap());
}

#[tokio::test]
async fn unreachable_registry_is_transient() {
    // Port 1 on loopback: nothing listens, the connection is refused.
    let options = TransportOptions {
        insecure: true,
        ..Default::default()
    };
    let t = RegistryTransport::new("127.0.0.1:1", &options).unwrap();
    let e = t.get_manifest("a/b", "v1").await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
    let blob = Descriptor::of("application/octet-stream", b"x");
    let e = t.blob_exists("a/b", &blob).await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");
}

#[test]
fn bad_locations_are_refused() {
    let o = TransportOptions::default();
    assert!(RegistryTransport::new("", &o).is_err());
    assert!(RegistryTransport::new("https://x", &o).is_err());
    assert!(RegistryTransport::new("host/repo", &o).is_err());
}
