//! SSH into the job's VM with russh: password or key authentication, the host key
//! pinned at prepare time, scripts piped into the guest's shell with their output
//! streamed live.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, load_secret_key};
use russh::{ChannelMsg, Disconnect};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// How to log in to the guest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Login {
    pub host: String,
    pub port: u16,
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
    /// `SHA256:…` of the host key, pinned once seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
}

#[derive(Debug, Error)]
pub enum SshError {
    #[error("{host}:{port}: cannot connect: {message}")]
    Connect {
        host: String,
        port: u16,
        message: String,
    },
    #[error(
        "{host}: the host key is {actual}, but {expected} was seen when the VM came up: refusing to talk to another machine"
    )]
    HostKey {
        host: String,
        expected: String,
        actual: String,
    },
    #[error(
        "{user}@{host}: authentication refused ({what}): check username, password or identity-file"
    )]
    Auth {
        user: String,
        host: String,
        what: String,
    },
    #[error("{path}: cannot read the SSH key: {message}")]
    Key { path: String, message: String },
    #[error("{host}: SSH session failed: {message}")]
    Session { host: String, message: String },
}

struct Client {
    expected: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::ssh_key::PublicKey,
    ) -> Result<bool, Self::Error> {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let ok = self.expected.as_ref().is_none_or(|e| *e == fingerprint);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(fingerprint);
        }
        Ok(ok)
    }
}

/// An authenticated connection.
pub struct Session {
    handle: Handle<Client>,
    host: String,
    /// The host key's fingerprint.
    pub host_key: String,
}

impl Login {
    /// Connects and authenticates (key first, then password), pinning or checking
    /// the host key.
    pub async fn connect(&self, timeout: Duration) -> Result<Session, SshError> {
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 8,
            ..Default::default()
        });
        let seen = Arc::new(Mutex::new(None));
        let handler = Client {
            expected: self.host_key.clone(),
            seen: seen.clone(),
        };
        let connect = client::connect(config, (self.host.as_str(), self.port), handler);
        let result =
            tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| SshError::Connect {
                    host: self.host.clone(),
                    port: self.port,
                    message: format!("no answer within {}s", timeout.as_secs()),
                })?;
        let seen = seen.lock().ok().and_then(|s| s.clone());
        let mut handle = match result {
            Ok(h) => h,
            Err(e) => {
                if let (Some(expected), Some(actual)) = (&self.host_key, &seen) {
                    if expected != actual {
                        return Err(SshError::HostKey {
                            host: self.host.clone(),
                            expected: expected.clone(),
                            actual: actual.clone(),
                        });
                    }
                }
                return Err(SshError::Connect {
                    host: self.host.clone(),
                    port: self.port,
                    message: e.to_string(),
                });
            }
        };
        let session_error = |e: russh::Error| SshError::Session {
            host: self.host.clone(),
            message: e.to_string(),
        };
        let mut tried = Vec::new();
        let mut ok = false;
        if let Some(path) = &self.identity_file {
            let key =
                load_secret_key(path, self.password.as_deref()).map_err(|e| SshError::Key {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            let hash = handle
                .best_supported_rsa_hash()
                .await
                .map_err(session_error)?
                .flatten();
            let result = handle
                .authenticate_publickey(
                    &self.username,
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await
                .map_err(session_error)?;
            ok = result.success();
            tried.push("key");
        }
        if !ok {
            if let Some(password) = &self.password {
                let result = handle
                    .authenticate_password(&self.username, password)
                    .await
                    .map_err(session_error)?;
                ok = result.success();
                tried.push("password");
            }
        }
        if !ok {
            return Err(SshError::Auth {
                user: self.username.clone(),
                host: self.host.clone(),
                what: if tried.is_empty() {
                    "no password or identity file configured".into()
                } else {
                    tried.join(", then ")
                },
            });
        }
        Ok(Session {
            handle,
            host: self.host.clone(),
            host_key: seen.unwrap_or_default(),
        })
    }
}

impl Session {
    /// Runs `command` with `input` on its standard input, copying its output to
    /// `stdout`/`stderr` as it comes; returns its exit status (a signal counts as
    /// 128 + 1, as the shell reports it roughly).
    pub async fn run(
        &mut self,
        command: &str,
        mut input: impl AsyncRead + Unpin,
        stdout: &mut (impl AsyncWrite + Unpin),
        stderr: &mut (impl AsyncWrite + Unpin),
    ) -> Result<i32, SshError> {
        let host = self.host.clone();
        let err = |e: russh::Error| SshError::Session {
            host: host.clone(),
            message: e.to_string(),
        };
        let mut channel = self.handle.channel_open_session().await.map_err(err)?;
        channel.exec(true, command).await.map_err(err)?;
        channel.data(&mut input).await.map_err(err)?;
        channel.eof().await.map_err(err)?;
        let mut status = None;
        let io = |e: std::io::Error| SshError::Session {
            host: self.host.clone(),
            message: format!("writing the output: {e}"),
        };
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    stdout.write_all(&data).await.map_err(io)?;
                    stdout.flush().await.map_err(io)?;
                }
                ChannelMsg::ExtendedData { data, .. } => {
                    stderr.write_all(&data).await.map_err(io)?;
                    stderr.flush().await.map_err(io)?;
                }
                ChannelMsg::ExitStatus { exit_status } => {
                    status = Some(i32::try_from(exit_status).unwrap_or(255));
                }
                ChannelMsg::ExitSignal { .. } => status = Some(129),
                _ => {}
            }
        }
        status.ok_or_else(|| SshError::Session {
            host: self.host.clone(),
            message: "the command ended without an exit status (connection lost?)".into(),
        })
    }

    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}
