//! cosign's signature format, as cosign writes and reads it (its
//! `specs/SIGNATURE_SPEC.md`): a "simple signing" payload naming the signed
//! manifest's digest and the image's repository, an ECDSA signature of the
//! payload's bytes in a layer annotation, and an image manifest holding one
//! layer per signature under the tag `sha256-<manifest hex>.sig` of the signed
//! image's repository.

use std::collections::BTreeMap;

use sarde_api::Digest;
use sarde_api::oci::media_types;
use serde::{Deserialize, Serialize};

use crate::TrustError;

/// The media type of a simple signing payload layer.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature of the payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of a cosign signature.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// The artifact type of a signature stored as an OCI 1.1 referrer.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// Payloads larger than this are refused before they are read (containers/image
/// allows 4 MiB; a real one is about 250 bytes).
pub const MAX_PAYLOAD_BYTES: u64 = 4 << 20;
/// Signatures read per image at most (a real image has a handful): a hostile
/// registry cannot make a check read without end.
pub const MAX_SIGNATURES: usize = 128;
/// Payload bytes read per image at most, over all its signatures.
pub const MAX_PAYLOAD_TOTAL: u64 = 32 << 20;
/// A signature manifest larger than this is refused (it lists one small layer
/// per signature).
pub const MAX_SIGNATURE_MANIFEST_BYTES: usize = 4 << 20;
/// What cosign writes as the config's timestamps unless asked to record the
/// signing time (`--record-creation-timestamp`).
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The tag cosign stores the signatures of `manifest` under.
pub fn signature_tag(manifest: &Digest) -> String {
    format!("{}-{}.sig", manifest.algorithm().name(), manifest.hex())
}

/// The tags whose images travel with the image `manifest` (its signatures),
/// for the copy engine's attachments.
pub fn attachment_tags(manifest: &Digest) -> Vec<String> {
    vec![signature_tag(manifest)]
}

/// Whether `tag` is cosign's tag for something attached to an image
/// (`sha256-<hex>.sig`, `.att`, `.sbom`), not an image of its own.
pub fn is_attachment_tag(tag: &str) -> bool {
    sarde_api::oci::attachment_subject(tag).is_some()
}

/// A simple signing payload (containers-signature(5), as cosign uses it).
/// Parsing is strict, as containers/image's: unknown fields of `critical` are
/// refused, `optional` may hold anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleSigning {
    pub critical: Critical,
    pub optional: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Critical {
    pub identity: Identity,
    pub image: SignedImage,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedImage {
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

impl SimpleSigning {
    /// The payload cosign writes for `manifest` of the image named `identity`
    /// (cosign names the repository, without tag).
    pub fn new(identity: &str, manifest: &Digest) -> Self {
        SimpleSigning {
            critical: Critical {
                identity: Identity {
                    docker_reference: identity.to_string(),
                },
                image: SignedImage {
                    docker_manifest_digest: manifest.to_string(),
                },
                kind: SIGNATURE_TYPE.to_string(),
            },
            optional: None,
        }
    }

    /// The bytes that are signed: compact JSON in cosign's field order.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a payload always serialises")
    }

    /// Parses payload bytes; a payload that is not a cosign signature's is refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, TrustError> {
        let payload: SimpleSigning = serde_json::from_slice(bytes)
            .map_err(|e| TrustError::BadSignature(format!("its payload is not valid: {e}")))?;
        if payload.critical.kind != SIGNATURE_TYPE {
            return Err(TrustError::BadSignature(format!(
                "its payload's type is {:?}, not {SIGNATURE_TYPE:?}",
                payload.critical.kind
            )));
        }
        Ok(payload)
    }

    /// The signed manifest's digest.
    pub fn manifest_digest(&self) -> Result<Digest, TrustError> {
        self.critical
            .image
            .docker_manifest_digest
            .parse()
            .map_err(|e| {
                TrustError::BadSignature(format!(
                    "its payload names no valid manifest digest ({:?}: {e})",
                    self.critical.image.docker_manifest_digest
                ))
            })
    }
}

/// A descriptor in go-containerregistry's field order (mediaType, size,
/// digest, annotations), which is what cosign writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureDescriptor {
    pub media_type: String,
    pub size: u64,
    pub digest: Digest,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A signature manifest: config, then one layer per signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: SignatureDescriptor,
    #[serde(default)]
    pub layers: Vec<SignatureDescriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One signature: its payload's bytes and the base64 signature of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub payload: Vec<u8>,
    pub signature: String,
}

impl Signature {
    pub fn layer(&self) -> SignatureDescriptor {
        SignatureDescriptor {
            media_type: SIMPLE_SIGNING_MEDIA_TYPE.to_string(),
            size: self.payload.len() as u64,
            digest: Digest::sha256_of(&self.payload),
            annotations: BTreeMap::from([(
                SIGNATURE_ANNOTATION.to_string(),
                self.signature.clone(),
            )]),
        }
    }
}

impl SignatureManifest {
    /// Parses a signature manifest; bytes that are not one are refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() > MAX_SIGNATURE_MANIFEST_BYTES {
            return Err(TrustError::BadSignature(format!(
                "its manifest has {} bytes, more than {MAX_SIGNATURE_MANIFEST_BYTES}",
                bytes.len()
            )));
        }
        let manifest: SignatureManifest = serde_json::from_slice(bytes).map_err(|e| {
            TrustError::BadSignature(format!("its manifest is not an image manifest: {e}"))
        })?;
        if manifest.schema_version != 2 {
            return Err(TrustError::BadSignature(format!(
                "its manifest has schemaVersion {}",
                manifest.schema_version
            )));
        }
        Ok(manifest)
    }

    /// The layers that are simple signing payloads with a signature.
    pub fn signature_layers(&self) -> impl Iterator<Item = (&SignatureDescriptor, &str)> {
        self.layers.iter().filter_map(|layer| {
            let signature = layer.annotations.get(SIGNATURE_ANNOTATION)?;
            (layer.media_type == SIMPLE_SIGNING_MEDIA_TYPE).then_some((layer, signature.as_str()))
        })
    }
}

/// A signature manifest ready to write: its bytes and the blobs it names
/// (config first, then payloads) with their bytes.
pub struct SignatureImage {
    pub manifest: Vec<u8>,
    pub blobs: Vec<(SignatureDescriptor, Vec<u8>)>,
}

impl SignatureImage {
    /// The image cosign writes for `signatures` (the existing ones first, a new
    /// one last), with the config go-containerregistry makes for it.
    pub fn build(signatures: &[Signature]) -> Self {
        let layers: Vec<SignatureDescriptor> = signatures.iter().map(Signature::layer).collect();
        Self::from_layers(layers, signatures)
    }

    /// The image of `layers` (an existing signature manifest's, kept as they
    /// are with all their annotations, then new ones), whose blobs `new` are
    /// written (the others are at the destination already).
    pub fn from_layers(layers: Vec<SignatureDescriptor>, new: &[Signature]) -> Self {
        let config = serde_json::json!({
            "architecture": "",
            "created": ZERO_TIME,
            "history": layers.iter().map(|_| serde_json::json!({"created": ZERO_TIME})).collect::<Vec<_>>(),
            "os": "",
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.digest.to_string()).collect::<Vec<_>>(),
            },
            "config": {},
        });
        let config = config_bytes(&config);
        let config_descriptor = SignatureDescriptor {
            media_type: media_types::IMAGE_CONFIG.to_string(),
            size: config.len() as u64,
            digest: Digest::sha256_of(&config),
            annotations: BTreeMap::new(),
        };
        let manifest = SignatureManifest {
            schema_version: 2,
            media_type: Some(media_types::IMAGE_MANIFEST.to_string()),
            artifact_type: None,
            config: config_descriptor.clone(),
            layers: layers.clone(),
            subject: None,
            annotations: BTreeMap::new(),
        };
        let mut blobs = vec![(config_descriptor, config)];
        for signature in new {
            blobs.push((signature.layer(), signature.payload.clone()));
        }
        SignatureImage {
            manifest: serde_json::to_vec(&manifest).expect("a manifest always serialises"),
            blobs,
        }
    }
}

impl SignatureImage {
    /// The same signatures as an OCI 1.1 referrer of `subject`, as cosign
    /// writes them with `--registry-referrers-mode=oci-1-1`: the config's media
    /// type is the signature's artifact type, `artifactType` says it too, and
    /// `subject` names the signed manifest. Stored by digest.
    pub fn referrer(signatures: &[Signature], subject: SignatureDescriptor) -> Self {
        let mut image = SignatureImage::build(signatures);
        let mut manifest: SignatureManifest =
            serde_json::from_slice(&image.manifest).expect("built just now");
        manifest.config.media_type = SIGNATURE_ARTIFACT_TYPE.to_string();
        manifest.artifact_type = Some(SIGNATURE_ARTIFACT_TYPE.to_string());
        manifest.subject = Some(serde_json::to_value(subject).expect("a descriptor serialises"));
        image.blobs[0].0.media_type = SIGNATURE_ARTIFACT_TYPE.to_string();
        image.manifest = serde_json::to_vec(&manifest).expect("a manifest serialises");
        image
    }
}

/// How two signature manifests of one image combine.
pub enum Merged {
    /// The existing one has every signature of the other.
    Existing,
    /// Both sets: the existing layers as they are, then the others' new ones.
    Combined(SignatureImage),
    /// The existing one is not a signature manifest: the other replaces it.
    Incoming,
}

/// Combines the signature manifest a destination has with the one a copy
/// brings, so neither side's signatures are lost (as cosign appends). A layer
/// counts as present when one with the same digest and annotations is.
pub fn merge(existing: &[u8], incoming: &[u8]) -> Merged {
    let Ok(existing) = SignatureManifest::parse(existing) else {
        return Merged::Incoming;
    };
    let Ok(incoming) = SignatureManifest::parse(incoming) else {
        return Merged::Existing;
    };
    // A destination manifest without signatures keeps nothing: the incoming
    // one goes as it is, not rebuilt.
    if existing.layers.is_empty() {
        return Merged::Incoming;
    }
    let mut layers = existing.layers;
    let before = layers.len();
    for layer in incoming.layers {
        if !layers.contains(&layer) {
            layers.push(layer);
        }
    }
    if layers.len() == before {
        return Merged::Existing;
    }
    Merged::Combined(SignatureImage::from_layers(layers, &[]))
}

/// The config JSON in go-containerregistry's field order (Go marshals struct
/// fields in declaration order: architecture, created, history, os, rootfs,
/// config), which serde_json's sorted maps would not keep.
fn config_bytes(config: &serde_json::Value) -> Vec<u8> {
    let field = |name: &str| serde_json::to_string(&config[name]).expect("JSON serialises");
    format!(
        "{{\"architecture\":{},\"created\":{},\"history\":{},\"os\":{},\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":{}}},\"config\":{{}}}}",
        field("architecture"),
        field("created"),
        field("history"),
        field("os"),
        serde_json::to_string(&config["rootfs"]["diff_ids"]).expect("JSON serialises"),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_tags_follow_cosign() {
        let digest = Digest::sha256_of(b"x");
        let tag = signature_tag(&digest);
        assert_eq!(tag, format!("sha256-{}.sig", digest.hex()));
        assert!(is_attachment_tag(&tag));
        assert!(is_attachment_tag(&tag.replace(".sig", ".att")));
        assert!(!is_attachment_tag("latest"));
        assert!(!is_attachment_tag("sha256-abc.sig"));
        assert!(!is_attachment_tag(&tag.replace(".sig", ".tar")));
    }

    #[test]
    fn payloads_are_cosigns_bytes() {
        let digest: Digest =
            "sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b"
                .parse()
                .unwrap();
        let payload = SimpleSigning::new("registry-testing.svc.lan/busybox", &digest);
        assert_eq!(
            String::from_utf8(payload.to_bytes()).unwrap(),
            r#"{"critical":{"identity":{"docker-reference":"registry-testing.svc.lan/busybox"},"image":{"docker-manifest-digest":"sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b"},"type":"cosign container image signature"},"optional":null}"#
        );
        assert_eq!(SimpleSigning::parse(&payload.to_bytes()).unwrap(), payload);
    }

    #[test]
    fn merged_signature_manifests_keep_both_sides() {
        let sig = |n: u8| Signature {
            payload: vec![b'{', n, b'}'],
            signature: format!("sig{n}"),
        };
        let one = SignatureImage::build(&[sig(1)]).manifest;
        let two = SignatureImage::build(&[sig(1), sig(2)]).manifest;
        let Merged::Combined(image) = merge(&one, &SignatureImage::build(&[sig(2)]).manifest)
        else {
            panic!("not combined")
        };
        assert_eq!(image.manifest, two, "existing first, then the new one");
        assert_eq!(image.blobs.len(), 1, "only the new config is written");
        assert!(matches!(merge(&two, &one), Merged::Existing));
        assert!(matches!(merge(b"junk", &one), Merged::Incoming));
        assert!(matches!(merge(&one, b"junk"), Merged::Existing));
        // No signature at the destination: the incoming manifest as it is.
        let none = SignatureImage::build(&[]).manifest;
        assert!(matches!(merge(&none, &one), Merged::Incoming));
    }

    #[test]
    fn strange_payloads_are_refused() {
        for bad in [
            &br#"{"critical":{"identity":{"docker-reference":"a/b"},"image":{"docker-manifest-digest":"sha256:00"},"type":"atomic container signature"},"optional":null}"#[..],
            br#"{"critical":{"identity":{"docker-reference":"a/b"},"image":{"docker-manifest-digest":"x"},"type":"cosign container image signature","extra":1},"optional":null}"#,
            br#"{"critical":{}}"#,
            b"not json",
        ] {
            assert!(SimpleSigning::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
