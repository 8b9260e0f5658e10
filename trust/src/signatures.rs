//! Reading and writing the signatures of an image through any transport: the
//! tag schema (`sha256-<hex>.sig`, which every transport serves) and the OCI
//! referrers API where the transport has one.

use sarde_api::oci::Descriptor;
use sarde_api::transport::{BlobReader, RawManifest};
use sarde_api::{Digest, Transport, TransportError};
use tokio::io::AsyncReadExt;

use crate::TrustError;
use crate::cosign::{
    MAX_PAYLOAD_BYTES, MAX_PAYLOAD_TOTAL, MAX_SIGNATURES, SIGNATURE_ARTIFACT_TYPE, Signature,
    SignatureDescriptor, SignatureImage, SignatureManifest, signature_tag,
};

/// A signature as found, or why one layer could not be read as one (kept
/// for the message when no signature is accepted).
pub type Found = Result<Signature, String>;

/// Every signature of `manifest` in `repository`. A transport error other than
/// "no such manifest" is returned: a signature that cannot be read is not the
/// same as no signature, and the caller fails closed either way.
pub async fn find(
    transport: &dyn Transport,
    repository: &str,
    manifest: &Digest,
) -> Result<Vec<Found>, TrustError> {
    let mut manifests = Vec::new();
    if let Some(m) = signature_manifest(transport, repository, manifest).await? {
        manifests.push(m);
    }
    let listed = match transport
        .list_referrers(repository, manifest, Some(SIGNATURE_ARTIFACT_TYPE))
        .await
    {
        Ok(listed) => listed,
        // Signatures found under the tag are checked anyway; with none, a
        // referrers list that cannot be read fails the check (fail closed).
        Err(e) if !manifests.is_empty() => {
            tracing::warn!(
                "{repository}@{manifest}: the referrers API failed ({e}); using the signatures under the tag"
            );
            None
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(referrers) = listed {
        for referrer in referrers.iter().take(64) {
            match transport
                .get_manifest(repository, &referrer.digest.to_string())
                .await
            {
                Ok(raw) => manifests.push(raw),
                Err(TransportError::ManifestUnknown { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let mut found = Vec::new();
    let mut payload_bytes = 0u64;
    for raw in manifests {
        let parsed = match SignatureManifest::parse(&raw.bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                found.push(Err(format!("signature manifest {}: {e}", raw.digest)));
                continue;
            }
        };
        for (layer, signature) in parsed.signature_layers() {
            payload_bytes = payload_bytes.saturating_add(layer.size);
            if found.len() >= MAX_SIGNATURES || payload_bytes > MAX_PAYLOAD_TOTAL {
                found.push(Err(format!(
                    "more than {MAX_SIGNATURES} signatures or {MAX_PAYLOAD_TOTAL} payload bytes: the rest is not read"
                )));
                return Ok(found);
            }
            let payload = read_payload(transport, repository, &layer.digest, layer.size).await;
            found.push(payload.map(|payload| Signature {
                payload,
                signature: signature.to_string(),
            }));
        }
    }
    Ok(found)
}

/// The tag-schema signature manifest of `manifest`, if there is one.
pub async fn signature_manifest(
    transport: &dyn Transport,
    repository: &str,
    manifest: &Digest,
) -> Result<Option<RawManifest>, TrustError> {
    match transport
        .get_manifest(repository, &signature_tag(manifest))
        .await
    {
        Ok(raw) => Ok(Some(raw)),
        Err(TransportError::ManifestUnknown { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A payload blob, read whole (it is small, and bounded) and checked against
/// its digest.
async fn read_payload(
    transport: &dyn Transport,
    repository: &str,
    digest: &Digest,
    size: u64,
) -> Result<Vec<u8>, String> {
    if size > MAX_PAYLOAD_BYTES {
        return Err(format!(
            "payload {digest} claims {size} bytes, more than {MAX_PAYLOAD_BYTES}"
        ));
    }
    let descriptor = Descriptor::new(
        crate::cosign::SIMPLE_SIGNING_MEDIA_TYPE,
        digest.clone(),
        size,
    );
    let reader = transport
        .get_blob(repository, &descriptor, 0)
        .await
        .map_err(|e| format!("payload {digest}: {e}"))?;
    let mut bytes = Vec::with_capacity(size as usize);
    reader
        .take(size + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("payload {digest}: {e}"))?;
    if bytes.len() as u64 != size || Digest::sha256_of(&bytes) != *digest {
        return Err(format!(
            "payload {digest}: the bytes read ({} of them) are not the payload the manifest names",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Writes the signature manifest `signatures` make for `manifest` into
/// `repository`: blobs first, then the manifest under the signature tag.
pub async fn write(
    transport: &dyn Transport,
    repository: &str,
    manifest: &Digest,
    signatures: &[Signature],
) -> Result<Digest, TrustError> {
    write_image(
        transport,
        repository,
        manifest,
        SignatureImage::build(signatures),
    )
    .await
}

/// Writes a signature image under the signature tag of `manifest`.
pub async fn write_image(
    transport: &dyn Transport,
    repository: &str,
    manifest: &Digest,
    image: SignatureImage,
) -> Result<Digest, TrustError> {
    put(transport, repository, &signature_tag(manifest), image).await
}

/// Writes `signatures` as a referrer of `subject` (stored by digest), for a
/// registry that offers the referrers API.
pub async fn write_referrer(
    transport: &dyn Transport,
    repository: &str,
    subject: SignatureDescriptor,
    signatures: &[Signature],
) -> Result<Digest, TrustError> {
    let image = SignatureImage::referrer(signatures, subject);
    let digest = Digest::sha256_of(&image.manifest);
    put(transport, repository, &digest.to_string(), image).await
}

async fn put(
    transport: &dyn Transport,
    repository: &str,
    reference: &str,
    image: SignatureImage,
) -> Result<Digest, TrustError> {
    for (descriptor, bytes) in &image.blobs {
        let blob = Descriptor::new(
            descriptor.media_type.clone(),
            descriptor.digest.clone(),
            descriptor.size,
        );
        if transport.blob_exists(repository, &blob).await? {
            continue;
        }
        let reader: BlobReader = Box::pin(std::io::Cursor::new(bytes.clone()));
        transport.put_blob(repository, &blob, reader).await?;
    }
    let raw = RawManifest {
        media_type: sarde_api::oci::media_types::IMAGE_MANIFEST.to_string(),
        digest: Digest::sha256_of(&image.manifest),
        bytes: image.manifest,
    };
    transport.put_manifest(repository, reference, &raw).await?;
    Ok(raw.digest)
}
