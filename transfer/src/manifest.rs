//! What a manifest references: child manifests (an index) or blobs (an image).
//! Registry content is untrusted: shapes, digests and counts are checked before
//! anything is requested or written.

use sarde_api::Transport;
use sarde_api::digest::Algorithm;
use sarde_api::limits::{MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE};
use sarde_api::oci::{Descriptor, media_types};
use sarde_api::transport::RawManifest;
use serde::Deserialize;

use crate::retry::retrying;
use crate::{TransferError, TransferOptions};

/// Reads a manifest from `source`, retrying transient failures; `image` names
/// it in messages.
pub(crate) async fn get(
    source: &dyn Transport,
    repository: &str,
    reference: &str,
    image: &str,
    options: &TransferOptions,
) -> Result<RawManifest, TransferError> {
    let what = format!("{image}: manifest {reference}");
    let (result, _) = retrying(options, &what, |_| async {
        Ok(source.get_manifest(repository, reference).await?)
    })
    .await;
    result
}

/// More blobs than any real VM image has (a 60 GiB disk in 64 MiB pieces is ~1000).
const MAX_BLOBS: usize = 100_000;
/// An index nests manifests one level deep; deeper is refused.
pub(crate) const MAX_DEPTH: usize = 2;

#[derive(Deserialize)]
struct Shape {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// The references of one manifest.
pub(crate) enum Refs {
    Index(Vec<Descriptor>),
    Image(Vec<Descriptor>),
}

pub(crate) fn references(image: &str, manifest: &RawManifest) -> Result<Refs, TransferError> {
    let refused = |message: String| TransferError::Manifest {
        image: image.to_string(),
        digest: manifest.digest.to_string(),
        message,
    };
    if manifest.bytes.len() as u64 > MAX_MANIFEST_SIZE {
        return Err(refused(format!(
            "{} bytes, more than the {MAX_MANIFEST_SIZE} sarde reads for a manifest",
            manifest.bytes.len()
        )));
    }
    let shape: Shape = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| refused(format!("not a manifest: {e}")))?;
    let is_index = matches!(
        manifest.media_type.as_str(),
        media_types::IMAGE_INDEX | media_types::DOCKER_MANIFEST_LIST
    );
    let (refs, children) = match (is_index, shape) {
        (
            true,
            Shape {
                manifests: Some(m), ..
            },
        ) => (m, true),
        (
            false,
            Shape {
                config: Some(config),
                layers,
                ..
            },
        ) => {
            let mut blobs = vec![config];
            blobs.extend(layers.unwrap_or_default());
            (blobs, false)
        }
        (_, _) => {
            return Err(refused(format!(
                "{} without the fields it needs (config and layers, or manifests)",
                manifest.media_type
            )));
        }
    };
    if refs.len() > MAX_BLOBS {
        return Err(refused(format!(
            "references {} objects, more than the {MAX_BLOBS} sarde accepts",
            refs.len()
        )));
    }
    for (i, d) in refs.iter().enumerate() {
        // What is read into memory later (configs, JSON and XML metadata, child
        // manifests) is refused here, before a byte of it is downloaded.
        let limit = if children {
            is_manifest(&d.media_type).then_some(MAX_MANIFEST_SIZE)
        } else {
            // The config, and the layers sarde reads into memory.
            let metadata = i == 0
                || d.media_type == media_types::DOMAIN_XML
                || d.media_type == media_types::VM_CONFIG;
            metadata.then_some(MAX_CONFIG_SIZE)
        };
        if let Some(limit) = limit.filter(|limit| d.size > *limit) {
            return Err(refused(format!(
                "{} ({}) announces {} bytes, more than the {limit} sarde reads into memory for it",
                d.digest, d.media_type, d.size
            )));
        }
        if d.digest.algorithm() != Algorithm::Sha256 {
            return Err(refused(format!(
                "{} uses {}, sarde stores sha256 blobs only",
                d.digest,
                d.digest.algorithm().name()
            )));
        }
    }
    Ok(if children {
        Refs::Index(refs)
    } else {
        Refs::Image(refs)
    })
}

/// Whether a media type names a manifest (as opposed to a blob).
pub(crate) fn is_manifest(media_type: &str) -> bool {
    matches!(
        media_type,
        media_types::IMAGE_MANIFEST
            | media_types::IMAGE_INDEX
            | media_types::DOCKER_MANIFEST
            | media_types::DOCKER_MANIFEST_LIST
    )
}

/// Blobs once each, in first-seen order (an image may name one blob twice, e.g.
/// two all-equal pieces).
pub(crate) fn unique(blobs: impl IntoIterator<Item = Descriptor>) -> Vec<Descriptor> {
    let mut seen = std::collections::HashSet::new();
    blobs
        .into_iter()
        .filter(|d| seen.insert(d.digest.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sarde_api::Digest;

    fn raw(media_type: &str, json: &str) -> RawManifest {
        RawManifest {
            media_type: media_type.into(),
            digest: Digest::sha256_of(json.as_bytes()),
            bytes: json.as_bytes().to_vec(),
        }
    }

    #[test]
    fn image_blobs_are_config_then_layers() {
        let c = Digest::sha256_of(b"c");
        let l = Digest::sha256_of(b"l");
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{c}","size":1}},"layers":[{{"mediaType":"y","digest":"{l}","size":1}}]}}"#
        );
        let Refs::Image(blobs) = references("i", &raw(media_types::IMAGE_MANIFEST, &json)).unwrap()
        else {
            panic!("an image")
        };
        assert_eq!(blobs.len(), 2);
        assert_eq!(blobs[0].digest, c);
        assert_eq!(blobs[1].digest, l);
    }

    #[test]
    fn hostile_shapes_are_refused_with_the_image_named() {
        for (media_type, json) in [
            (media_types::IMAGE_MANIFEST, "[]"),
            (media_types::IMAGE_MANIFEST, r#"{"schemaVersion":2}"#),
            (media_types::IMAGE_INDEX, r#"{"schemaVersion":2}"#),
            (
                media_types::IMAGE_MANIFEST,
                r#"{"config":{"mediaType":"x","digest":"sha512:00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000","size":1}}"#,
            ),
        ] {
            let e = references("reg/img:1", &raw(media_type, json))
                .err()
                .unwrap()
                .to_string();
            assert!(e.starts_with("reg/img:1: manifest sha256:"), "{e}");
        }
    }

    #[test]
    fn unique_keeps_first_order() {
        let a = Descriptor::of("x", b"a");
        let b = Descriptor::of("x", b"b");
        let out = unique([a.clone(), b.clone(), a.clone()]);
        assert_eq!(out, vec![a, b]);
    }
}
