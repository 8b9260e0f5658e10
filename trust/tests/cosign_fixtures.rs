//! Signatures made by the real cosign and skopeo (tests/fixtures/README.md says
//! where each file comes from) verify in sarde through a real transport (an OCI
//! layout directory), and a byte changed in any of them is refused.

use std::path::{Path, PathBuf};

use sarde_api::transport::{RawManifest, TransportOptions};
use sarde_api::{Digest, Transport, TransportFactory};
use sarde_transport_oci_layout::OciLayoutFactory;
use sarde_trust::cosign::{Signature, SignatureImage, SignatureManifest};
use sarde_trust::verify::Subject;
use sarde_trust::{Policy, PrivateKey, PublicKey, TrustError, signatures};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(fixture(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn manifest(bytes: Vec<u8>) -> RawManifest {
    RawManifest {
        media_type: "application/vnd.docker.distribution.manifest.v2+json".to_string(),
        digest: Digest::sha256_of(&bytes),
        bytes,
    }
}

fn signature(dir: &str) -> Signature {
    Signature {
        payload: read(&format!("{dir}/payload.json")),
        signature: String::from_utf8(read(&format!("{dir}/signature.b64"))).unwrap(),
    }
}

/// An OCI layout holding `signatures` of `manifest` under cosign's tag.
async fn layout(dir: &Path, manifest: &Digest, signatures: &[Signature]) -> Box<dyn Transport> {
    let transport = OciLayoutFactory
        .open(dir.to_str().unwrap(), &TransportOptions::default())
        .unwrap();
    if !signatures.is_empty() {
        signatures::write(transport.as_ref(), "", manifest, signatures)
            .await
            .unwrap();
    }
    transport
}

fn policy(dir: &Path, key: &str, identity: &str) -> Policy {
    let text = format!(
        r#"{{"default": [{{"type": "reject"}}],
            "transports": {{"docker": {{"192.168.64.2:5000": [{{"type": "sigstoreSigned", "keyPath": "{}", "signedIdentity": {identity}}}]}}}}}}"#,
        fixture(key).display()
    );
    let path = dir.join("policy.json");
    std::fs::write(&path, text).unwrap();
    Policy::load(&path).unwrap()
}

async fn check(
    policy: &Policy,
    transport: &dyn Transport,
    image: &str,
    manifest: &RawManifest,
) -> Result<sarde_trust::Accepted, TrustError> {
    let reference: sarde_api::ImageReference = image.parse().unwrap();
    let scopes = sarde_api::transport::registry_scopes(&reference);
    policy
        .check(&Subject {
            transport,
            repository: "",
            policy_transport: "docker",
            scopes: &scopes,
            identity: Some(image),
            manifest,
            name: image,
        })
        .await
}

const COSIGN_IMAGE: &str = "192.168.64.2:5000/cosign-signed-single-sample:latest";
const SKOPEO_IMAGE: &str = "192.168.64.2:5000/skopeo-signed:tag";

#[tokio::test]
async fn cosign_signatures_verify_and_every_changed_byte_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = manifest(read("containers-image/valid/manifest.json"));
    let good = signature("containers-image/valid");
    let matching = r#"{"type": "matchRepository"}"#;
    let policy = policy(dir.path(), "containers-image/cosign.pub", matching);

    let store = dir.path().join("good");
    let transport = layout(&store, &image.digest, std::slice::from_ref(&good)).await;
    let accepted = check(&policy, transport.as_ref(), COSIGN_IMAGE, &image)
        .await
        .expect("cosign's signature verifies");
    assert_eq!(accepted.signatures_verified, 1);
    assert!(accepted.scope.contains("192.168.64.2:5000"), "{accepted:?}");

    // cosign signs the repository without a tag, so the default identity rule
    // (matchRepoDigestOrExact) refuses it for a tagged name, as in containers/image.
    let default_policy = self::policy(
        dir.path(),
        "containers-image/cosign.pub",
        r#"{"type": "matchRepoDigestOrExact"}"#,
    );
    let e = check(&default_policy, transport.as_ref(), COSIGN_IMAGE, &image)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("matchRepository"), "{e}");

    // Another image (a manifest changed after signing).
    let modified = manifest(read("containers-image/modified-manifest/manifest.json"));
    let swapped = dir.path().join("swapped");
    let transport = layout(&swapped, &modified.digest, std::slice::from_ref(&good)).await;
    let e = check(&policy, transport.as_ref(), COSIGN_IMAGE, &modified)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("was replaced after signing"), "{e}");
    assert!(
        e.contains(COSIGN_IMAGE) && e.contains("sigstoreSigned"),
        "{e}"
    );

    // Another key.
    let other = self::policy(dir.path(), "containers-image/cosign2.pub", matching);
    let transport = layout(&store, &image.digest, &[]).await;
    let e = check(&other, transport.as_ref(), COSIGN_IMAGE, &image)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not made by the trusted key"), "{e}");

    // Another repository.
    let e = check(
        &policy,
        transport.as_ref(),
        "192.168.64.2:5000/other:latest",
        &image,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("no signature"), "{e}");

    // Every byte of the payload and of the signature, changed one at a time.
    for i in 0..good.payload.len() {
        let mut bad = good.clone();
        bad.payload[i] ^= 0x01;
        assert_refused(
            &policy,
            dir.path(),
            &image,
            bad,
            &format!("payload byte {i}"),
        )
        .await;
    }
    let bytes = good.signature.as_bytes().to_vec();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        let bad = Signature {
            payload: good.payload.clone(),
            signature: String::from_utf8(bad).unwrap(),
        };
        assert_refused(
            &policy,
            dir.path(),
            &image,
            bad,
            &format!("signature byte {i}"),
        )
        .await;
    }
    // Every byte of the image manifest.
    let transport = layout(&store, &image.digest, &[]).await;
    for i in (0..image.bytes.len()).step_by(7) {
        let mut bytes = image.bytes.clone();
        bytes[i] ^= 0x01;
        let changed = manifest(bytes);
        assert!(
            check(&policy, transport.as_ref(), COSIGN_IMAGE, &changed)
                .await
                .is_err(),
            "manifest byte {i} changed and still accepted"
        );
    }
    // Every character of the key's base64 body.
    let key = String::from_utf8(read("containers-image/cosign.pub")).unwrap();
    let body_start = key.find('\n').unwrap() + 1;
    let body_end = key.rfind("-----END").unwrap() - 1;
    for i in body_start..body_end {
        let mut bad = key.clone().into_bytes();
        if bad[i] == b'\n' {
            continue;
        }
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        let verifies = PublicKey::from_pem(&bad, "changed key")
            .map(|k| k.verifies(&good.payload, &good.signature))
            .unwrap_or(false);
        assert!(
            !verifies,
            "key byte {i} changed and the signature still verifies"
        );
    }
}

async fn assert_refused(
    policy: &Policy,
    dir: &Path,
    image: &RawManifest,
    bad: Signature,
    what: &str,
) {
    let store = tempfile::tempdir_in(dir).unwrap();
    let transport = layout(store.path(), &image.digest, &[bad]).await;
    let result = check(policy, transport.as_ref(), COSIGN_IMAGE, image).await;
    assert!(
        matches!(result, Err(TrustError::Refused { .. })),
        "{what} changed: {result:?}"
    );
}

#[tokio::test]
async fn a_skopeo_signature_with_its_tag_verifies_under_the_default_identity_rule() {
    let dir = tempfile::tempdir().unwrap();
    let image = manifest(read("containers-image/valid-with-tag/manifest.json"));
    let signed = signature("containers-image/valid-with-tag");
    let transport = layout(&dir.path().join("l"), &image.digest, &[signed]).await;
    let policy = policy(
        dir.path(),
        "containers-image/cosign.pub",
        r#"{"type": "matchRepoDigestOrExact"}"#,
    );
    check(&policy, transport.as_ref(), SKOPEO_IMAGE, &image)
        .await
        .expect("skopeo's signature verifies");
    let e = check(
        &policy,
        transport.as_ref(),
        "192.168.64.2:5000/skopeo-signed:other",
        &image,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("skopeo-signed:tag"), "{e}");
}

#[test]
fn sigstore_rs_cosign_signature_verifies() {
    let key = PublicKey::load(&fixture("sigstore-rs/busybox.pub")).unwrap();
    let payload = read("sigstore-rs/busybox.payload.json");
    let signature = String::from_utf8(read("sigstore-rs/busybox.signature.b64")).unwrap();
    assert!(key.verifies(&payload, &signature));
    let mut changed = payload.clone();
    changed[10] ^= 1;
    assert!(!key.verifies(&changed, &signature));
    let other = PublicKey::load(&fixture("containers-image/cosign.pub")).unwrap();
    assert!(!other.verifies(&payload, &signature));
}

#[test]
fn cosign_private_keys_open_and_sign() {
    let key = PrivateKey::load(&fixture("cosign/sigstore-labelled.key"), b"hello")
        .expect("cosign's encrypted key opens with its passphrase");
    let signature = key.sign(b"payload").unwrap();
    assert!(key.public_key().unwrap().verifies(b"payload", &signature));
    let e = PrivateKey::load(&fixture("cosign/sigstore-labelled.key"), b"wrong")
        .err()
        .expect("a wrong passphrase fails")
        .to_string();
    assert!(e.contains("sigstore-labelled.key"), "{e}");
    PrivateKey::load(
        &fixture("sigstore-rs/cosign_generated_encrypted_empty_private.key"),
        b"",
    )
    .expect("cosign's key with an empty passphrase opens");

    // A key sarde generates reads back, and its public PEM verifies.
    let generated = PrivateKey::generate().unwrap();
    let pem = generated.to_encrypted_pem(b"pw").unwrap();
    assert!(
        pem.contains("ENCRYPTED SIGSTORE PRIVATE KEY"),
        "{}",
        pem.as_str()
    );
    let reread = PrivateKey::from_encrypted_pem(pem.as_bytes(), b"pw").unwrap();
    let public =
        PublicKey::from_pem(generated.public_key_pem().unwrap().as_bytes(), "pub").unwrap();
    assert!(public.verifies(b"x", &reread.sign(b"x").unwrap()));
}

/// The signature manifest sarde writes has cosign's fields: the same media
/// types, annotation names, config fields in the same order, payload JSON.
#[test]
fn signature_manifests_match_cosigns_field_by_field() {
    let cosign_manifest = read("cosign-trace/signature-manifest.json");
    let cosign_config = read("cosign-trace/config.json");
    let ours = SignatureImage::build(&[signature("containers-image/valid")]);

    let theirs: serde_json::Value = serde_json::from_slice(&cosign_manifest).unwrap();
    let mine: serde_json::Value = serde_json::from_slice(&ours.manifest).unwrap();
    assert_eq!(shape(&theirs), shape(&mine));
    for field in [
        "/schemaVersion",
        "/mediaType",
        "/config/mediaType",
        "/layers/0/mediaType",
    ] {
        assert_eq!(theirs.pointer(field), mine.pointer(field), "{field}");
    }
    assert_eq!(key_order(&cosign_manifest), key_order(&ours.manifest));

    let (config_descriptor, config) = &ours.blobs[0];
    assert_eq!(Digest::sha256_of(config), config_descriptor.digest);
    assert_eq!(key_order(&cosign_config), key_order(config));
    let theirs: serde_json::Value = serde_json::from_slice(&cosign_config).unwrap();
    let mine: serde_json::Value = serde_json::from_slice(config).unwrap();
    assert_eq!(shape(&theirs), shape(&mine));
    assert_eq!(
        mine["rootfs"]["diff_ids"][0],
        serde_json::json!(ours.blobs[1].0.digest.to_string())
    );

    // Both parse as signature manifests with one signature layer.
    for bytes in [&cosign_manifest, &ours.manifest] {
        let parsed = SignatureManifest::parse(bytes).unwrap();
        assert_eq!(parsed.signature_layers().count(), 1);
    }
}

/// The JSON's structure: object keys and value types, not values.
fn shape(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        Value::String(_) => Value::String("string".into()),
        Value::Number(_) => Value::String("number".into()),
        other => other.clone(),
    }
}

/// Object keys in the order the bytes have them.
fn key_order(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut keys = Vec::new();
    let mut rest = text.as_ref();
    while let Some(i) = rest.find("\":") {
        let start = rest[..i].rfind('"').unwrap();
        keys.push(rest[start + 1..i].to_string());
        rest = &rest[i + 2..];
    }
    keys
}

/// What sarde does not check refuses the image, even one whose key signature
/// verifies: keyless (fulcio), X.509 (pki), a Rekor log, GPG (signedBy).
#[tokio::test]
async fn requirements_sarde_does_not_check_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let image = manifest(read("containers-image/valid/manifest.json"));
    let transport = layout(
        &dir.path().join("l"),
        &image.digest,
        &[signature("containers-image/valid")],
    )
    .await;
    let key = fixture("containers-image/cosign.pub");
    let key = key.display();
    for (requirement, expected) in [
        (
            r#"{"type": "sigstoreSigned", "fulcio": {"caPath": "/dev/null", "oidcIssuer": "https://issuer", "subjectEmail": "a@b"}, "rekorPublicKeyPath": "/dev/null"}"#.to_string(),
            "fulcio",
        ),
        (
            r#"{"type": "sigstoreSigned", "pki": {"caRootsPath": "/dev/null"}}"#.to_string(),
            "pki",
        ),
        (
            format!(r#"{{"type": "sigstoreSigned", "keyPath": "{key}", "rekorPublicKeyPath": "/dev/null", "signedIdentity": {{"type": "matchRepository"}}}}"#),
            "Rekor",
        ),
        (
            r#"{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/dev/null"}"#.to_string(),
            "signedBy",
        ),
    ] {
        let path = dir.path().join("policy.json");
        std::fs::write(&path, format!(r#"{{"default": [{requirement}]}}"#)).unwrap();
        let policy = Policy::load(&path).unwrap();
        let e = check(&policy, transport.as_ref(), COSIGN_IMAGE, &image)
            .await
            .unwrap_err();
        assert!(matches!(e, TrustError::Refused { .. }), "{e}");
        assert!(e.to_string().contains(expected), "{expected}: {e}");
    }
}

/// A signature manifest with more layers than any real image has is read only
/// up to the bound.
#[tokio::test]
async fn signatures_are_read_up_to_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let image = manifest(read("containers-image/valid/manifest.json"));
    let many: Vec<Signature> = (0..200)
        .map(|i| Signature {
            payload: format!("{{\"n\":{i}}}").into_bytes(),
            signature: "MEUCIQ==".to_string(),
        })
        .collect();
    let transport = layout(&dir.path().join("l"), &image.digest, &many).await;
    let found = signatures::find(transport.as_ref(), "", &image.digest)
        .await
        .unwrap();
    let limit = sarde_trust::cosign::MAX_SIGNATURES;
    assert_eq!(found.len(), limit + 1);
    assert!(found[..limit].iter().all(Result::is_ok));
    assert!(found[limit].as_ref().unwrap_err().contains("not read"));
}
