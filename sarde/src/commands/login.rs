//! login and logout: credentials in the containers auth file (what skopeo and
//! podman read), checked with the registry before they are stored.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use sarde_api::ImageReference;
use sarde_api::transport::{Credentials, TransportOptions};
use sarde_cli::config::Config;
use sarde_transport_registry::credentials;

use super::image::engine;
use crate::cli::{Cli, LoginArgs, LogoutArgs};

/// `host[:port]` of a registry argument; a scheme or path is refused.
fn registry_location(text: &str) -> Result<String> {
    let bare = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .unwrap_or(text)
        .trim_end_matches('/');
    if bare.is_empty() || bare.contains('/') {
        bail!(
            "{text:?} is not a registry: give host[:port], e.g. registry.example.org or 127.0.0.1:5000"
        );
    }
    // Parsed as the registry part of a reference, so it is valid where images name it.
    let probe: ImageReference = format!("{bare}/probe")
        .parse()
        .with_context(|| format!("{text:?} is not a registry host[:port]"))?;
    Ok(probe.registry_location())
}

fn auth_file() -> Result<std::path::PathBuf> {
    credentials::default_auth_file()
        .context("no place for the auth file: set REGISTRY_AUTH_FILE, XDG_RUNTIME_DIR or HOME")
}

pub fn login(cli: &Cli, config: &Config, args: &LoginArgs) -> Result<ExitCode> {
    let location = registry_location(&args.registry)?;
    let interactive = std::io::stdin().is_terminal();
    let username = match &args.username {
        Some(u) => u.clone(),
        None if interactive => {
            eprint!("Username for {location}: ");
            std::io::stderr().flush().ok();
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim().to_string()
        }
        None => bail!("no user name: pass -u USER (standard input is not a terminal)"),
    };
    if username.is_empty() {
        bail!("the user name is empty");
    }
    let password = if let Some(p) = &args.password {
        tracing::warn!(
            "a password on the command line is visible to other users; prefer --password-stdin"
        );
        p.clone()
    } else if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else if interactive {
        rpassword::prompt_password(format!("Password for {username}@{location}: "))
            .context("reading the password")?
    } else {
        bail!("no password: pass --password-stdin (standard input is not a terminal)");
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    let credentials = Credentials { username, password };
    let engine = engine(cli, config)?;
    let insecure = args.insecure || engine.remote.insecure.contains(&location);
    let options = TransportOptions {
        insecure,
        ca_file: engine.remote.ca_file(&location),
        credentials: Some(credentials.clone()),
        concurrency: 1,
        bounds: engine.remote.bounds,
        ..TransportOptions::default()
    };
    let transport = engine
        .registry
        .transport(sarde_engine::remote::DEFAULT_SCHEME)?
        .open(&location, &options)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(transport.check_credentials())
        .with_context(|| format!("logging in to {location} as {}", credentials.username))?;
    let path = auth_file()?;
    credentials::store(&path, &location, &credentials)
        .with_context(|| format!("storing the credentials for {location}"))?;
    eprintln!(
        "Login to {location} succeeded; credentials stored in {}",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn logout(args: &LogoutArgs) -> Result<ExitCode> {
    let location = if args.registry == "*" {
        "*".to_string()
    } else {
        registry_location(&args.registry)?
    };
    let path = auth_file()?;
    let removed = credentials::remove(&path, &location)
        .with_context(|| format!("removing the credentials for {location}"))?;
    if removed {
        eprintln!(
            "Removed the credentials for {location} from {}",
            path.display()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("No credentials for {location} in {}", path.display());
        Ok(ExitCode::FAILURE)
    }
}
