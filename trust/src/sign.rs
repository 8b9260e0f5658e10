//! Signing an image where it is stored, as `cosign sign --key` and
//! `skopeo copy --sign-by-sigstore-private-key` do.

use sarde_api::{Digest, Transport};

use crate::TrustError;
use crate::cosign::{SIGNATURE_ARTIFACT_TYPE, Signature, SignatureDescriptor, SimpleSigning};
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
    let payload = SimpleSigning::new(identity, manifest).to_bytes();
    let public = key.public_key()?;
    let mut existing: Vec<Signature> = signatures::find(transport, repository, manifest)
        .await?
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    // Signing again with the same key and claim adds nothing: keep the one.
    if existing
        .iter()
        .any(|s| s.payload == payload && public.verifies(&s.payload, &s.signature))
    {
        tracing::debug!("{repository}@{manifest}: already signed by this key for {identity}");
        let digest = signatures::signature_manifest(transport, repository, manifest)
            .await?
            .map(|m| m.digest);
        if let Some(signature_manifest) = digest {
            return Ok(Signed {
                signature_manifest,
                identity: identity.to_string(),
                signatures: existing.len(),
            });
        }
    }
    let signature = key.sign(&payload)?;
    let new = Signature { payload, signature };
    existing.push(new.clone());
    let signature_manifest = signatures::write(transport, repository, manifest, &existing).await?;
    // Where the registry offers the referrers API, a referrer too (cosign's
    // OCI 1.1 mode), so clients that only look there find it.
    if transport
        .list_referrers(repository, manifest, Some(SIGNATURE_ARTIFACT_TYPE))
        .await?
        .is_some()
    {
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
        signatures: existing.len(),
    })
}
