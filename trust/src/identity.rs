//! `signedIdentity`: whether the name a signature claims
//! (`critical.identity.docker-reference`) fits the image being read, as
//! containers/image decides it.

use sarde_api::ImageReference;

use crate::policy::SignedIdentity;

/// `Ok(())` when `signed` (the signature's claim) is acceptable for an image
/// named `image` (its registry name; `None` for a layout or archive, which
/// have none); else why not.
pub fn check(rule: &SignedIdentity, image: Option<&str>, signed: &str) -> Result<(), String> {
    let signed_ref: ImageReference = signed
        .parse()
        .map_err(|e| format!("it claims {signed:?}, which is not an image reference ({e})"))?;
    let image_ref = || -> Result<ImageReference, String> {
        let image = image.ok_or_else(|| {
            "the image has no registry name here (a layout or an archive): the policy must say \
             which name to expect with signedIdentity exactReference or exactRepository"
                .to_string()
        })?;
        let parsed: ImageReference = image
            .parse()
            .map_err(|e| format!("the image's name {image:?} is not a reference ({e})"))?;
        // A name without tag or digest means `:latest`, as everywhere.
        Ok(match (parsed.tag(), parsed.digest()) {
            (None, None) => parsed.with_tag("latest").map_err(|e| e.to_string())?,
            _ => parsed,
        })
    };
    let claim = signed_ref.to_string();
    let fits = match rule {
        SignedIdentity::MatchExact => claim == image_ref()?.to_string(),
        SignedIdentity::MatchRepoDigestOrExact => repo_digest_or_exact(&image_ref()?, &signed_ref),
        SignedIdentity::MatchRepository => signed_ref.name() == image_ref()?.name(),
        SignedIdentity::ExactReference { docker_reference } => {
            let expected: ImageReference = docker_reference.parse().map_err(|e| format!("{e}"))?;
            claim == expected.to_string()
        }
        SignedIdentity::ExactRepository { docker_repository } => {
            let expected: ImageReference = docker_repository.parse().map_err(|e| format!("{e}"))?;
            signed_ref.name() == expected.name()
        }
        SignedIdentity::RemapIdentity {
            prefix,
            signed_prefix,
        } => {
            let image = image_ref()?;
            let remapped = remap(&image, prefix, signed_prefix)?.unwrap_or(image);
            repo_digest_or_exact(&remapped, &signed_ref)
        }
    };
    if fits {
        Ok(())
    } else {
        Err(format!(
            "it is signed for {claim}, which does not fit {} under signedIdentity {}",
            image.unwrap_or("this image"),
            describe(rule)
        ))
    }
}

/// By digest, the repository must match; by tag, the whole reference.
fn repo_digest_or_exact(image: &ImageReference, signed: &ImageReference) -> bool {
    if image.tag().is_none() && image.digest().is_some() {
        signed.name() == image.name()
    } else {
        signed.to_string() == image.to_string()
    }
}

/// The image's name with `prefix` replaced by `signed_prefix`, when it starts
/// with it at a component boundary.
fn remap(
    image: &ImageReference,
    prefix: &str,
    signed_prefix: &str,
) -> Result<Option<ImageReference>, String> {
    let text = image.to_string();
    let Some(rest) = text.strip_prefix(prefix) else {
        return Ok(None);
    };
    let boundary = prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', ':', '@']);
    if !boundary {
        return Ok(None);
    }
    let remapped = format!("{signed_prefix}{rest}");
    remapped
        .parse()
        .map(Some)
        .map_err(|e| format!("remapIdentity makes {remapped:?} of {text:?}: {e}"))
}

fn describe(rule: &SignedIdentity) -> String {
    match rule {
        SignedIdentity::MatchExact => "matchExact".to_string(),
        SignedIdentity::MatchRepoDigestOrExact => {
            "matchRepoDigestOrExact (the default; cosign signs repository names without a tag: \
             use matchRepository for its signatures)"
                .to_string()
        }
        SignedIdentity::MatchRepository => "matchRepository".to_string(),
        SignedIdentity::ExactReference { docker_reference } => {
            format!("exactReference {docker_reference}")
        }
        SignedIdentity::ExactRepository { docker_repository } => {
            format!("exactRepository {docker_repository}")
        }
        SignedIdentity::RemapIdentity {
            prefix,
            signed_prefix,
        } => format!("remapIdentity {prefix} -> {signed_prefix}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_match_as_in_containers_image() {
        use SignedIdentity::*;
        let ok = |rule: &SignedIdentity, image: Option<&str>, signed: &str| {
            check(rule, image, signed).is_ok()
        };
        let digest = format!("sha256:{}", "a".repeat(64));
        let by_digest = format!("reg.example.org/ns/vm@{digest}");
        // Tagged image: exact, or repository under matchRepository.
        assert!(ok(
            &MatchRepoDigestOrExact,
            Some("reg.example.org/ns/vm:1"),
            "reg.example.org/ns/vm:1"
        ));
        assert!(!ok(
            &MatchRepoDigestOrExact,
            Some("reg.example.org/ns/vm:1"),
            "reg.example.org/ns/vm"
        ));
        assert!(!ok(
            &MatchRepoDigestOrExact,
            Some("reg.example.org/ns/vm:1"),
            "reg.example.org/ns/vm:2"
        ));
        assert!(ok(
            &MatchRepoDigestOrExact,
            Some(&by_digest),
            "reg.example.org/ns/vm:anything"
        ));
        assert!(ok(
            &MatchRepository,
            Some("reg.example.org/ns/vm:1"),
            "reg.example.org/ns/vm"
        ));
        assert!(!ok(
            &MatchRepository,
            Some("reg.example.org/ns/vm:1"),
            "reg.example.org/ns/other"
        ));
        assert!(ok(
            &MatchExact,
            Some("reg.example.org/ns/vm"),
            "reg.example.org/ns/vm:latest"
        ));
        assert!(!ok(
            &MatchExact,
            Some("reg.example.org/ns/vm:1"),
            "reg.example.org/ns/vm"
        ));
        // Normalised names: docker.io/library.
        assert!(ok(
            &MatchRepository,
            Some("debian:12"),
            "docker.io/library/debian"
        ));
        // No registry name: only the exact rules apply.
        assert!(
            check(&MatchRepository, None, "reg.example.org/ns/vm")
                .unwrap_err()
                .contains("exactRepository")
        );
        let exact_repo = ExactRepository {
            docker_repository: "reg.example.org/ns/vm".into(),
        };
        assert!(ok(&exact_repo, None, "reg.example.org/ns/vm:3"));
        assert!(!ok(&exact_repo, None, "reg.example.org/ns/vm2"));
        let exact_ref = ExactReference {
            docker_reference: "reg.example.org/ns/vm:3".into(),
        };
        assert!(ok(&exact_ref, None, "reg.example.org/ns/vm:3"));
        assert!(!ok(&exact_ref, None, "reg.example.org/ns/vm:4"));
        let remap = RemapIdentity {
            prefix: "mirror.local/ns".into(),
            signed_prefix: "reg.example.org/ns".into(),
        };
        assert!(ok(
            &remap,
            Some("mirror.local/ns/vm:1"),
            "reg.example.org/ns/vm:1"
        ));
        assert!(!ok(
            &remap,
            Some("mirror.local/nsx/vm:1"),
            "reg.example.org/ns/vm:1"
        ));
        assert!(!ok(
            &MatchRepository,
            Some("reg.example.org/ns/vm:1"),
            "not a reference!"
        ));
    }
}
