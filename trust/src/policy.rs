//! `containers-policy.json(5)`, read as containers/image reads it: a default
//! list of requirements, and lists per transport and scope; the most specific
//! scope that the policy names decides, else the transport's `""` scope, else
//! the default. Every requirement of the chosen list must accept the image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::TrustError;
use crate::keys::PublicKey;

/// Where podman and skopeo look, in order, when no `--policy` is given.
pub fn default_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(dir) = config_home {
        paths.push(dir.join("containers/policy.json"));
    }
    paths.push(PathBuf::from("/etc/containers/policy.json"));
    paths
}

/// A policy file, parsed and checked.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The file it came from (for messages).
    pub path: String,
    default: Vec<Requirement>,
    transports: BTreeMap<String, BTreeMap<String, Vec<Requirement>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    default: Option<Vec<Requirement>>,
    #[serde(default)]
    transports: BTreeMap<String, BTreeMap<String, Vec<Requirement>>>,
}

/// One requirement (`"type": …`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type")]
pub enum Requirement {
    #[serde(rename = "insecureAcceptAnything")]
    InsecureAcceptAnything,
    #[serde(rename = "reject")]
    Reject,
    /// GPG simple signing: not implemented, so it refuses every image.
    #[serde(rename = "signedBy")]
    SignedBy(serde_json::Map<String, serde_json::Value>),
    #[serde(rename = "sigstoreSigned")]
    SigstoreSigned(Box<SigstoreSigned>),
}

/// `sigstoreSigned`: exactly one source of trust (keys, or `fulcio`, or `pki`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SigstoreSigned {
    pub key_path: Option<String>,
    pub key_paths: Option<Vec<String>>,
    pub key_data: Option<String>,
    pub key_datas: Option<Vec<String>>,
    pub fulcio: Option<serde_json::Value>,
    pub pki: Option<serde_json::Value>,
    pub rekor_public_key_path: Option<String>,
    pub rekor_public_key_paths: Option<Vec<String>>,
    pub rekor_public_key_data: Option<String>,
    pub rekor_public_key_datas: Option<Vec<String>>,
    pub signed_identity: Option<SignedIdentity>,
}

/// What a signature's `docker-reference` must be, given the image's name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum SignedIdentity {
    #[serde(rename = "matchExact")]
    MatchExact,
    #[serde(rename = "matchRepoDigestOrExact")]
    MatchRepoDigestOrExact,
    #[serde(rename = "matchRepository")]
    MatchRepository,
    #[serde(rename = "exactReference")]
    ExactReference {
        #[serde(rename = "dockerReference")]
        docker_reference: String,
    },
    #[serde(rename = "exactRepository")]
    ExactRepository {
        #[serde(rename = "dockerRepository")]
        docker_repository: String,
    },
    #[serde(rename = "remapIdentity")]
    RemapIdentity {
        prefix: String,
        #[serde(rename = "signedPrefix")]
        signed_prefix: String,
    },
}

/// The requirements that apply to an image, and where the policy says so.
#[derive(Debug)]
pub struct Rules<'a> {
    pub requirements: &'a [Requirement],
    /// `default`, or `transports.docker["registry.example.org/ns"]`.
    pub scope: String,
}

impl Policy {
    /// The policy of the first file of [`default_paths`] that exists; `None`
    /// when there is none.
    pub fn load_default() -> Result<Option<Policy>, TrustError> {
        for path in default_paths() {
            match std::fs::metadata(&path) {
                Ok(_) => return Policy::load(&path).map(Some),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // A policy that exists but cannot be read is not "no policy".
                Err(e) => {
                    return Err(TrustError::Policy {
                        path: path.display().to_string(),
                        message: format!("cannot read it: {e}"),
                    });
                }
            }
        }
        Ok(None)
    }

    /// Reads and checks a policy file. Relative key paths are taken from the
    /// file's directory.
    pub fn load(path: &Path) -> Result<Policy, TrustError> {
        let text = std::fs::read(path).map_err(|e| TrustError::Policy {
            path: path.display().to_string(),
            message: format!("cannot read it: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("/"));
        Policy::parse(&text, &path.display().to_string(), base)
    }

    /// Parses policy JSON; `base` is the directory relative key paths start from.
    pub fn parse(text: &[u8], name: &str, base: &Path) -> Result<Policy, TrustError> {
        let bad = |message: String| TrustError::Policy {
            path: name.to_string(),
            message,
        };
        let file: PolicyFile = serde_json::from_slice(text)
            .map_err(|e| bad(format!("not a containers-policy.json(5) file: {e}")))?;
        let default = file
            .default
            .ok_or_else(|| bad("it has no \"default\" requirements".to_string()))?;
        let mut policy = Policy {
            path: name.to_string(),
            default,
            transports: file.transports,
        };
        let mut all: Vec<(String, &mut Requirement)> = policy
            .default
            .iter_mut()
            .map(|r| ("default".to_string(), r))
            .collect();
        for (transport, scopes) in policy.transports.iter_mut() {
            for (scope, requirements) in scopes.iter_mut() {
                for r in requirements.iter_mut() {
                    all.push((format!("transports.{transport}[{scope:?}]"), r));
                }
            }
        }
        for (place, requirement) in all {
            if let Requirement::SigstoreSigned(s) = requirement {
                s.check()
                    .map_err(|m| bad(format!("{place}: sigstoreSigned: {m}")))?;
                s.resolve_paths(base);
            }
        }
        Ok(policy)
    }

    /// The requirements for an image of `transport` whose scopes are `scopes`
    /// (most specific first).
    pub fn rules(&self, transport: &str, scopes: &[String]) -> Rules<'_> {
        if let Some(by_scope) = self.transports.get(transport) {
            for scope in scopes {
                if let Some(requirements) = by_scope.get(scope) {
                    return Rules {
                        requirements,
                        scope: format!("transports.{transport}[{scope:?}]"),
                    };
                }
            }
            if let Some(requirements) = by_scope.get("") {
                return Rules {
                    requirements,
                    scope: format!("transports.{transport}[\"\"]"),
                };
            }
        }
        Rules {
            requirements: &self.default,
            scope: "default".to_string(),
        }
    }
}

impl Requirement {
    /// The requirement's `type`, as the policy spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Requirement::InsecureAcceptAnything => "insecureAcceptAnything",
            Requirement::Reject => "reject",
            Requirement::SignedBy(_) => "signedBy",
            Requirement::SigstoreSigned(_) => "sigstoreSigned",
        }
    }
}

impl SigstoreSigned {
    /// containers/image's rules: exactly one trust source, and a Rekor key only
    /// where it means something.
    fn check(&self) -> Result<(), String> {
        let sources = [
            self.key_path.is_some(),
            self.key_paths.is_some(),
            self.key_data.is_some(),
            self.key_datas.is_some(),
            self.fulcio.is_some(),
            self.pki.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            1 => {}
            0 => {
                return Err(
                    "no trust source: give one of keyPath, keyPaths, keyData, keyDatas, fulcio, pki"
                        .to_string(),
                );
            }
            _ => {
                return Err(
                    "more than one trust source: give only one of keyPath, keyPaths, keyData, keyDatas, fulcio, pki"
                        .to_string(),
                );
            }
        }
        if self.key_paths.as_ref().is_some_and(Vec::is_empty)
            || self.key_datas.as_ref().is_some_and(Vec::is_empty)
        {
            return Err("keyPaths and keyDatas must not be empty".to_string());
        }
        if let Some(SignedIdentity::ExactReference { docker_reference }) = &self.signed_identity {
            let image: sarde_api::ImageReference = docker_reference
                .parse()
                .map_err(|e| format!("signedIdentity dockerReference {docker_reference:?}: {e}"))?;
            if image.tag().is_none() && image.digest().is_none() {
                return Err(format!(
                    "signedIdentity dockerReference {docker_reference:?} names neither a tag nor a digest"
                ));
            }
        }
        if let Some(SignedIdentity::ExactRepository { docker_repository }) = &self.signed_identity {
            docker_repository
                .parse::<sarde_api::ImageReference>()
                .map_err(|e| {
                    format!("signedIdentity dockerRepository {docker_repository:?}: {e}")
                })?;
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut String| {
            if Path::new(p.as_str()).is_relative() {
                *p = base.join(p.as_str()).display().to_string();
            }
        };
        self.key_path.iter_mut().for_each(resolve);
        self.key_paths.iter_mut().flatten().for_each(resolve);
        self.rekor_public_key_path.iter_mut().for_each(resolve);
        self.rekor_public_key_paths
            .iter_mut()
            .flatten()
            .for_each(resolve);
    }

    /// What this requirement needs that sarde does not implement, if anything:
    /// such a requirement refuses every image (fail closed).
    pub fn unsupported(&self) -> Option<&'static str> {
        if self.fulcio.is_some() {
            Some("fulcio (keyless) signatures")
        } else if self.pki.is_some() {
            Some("pki (X.509 certificate) signatures")
        } else if self.rekor_public_key_path.is_some()
            || self.rekor_public_key_paths.is_some()
            || self.rekor_public_key_data.is_some()
            || self.rekor_public_key_datas.is_some()
        {
            Some("Rekor transparency-log checks (rekorPublicKey*)")
        } else {
            None
        }
    }

    /// The keys the requirement trusts; a key that cannot be read is an error
    /// (the policy cannot be applied as written).
    pub fn keys(&self) -> Result<Vec<PublicKey>, TrustError> {
        let mut keys = Vec::new();
        for path in self.key_path.iter().chain(self.key_paths.iter().flatten()) {
            keys.push(PublicKey::load(Path::new(path))?);
        }
        for (i, data) in self
            .key_data
            .iter()
            .chain(self.key_datas.iter().flatten())
            .enumerate()
        {
            let origin = format!("keyData #{}", i + 1);
            let pem = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| TrustError::Key {
                    path: origin.clone(),
                    message: format!("not base64: {e}"),
                })?;
            keys.push(PublicKey::from_pem(&pem, &origin)?);
        }
        Ok(keys)
    }

    /// The identity rule, with containers/image's default.
    pub fn identity(&self) -> SignedIdentity {
        self.signed_identity
            .clone()
            .unwrap_or(SignedIdentity::MatchRepoDigestOrExact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, TrustError> {
        Policy::parse(text.as_bytes(), "policy.json", Path::new("/etc/containers"))
    }

    #[test]
    fn the_most_specific_scope_decides() {
        let policy = parse(
            r#"{
                "default": [{"type": "reject"}],
                "transports": {
                    "docker": {
                        "": [{"type": "insecureAcceptAnything"}],
                        "reg.example.org/ns": [{"type": "sigstoreSigned", "keyPath": "k.pub", "signedIdentity": {"type": "matchRepository"}}],
                        "*.example.org": [{"type": "reject"}]
                    }
                }
            }"#,
        )
        .unwrap();
        let scopes = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let rules = policy.rules(
            "docker",
            &scopes(&[
                "reg.example.org/ns/vm:1",
                "reg.example.org/ns/vm",
                "reg.example.org/ns",
                "reg.example.org",
                "*.example.org",
            ]),
        );
        assert_eq!(rules.scope, "transports.docker[\"reg.example.org/ns\"]");
        let Requirement::SigstoreSigned(s) = &rules.requirements[0] else {
            panic!("{:?}", rules.requirements)
        };
        assert_eq!(s.key_path.as_deref(), Some("/etc/containers/k.pub"));
        assert_eq!(s.identity(), SignedIdentity::MatchRepository);
        let rules = policy.rules(
            "docker",
            &scopes(&["other.example.org/x", "other.example.org", "*.example.org"]),
        );
        assert!(matches!(rules.requirements[0], Requirement::Reject));
        let rules = policy.rules("docker", &scopes(&["127.0.0.1:5000/x"]));
        assert_eq!(rules.scope, "transports.docker[\"\"]");
        let rules = policy.rules("oci", &scopes(&["/srv/x"]));
        assert_eq!(rules.scope, "default");
    }

    #[test]
    fn invalid_policies_are_refused_naming_the_problem() {
        for (text, expected) in [
            (r#"{}"#, "no \"default\""),
            (
                r#"{"default": [{"type": "whatever"}]}"#,
                "not a containers-policy.json(5) file",
            ),
            (
                r#"{"default": [{"type": "sigstoreSigned"}]}"#,
                "no trust source",
            ),
            (
                r#"{"default": [{"type": "sigstoreSigned", "keyPath": "a", "keyData": "b"}]}"#,
                "more than one trust source",
            ),
            (
                r#"{"default": [{"type": "sigstoreSigned", "keyPath": "a", "signedIdentity": {"type": "exactReference", "dockerReference": "reg.example.org/vm"}}]}"#,
                "neither a tag nor a digest",
            ),
            (r#"{"default": [], "extra": 1}"#, "unknown field"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
            assert!(e.contains("policy.json"), "{e}");
        }
    }
}
