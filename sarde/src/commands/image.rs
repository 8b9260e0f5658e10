//! export, import, list, getconfig: flags and config to engine requests, results to
//! stdout.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use sarde_api::ImageReference;
use sarde_cli::config::Config;
use sarde_engine::export::ExportRequest;
use sarde_engine::lifecycle::LifecycleSettings;
use sarde_engine::remote::Remote;
use sarde_engine::{Engine, ImageLocation};
use sarde_format::Format;
use sarde_lifecycle::space::human_age;
use sarde_transfer::{RetryBudget, TransferOptions};
use sarde_transport_oci_dir::OciDir;

use super::progress::human;
use super::{load_registry, print_table};
use crate::cli::{Cli, ExportArgs, GetconfigArgs, ImageFormat, ImportArgs, ListArgs, OutputFormat};

pub(crate) fn engine(cli: &Cli, config: &Config) -> Result<Engine> {
    let loaded = load_registry(cli, config)?;
    let s = &config.settings;
    Ok(Engine {
        registry: Arc::new(loaded.registry),
        connect: s.connect.clone(),
        ocidir: OciDir::new(s.ocidir.clone()),
        vmdir: s.vmdir.clone(),
        threads: s.threads,
        remote: Remote {
            insecure: s.insecure.clone(),
            certs_dirs: s.certs_dir.clone(),
            transfer: TransferOptions {
                concurrency: s.concurrency,
                retries: s.retries,
                retry_budget: RetryBudget::new(s.retry_budget),
                ..TransferOptions::default()
            },
            bounds: s.time_bounds(),
            default_transport: s.transport.clone(),
            credentials: Vec::new(),
            trust: Default::default(),
        },
        lifecycle: LifecycleSettings {
            space_budget: s.space_budget.map(|b| b.0),
            auto_prune: s.auto_prune,
            prune_min_age: s.prune_min_age.0,
            keep_blobs: s.keep_blobs,
        },
    })
}

pub(crate) fn location(config: &Config, raw: bool, image: &str) -> Result<ImageLocation> {
    if raw {
        return Ok(ImageLocation::raw(image));
    }
    let reference: ImageReference = image.parse()?;
    Ok(ImageLocation::cached(
        &OciDir::new(config.settings.ocidir.clone()),
        &reference,
    ))
}

/// The default image name for a VM: its name, lower-cased, with characters that a
/// repository name cannot hold replaced by `-`.
fn default_image_name(vm: &str) -> String {
    let mut name: String = vm
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if name.is_empty() { "vm".into() } else { name }
}

pub fn export(cli: &Cli, config: &Config, args: &ExportArgs) -> Result<ExitCode> {
    let image = args
        .image
        .clone()
        .or_else(|| args.tag.clone())
        .unwrap_or_else(|| default_image_name(&args.vm));
    // Written where new images go, never into a layout found elsewhere (the
    // Python tool's host:port layout is read, never written).
    let location = if args.raw {
        ImageLocation::raw(&image)
    } else {
        let reference: ImageReference = image.parse()?;
        ImageLocation::to_write(&OciDir::new(config.settings.ocidir.clone()), &reference)
    };
    let engine = engine(cli, config)?;
    let request = ExportRequest {
        vm: args.vm.clone(),
        libvirt_xml: args.libvirtconfig.clone(),
        vm_config: args.vmconfig.clone(),
        image: location,
        chunksize: config.settings.chunksize.0,
        // Unset: the image format's own codec.
        codec: (config.origin("codec").kind != "default").then(|| config.settings.codec.clone()),
        level: config.settings.level,
        format: match args.image_format {
            ImageFormat::Native => Format::Native,
            ImageFormat::V1 => Format::V1,
        },
        force: args.force,
    };
    let started = std::time::Instant::now();
    let outcome = engine
        .export(&request)
        .with_context(|| format!("exporting VM {:?} to {image}", args.vm))?;
    tracing::info!(
        "exported {} files ({} bytes read; {} unchanged since their last export, not read) into {} layers, {} bytes stored, {} zero pieces skipped, {} pieces unchanged and not compressed again, in {:.1}s",
        outcome.files,
        outcome.bytes_read,
        outcome.files_unchanged,
        outcome.layers,
        outcome.bytes_stored,
        outcome.zero_pieces,
        outcome.pieces_reused,
        started.elapsed().as_secs_f64()
    );
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string(&outcome)?),
        OutputFormat::Text => println!("{}", outcome.image_id),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn import(cli: &Cli, config: &Config, args: &ImportArgs) -> Result<ExitCode> {
    let location = location(config, args.raw, &args.image)?;
    let engine = engine(cli, config)?;
    let request = args.vm.request(location);
    let outcome = engine
        .import(&request)
        .with_context(|| format!("importing {}", args.image))?;
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&outcome)?),
        OutputFormat::Text if args.vm.print_uuid => println!("{}", outcome.uuid),
        OutputFormat::Text => println!("{}", outcome.name),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(cli: &Cli, config: &Config, args: &ListArgs) -> Result<ExitCode> {
    let engine = engine(cli, config)?;
    let listing = engine.list().context("listing the local images")?;
    let mut out = std::io::stdout().lock();
    match args.format {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&listing)?)?,
        OutputFormat::Text => {
            let now = std::time::SystemTime::now();
            let rows: Vec<[String; 5]> = listing
                .images
                .iter()
                .map(|e| {
                    let id = e
                        .image_id
                        .as_ref()
                        .map(|d| d.hex()[..12].to_string())
                        .unwrap_or_else(|| "?".into());
                    let vms = e
                        .vms
                        .iter()
                        .map(|v| format!("{} ({}, {})", v.name, v.state, human(v.size)))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let name = match &e.tag {
                        Some(tag) => format!("{}:{tag}", e.name),
                        None => format!("{}@{}", e.name, e.manifest),
                    };
                    let size = if e.broken {
                        format!("{} (broken)", human(e.size))
                    } else {
                        human(e.size)
                    };
                    [name, id, size, ago(now, e.last_used), vms]
                })
                .collect();
            print_table(
                &mut out,
                ["IMAGE", "IMAGE ID", "SIZE", "LAST USED", "VMS"],
                &rows,
            )?;
            writeln!(
                out,
                "cache {} (blobs shared by several images counted once), {} VM(s) {}, total {}",
                human(listing.cache_bytes),
                listing.vms.len(),
                human(listing.vm_bytes),
                human(listing.cache_bytes + listing.vm_bytes)
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `3d 4h ago` for seconds since the epoch; `never` for 0.
pub(crate) fn ago(now: std::time::SystemTime, seconds: u64) -> String {
    if seconds == 0 {
        return "never".into();
    }
    let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    match now.duration_since(then) {
        Ok(age) => format!("{} ago", human_age(age)),
        Err(_) => "just now".into(),
    }
}

pub fn getconfig(cli: &Cli, config: &Config, args: &GetconfigArgs) -> Result<ExitCode> {
    let location = location(config, args.raw, &args.image)?;
    let engine = engine(cli, config)?;
    let json = engine
        .getconfig(&location)
        .with_context(|| format!("reading the configuration of {}", args.image))?;
    let mut out = std::io::stdout().lock();
    match json {
        Some(bytes) => {
            out.write_all(&bytes)?;
            if !bytes.ends_with(b"\n") {
                writeln!(out)?;
            }
        }
        None => writeln!(out, "{{}}")?,
    }
    Ok(ExitCode::SUCCESS)
}
