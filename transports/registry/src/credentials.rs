//! Registry credentials: where they are found, and how `sarde login` stores them.
//!
//! Looked up in this order, first hit wins:
//! 1. `SARDE_REGISTRY_USERNAME` / `SARDE_REGISTRY_PASSWORD`, for every registry or,
//!    with `SARDE_REGISTRY_HOSTNAME`, only for that one (CI jobs);
//! 2. the containers auth file that podman and skopeo use: `$REGISTRY_AUTH_FILE`, else
//!    `$XDG_RUNTIME_DIR/containers/auth.json`;
//! 3. docker's `~/.docker/config.json` (or `$DOCKER_CONFIG/config.json`), including
//!    its `credHelpers` and `credsStore` (run through the docker_credential crate).
//!
//! `sarde login` writes the containers auth file (mode 0600), like `podman login`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use docker_credential::{CredentialRetrievalError, DockerCredential};
use sarde_api::transport::Credentials;
use serde_json::{Map, Value};
use thiserror::Error;

/// Why credentials could not be read or stored.
#[derive(Debug, Error)]
pub enum CredentialError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{source_name}: credential helper for {registry} failed: {message}")]
    Helper {
        source_name: String,
        registry: String,
        message: String,
    },
    #[error(
        "SARDE_REGISTRY_USERNAME is set but SARDE_REGISTRY_PASSWORD is not (or the other way round)"
    )]
    HalfEnvironment,
}

/// Where a credential came from (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Environment,
    AuthFile(PathBuf),
    DockerConfig(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Environment => f.write_str("SARDE_REGISTRY_USERNAME/PASSWORD"),
            Source::AuthFile(p) => write!(f, "{}", p.display()),
            Source::DockerConfig(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The places to look, taken from the environment once so lookups are testable.
#[derive(Debug, Clone, Default)]
pub struct CredentialSources {
    pub username: Option<String>,
    pub password: Option<String>,
    pub hostname: Option<String>,
    pub auth_file: Option<PathBuf>,
    pub docker_config: Option<PathBuf>,
}

impl CredentialSources {
    /// The sources as this process's environment names them.
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let path = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        CredentialSources {
            username: var("SARDE_REGISTRY_USERNAME"),
            password: var("SARDE_REGISTRY_PASSWORD"),
            hostname: var("SARDE_REGISTRY_HOSTNAME"),
            auth_file: default_auth_file(),
            docker_config: path("DOCKER_CONFIG")
                .or_else(|| path("HOME").map(|h| h.join(".docker")))
                .map(|d| d.join("config.json")),
        }
    }

    /// Credentials for `registry` (`host[:port]`), or `None` for anonymous access.
    pub fn lookup(&self, registry: &str) -> Result<Option<(Credentials, Source)>, CredentialError> {
        match (&self.username, &self.password) {
            (Some(username), Some(password)) => {
                let applies = self.hostname.as_deref().is_none_or(|h| h == registry);
                if applies {
                    return Ok(Some((
                        Credentials {
                            username: username.clone(),
                            password: password.clone(),
                        },
                        Source::Environment,
                    )));
                }
            }
            (None, None) => {}
            _ => return Err(CredentialError::HalfEnvironment),
        }
        if let Some(path) = &self.auth_file {
            if let Some(c) = from_file(path, registry)? {
                return Ok(Some((c, Source::AuthFile(path.clone()))));
            }
        }
        if let Some(path) = &self.docker_config {
            if let Some(c) = from_file(path, registry)? {
                return Ok(Some((c, Source::DockerConfig(path.clone()))));
            }
        }
        Ok(None)
    }
}

/// Where `sarde login` writes: `$REGISTRY_AUTH_FILE`, else
/// `$XDG_RUNTIME_DIR/containers/auth.json`, else `~/.config/containers/auth.json`.
pub fn default_auth_file() -> Option<PathBuf> {
    let path = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    path("REGISTRY_AUTH_FILE")
        .or_else(|| path("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")))
        .or_else(|| path("HOME").map(|h| h.join(".config/containers/auth.json")))
}

/// The keys a registry may be stored under (docker.io has historical aliases).
fn keys_for(registry: &str) -> Vec<String> {
    let mut keys = vec![registry.to_string(), format!("https://{registry}")];
    if registry == "docker.io" {
        keys.extend([
            "index.docker.io".to_string(),
            "https://index.docker.io/v1/".to_string(),
        ]);
    }
    keys
}

fn from_file(path: &Path, registry: &str) -> Result<Option<Credentials>, CredentialError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CredentialError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        }
    };
    for key in keys_for(registry) {
        match docker_credential::get_credential_from_reader(&bytes[..], &key) {
            Ok(DockerCredential::UsernamePassword(username, password)) => {
                return Ok(Some(Credentials { username, password }));
            }
            Ok(DockerCredential::IdentityToken(_)) => {
                tracing::warn!(
                    "{}: {key} has an identity token, which sarde does not use; log in with a password",
                    path.display()
                );
            }
            Err(CredentialRetrievalError::NoCredentialConfigured) => {}
            Err(CredentialRetrievalError::ConfigReadError) => {
                return Err(CredentialError::File {
                    path: path.to_path_buf(),
                    message: "not valid JSON: fix or remove it".into(),
                });
            }
            Err(
                e @ (CredentialRetrievalError::HelperCommunicationError
                | CredentialRetrievalError::MalformedHelperResponse
                | CredentialRetrievalError::HelperFailure { .. }),
            ) => {
                return Err(CredentialError::Helper {
                    source_name: path.display().to_string(),
                    registry: registry.to_string(),
                    message: e.to_string(),
                });
            }
            Err(_) => {}
        }
    }
    Ok(None)
}

fn read_auths(path: &Path) -> Result<Map<String, Value>, CredentialError> {
    let err = |message: String| CredentialError::File {
        path: path.to_path_buf(),
        message,
    };
    match fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(err("not a JSON object: fix or remove it".into())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Map::new()),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Writes the file atomically with mode 0600 (its directory 0700 when created).
fn write_auths(path: &Path, doc: &Map<String, Value>) -> Result<(), CredentialError> {
    let err = |e: io::Error| CredentialError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(err)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    let bytes = serde_json::to_vec_pretty(&Value::Object(doc.clone())).expect("JSON serialises");
    file.write_all(&bytes)
        .and_then(|_| file.sync_all())
        .map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// Stores credentials for `registry` in an auth file, keeping its other entries.
pub fn store(
    path: &Path,
    registry: &str,
    credentials: &Credentials,
) -> Result<(), CredentialError> {
    let mut doc = read_auths(path)?;
    let auths = doc
        .entry("auths")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(auths) = auths else {
        return Err(CredentialError::File {
            path: path.to_path_buf(),
            message: "\"auths\" is not an object: fix or remove the file".into(),
        });
    };
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", credentials.username, credentials.password));
    let mut entry = Map::new();
    entry.insert("auth".into(), Value::String(token));
    auths.insert(registry.to_string(), Value::Object(entry));
    write_auths(path, &doc)
}

/// Removes the credentials of `registry` (`*`: of every registry). Returns whether
/// anything was removed.
pub fn remove(path: &Path, registry: &str) -> Result<bool, CredentialError> {
    let mut doc = read_auths(path)?;
    let removed = match doc.get_mut("auths") {
        Some(Value::Object(auths)) if registry == "*" => {
            let any = !auths.is_empty();
            auths.clear();
            any
        }
        Some(Value::Object(auths)) => {
            let before = auths.len();
            let keys = keys_for(registry);
            auths.retain(|k, _| !keys.contains(k));
            before != auths.len()
        }
        _ => false,
    };
    if removed {
        write_auths(path, &doc)?;
    }
    Ok(removed)
}
