//! The native format: disks as independently compressed fixed-size pieces.
//!
//! Layers, in order: the domain XML, the optional access JSON, the pieces of the NVRAM
//! file (if any), then the pieces of every disk file, each backing chain from its base
//! to its top. Each piece layer is annotated with its file (name, total size, format,
//! backing file, role), its offset and uncompressed size, and the sha256 of its
//! uncompressed content; pieces that are all zero are not stored and come back as
//! holes. Every file keeps at least one stored piece so its metadata travels.

use std::collections::{BTreeMap, BTreeSet};

use sarde_api::digest::Digest;
use sarde_api::oci::{Descriptor, History, ImageConfig, ImageManifest, RootFs, media_types};

use crate::{CommonLayers, FileRole, FormatError, check_file_name, common_layers};

/// Media type (without codec suffix) of a disk piece.
pub const DISK_PIECE: &str = "application/vnd.sardinecake.disk.piece.v1";
/// Media type (without codec suffix) of an NVRAM piece.
pub const NVRAM_PIECE: &str = "application/vnd.sardinecake.nvram.piece.v1";
/// The largest piece an image may announce: bounds memory and bomb exposure.
pub const MAX_PIECE_SIZE: u64 = 4 << 30;

/// Annotation keys on piece layers.
pub mod annotations {
    pub const FILE_NAME: &str = "org.sardinecake.file.name";
    pub const FILE_SIZE: &str = "org.sardinecake.file.size";
    pub const FILE_FORMAT: &str = "org.sardinecake.file.format";
    pub const FILE_BACKING: &str = "org.sardinecake.file.backing";
    pub const FILE_ROLE: &str = "org.sardinecake.file.role";
    pub const PIECE_OFFSET: &str = "org.sardinecake.piece.offset";
    pub const PIECE_SIZE: &str = "org.sardinecake.piece.size";
    pub const PIECE_DIGEST: &str = "org.sardinecake.piece.digest";
}

/// One file of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Base name inside the image and in the VM's directory after import.
    pub name: String,
    pub role: FileRole,
    /// `qcow2`, `raw`…, as qemu-img names it.
    pub format: String,
    /// Length of the file in bytes.
    pub size: u64,
    /// Name (in this image) of the file this one is an overlay of.
    pub backing: Option<String>,
}

/// One stored piece.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Piece {
    pub offset: u64,
    /// Uncompressed length.
    pub size: u64,
    /// sha256 of the uncompressed bytes.
    pub digest: Digest,
    /// The compressed blob.
    pub blob: Digest,
    pub blob_size: u64,
    /// The codec's media-type suffix (`+zstd`), `None` when stored uncompressed.
    pub suffix: Option<String>,
}

/// A file and its stored pieces, ordered by offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeFile {
    pub spec: FileSpec,
    pub pieces: Vec<Piece>,
}

/// Image-level facts for the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    /// Go architecture name (`amd64`).
    pub architecture: String,
    /// Go OS name (`linux`, `windows`).
    pub os: String,
    /// RFC 3339 creation time. Derive it from the content (e.g. the newest file
    /// mtime) so the same VM exports to the same config digest.
    pub created: String,
}

/// A built image: the config blob and the manifest that references it.
#[derive(Debug, Clone)]
pub struct Built {
    pub config: Vec<u8>,
    pub config_descriptor: Descriptor,
    pub manifest: ImageManifest,
    pub manifest_bytes: Vec<u8>,
}

fn piece_descriptor(spec: &FileSpec, piece: &Piece) -> Descriptor {
    let base = match spec.role {
        FileRole::Disk => DISK_PIECE,
        FileRole::Nvram => NVRAM_PIECE,
    };
    let media = format!("{base}{}", piece.suffix.as_deref().unwrap_or(""));
    let mut d = Descriptor::new(media, piece.blob.clone(), piece.blob_size);
    let a = &mut d.annotations;
    a.insert(annotations::FILE_NAME.into(), spec.name.clone());
    a.insert(annotations::FILE_SIZE.into(), spec.size.to_string());
    a.insert(annotations::FILE_FORMAT.into(), spec.format.clone());
    a.insert(annotations::FILE_ROLE.into(), spec.role.as_str().into());
    if let Some(backing) = &spec.backing {
        a.insert(annotations::FILE_BACKING.into(), backing.clone());
    }
    a.insert(annotations::PIECE_OFFSET.into(), piece.offset.to_string());
    a.insert(annotations::PIECE_SIZE.into(), piece.size.to_string());
    a.insert(annotations::PIECE_DIGEST.into(), piece.digest.to_string());
    d
}

/// Builds config and manifest. `files` in layer order (NVRAM first, then each chain
/// base to top); each file needs at least one stored piece.
pub fn build(
    meta: &ImageMeta,
    domain_xml: &Descriptor,
    vm_config: Option<&Descriptor>,
    files: &[NativeFile],
) -> Result<Built, FormatError> {
    let mut layers = vec![domain_xml.clone()];
    let mut diff_ids = vec![domain_xml.digest.clone()];
    let mut history = vec![history_entry(meta, "sarde export: domain XML")];
    if let Some(json) = vm_config {
        layers.push(json.clone());
        diff_ids.push(json.digest.clone());
        history.push(history_entry(meta, "sarde export: access configuration"));
    }
    let mut ordered: Vec<&NativeFile> = files
        .iter()
        .filter(|f| f.spec.role == FileRole::Nvram)
        .collect();
    ordered.extend(files.iter().filter(|f| f.spec.role == FileRole::Disk));
    for file in ordered {
        check_file_name(&file.spec.name)?;
        if file.pieces.is_empty() {
            return Err(FormatError::BadFile {
                name: file.spec.name.clone(),
                message: "has no stored piece; store at least the first one".into(),
            });
        }
        let count = file.pieces.len();
        for (i, piece) in file.pieces.iter().enumerate() {
            layers.push(piece_descriptor(&file.spec, piece));
            diff_ids.push(piece.digest.clone());
            history.push(history_entry(
                meta,
                &format!(
                    "sarde export: {} piece {}/{count} at offset {}",
                    file.spec.name,
                    i + 1,
                    piece.offset
                ),
            ));
        }
    }
    Ok(assemble(meta, layers, diff_ids, history, true))
}

/// The config blob and the manifest over `layers`, shared by both formats. The v1
/// layout has no manifest annotations, as the Python tool wrote none.
pub(crate) fn assemble(
    meta: &ImageMeta,
    layers: Vec<Descriptor>,
    diff_ids: Vec<Digest>,
    history: Vec<History>,
    annotate_created: bool,
) -> Built {
    let config = ImageConfig {
        created: Some(meta.created.clone()),
        author: None,
        architecture: meta.architecture.clone(),
        os: meta.os.clone(),
        config: None,
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids,
        },
        history,
    };
    let config_bytes = serde_json::to_vec(&config).expect("config serialises");
    let config_descriptor = Descriptor::of(media_types::IMAGE_CONFIG, &config_bytes);
    let mut manifest = ImageManifest::new(config_descriptor.clone(), layers);
    if annotate_created {
        manifest
            .annotations
            .insert(media_types::ANNOTATION_CREATED.into(), meta.created.clone());
    }
    let manifest_bytes = manifest.to_bytes();
    Built {
        config: config_bytes,
        config_descriptor,
        manifest,
        manifest_bytes,
    }
}

pub(crate) fn history_entry(meta: &ImageMeta, created_by: &str) -> History {
    History {
        created: Some(serde_json::Value::String(meta.created.clone())),
        created_by: Some(created_by.to_string()),
        author: None,
        comment: None,
        empty_layer: None,
    }
}

/// A native image as read from its manifest, checked for consistency and safety.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeImage {
    pub common: CommonLayers,
    /// Files in layer order (so every backing file precedes its overlays).
    pub files: Vec<NativeFile>,
}

impl NativeImage {
    pub fn file(&self, name: &str) -> Option<&NativeFile> {
        self.files.iter().find(|f| f.spec.name == name)
    }

    /// Sum of the uncompressed sizes of all files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.spec.size).sum()
    }
}

/// Whether a media type is a native piece; returns its role and codec suffix.
pub fn piece_kind(media_type: &str) -> Option<(FileRole, Option<String>)> {
    // An uncompressed piece has no `+suffix`; `split` then returns the whole type.
    let (base, suffix, _) = media_types::split(media_type);
    [(DISK_PIECE, FileRole::Disk), (NVRAM_PIECE, FileRole::Nvram)]
        .into_iter()
        .find(|(known, _)| base == *known)
        .map(|(_, role)| (role, suffix.map(str::to_string)))
}

fn annotation<'a>(layer: &'a Descriptor, key: &str) -> Result<&'a str, FormatError> {
    layer.annotation(key).ok_or_else(|| FormatError::BadLayer {
        digest: layer.digest.clone(),
        message: format!("annotation {key} is missing"),
    })
}

fn number(layer: &Descriptor, key: &str) -> Result<u64, FormatError> {
    let text = annotation(layer, key)?;
    text.parse().map_err(|_| FormatError::BadLayer {
        digest: layer.digest.clone(),
        message: format!("annotation {key} = {text:?} is not a number"),
    })
}

/// Reads and checks a native image's manifest.
pub fn parse(manifest: &ImageManifest) -> Result<NativeImage, FormatError> {
    let common = common_layers(manifest)?;
    let mut files: Vec<NativeFile> = Vec::new();
    for layer in &manifest.layers {
        if layer.media_type == media_types::DOMAIN_XML || layer.media_type == media_types::VM_CONFIG
        {
            continue;
        }
        let Some((role, suffix)) = piece_kind(&layer.media_type) else {
            return Err(FormatError::UnknownLayer {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        };
        let name = annotation(layer, annotations::FILE_NAME)?.to_string();
        check_file_name(&name)?;
        let format = annotation(layer, annotations::FILE_FORMAT)?.to_string();
        if format.is_empty() || !format.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(FormatError::BadFile {
                name,
                message: format!("format {format:?} is not a qemu-img format name"),
            });
        }
        let backing = layer
            .annotation(annotations::FILE_BACKING)
            .map(str::to_string);
        if let Some(b) = &backing {
            check_file_name(b)?;
        }
        let announced_role = annotation(layer, annotations::FILE_ROLE)?;
        if announced_role != role.as_str() {
            return Err(FormatError::BadLayer {
                digest: layer.digest.clone(),
                message: format!(
                    "role {announced_role:?} does not match media type {}",
                    layer.media_type
                ),
            });
        }
        let spec = FileSpec {
            name: name.clone(),
            role,
            format,
            size: number(layer, annotations::FILE_SIZE)?,
            backing,
        };
        let digest: Digest = annotation(layer, annotations::PIECE_DIGEST)?
            .parse()
            .map_err(|e: sarde_api::digest::DigestError| FormatError::BadLayer {
                digest: layer.digest.clone(),
                message: e.to_string(),
            })?;
        let piece = Piece {
            offset: number(layer, annotations::PIECE_OFFSET)?,
            size: number(layer, annotations::PIECE_SIZE)?,
            digest,
            blob: layer.digest.clone(),
            blob_size: layer.size,
            suffix,
        };
        if piece.size == 0 || piece.size > MAX_PIECE_SIZE {
            return Err(FormatError::BadLayer {
                digest: layer.digest.clone(),
                message: format!("piece size {} is outside 1..={MAX_PIECE_SIZE}", piece.size),
            });
        }
        match files.iter_mut().find(|f| f.spec.name == name) {
            Some(file) => {
                if file.spec != spec {
                    return Err(FormatError::BadFile {
                        name,
                        message: "its pieces disagree about size, format, role or backing file"
                            .into(),
                    });
                }
                file.pieces.push(piece);
            }
            None => files.push(NativeFile {
                spec,
                pieces: vec![piece],
            }),
        }
    }
    for file in &mut files {
        check_pieces(file)?;
    }
    check_backing(&files)?;
    Ok(NativeImage { common, files })
}

/// Pieces must lie inside the file and not overlap.
fn check_pieces(file: &mut NativeFile) -> Result<(), FormatError> {
    file.pieces.sort_by_key(|p| p.offset);
    let mut end = 0u64;
    for p in &file.pieces {
        let bad = |message: String| FormatError::BadFile {
            name: file.spec.name.clone(),
            message,
        };
        let piece_end = p
            .offset
            .checked_add(p.size)
            .ok_or_else(|| bad(format!("piece at {} overflows", p.offset)))?;
        if p.offset < end {
            return Err(bad(format!(
                "piece at offset {} overlaps the previous one",
                p.offset
            )));
        }
        if piece_end > file.spec.size {
            return Err(bad(format!(
                "piece at offset {} ends at {piece_end}, beyond the file size {}",
                p.offset, file.spec.size
            )));
        }
        end = piece_end;
    }
    Ok(())
}

/// Backing files must be in the image, precede their overlays and form no loop.
fn check_backing(files: &[NativeFile]) -> Result<(), FormatError> {
    let mut seen = BTreeSet::new();
    let roles: BTreeMap<&str, FileRole> = files
        .iter()
        .map(|f| (f.spec.name.as_str(), f.spec.role))
        .collect();
    for file in files {
        if let Some(backing) = &file.spec.backing {
            if !roles.contains_key(backing.as_str()) {
                return Err(FormatError::BadFile {
                    name: file.spec.name.clone(),
                    message: format!("its backing file {backing:?} is not in the image"),
                });
            }
            if !seen.contains(backing.as_str()) {
                return Err(FormatError::BadFile {
                    name: file.spec.name.clone(),
                    message: format!(
                        "its backing file {backing:?} comes after it (or it backs itself)"
                    ),
                });
            }
        }
        seen.insert(file.spec.name.as_str());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    fn piece(offset: u64, size: u64, n: u8) -> Piece {
        Piece {
            offset,
            size,
            digest: digest(n),
            blob: digest(n + 100),
            blob_size: 10,
            suffix: Some("+zstd".into()),
        }
    }

    fn sample() -> (ImageMeta, Descriptor, Vec<NativeFile>) {
        let meta = ImageMeta {
            architecture: "amd64".into(),
            os: "linux".into(),
            created: "2024-05-01T10:00:00Z".into(),
        };
        let xml = Descriptor::of(media_types::DOMAIN_XML, b"<domain/>");
        let files = vec![
            NativeFile {
                spec: FileSpec {
                    name: "base.qcow2".into(),
                    role: FileRole::Disk,
                    format: "qcow2".into(),
                    size: 3000,
                    backing: None,
                },
                pieces: vec![piece(0, 1000, 1), piece(2000, 1000, 2)],
            },
            NativeFile {
                spec: FileSpec {
                    name: "top.qcow2".into(),
                    role: FileRole::Disk,
                    format: "qcow2".into(),
                    size: 500,
                    backing: Some("base.qcow2".into()),
                },
                pieces: vec![piece(0, 500, 3)],
            },
            NativeFile {
                spec: FileSpec {
                    name: "vm_VARS.fd".into(),
                    role: FileRole::Nvram,
                    format: "raw".into(),
                    size: 100,
                    backing: None,
                },
                pieces: vec![piece(0, 100, 4)],
            },
        ];
        (meta, xml, files)
    }

    #[test]
    fn build_then_parse_round_trips_with_nvram_first() {
        let (meta, xml, files) = sample();
        let json = Descriptor::of(media_types::VM_CONFIG, b"{}");
        let built = build(&meta, &xml, Some(&json), &files).unwrap();
        let layers = &built.manifest.layers;
        assert_eq!(layers[0].media_type, media_types::DOMAIN_XML);
        assert_eq!(layers[1].media_type, media_types::VM_CONFIG);
        assert_eq!(
            layers[2].media_type,
            "application/vnd.sardinecake.nvram.piece.v1+zstd"
        );
        assert_eq!(
            layers[3].media_type,
            "application/vnd.sardinecake.disk.piece.v1+zstd"
        );
        let config: ImageConfig = serde_json::from_slice(&built.config).unwrap();
        assert_eq!(config.rootfs.diff_ids.len(), layers.len());
        assert_eq!(config.history.len(), layers.len());
        assert_eq!(config.rootfs.diff_ids[3], digest(1));

        let parsed = parse(&built.manifest).unwrap();
        assert_eq!(parsed.common.domain_xml, xml);
        assert_eq!(parsed.common.vm_config, Some(json));
        assert_eq!(parsed.files[0].spec.name, "vm_VARS.fd");
        assert_eq!(parsed.file("base.qcow2").unwrap(), &files[0]);
        assert_eq!(parsed.file("top.qcow2").unwrap(), &files[1]);
        assert_eq!(parsed.total_size(), 3600);

        // Deterministic: the same description gives the same bytes.
        let again = build(&meta, &xml, Some(&layers[1]), &files).unwrap();
        assert_eq!(again.manifest_bytes, built.manifest_bytes);
        assert_eq!(again.config, built.config);
    }

    fn tamper(f: impl FnOnce(&mut ImageManifest)) -> FormatError {
        let (meta, xml, files) = sample();
        let mut manifest = build(&meta, &xml, None, &files).unwrap().manifest;
        f(&mut manifest);
        parse(&manifest).unwrap_err()
    }

    #[test]
    fn hostile_or_inconsistent_manifests_are_refused() {
        use annotations::*;
        let set = |i: usize, k: &'static str, v: &'static str| {
            move |m: &mut ImageManifest| {
                m.layers[i].annotations.insert(k.into(), v.into());
            }
        };
        type Tamper = Box<dyn FnOnce(&mut ImageManifest)>;
        let cases: Vec<(Tamper, &str)> = vec![
            (
                Box::new(set(2, FILE_NAME, "../../etc/shadow")),
                "path separator",
            ),
            (Box::new(set(2, FILE_NAME, ".staging")), "starts with a dot"),
            (
                Box::new(set(3, PIECE_OFFSET, "2500")),
                "beyond the file size",
            ),
            (Box::new(set(3, PIECE_OFFSET, "500")), "overlaps"),
            (Box::new(set(2, PIECE_SIZE, "0")), "outside"),
            (Box::new(set(2, PIECE_SIZE, "99999999999")), "outside"),
            (Box::new(set(2, PIECE_OFFSET, "x")), "not a number"),
            (Box::new(set(2, FILE_SIZE, "1")), "disagree"),
            (
                Box::new(set(4, FILE_BACKING, "missing.qcow2")),
                "not in the image",
            ),
            (
                Box::new(set(4, FILE_FORMAT, "qcow2 -o x")),
                "qemu-img format",
            ),
            (Box::new(set(1, FILE_ROLE, "disk")), "does not match"),
            (Box::new(set(2, PIECE_DIGEST, "sha256:abc")), "64 hex"),
            (
                Box::new(|m: &mut ImageManifest| {
                    m.layers[3].annotations.remove(PIECE_DIGEST);
                }),
                "missing",
            ),
            (
                Box::new(|m: &mut ImageManifest| {
                    m.layers[1].media_type = "application/x-unknown".into()
                }),
                "does not know",
            ),
            (
                Box::new(|m: &mut ImageManifest| m.layers.remove(0).media_type.clear()),
                "no domain XML",
            ),
        ];
        for (f, expected) in cases {
            let err = tamper(f).to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn backing_loops_and_forward_references_are_refused() {
        let (meta, xml, mut files) = sample();
        files[0].spec.backing = Some("top.qcow2".into());
        let manifest = build(&meta, &xml, None, &files).unwrap().manifest;
        let err = parse(&manifest).unwrap_err().to_string();
        assert!(err.contains("comes after it"), "{err}");
    }

    #[test]
    fn piece_kinds_are_recognised_with_and_without_codec() {
        assert_eq!(
            piece_kind("application/vnd.sardinecake.disk.piece.v1+zstd"),
            Some((FileRole::Disk, Some("+zstd".into())))
        );
        assert_eq!(
            piece_kind("application/vnd.sardinecake.disk.piece.v1"),
            Some((FileRole::Disk, None))
        );
        assert_eq!(
            piece_kind("application/vnd.sardinecake.nvram.piece.v1+xz"),
            Some((FileRole::Nvram, Some("+xz".into())))
        );
        assert_eq!(piece_kind("application/x-qemu-disk+gzip"), None);
    }
}
