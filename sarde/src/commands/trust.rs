//! `sarde key generate`, the signing key of `push`, and the signature policy
//! of fetch, pull, copy and clone: files and passphrases to `sarde-trust`.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use sarde_cli::config::Config;
use sarde_engine::trust::Trust;
use sarde_trust::{Accepted, Policy, PrivateKey};
use serde_json::{Value, json};

use crate::cli::{KeyCommand, KeyGenerateArgs, SignFlags};

pub fn key(command: &KeyCommand) -> Result<ExitCode> {
    match command {
        KeyCommand::Generate(args) => generate(args),
    }
}

fn generate(args: &KeyGenerateArgs) -> Result<ExitCode> {
    let with_suffix = |suffix: &str| {
        let mut path = args.output_prefix.clone().into_os_string();
        path.push(suffix);
        PathBuf::from(path)
    };
    let (private, public) = (with_suffix(".private"), with_suffix(".pub"));
    for path in [&private, &public] {
        if path.exists() {
            bail!(
                "{} exists: sarde does not overwrite a key; remove it or choose another --output-prefix",
                path.display()
            );
        }
    }
    let passphrase = passphrase(args.passphrase_file.as_deref(), true)?;
    let key = PrivateKey::generate()?;
    let pem = key.to_encrypted_pem(passphrase.as_bytes())?;
    write_new(&private, pem.as_bytes(), 0o600)?;
    // Both files or neither: a lone private key would block the next try.
    if let Err(e) = key
        .public_key_pem()
        .map_err(anyhow::Error::from)
        .and_then(|pem| write_new(&public, pem.as_bytes(), 0o644))
    {
        let _ = std::fs::remove_file(&private);
        return Err(e);
    }
    eprintln!(
        "Wrote {} (keep it secret) and {} (give it to the hosts that verify, as keyPath of a sigstoreSigned policy rule)",
        private.display(),
        public.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Creates `path`, failing if it exists (so a key is never overwritten).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A passphrase from `file` (its first line) or asked for on the terminal
/// (twice when `confirm`).
fn passphrase(file: Option<&Path>, confirm: bool) -> Result<zeroize::Zeroizing<String>> {
    if let Some(file) = file {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the passphrase file {}", file.display()))?,
        );
        let line = text.lines().next().unwrap_or_default();
        return Ok(zeroize::Zeroizing::new(line.to_string()));
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "no passphrase: give --passphrase-file or --sign-passphrase-file (no terminal to ask on)"
        );
    }
    let first = zeroize::Zeroizing::new(rpassword::prompt_password("Passphrase for the key: ")?);
    if confirm {
        let again = zeroize::Zeroizing::new(rpassword::prompt_password("Passphrase again: ")?);
        if *first != *again {
            bail!("the two passphrases differ");
        }
    }
    Ok(first)
}

/// The signing key of `--sign-by-sigstore-private-key` (push, copy), opened
/// before anything is sent; `None` without the flag.
pub fn signing_key(flags: &SignFlags) -> Result<Option<PrivateKey>> {
    let Some(key) = flags.sign_by_sigstore_private_key.as_deref() else {
        return Ok(None);
    };
    let passphrase = passphrase(flags.sign_passphrase_file.as_deref(), false)?;
    let key = PrivateKey::load(key, passphrase.as_bytes()).context("the signing key")?;
    Ok(Some(key))
}

/// The policy in force: the `policy` setting (`--policy`), else the first
/// file where podman and skopeo look; none at all is no policy.
pub fn trust(config: &Config) -> Result<Trust> {
    let policy = match &config.settings.policy {
        Some(path) => Some(Policy::load(path)?),
        None => Policy::load_default()?,
    };
    match &policy {
        Some(p) => tracing::debug!("signature policy: {}", p.path),
        None => tracing::debug!(
            "no containers-policy.json (policy, ~/.config/containers/policy.json, /etc/containers/policy.json): images are not checked"
        ),
    }
    Ok(Trust {
        policy: policy.map(Arc::new),
        require_signature: false,
    })
}

/// What the policy said, for `--format json`.
pub fn policy_json(accepted: Option<&Accepted>) -> Value {
    match accepted {
        None => Value::Null,
        Some(a) => json!({
            "file": a.policy,
            "scope": a.scope,
            "requirements": a.requirements,
            "signatures_verified": a.signatures_verified,
        }),
    }
}
