//! The Python tool's format ("v1"): each file of a backing chain is ONE gzip stream
//! (FNAME = the file's base name, MTIME = its mtime) cut into pieces of at most
//! `chunksize` bytes. The first piece of a file has media type
//! `application/x-qemu-disk+gzip`, the following ones carry `;chunk=1`, `;chunk=2`…
//! Pieces only decompress concatenated, in order.
//!
//! The Python importer ignored `;chunk=N` and looked for the gzip magic at the start
//! of each piece; sarde groups by `;chunk=N` only, and its writer never starts a
//! continuation piece with the gzip magic, so both importers read what it writes.

use sarde_api::digest::Digest;
use sarde_api::oci::{Descriptor, ImageConfig, ImageManifest, media_types};

use crate::{CommonLayers, FormatError, common_layers};

/// The gzip magic bytes a continuation piece must not start with.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Whether `media_type` is a v1 disk piece (with or without `;chunk=N`).
pub fn is_disk_layer(media_type: &str) -> bool {
    let (base, suffix, _) = media_types::split(media_type);
    base == "application/x-qemu-disk" && suffix == Some("+gzip")
}

fn chunk_index(layer: &Descriptor) -> Result<u64, FormatError> {
    let (_, _, params) = media_types::split(&layer.media_type);
    match params.iter().find(|(k, _)| *k == "chunk") {
        None => Ok(0),
        Some((_, v)) => v.parse().map_err(|_| FormatError::BadLayer {
            digest: layer.digest.clone(),
            message: format!("chunk parameter {v:?} is not a number"),
        }),
    }
}

/// One file of a v1 image: its pieces in order, and the sha256 of its uncompressed
/// content when the config records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1File {
    pub pieces: Vec<Descriptor>,
    pub diff_id: Option<Digest>,
}

impl V1File {
    pub fn compressed_size(&self) -> u64 {
        self.pieces.iter().map(|p| p.size).sum()
    }
}

/// A v1 image as read from its manifest and config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Image {
    pub common: CommonLayers,
    /// Files in layer order (backing files first). Their names come from the gzip
    /// headers, which the importer reads and checks.
    pub files: Vec<V1File>,
}

/// Groups the disk layers into files by `;chunk=N`.
pub fn parse(manifest: &ImageManifest, config: &ImageConfig) -> Result<V1Image, FormatError> {
    let common = common_layers(manifest)?;
    let mut files: Vec<V1File> = Vec::new();
    for layer in &manifest.layers {
        if layer.media_type == media_types::DOMAIN_XML || layer.media_type == media_types::VM_CONFIG
        {
            continue;
        }
        if !is_disk_layer(&layer.media_type) {
            return Err(FormatError::UnknownLayer {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
        let chunk = chunk_index(layer)?;
        if chunk == 0 {
            files.push(V1File {
                pieces: vec![layer.clone()],
                diff_id: None,
            });
            continue;
        }
        let file = files.last_mut().ok_or_else(|| FormatError::BadLayer {
            digest: layer.digest.clone(),
            message: format!("chunk={chunk} continues a file, but no file started before it"),
        })?;
        let expected = file.pieces.len() as u64;
        if chunk != expected {
            return Err(FormatError::BadLayer {
                digest: layer.digest.clone(),
                message: format!("chunk={chunk} where chunk={expected} was expected"),
            });
        }
        file.pieces.push(layer.clone());
    }
    // diff_ids: [domain XML, access JSON?, one per file].
    let fixed = 1 + usize::from(common.vm_config.is_some());
    let ids = &config.rootfs.diff_ids;
    if ids.len() == fixed + files.len() {
        for (file, id) in files.iter_mut().zip(&ids[fixed..]) {
            file.diff_id = Some(id.clone());
        }
    }
    Ok(V1Image { common, files })
}

/// A file as written by sarde's v1 exporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1FileOut {
    pub name: String,
    /// Compressed pieces in order: (blob digest, blob size).
    pub pieces: Vec<(Digest, u64)>,
    /// sha256 of the uncompressed file.
    pub diff_id: Digest,
}

/// Config and manifest of a v1 image, as the Python tool lays them out but with
/// RFC 3339 history times.
pub fn build(
    meta: &crate::native::ImageMeta,
    domain_xml: &Descriptor,
    vm_config: Option<&Descriptor>,
    files: &[V1FileOut],
) -> crate::native::Built {
    let history_entry = |by: String| crate::native::history_entry(meta, &by);
    let mut layers = vec![domain_xml.clone()];
    let mut diff_ids = vec![domain_xml.digest.clone()];
    let mut history = vec![history_entry("sarde export: domain XML".into())];
    if let Some(json) = vm_config {
        layers.push(json.clone());
        diff_ids.push(json.digest.clone());
        history.push(history_entry("sarde export: access configuration".into()));
    }
    for file in files {
        diff_ids.push(file.diff_id.clone());
        history.push(history_entry(format!(
            "gzip -6 -c {} | split (sarde export --image-format v1)",
            file.name
        )));
        for (i, (digest, size)) in file.pieces.iter().enumerate() {
            let media = if i == 0 {
                media_types::V1_DISK_GZIP.to_string()
            } else {
                format!("{};chunk={i}", media_types::V1_DISK_GZIP)
            };
            layers.push(Descriptor::new(media, digest.clone(), *size));
        }
    }
    crate::native::assemble(meta, layers, diff_ids, history, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::native::ImageMeta;

    fn meta() -> ImageMeta {
        ImageMeta {
            architecture: "amd64".into(),
            os: "linux".into(),
            created: "2024-05-01T10:00:00Z".into(),
        }
    }

    fn d(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    #[test]
    fn build_then_parse_groups_pieces_by_chunk_parameter() {
        let xml = Descriptor::of(media_types::DOMAIN_XML, b"<domain/>");
        let json = Descriptor::of(media_types::VM_CONFIG, b"{}");
        let files = vec![
            V1FileOut {
                name: "base.qcow2".into(),
                pieces: vec![(d(1), 10), (d(2), 10), (d(3), 5)],
                diff_id: d(10),
            },
            V1FileOut {
                name: "top.qcow2".into(),
                pieces: vec![(d(4), 7)],
                diff_id: d(11),
            },
        ];
        let built = build(&meta(), &xml, Some(&json), &files);
        let types: Vec<&str> = built
            .manifest
            .layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect();
        assert_eq!(
            types[2..],
            [
                "application/x-qemu-disk+gzip",
                "application/x-qemu-disk+gzip;chunk=1",
                "application/x-qemu-disk+gzip;chunk=2",
                "application/x-qemu-disk+gzip",
            ]
        );
        let config: ImageConfig = serde_json::from_slice(&built.config).unwrap();
        assert!(
            config
                .history
                .iter()
                .all(|h| h.created.as_ref().unwrap().is_string())
        );
        let parsed = parse(&built.manifest, &config).unwrap();
        assert_eq!(parsed.files.len(), 2);
        assert_eq!(parsed.files[0].pieces.len(), 3);
        assert_eq!(parsed.files[0].diff_id, Some(d(10)));
        assert_eq!(parsed.files[1].diff_id, Some(d(11)));
        assert_eq!(parsed.files[0].compressed_size(), 25);
        assert_eq!(crate::Format::detect(&built.manifest), crate::Format::V1);
    }

    #[test]
    fn chunks_out_of_order_or_orphaned_are_refused() {
        let xml = Descriptor::of(media_types::DOMAIN_XML, b"<domain/>");
        let files = vec![V1FileOut {
            name: "a".into(),
            pieces: vec![(d(1), 1), (d(2), 1)],
            diff_id: d(3),
        }];
        let built = build(&meta(), &xml, None, &files);
        let config: ImageConfig = serde_json::from_slice(&built.config).unwrap();
        let mut m = built.manifest.clone();
        m.layers[2].media_type = format!("{};chunk=3", media_types::V1_DISK_GZIP);
        assert!(
            parse(&m, &config)
                .unwrap_err()
                .to_string()
                .contains("chunk=1 was expected")
        );
        let mut m = built.manifest.clone();
        m.layers[1].media_type = format!("{};chunk=1", media_types::V1_DISK_GZIP);
        assert!(
            parse(&m, &config)
                .unwrap_err()
                .to_string()
                .contains("no file started")
        );
        let mut m = built.manifest;
        m.layers[2].media_type = format!("{};chunk=x", media_types::V1_DISK_GZIP);
        assert!(
            parse(&m, &config)
                .unwrap_err()
                .to_string()
                .contains("not a number")
        );
    }

    #[test]
    fn python_tool_float_history_is_tolerated() {
        let manifest_json = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
          "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},
          "layers":[{"mediaType":"application/vnd.libvirt.domain.config+xml","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},
                    {"mediaType":"application/x-qemu-disk+gzip","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0}]}"#;
        let manifest: ImageManifest = serde_json::from_str(manifest_json).unwrap();
        let config_json = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[
          "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
          "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
          "history":[{"created":"2024-05-01T10:00:00Z"},{"created":1714557600.5}]}"#;
        let config = crate::parse_config(&manifest, config_json.as_bytes()).unwrap();
        let parsed = parse(&manifest, &config).unwrap();
        assert_eq!(parsed.files.len(), 1);
        assert!(parsed.files[0].diff_id.is_some());
    }
}
