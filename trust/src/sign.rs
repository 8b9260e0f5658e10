//! Signing an image where it is stored, as `cosign sign --key` and
//! `skopeo copy --sign-by-sigstore-private-key` do.

use sarde_api::{Digest, Transport};

use crate::TrustError;
use crate::cosign::{
    SIGNATURE_ARTIFACT_TYPE, Signature, SignatureDescriptor, SignatureImage, SignatureManifest,
    SimpleSigning,
};
use crate::keys::PrivateKey;
use crate::signatures;

/// What a signing did.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The signature manifest's digest.
    pub signature_manifest: Digest,
    /// The name the signature claims.
    pub identity: String,
    /// How many signatures the image has now.
    pub signatures: usize,
}

/// Signs `manifest` in `repository` for `identity` (the name a policy checks:
/// the pushed reference, with its tag, as skopeo signs) and stores the
/// signature beside the image's others.
pub async fn sign(
    transport: &dyn Transport,
    repository: &str,
    manifest: &Digest,
    identity: &str,
    key: &PrivateKey,
) -> Result<Signed, TrustError> {
    // Signing writes here: the signatures it appends to are read where it
    // writes too (never a mirror's stale copy), with one token for both.
    transport.will_access(repository, sarde_api::transport::Access::Push);
    let payload = SimpleSigning::new(identity, manifest).to_bytes();
    let public = key.public_key()?;
    // The signatures there are kept as they are, annotations (certificates,
    // bundles) and all: the new one is appended, as cosign appends.
    let existing = match signatures::signature_manifest(transport, repository, manifest).await? {
        Some(raw) => Some((raw.digest, SignatureManifest::parse(&raw.bytes)?)),
        None => None,
    };
    let payload_digest = Digest::sha256_of(&payload);
    if let Some((digest, m)) = &existing {
        // Signing again with the same key and claim adds nothing.
        let already = m.signature_layers().any(|(layer, signature)| {
            layer.digest == payload_digest && public.verifies(&payload, signature)
        });
        if already {
            tracing::debug!("{repository}@{manifest}: already signed by this key for {identity}");
            return Ok(Signed {
                signature_manifest: digest.clone(),
                identity: identity.to_string(),
                signatures: m.signature_layers().count(),
            });
        }
    }
    let signature = key.sign(&payload)?;
    let new = Signature { payload, signature };
    let mut layers = existing.map(|(_, m)| m.layers).unwrap_or_default();
    layers.push(new.layer());
    let count = layers.len();
    let image = SignatureImage::from_layers(layers, std::slice::from_ref(&new));
    let signature_manifest =
        signatures::write_image(transport, repository, manifest, image).await?;
    // Where the registry offers the referrers API, a referrer too (cosign's
    // OCI 1.1 mode), so clients that only look there find it.
    let offers_referrers = match transport
        .list_referrers(repository, manifest, Some(SIGNATURE_ARTIFACT_TYPE))
        .await
    {
        Ok(listed) => listed.is_some(),
        Err(e) => {
            tracing::warn!(
                "{repository}@{manifest}: signed under the tag; the referrers API failed ({e}), so no referrer was written"
            );
            false
        }
    };
    if offers_referrers {
        let signed = transport
            .get_manifest(repository, &manifest.to_string())
            .await?;
        let subject = SignatureDescriptor {
            media_type: signed.media_type.clone(),
            size: signed.bytes.len() as u64,
            digest: signed.digest.clone(),
            annotations: Default::default(),
        };
        let referrer = signatures::write_referrer(transport, repository, subject, &[new]).await?;
        tracing::info!("{repository}@{manifest}: signature also stored as referrer {referrer}");
    }
    Ok(Signed {
        signature_manifest,
        identity: identity.to_string(),
        signatures: count,
    })
}
