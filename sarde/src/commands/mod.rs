//! What each subcommand does: load configuration and the registry, call the
//! libraries, print the result.

mod image;
mod lifecycle;
mod login;
mod progress;
mod remote;
mod trust;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;
use sarde_cli::builtin;
use sarde_cli::config::{self, Config, Environment, FlagValues};
use serde_json::json;

use crate::cli::{Cli, Command, ConfigArgs, OutputFormat, PluginsArgs};

pub fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Completions(args) = &cli.command {
        let mut command = Cli::command();
        clap_complete::generate(args.shell, &mut command, "sarde", &mut std::io::stdout());
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Key(args) = &cli.command {
        // No configuration: a key pair is files and a passphrase.
        sarde_cli::logging::init(i32::from(cli.verbose) - i32::from(cli.quiet));
        return trust::key(&args.command);
    }
    let mut flags = match &cli.command {
        Command::Config(args) => crate::cli::flag_values(&[&args.overrides]),
        Command::Export(args) => args.flag_values(),
        Command::Import(args) => args.flag_values(),
        Command::List(args) => args.flag_values(),
        Command::Push(args) => args.flag_values(),
        Command::Fetch(args) => args.flag_values(),
        Command::Copy(args) => args.flag_values(),
        Command::Pull(args) => args.flag_values(),
        Command::Clone(args) => args.flag_values(),
        Command::Login(args) => args.flag_values(),
        Command::Logout(args) => args.flag_values(),
        Command::Getconfig(args) => args.flag_values(),
        Command::Inspect(args) => args.flag_values(),
        Command::Rm(args) => args.flag_values(),
        Command::Prune(args) => args.flag_values(),
        Command::Plugins(_) | Command::Completions(_) | Command::Key(_) => FlagValues::default(),
    };
    if let Some(dirs) = &cli.plugin_dir {
        flags.set("plugin-dir", dirs.as_str());
    }
    let env = Environment::from_process();
    let config = Config::load(&env, cli.command.config_section(), &flags)
        .context("invalid configuration")?;
    let verbosity = config.settings.verbose - config.settings.quiet + i32::from(cli.verbose)
        - i32::from(cli.quiet);
    sarde_cli::logging::init(verbosity);
    for (key, origin) in &config.unknown_keys {
        tracing::debug!("unknown configuration key `{key}` from {origin}: ignored");
    }

    match &cli.command {
        Command::Export(args) => image::export(&cli, &config, args),
        Command::Import(args) => image::import(&cli, &config, args),
        Command::List(args) => image::list(&cli, &config, args),
        Command::Push(args) => remote::push(&cli, &config, args),
        Command::Fetch(args) => remote::fetch(&cli, &config, args),
        Command::Copy(args) => remote::copy(&cli, &config, args),
        Command::Pull(args) => remote::pull(&cli, &config, args),
        Command::Clone(args) => remote::clone(&cli, &config, args),
        Command::Login(args) => login::login(&cli, &config, args),
        Command::Logout(args) => login::logout(args),
        Command::Getconfig(args) => image::getconfig(&cli, &config, args),
        Command::Inspect(args) => lifecycle::inspect(&cli, &config, args),
        Command::Rm(args) => lifecycle::rm(&cli, &config, args),
        Command::Prune(args) => lifecycle::prune(&cli, &config, args),
        Command::Plugins(args) => plugins(&cli, &config, args),
        Command::Config(args) => show_config(&cli, &config, &env, args),
        Command::Completions(_) | Command::Key(_) => unreachable!("handled above"),
    }
}

/// The registry with built-ins and the configured and named plugins.
pub(crate) fn load_registry(cli: &Cli, config: &Config) -> Result<builtin::Loaded> {
    let mut explicit = config.settings.plugin.clone();
    explicit.extend(cli.plugin.iter().cloned());
    builtin::load_registry(&config.settings.plugin_dir, &explicit)
}

fn plugins(cli: &Cli, config: &Config, args: &PluginsArgs) -> Result<ExitCode> {
    let loaded = load_registry(cli, config)?;
    let entries = loaded.registry.entries();
    let mut out = std::io::stdout().lock();
    match args.format {
        OutputFormat::Json => {
            let value = json!({
                "factories": entries,
                "plugins": loaded.plugins.iter().map(|p| json!({
                    "name": p.name, "path": p.path, "api_version": p.api_version,
                })).collect::<Vec<_>>(),
                "skipped": loaded.skipped.iter().map(|s| json!({
                    "path": s.path, "reason": s.reason,
                })).collect::<Vec<_>>(),
                "plugin_dirs": config.settings.plugin_dir,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        }
        OutputFormat::Text => {
            let rows: Vec<[String; 4]> = entries
                .iter()
                .map(|e| {
                    [
                        e.kind.to_string(),
                        e.name.clone(),
                        e.origin.to_string(),
                        e.description.clone(),
                    ]
                })
                .collect();
            print_table(&mut out, ["KIND", "NAME", "ORIGIN", "DESCRIPTION"], &rows)?;
            for s in &loaded.skipped {
                writeln!(out, "skipped {}: {}", s.path.display(), s.reason)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_config(
    cli: &Cli,
    config: &Config,
    env: &Environment,
    args: &ConfigArgs,
) -> Result<ExitCode> {
    let report = config.report();
    let transports = transport_configuration(cli, config)?;
    let mut out = std::io::stdout().lock();
    match args.format {
        OutputFormat::Json => {
            let settings: serde_json::Map<String, serde_json::Value> = report
                .iter()
                .map(|(key, value, origin)| {
                    (key.clone(), json!({ "value": value, "origin": origin }))
                })
                .collect();
            let value = json!({
                "command": config.command,
                "files": env.files,
                "files_from_env": env.files_from_env,
                "files_read": config.files_read,
                "settings": settings,
                "unknown_keys": config.unknown_keys.iter()
                    .map(|(k, o)| json!({"key": k, "origin": o}))
                    .collect::<Vec<_>>(),
                "unused_keys": config.unused_keys.iter()
                    .map(|(k, o)| json!({"key": k, "origin": o}))
                    .collect::<Vec<_>>(),
                "transports": transports.iter()
                    .map(|(scheme, lines)| json!({"scheme": scheme, "configuration": lines}))
                    .collect::<Vec<_>>(),
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        }
        OutputFormat::Text => {
            let source = if env.files_from_env {
                " (from SARDE_CONF_FILES)"
            } else {
                ""
            };
            writeln!(out, "# configuration files{source}, in order:")?;
            for file in &env.files {
                let state = if config.files_read.contains(file) {
                    "read"
                } else {
                    "absent"
                };
                writeln!(out, "#   {} ({state})", file.display())?;
            }
            if let Some(command) = &config.command {
                writeln!(out, "# sections: [DEFAULT], then [{command}]")?;
            }
            let rows: Vec<[String; 3]> = report
                .into_iter()
                .map(|(k, v, o)| [k, v, o.to_string()])
                .collect();
            print_table(&mut out, ["KEY", "VALUE", "ORIGIN"], &rows)?;
            for (scheme, lines) in &transports {
                for line in lines {
                    writeln!(out, "# {scheme}: {line}")?;
                }
            }
            for (origin, keys) in config::keys_by_origin(&config.unknown_keys) {
                writeln!(
                    out,
                    "# unknown, ignored: {} (from {origin})",
                    keys.join(", ")
                )?;
            }
            for (origin, keys) in config::keys_by_origin(&config.unused_keys) {
                writeln!(
                    out,
                    "# set, not used by this command: {} (from {origin})",
                    keys.join(", ")
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What each transport reads besides sarde's configuration (registries.conf),
/// for commands that move images.
fn transport_configuration(cli: &Cli, config: &Config) -> Result<Vec<(String, Vec<String>)>> {
    if !config.used_keys.contains(&"transport") {
        return Ok(Vec::new());
    }
    let loaded = load_registry(cli, config)?;
    let mut out = Vec::new();
    for entry in loaded.registry.entries() {
        if entry.kind != sarde_api::registry::Kind::Transport {
            continue;
        }
        let factory = loaded.registry.transport(&entry.name)?;
        let lines = factory
            .configuration(&sarde_api::transport::TransportOptions::default())
            .with_context(|| format!("the {} transport's configuration", entry.name))?;
        if !lines.is_empty() {
            out.push((entry.name.clone(), lines));
        }
    }
    Ok(out)
}

/// Left-aligned columns, the last one unpadded.
pub(crate) fn print_table<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |out: &mut dyn Write, cells: Vec<&str>| -> std::io::Result<()> {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, header.to_vec())?;
    for row in rows {
        line(out, row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}
