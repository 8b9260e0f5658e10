//! Credential lookup order and the auth file `sarde login` writes.

use std::os::unix::fs::PermissionsExt;

use sarde_api::transport::Credentials;
use sarde_transport_registry::credentials::{self, CredentialSources, Source};

fn creds(u: &str, p: &str) -> Credentials {
    Credentials {
        username: u.into(),
        password: p.into(),
    }
}

#[test]
fn environment_then_auth_file_then_docker_config() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("containers/auth.json");
    let docker = dir.path().join("docker/config.json");
    credentials::store(&auth, "127.0.0.1:5000", &creds("podman-user", "p1")).unwrap();
    credentials::store(&docker, "127.0.0.1:5000", &creds("docker-user", "p2")).unwrap();
    credentials::store(&docker, "registry.example.org", &creds("docker-only", "p3")).unwrap();

    let mut sources = CredentialSources {
        auth_file: Some(auth.clone()),
        docker_config: Some(docker.clone()),
        ..Default::default()
    };
    let (c, source) = sources.lookup("127.0.0.1:5000").unwrap().unwrap();
    assert_eq!(
        (c, source),
        (creds("podman-user", "p1"), Source::AuthFile(auth.clone()))
    );
    let (c, source) = sources.lookup("registry.example.org").unwrap().unwrap();
    assert_eq!(
        (c, source),
        (
            creds("docker-only", "p3"),
            Source::DockerConfig(docker.clone())
        )
    );
    assert!(sources.lookup("other.example.org").unwrap().is_none());

    // The environment wins, for every registry or only the one it names.
    sources.username = Some("ci".into());
    sources.password = Some("token".into());
    let (c, source) = sources.lookup("registry.example.org").unwrap().unwrap();
    assert_eq!((c, source), (creds("ci", "token"), Source::Environment));
    sources.hostname = Some("127.0.0.1:5000".into());
    let (_, source) = sources.lookup("registry.example.org").unwrap().unwrap();
    assert_eq!(source, Source::DockerConfig(docker));
    let (_, source) = sources.lookup("127.0.0.1:5000").unwrap().unwrap();
    assert_eq!(source, Source::Environment);

    sources.password = None;
    let err = sources.lookup("127.0.0.1:5000").unwrap_err().to_string();
    assert!(err.contains("SARDE_REGISTRY_PASSWORD"), "{err}");
}

#[test]
fn login_file_is_private_keeps_other_entries_and_logout_removes() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("new/auth.json");
    credentials::store(&auth, "a.example.org", &creds("u", "secret:with:colons")).unwrap();
    credentials::store(&auth, "b.example.org:5000", &creds("v", "w")).unwrap();
    let mode = std::fs::metadata(&auth).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(auth.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    // skopeo/podman format: base64 of user:password under auths.<host>.auth.
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&auth).unwrap()).unwrap();
    assert_eq!(doc["auths"]["b.example.org:5000"]["auth"], "djp3");
    let sources = CredentialSources {
        auth_file: Some(auth.clone()),
        ..Default::default()
    };
    let (c, _) = sources.lookup("a.example.org").unwrap().unwrap();
    assert_eq!(c.password, "secret:with:colons");

    assert!(credentials::remove(&auth, "a.example.org").unwrap());
    assert!(!credentials::remove(&auth, "a.example.org").unwrap());
    assert!(sources.lookup("a.example.org").unwrap().is_none());
    assert!(sources.lookup("b.example.org:5000").unwrap().is_some());
    assert!(credentials::remove(&auth, "*").unwrap());
    assert!(sources.lookup("b.example.org:5000").unwrap().is_none());
}

#[test]
fn broken_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.json");
    std::fs::write(&auth, "{not json").unwrap();
    let sources = CredentialSources {
        auth_file: Some(auth.clone()),
        ..Default::default()
    };
    let err = sources.lookup("x.example.org").unwrap_err().to_string();
    assert!(err.contains(&auth.display().to_string()), "{err}");
    let err = credentials::store(&auth, "x", &creds("a", "b"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth.json"), "{err}");
}
