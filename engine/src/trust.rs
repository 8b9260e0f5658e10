//! Signed images on the way in and out: the policy check of fetch, pull, copy
//! and the executor's prepare (on the manifest, before any blob is used), and
//! the signing of push. The format and the policy rules are `sarde-trust`'s.

use std::sync::Arc;

use sarde_api::transport::{RawManifest, TransportReference};
use sarde_api::{ImageReference, Transport};
use sarde_transfer::{CopyRequest, Destination, SourceImage};
use sarde_trust::{Accepted, Policy, PrivateKey, Subject, TrustError};

use crate::remote::{RemoteError, RemoteReference};
use crate::{Engine, ImageLocation};

/// What this host trusts.
#[derive(Clone, Default)]
pub struct Trust {
    /// The `containers-policy.json(5)` in force; `None` when there is none
    /// (no `--policy`, no `policy` key, no file where podman looks): then
    /// images are taken unchecked, as before policies existed.
    pub policy: Option<Arc<Policy>>,
    /// Refuse an image unless a signature of it was verified (the executor's
    /// `require-signature`), whatever else the policy allows.
    pub require_signature: bool,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("policy", &self.policy.as_ref().map(|p| p.path.clone()))
            .field("require_signature", &self.require_signature)
            .finish()
    }
}

impl Engine {
    /// Checks the policy for the image `source` names, whose manifest was
    /// read from `transport`. `Ok(None)` when no policy is in force.
    async fn check_policy(
        &self,
        source: &RemoteReference,
        transport: &dyn Transport,
        manifest: &RawManifest,
    ) -> Result<Option<Accepted>, RemoteError> {
        let name = source.to_string();
        self.check_target(&name, &source.scheme, &source.target, transport, manifest)
            .await
    }

    /// The attachments a fetch or pull keeps in the cache: the image's
    /// signatures when the policy checks signatures of it (so a later use of
    /// the cached image verifies without the registry); none otherwise, which
    /// saves a request per fetch.
    pub(crate) fn signatures_to_keep(
        &self,
        source: &RemoteReference,
    ) -> Option<Arc<dyn sarde_transfer::Attachments>> {
        let trust = &self.remote.trust;
        let checked = trust.require_signature
            || trust.policy.as_ref().is_some_and(|policy| {
                policy
                    .rules(
                        sarde_trust::policy_transport(&source.scheme),
                        &source.target.policy_scopes,
                    )
                    .requirements
                    .iter()
                    .any(|r| matches!(r, sarde_trust::policy::Requirement::SigstoreSigned(_)))
            });
        checked.then(signatures)
    }

    /// Reads the source's manifest and checks the policy on it: before any
    /// blob of the image is used, and before a VM is defined.
    pub(crate) async fn resolve_trusted(
        &self,
        request: &CopyRequest,
        source: &RemoteReference,
    ) -> Result<(SourceImage, Option<Accepted>), RemoteError> {
        let resolved = request.resolve(&self.remote.transfer).await?;
        let policy = self
            .check_policy(source, request.source.as_ref(), &resolved.manifest)
            .await?;
        Ok((resolved, policy))
    }

    async fn check_target(
        &self,
        name: &str,
        scheme: &str,
        target: &TransportReference,
        transport: &dyn Transport,
        manifest: &RawManifest,
    ) -> Result<Option<Accepted>, RemoteError> {
        let trust = &self.remote.trust;
        let Some(policy) = &trust.policy else {
            if trust.require_signature {
                return Err(TrustError::Refused {
                    image: name.to_string(),
                    rule: "require-signature".to_string(),
                    reason: "signatures are required, but there is no policy to check them \
                             with: give `policy` (a containers-policy.json(5) file with a \
                             sigstoreSigned rule for this image)"
                        .to_string(),
                }
                .into());
            }
            tracing::debug!("{name}: no containers-policy.json: taken without a policy check");
            return Ok(None);
        };
        let accepted = policy
            .check(&Subject {
                transport,
                repository: &target.repository,
                policy_transport: sarde_trust::policy_transport(scheme),
                scopes: &target.policy_scopes,
                identity: target.identity.as_deref(),
                manifest,
                name,
            })
            .await?;
        if trust.require_signature && !accepted.signed() {
            return Err(TrustError::Refused {
                image: name.to_string(),
                rule: format!(
                    "require-signature, with {} {} ({})",
                    policy.path,
                    accepted.scope,
                    accepted.requirements.join(", ")
                ),
                reason: "signatures are required, and the policy takes this image without \
                         checking one: give it a sigstoreSigned rule"
                    .to_string(),
            }
            .into());
        }
        Ok(Some(accepted))
    }

    /// Checks the policy for an image of the cache, with the signatures the
    /// cache kept (a pull that does not go to the registry: `pull-policy =
    /// never`, or the image is present). Returns the manifest checked: the
    /// caller imports that digest, not the tag, which may move meanwhile.
    pub async fn check_cached_policy(
        &self,
        image: &ImageReference,
    ) -> Result<(Option<Accepted>, sarde_api::Digest), RemoteError> {
        let location = ImageLocation::cached(&self.ocidir, image);
        // From the layout itself: an image kept without its disk pieces
        // (keep-blobs = no) has its manifest, which the transport would refuse.
        let layout = sarde_transport_oci_dir::Layout::open(&location.layout)?;
        let entry = layout.resolve(&location.reference)?;
        if self.remote.trust.policy.is_none() && !self.remote.trust.require_signature {
            return Ok((None, entry.digest));
        }
        let manifest = RawManifest {
            bytes: layout.read_blob(&entry)?,
            media_type: entry.media_type.clone(),
            digest: entry.digest.clone(),
        };
        let cache = self.open_cache()?;
        let repository = location
            .cache_repository(&self.ocidir)
            .unwrap_or_else(|| crate::remote::cache_repository(image));
        if sarde_api::Digest::sha256_of(&manifest.bytes) != manifest.digest {
            return Err(RemoteError::Refused(format!(
                "{image}: the cached manifest does not hash to {}",
                manifest.digest
            )));
        }
        let target = TransportReference {
            repository,
            ..TransportReference::from(image)
        };
        // The engine's own cache keeps registry images under their names:
        // the registry's rules apply.
        let accepted = self
            .check_target(
                &image.to_string(),
                sarde_trust::REGISTRY_POLICY_TRANSPORT,
                &target,
                cache.as_ref(),
                &manifest,
            )
            .await?;
        Ok((accepted, manifest.digest))
    }

    /// Signs the image `manifest` at each destination, for the name its
    /// reference gives (with its tag, as skopeo signs).
    pub(crate) async fn sign_destinations(
        &self,
        destinations: &[(Destination, String)],
        manifest: &sarde_api::Digest,
        key: &PrivateKey,
    ) -> Result<Vec<sarde_trust::sign::Signed>, RemoteError> {
        let mut signed = Vec::new();
        for (destination, identity) in destinations {
            let done = sarde_trust::sign::sign(
                destination.transport.as_ref(),
                &destination.repository,
                manifest,
                identity,
                key,
            )
            .await?;
            tracing::info!(
                "{}: signed {manifest} for {} ({} signature(s) now)",
                destination.name,
                done.identity,
                done.signatures
            );
            signed.push(done);
        }
        Ok(signed)
    }
}

/// Signatures as attachments of the copy engine: cosign's tag, and the
/// destination's signatures kept beside the source's.
struct CosignSignatures;

impl sarde_transfer::Attachments for CosignSignatures {
    fn tags(&self, manifest: &sarde_api::Digest) -> Vec<String> {
        sarde_trust::cosign::attachment_tags(manifest)
    }

    fn merge(&self, existing: &[u8], incoming: &[u8]) -> sarde_transfer::Merge {
        use sarde_trust::cosign::Merged;
        match sarde_trust::cosign::merge(existing, incoming) {
            Merged::Existing => sarde_transfer::Merge::Existing,
            Merged::Incoming => sarde_transfer::Merge::Incoming,
            Merged::Combined(image) => sarde_transfer::Merge::Combined {
                manifest: image.manifest,
                blobs: image
                    .blobs
                    .into_iter()
                    .map(|(d, bytes)| {
                        (
                            sarde_api::oci::Descriptor::new(d.media_type, d.digest, d.size),
                            bytes,
                        )
                    })
                    .collect(),
            },
        }
    }
}

/// What push, copy and (when signatures are checked) fetch carry along.
pub(crate) fn signatures() -> Arc<dyn sarde_transfer::Attachments> {
    Arc::new(CosignSignatures)
}

/// The name a signature of an image written to `target` claims: its registry
/// reference. A destination without one (a layout, an archive) cannot be
/// signed for, as with skopeo.
pub(crate) fn signing_identity(target: &RemoteReference) -> Result<String, RemoteError> {
    let identity = target.target.identity.clone().ok_or_else(|| {
        RemoteError::Refused(format!(
            "{target}: a signature names the image's registry reference, and this destination \
             has none: sign where the image goes to a registry (push, or copy to docker://…)"
        ))
    })?;
    // The tag the push writes (`latest` when the reference names none), as
    // skopeo signs and as the default identity rule expects.
    match (identity.parse::<ImageReference>(), &target.target.tag) {
        (Ok(image), Some(tag)) if image.tag().is_none() && image.digest().is_none() => image
            .with_tag(tag)
            .map(|i| i.to_string())
            .map_err(|e| RemoteError::Refused(format!("{target}: {e}"))),
        _ => Ok(identity),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_names_the_tag_the_push_writes() {
        let identity = |text: &str| {
            let image: ImageReference = text.parse().unwrap();
            signing_identity(&RemoteReference::registry(&image)).unwrap()
        };
        assert_eq!(
            identity("reg.example.org/ci/vm"),
            "reg.example.org/ci/vm:latest"
        );
        assert_eq!(
            identity("reg.example.org/ci/vm:2"),
            "reg.example.org/ci/vm:2"
        );
        let digest = format!("sha256:{}", "b".repeat(64));
        assert_eq!(
            identity(&format!("reg.example.org/ci/vm@{digest}")),
            format!("reg.example.org/ci/vm@{digest}")
        );
    }
}
