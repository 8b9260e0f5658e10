//! Whether a policy lets an image in: every requirement of the rules for its
//! transport and scope must accept it. Runs on the manifest alone, before any
//! blob of the image is read.

use sarde_api::transport::RawManifest;
use sarde_api::{Digest, Transport};

use crate::TrustError;
use crate::cosign::SimpleSigning;
use crate::identity;
use crate::policy::{Policy, Requirement, SigstoreSigned};
use crate::signatures;

/// The image a policy is asked about.
pub struct Subject<'a> {
    /// Where its manifest and signatures are.
    pub transport: &'a dyn Transport,
    pub repository: &'a str,
    /// The transport's name in policies (`docker`, `oci`, `oci-archive`).
    pub policy_transport: &'a str,
    /// The policy scopes that apply, most specific first.
    pub scopes: &'a [String],
    /// Its registry name, which a signature must claim; `None` where it has none.
    pub identity: Option<&'a str>,
    /// The manifest about to be used (its digest is what signatures sign).
    pub manifest: &'a RawManifest,
    /// The image in messages.
    pub name: &'a str,
}

/// Why the policy let the image in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The policy file.
    pub policy: String,
    /// Where in it the rules came from.
    pub scope: String,
    /// Requirement types that accepted, in order.
    pub requirements: Vec<String>,
    /// Signatures verified (by any `sigstoreSigned` requirement).
    pub signatures_verified: usize,
}

impl Accepted {
    /// Whether a signature was checked (not only `insecureAcceptAnything`).
    pub fn signed(&self) -> bool {
        self.signatures_verified > 0
    }
}

impl Policy {
    /// Checks `subject` against the policy: `Ok` with why, or
    /// [`TrustError::Refused`] naming the image, the rule and the reason.
    pub async fn check(&self, subject: &Subject<'_>) -> Result<Accepted, TrustError> {
        let rules = self.rules(subject.policy_transport, subject.scopes);
        let refused = |index: Option<usize>, kind: &str, reason: String| TrustError::Refused {
            image: subject.name.to_string(),
            rule: match index {
                Some(i) => format!("{} {}[{i}] ({kind})", self.path, rules.scope),
                None => format!("{} {}", self.path, rules.scope),
            },
            reason,
        };
        if rules.requirements.is_empty() {
            return Err(refused(
                None,
                "",
                "the policy lists no requirement here, which refuses every image".to_string(),
            ));
        }
        let mut accepted = Accepted {
            policy: self.path.clone(),
            scope: rules.scope.clone(),
            requirements: Vec::new(),
            signatures_verified: 0,
        };
        for (i, requirement) in rules.requirements.iter().enumerate() {
            let kind = requirement.kind();
            match requirement {
                Requirement::InsecureAcceptAnything => {}
                Requirement::Reject => {
                    return Err(refused(Some(i), kind, "the policy rejects it".to_string()));
                }
                Requirement::SignedBy(_) => {
                    return Err(refused(
                        Some(i),
                        kind,
                        "sarde does not check GPG (signedBy) signatures, so it refuses what only \
                         they could let in; sign with sigstore keys and use sigstoreSigned"
                            .to_string(),
                    ));
                }
                Requirement::SigstoreSigned(rule) => {
                    let verified =
                        sigstore_signed(rule, subject)
                            .await
                            .map_err(|reason| match reason {
                                Reason::Refused(reason) => refused(Some(i), kind, reason),
                                Reason::Error(e) => e,
                            })?;
                    accepted.signatures_verified += verified;
                }
            }
            accepted.requirements.push(kind.to_string());
        }
        tracing::info!(
            "{}: accepted by {} {} ({})",
            subject.name,
            self.path,
            accepted.scope,
            accepted.requirements.join(", ")
        );
        Ok(accepted)
    }
}

enum Reason {
    Refused(String),
    Error(TrustError),
}

impl From<TrustError> for Reason {
    fn from(e: TrustError) -> Self {
        Reason::Error(e)
    }
}

/// How many of the image's signatures `rule` accepts; refused when none.
async fn sigstore_signed(rule: &SigstoreSigned, subject: &Subject<'_>) -> Result<usize, Reason> {
    if let Some(what) = rule.unsupported() {
        return Err(Reason::Refused(format!(
            "it requires {what}, which sarde does not check, so it refuses the image (fail closed)"
        )));
    }
    let keys = rule.keys()?;
    let digest = &subject.manifest.digest;
    let found = signatures::find(subject.transport, subject.repository, digest).await?;
    if found.is_empty() {
        return Err(Reason::Refused(format!(
            "it has no signature (none under the tag {} or among its referrers)",
            crate::cosign::signature_tag(digest)
        )));
    }
    let mut verified = 0;
    let mut reasons = Vec::new();
    for signature in found {
        let signature = match signature {
            Ok(s) => s,
            Err(reason) => {
                reasons.push(reason);
                continue;
            }
        };
        match accepts(&signature, &keys, rule, subject, digest) {
            Ok(()) => verified += 1,
            Err(reason) => reasons.push(reason),
        }
    }
    if verified == 0 {
        reasons.dedup();
        return Err(Reason::Refused(format!(
            "no signature is accepted: {}",
            reasons.join("; ")
        )));
    }
    Ok(verified)
}

fn accepts(
    signature: &crate::cosign::Signature,
    keys: &[crate::keys::PublicKey],
    rule: &SigstoreSigned,
    subject: &Subject<'_>,
    digest: &Digest,
) -> Result<(), String> {
    // The payload is trusted only once a key vouches for its bytes.
    if !keys
        .iter()
        .any(|k| k.verifies(&signature.payload, &signature.signature))
    {
        let origins: Vec<&str> = keys.iter().map(|k| k.origin.as_str()).collect();
        return Err(format!(
            "a signature is not made by the trusted key ({})",
            origins.join(", ")
        ));
    }
    let payload = SimpleSigning::parse(&signature.payload).map_err(|e| e.to_string())?;
    let signed = payload.manifest_digest().map_err(|e| e.to_string())?;
    if signed != *digest {
        return Err(format!(
            "a signature signs manifest {signed}, not this image's {digest} (the manifest was replaced after signing)"
        ));
    }
    identity::check(
        &rule.identity(),
        subject.identity,
        &payload.critical.identity.docker_reference,
    )
}
