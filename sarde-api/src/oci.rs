//! OCI image-spec types: descriptors, image manifest, image index, image config and
//! the media types sarde reads and writes.
//!
//! sarde keeps its own small serde types instead of a full OCI crate because it must
//! read what the Python tool wrote (float timestamps in `history`, which strict OCI
//! types refuse) and must write byte-for-byte deterministic JSON so an unchanged
//! image always has the same digests. Field order here is the serialisation order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Media types, and the annotation keys sarde uses.
pub mod media_types {
    pub const IMAGE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const IMAGE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";

    /// The libvirt domain XML layer (both formats).
    pub const DOMAIN_XML: &str = "application/vnd.libvirt.domain.config+xml";
    /// The "how to log in" JSON layer (both formats).
    pub const VM_CONFIG: &str = "application/vnd.sardinecake.vm.config.v1+json";
    /// A qcow2 file of the old (Python) format: one gzip stream cut into pieces.
    pub const V1_DISK_GZIP: &str = "application/x-qemu-disk+gzip";

    /// Annotation naming a layout entry's tag.
    pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
    /// Annotation holding a file name.
    pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
    pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

    /// Splits `type/subtype+suffix;param=value` into the base type, the `+suffix`
    /// (with its plus) and the parameters.
    pub fn split(media_type: &str) -> (&str, Option<&str>, Vec<(&str, &str)>) {
        let mut parts = media_type.split(';');
        let essence = parts.next().unwrap_or_default().trim();
        let params = parts
            .filter_map(|p| p.trim().split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        match essence.rfind('+') {
            Some(i) => (&essence[..i], Some(&essence[i..]), params),
            None => (essence, None, params),
        }
    }
}

/// A content descriptor: what a manifest says about one blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
            platform: None,
            artifact_type: None,
        }
    }

    /// A descriptor of `data` (digest and size computed).
    pub fn of(media_type: impl Into<String>, data: &[u8]) -> Self {
        Descriptor::new(media_type, Digest::sha256_of(data), data.len() as u64)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// The platform an image runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(
        default,
        rename = "os.version",
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An OCI image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageManifest {
    pub fn new(config: Descriptor, layers: Vec<Descriptor>) -> Self {
        ImageManifest {
            schema_version: 2,
            media_type: Some(media_types::IMAGE_MANIFEST.to_string()),
            artifact_type: None,
            config,
            layers,
            subject: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Deterministic bytes: the same manifest always serialises the same way.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serialises")
    }
}

/// An OCI image index (also the `index.json` of an image layout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for ImageIndex {
    fn default() -> Self {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media_types::IMAGE_INDEX.to_string()),
            manifests: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// The OCI image configuration blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

/// One `history` entry. `created` is kept as raw JSON because the Python tool wrote
/// float unix timestamps where OCI wants RFC 3339 strings; sarde writes strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_layer: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_split_finds_suffix_and_parameters() {
        let (base, suffix, params) = media_types::split("application/x-qemu-disk+gzip;chunk=2");
        assert_eq!(base, "application/x-qemu-disk");
        assert_eq!(suffix, Some("+gzip"));
        assert_eq!(params, vec![("chunk", "2")]);
        let (base, suffix, params) = media_types::split(media_types::IMAGE_CONFIG);
        assert_eq!(base, "application/vnd.oci.image.config.v1");
        assert_eq!(suffix, Some("+json"));
        assert!(params.is_empty());
    }

    #[test]
    fn python_tool_config_with_float_history_times_parses() {
        let json = r#"{"architecture":"amd64","os":"linux","created":"2024-05-01T10:00:00Z",
            "rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
            "history":[{"created":1714557600.25,"created_by":"sarde export"}]}"#;
        let config: ImageConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.rootfs.diff_ids.len(), 1);
        assert!(config.history[0].created.as_ref().unwrap().is_f64());
    }

    #[test]
    fn manifest_serialisation_is_stable() {
        let config = Descriptor::of(media_types::IMAGE_CONFIG, b"{}");
        let layer = Descriptor::of(media_types::DOMAIN_XML, b"<domain/>");
        let m = ImageManifest::new(config, vec![layer]);
        let bytes = m.to_bytes();
        assert_eq!(bytes, m.clone().to_bytes());
        let back: ImageManifest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, m);
        assert!(String::from_utf8(bytes).unwrap().starts_with(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json""#
        ));
    }
}

/// The image a tag of the tag schema for attachments names (cosign's
/// `sha256-<hex>.sig`, `.att`, `.sbom`): such a tag holds something that
/// belongs to that image (a signature), not an image of its own.
pub fn attachment_subject(tag: &str) -> Option<crate::Digest> {
    let (digest, suffix) = tag.rsplit_once('.')?;
    if !matches!(suffix, "sig" | "att" | "sbom") {
        return None;
    }
    let (algorithm, hex) = digest.split_once('-')?;
    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    format!("{algorithm}:{hex}").parse().ok()
}

#[cfg(test)]
mod attachment_tests {
    use super::attachment_subject;

    #[test]
    fn attachment_tags_name_their_image() {
        let hex = "a".repeat(64);
        let subject = attachment_subject(&format!("sha256-{hex}.sig")).unwrap();
        assert_eq!(subject.to_string(), format!("sha256:{hex}"));
        assert!(attachment_subject(&format!("sha256-{hex}.att")).is_some());
        assert!(attachment_subject(&format!("sha256-{hex}.tar")).is_none());
        assert!(attachment_subject("sha256-abc.sig").is_none());
        assert!(attachment_subject(&format!("sha256-{}.sig", "A".repeat(64))).is_none());
        assert!(attachment_subject("latest").is_none());
        assert!(attachment_subject("v1.sig").is_none());
    }
}
