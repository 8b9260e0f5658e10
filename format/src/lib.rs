//! # sarde-format
//!
//! What the layers of a sardinecake image mean, in both formats:
//!
//! - [`native`]: every file of every backing chain is cut into fixed-size pieces of
//!   uncompressed data, each compressed alone and stored as one layer annotated with
//!   its file, offset, size and uncompressed sha256; all-zero pieces are not stored.
//!   Pieces decompress in parallel, straight to their offsets. See `docs/format.md`.
//! - [`v1`]: the Python tool's format: each file one gzip stream cut into pieces.
//!
//! This crate only turns descriptions into manifests and configs and back, and checks
//! that what an image claims is safe and consistent before anything touches the disk.
//! Moving bytes is the job of the disk, transport and engine crates.

pub mod native;
pub mod v1;

use sarde_api::digest::Digest;
use sarde_api::oci::{Descriptor, ImageConfig, ImageManifest, media_types};
use thiserror::Error;

/// What a file in an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileRole {
    /// A disk image file (any file of a backing chain).
    Disk,
    /// UEFI variable store.
    Nvram,
}

impl FileRole {
    pub fn as_str(self) -> &'static str {
        match self {
            FileRole::Disk => "disk",
            FileRole::Nvram => "nvram",
        }
    }
}

/// Why an image cannot be read (or written) safely.
#[derive(Debug, Error)]
pub enum FormatError {
    #[error("the image has no domain XML layer ({media})", media = media_types::DOMAIN_XML)]
    NoDomainXml,
    #[error("the image has {count} domain XML layers; expected one")]
    SeveralDomainXml { count: usize },
    #[error("unsafe file name {name:?} in the image: {reason}")]
    UnsafeName { name: String, reason: &'static str },
    #[error("layer {digest}: {message}")]
    BadLayer { digest: Digest, message: String },
    #[error("file {name:?}: {message}")]
    BadFile { name: String, message: String },
    #[error("unsupported config media type {0:?}: expected {exp}", exp = media_types::IMAGE_CONFIG)]
    ConfigMediaType(String),
    #[error("the image config is not valid JSON: {0}")]
    Config(String),
    #[error("layer {digest} has media type {media_type:?}, which this image format does not know")]
    UnknownLayer { digest: Digest, media_type: String },
}

/// Checks a file name that an image asks us to create: a plain base name only.
pub fn check_file_name(name: &str) -> Result<(), FormatError> {
    let fail = |reason| {
        Err(FormatError::UnsafeName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > 200 {
        return fail("it is longer than 200 bytes");
    }
    if name.contains('/') || name.contains('\\') {
        return fail("it contains a path separator");
    }
    if name.contains('\0') {
        return fail("it contains a NUL byte");
    }
    if name.contains(':') {
        // qemu reads `proto:…` backing references as network URLs (nbd:, http:…).
        return fail("it contains ':', which qemu would read as a network protocol");
    }
    if name == "." || name == ".." {
        return fail("it names a directory");
    }
    if name.starts_with('.') {
        return fail("it starts with a dot (hidden files and staging names are reserved)");
    }
    if name.chars().any(char::is_control) {
        return fail("it contains control characters");
    }
    Ok(())
}

/// Which format an image is in, from its layers' media types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Native,
    V1,
}

impl Format {
    /// Detects the format. Images without disk layers count as native.
    pub fn detect(manifest: &ImageManifest) -> Format {
        if manifest
            .layers
            .iter()
            .any(|l| v1::is_disk_layer(&l.media_type))
        {
            Format::V1
        } else {
            Format::Native
        }
    }
}

/// Parses a config blob tolerantly (the Python tool wrote float history times) and
/// checks its media type first, so a foreign image gets a clear message.
pub fn parse_config(manifest: &ImageManifest, bytes: &[u8]) -> Result<ImageConfig, FormatError> {
    if manifest.config.media_type != media_types::IMAGE_CONFIG {
        return Err(FormatError::ConfigMediaType(
            manifest.config.media_type.clone(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| FormatError::Config(e.to_string()))
}

/// The layers every format shares: domain XML and the optional access JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonLayers {
    pub domain_xml: Descriptor,
    pub vm_config: Option<Descriptor>,
}

fn common_layers(manifest: &ImageManifest) -> Result<CommonLayers, FormatError> {
    let xml: Vec<&Descriptor> = manifest
        .layers
        .iter()
        .filter(|l| l.media_type == media_types::DOMAIN_XML)
        .collect();
    let domain_xml = match xml.as_slice() {
        [] => return Err(FormatError::NoDomainXml),
        [one] => (*one).clone(),
        more => return Err(FormatError::SeveralDomainXml { count: more.len() }),
    };
    let vm_config = manifest
        .layers
        .iter()
        .find(|l| l.media_type == media_types::VM_CONFIG)
        .cloned();
    Ok(CommonLayers {
        domain_xml,
        vm_config,
    })
}

/// RFC 3339 (UTC, seconds) for a unix time, as OCI wants `created` values.
pub fn rfc3339(unix_seconds: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_from_images_are_plain_base_names() {
        for ok in ["disk.qcow2", "base-1.qcow2", "VM_VARS.fd", "a b.img"] {
            check_file_name(ok).unwrap();
        }
        for bad in [
            "",
            "../etc/passwd",
            "a/b",
            "..",
            ".",
            ".hidden",
            "nul\0byte",
            "back\\slash",
            "nbd:10.0.0.5:10809",
            "new\nline",
            &"x".repeat(201),
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_714_557_600), "2024-05-01T10:00:00Z");
    }
}
