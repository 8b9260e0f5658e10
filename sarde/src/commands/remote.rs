//! push, fetch, pull: flags to engine requests, results to stdout.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use sarde_api::ImageReference;
use sarde_cli::config::Config;
use sarde_engine::Engine;
use sarde_engine::remote::RemoteReference;
use sarde_transfer::Summary;
use serde_json::json;

use super::image::engine;
use super::progress::{Reporter, human};
use crate::cli::{
    Cli, CloneArgs, CloneStartArg, CopyArgs, FetchArgs, ImportFlags, OutputFormat, PullArgs,
    PushArgs,
};
use sarde_engine::clone::{CloneRequest, CloneStart};

/// A runtime for one command: enough workers for the transfers plus the import.
fn runtime(config: &Config) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.settings.concurrency.clamp(2, 16))
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn quiet(cli: &Cli, config: &Config) -> bool {
    cli.quiet > 0 || config.settings.quiet > 0
}

/// The engine, and `texts` read as references of the transports they name
/// (`scheme:rest`, a registry without a scheme); `--insecure` applies to the
/// locations they name.
fn engine_for(
    cli: &Cli,
    config: &Config,
    insecure: bool,
    texts: &[&str],
) -> Result<(Engine, Vec<RemoteReference>)> {
    let mut engine = engine(cli, config)?;
    let refs = texts
        .iter()
        .map(|text| {
            engine
                .parse_remote(text)
                .with_context(|| format!("{text:?} is not an image reference"))
        })
        .collect::<Result<Vec<_>>>()?;
    if insecure {
        for r in &refs {
            engine.remote.insecure.push(r.target.location.clone());
        }
    }
    Ok((engine, refs))
}

/// The engine, where `fetch`, `pull` or `clone` reads, and the image's name in
/// the cache: IMAGE names both (a registry reference), or IMAGE is a
/// reference of another transport (`oci-archive:/mnt/usb/win11.tar`) and the
/// name is made from it; `--source` reads from elsewhere into the name IMAGE.
fn engine_and_source(
    cli: &Cli,
    config: &Config,
    insecure: bool,
    source: Option<&str>,
    image: &str,
) -> Result<(Engine, RemoteReference, Option<ImageReference>)> {
    let (mut engine, _) = engine_for(cli, config, false, &[])?;
    let (own, name) = engine
        .parse_image_argument(image)
        .with_context(|| format!("{image:?} is not an image reference"))?;
    let Some(source) = source else {
        if insecure {
            engine.remote.insecure.push(own.target.location.clone());
        }
        return Ok((engine, own, name));
    };
    if own.scheme != sarde_engine::remote::DEFAULT_SCHEME {
        anyhow::bail!(
            "{image} names where the image comes from, and so does --source {source}: give one of them (IMAGE then is the cache name)"
        );
    }
    let (engine, mut refs) = engine_for(cli, config, insecure, &[source])?;
    Ok((engine, refs.remove(0), name))
}

/// A placeholder for the image an import reads, until the pull has decided it.
fn pending_location(engine: &Engine, name: Option<&ImageReference>) -> sarde_engine::ImageLocation {
    match name {
        Some(image) => sarde_engine::ImageLocation::to_write(&engine.ocidir, image),
        None => sarde_engine::ImageLocation::pending(&engine.ocidir),
    }
}

fn parse_image(text: &str) -> Result<ImageReference> {
    text.parse()
        .with_context(|| format!("{text:?} is not an image reference"))
}

fn summary_line(s: &Summary) -> String {
    format!(
        "{} received, {} sent, {} skipped; {} blobs moved, {} skipped ({} mounted or linked); {:.1}s",
        human(s.bytes_received),
        human(s.bytes_sent),
        human(s.bytes_skipped),
        s.blobs_transferred,
        s.blobs_skipped,
        s.blobs_mounted,
        s.seconds
    )
}

pub fn push(cli: &Cli, config: &Config, args: &PushArgs) -> Result<ExitCode> {
    let image = parse_image(&args.image).with_context(|| {
        format!(
            "push sends an image of the cache, named as in `sarde list`; to send one from another transport use `sarde copy {} DESTINATION`",
            args.image
        )
    })?;
    let texts: Vec<&str> = args.targets.iter().map(String::as_str).collect();
    let (mut engine, mut targets) = engine_for(cli, config, args.insecure, &texts)?;
    if targets.is_empty() {
        // No target: the image's own name, a registry reference whatever
        // `transport` says.
        targets.push(RemoteReference::registry(&image));
        if args.insecure {
            engine.remote.insecure.push(image.registry_location());
        }
    }
    let key = super::trust::signing_key(&args.sign)?;
    let progress = Arc::new(Reporter::new(quiet(cli, config)));
    let result = runtime(config)?
        .block_on(engine.push(&image, &targets, key.as_ref(), progress))
        .with_context(|| format!("pushing {image}"))?;
    let pushed = &result.copied;
    tracing::info!("pushed {image}: {}", summary_line(&pushed.summary));
    match args.format {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&pushed.summary)?;
            value["image"] = json!(image.to_string());
            value["manifest"] = json!(pushed.manifest.digest.to_string());
            value["targets"] = json!(
                pushed
                    .targets
                    .iter()
                    .map(|(name, manifest_only)| json!({"name": name, "manifest_only": manifest_only}))
                    .collect::<Vec<_>>()
            );
            value["signed"] = signed_json(&result.signed);
            println!("{value}");
        }
        OutputFormat::Text => {
            for (name, _) in &pushed.targets {
                println!("{name}@{}", pushed.manifest.digest);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The signatures a push or copy wrote, for `--format json`.
fn signed_json(signed: &[sarde_trust::sign::Signed]) -> serde_json::Value {
    json!(
        signed
            .iter()
            .map(|s| json!({
                "identity": s.identity,
                "signature_manifest": s.signature_manifest.to_string(),
                "signatures": s.signatures,
            }))
            .collect::<Vec<_>>()
    )
}

pub fn copy(cli: &Cli, config: &Config, args: &CopyArgs) -> Result<ExitCode> {
    let (mut engine, refs) = engine_for(
        cli,
        config,
        args.insecure,
        &[&args.source, &args.destination],
    )?;
    engine.remote.trust = super::trust::trust(config)?;
    let (source, destination) = (&refs[0], &refs[1]);
    let key = super::trust::signing_key(&args.sign)?;
    let progress = Arc::new(Reporter::new(quiet(cli, config)));
    let result = runtime(config)?
        .block_on(engine.copy(source, destination, key.as_ref(), progress))
        .with_context(|| format!("copying {source} to {destination}"))?;
    let copied = &result.copied;
    tracing::info!(
        "copied {source} to {destination}: {}",
        summary_line(&copied.summary)
    );
    match args.format {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&copied.summary)?;
            value["source"] = json!(source.to_string());
            value["destination"] = json!(destination.to_string());
            value["manifest"] = json!(copied.manifest.digest.to_string());
            value["manifest_only"] = json!(copied.targets.first().is_some_and(|t| t.1));
            value["policy"] = super::trust::policy_json(result.policy.as_ref());
            value["signed"] = signed_json(&result.signed);
            println!("{value}");
        }
        OutputFormat::Text => println!("{destination}@{}", copied.manifest.digest),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn fetch(cli: &Cli, config: &Config, args: &FetchArgs) -> Result<ExitCode> {
    let (mut engine, source, name) = engine_and_source(
        cli,
        config,
        args.insecure,
        args.source.as_deref(),
        &args.image,
    )?;
    engine.remote.trust = super::trust::trust(config)?;
    let progress = Arc::new(Reporter::new(quiet(cli, config)));
    let fetched = runtime(config)?
        .block_on(engine.fetch(&source, name.as_ref(), progress))
        .with_context(|| format!("fetching {source}"))?;
    let image = &fetched.image;
    if fetched.up_to_date {
        tracing::info!("{image} is up to date ({})", fetched.manifest.digest);
    } else {
        tracing::info!("fetched {image}: {}", summary_line(&fetched.summary));
    }
    match args.format {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&fetched.summary)?;
            value["image"] = json!(image.to_string());
            value["source"] = json!(source.to_string());
            value["manifest"] = json!(fetched.manifest.digest.to_string());
            value["up_to_date"] = json!(fetched.up_to_date);
            value["policy"] = super::trust::policy_json(fetched.policy.as_ref());
            println!("{value}");
        }
        OutputFormat::Text => println!("{}", fetched.manifest.digest),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pull(cli: &Cli, config: &Config, args: &PullArgs) -> Result<ExitCode> {
    let (mut engine, source, name) = engine_and_source(
        cli,
        config,
        args.insecure,
        args.source.as_deref(),
        &args.image,
    )?;
    engine.remote.trust = super::trust::trust(config)?;
    let import = args.vm.request(pending_location(&engine, name.as_ref()));
    let progress = Arc::new(Reporter::new(quiet(cli, config)));
    let pulled = runtime(config)?
        .block_on(engine.pull(&source, name.as_ref(), import, progress))
        .with_context(|| format!("pulling {source}"))?;
    let image = &pulled.fetched.image;
    tracing::info!(
        "pulled {image} as VM {:?}: {}",
        pulled.import.name,
        summary_line(&pulled.fetched.summary)
    );
    match args.format {
        OutputFormat::Json => {
            let value = json!({
                "image": image.to_string(),
                "source": source.to_string(),
                "manifest": pulled.fetched.manifest.digest.to_string(),
                "up_to_date": pulled.fetched.up_to_date,
                "policy": super::trust::policy_json(pulled.fetched.policy.as_ref()),
                "transfer": pulled.fetched.summary,
                "import": pulled.import,
            });
            println!("{value}");
        }
        OutputFormat::Text if args.vm.print_uuid => println!("{}", pulled.import.uuid),
        OutputFormat::Text => println!("{}", pulled.import.name),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn clone(cli: &Cli, config: &Config, args: &CloneArgs) -> Result<ExitCode> {
    let engine = engine(cli, config)?;
    let hv = engine.registry.connect(&engine.connect)?;
    // A VM by that name wins; otherwise SOURCE is an image, imported under its id.
    let source_vm = if hv.exists(&args.source)? {
        args.source.clone()
    } else {
        let (mut engine, source, name) =
            engine_and_source(cli, config, args.insecure, None, &args.source).with_context(
                || {
                    format!(
                        "no VM {:?}, and it is not an image reference either",
                        args.source
                    )
                },
            )?;
        engine.remote.trust = super::trust::trust(config)?;
        let import = ImportFlags {
            name: None,
            print_uuid: false,
            replace: false,
            allow_unsafe_xml: false,
        }
        .request(pending_location(&engine, name.as_ref()));
        let progress = Arc::new(Reporter::new(quiet(cli, config)));
        let pulled = runtime(config)?
            .block_on(engine.pull(&source, name.as_ref(), import, progress))
            .with_context(|| format!("pulling {source} to clone it"))?;
        pulled.import.name
    };
    let request = CloneRequest {
        source: source_vm,
        name: args.target.clone(),
        clonedir: config.settings.clonedir.clone(),
        mac: args.mac.clone(),
        start: match args.start {
            CloneStartArg::Define => CloneStart::Define,
            CloneStartArg::Persistent => CloneStart::Persistent,
            CloneStartArg::Ephemeral => CloneStart::Ephemeral,
            CloneStartArg::PrintXml => CloneStart::PrintXml,
        },
    };
    let started = std::time::Instant::now();
    let outcome = engine
        .clone_vm(&request)
        .with_context(|| format!("cloning {}", request.source))?;
    tracing::info!(
        "cloned {} as {} ({} overlays) in {:.2}s",
        outcome.source,
        outcome.name,
        outcome.overlays.len(),
        started.elapsed().as_secs_f64()
    );
    match (args.format, &outcome.xml) {
        (OutputFormat::Json, _) => println!("{}", serde_json::to_string(&outcome)?),
        (OutputFormat::Text, Some(xml)) => println!("{xml}"),
        (OutputFormat::Text, None) => println!("{}", outcome.name),
    }
    Ok(ExitCode::SUCCESS)
}
