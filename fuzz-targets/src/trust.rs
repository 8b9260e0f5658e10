//! The signature side: what a registry or an image hands the policy check
//! (signature payloads and signature manifests, merged as copy merges them),
//! and `containers-policy.json(5)` files with the rules chosen from them.

use std::path::Path;

use sarde_trust::cosign::{SignatureManifest, SimpleSigning, merge};
use sarde_trust::identity;
use sarde_trust::policy::{Policy, Requirement, SignedIdentity};

/// A signature payload (`SimpleSigning::parse`, what the check runs on bytes
/// a key has vouched for) and its claim against each `signedIdentity` rule,
/// for images named by tag, by digest and not at all.
pub fn signature_payload(data: &[u8]) {
    let Ok(payload) = SimpleSigning::parse(data) else {
        return;
    };
    let _ = payload.manifest_digest();
    let claim = &payload.critical.identity.docker_reference;
    let digest = format!("reg.example.org/ns/vm@sha256:{}", "a".repeat(64));
    let rules = [
        SignedIdentity::MatchExact,
        SignedIdentity::MatchRepoDigestOrExact,
        SignedIdentity::MatchRepository,
        SignedIdentity::ExactReference {
            docker_reference: "reg.example.org/ns/vm:1".into(),
        },
        SignedIdentity::ExactRepository {
            docker_repository: "reg.example.org/ns/vm".into(),
        },
        SignedIdentity::RemapIdentity {
            prefix: "mirror.example.org/ns".into(),
            signed_prefix: claim.clone(),
        },
    ];
    for rule in &rules {
        for image in [Some("reg.example.org/ns/vm:1"), Some(digest.as_str()), None] {
            let _ = identity::check(rule, image, claim);
        }
    }
}

/// A signature manifest (`SignatureManifest::parse` and its signature
/// layers), and two of them merged as a copy merges a destination's with the
/// source's (`cosign::merge`), the result parsed again.
pub fn signature_manifest(data: &[u8]) {
    let [existing, incoming] = crate::parts::<2>(data);
    if let Ok(manifest) = SignatureManifest::parse(existing) {
        let _ = manifest.signature_layers().count();
    }
    if let sarde_trust::cosign::Merged::Combined(image) = merge(existing, incoming) {
        let merged = SignatureManifest::parse(&image.manifest)
            .expect("a merged signature manifest parses again");
        assert!(merged.layers.len() >= 2, "a merge adds a layer");
    }
}

/// A policy file (`Policy::parse`) and the rules it gives images of each
/// transport, with the parts of a requirement the check reads.
pub fn policy_json(data: &[u8]) {
    let Ok(policy) = Policy::parse(data, "policy.json", Path::new("/nonexistent")) else {
        return;
    };
    let scopes: Vec<String> = [
        "reg.example.org/ns/vm:1",
        "reg.example.org/ns/vm",
        "reg.example.org/ns",
        "reg.example.org",
        "*.example.org",
    ]
    .map(str::to_string)
    .to_vec();
    for transport in ["docker", "oci", "oci-archive", "oci-dir", ""] {
        let rules = policy.rules(transport, &scopes);
        for requirement in rules.requirements {
            let _ = requirement.kind();
            if let Requirement::SigstoreSigned(rule) = requirement {
                let _ = rule.unsupported();
                let _ = rule.identity();
                // Keys given inline (base64 PEM) are parsed; files are not read.
                if rule.key_path.is_none() && rule.key_paths.is_none() {
                    let _ = rule.keys();
                }
            }
        }
    }
}
