//! inspect, rm, prune: what an image is made of, and freeing space.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use sarde_cli::config::Config;
use sarde_engine::lifecycle::{PruneReport, PruneRequest};
use sarde_lifecycle::plan::Reason;

use serde_json::json;

use super::image::{engine, location};
use super::print_table;
use super::progress::human;
use crate::cli::{Cli, InspectArgs, OutputFormat, PruneArgs, RmArgs};

pub fn inspect(cli: &Cli, config: &Config, args: &InspectArgs) -> Result<ExitCode> {
    let location = location(config, args.raw, &args.image)?;
    let engine = engine(cli, config)?;
    let inspection = engine
        .inspect(&location)
        .with_context(|| format!("inspecting {}", args.image))?;
    let mut out = std::io::stdout().lock();
    if args.format == OutputFormat::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&inspection)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let i = &inspection;
    let unknown = || "?".to_string();
    writeln!(out, "image:     {}", i.image)?;
    writeln!(out, "manifest:  {}", i.manifest)?;
    writeln!(out, "image id:  {}", i.image_id)?;
    writeln!(out, "format:    {}", i.format)?;
    writeln!(
        out,
        "created:   {}",
        i.created.clone().unwrap_or_else(unknown)
    )?;
    writeln!(
        out,
        "platform:  {}/{}",
        i.os.clone().unwrap_or_else(unknown),
        i.architecture.clone().unwrap_or_else(unknown)
    )?;
    for (key, value) in &i.annotations {
        writeln!(out, "annotation {key}={value}")?;
    }
    writeln!(out)?;
    let size = |s: Option<u64>| s.map_or_else(unknown, human);
    let rows: Vec<[String; 8]> = i
        .files
        .iter()
        .map(|f| {
            [
                f.name.clone(),
                f.role.clone(),
                f.format.clone(),
                size(f.virtual_size),
                size(f.data_size),
                human(f.stored_size),
                f.pieces.to_string(),
                format!(
                    "{}{}",
                    f.codec,
                    f.backing
                        .as_ref()
                        .map(|b| format!(" (backing: {b})"))
                        .unwrap_or_default()
                ),
            ]
        })
        .collect();
    print_table(
        &mut out,
        [
            "FILE", "ROLE", "FORMAT", "VIRTUAL", "DATA", "STORED", "PIECES", "CODEC",
        ],
        &rows,
    )?;
    writeln!(out)?;
    if i.vms.is_empty() {
        writeln!(out, "no VM imported from this image")?;
    }
    for vm in &i.vms {
        writeln!(out, "VM {} ({}, {})", vm.name, vm.state, human(vm.size))?;
    }
    for clone in &i.clones {
        writeln!(out, "clone {} (of VM {})", clone.name, clone.source)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rm(cli: &Cli, config: &Config, args: &RmArgs) -> Result<ExitCode> {
    let engine = engine(cli, config)?;
    let mut out = std::io::stdout().lock();
    if args.vm {
        let mut removed = Vec::new();
        let mut freed = 0;
        for name in &args.names {
            let bytes = engine
                .rm_vm(name)
                .with_context(|| format!("removing VM {name}"))?;
            freed += bytes;
            removed.push(name.clone());
            if args.format == OutputFormat::Text {
                writeln!(out, "removed VM {name} ({})", human(bytes))?;
            }
        }
        if args.format == OutputFormat::Json {
            writeln!(out, "{}", json!({"vms": removed, "bytes_freed": freed}))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let locations = args
        .names
        .iter()
        .map(|n| location(config, false, n))
        .collect::<Result<Vec<_>>>()?;
    let swept = engine
        .remove_images(&locations)
        .with_context(|| format!("removing {}", args.names.join(", ")))?;
    match args.format {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(&swept)?)?,
        OutputFormat::Text => {
            for image in &swept.images {
                writeln!(out, "removed {image}")?;
            }
            writeln!(
                out,
                "{} blob(s) no other image uses removed, {} freed",
                swept.blobs,
                human(swept.bytes_freed)
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn prune(cli: &Cli, config: &Config, args: &PruneArgs) -> Result<ExitCode> {
    let engine = engine(cli, config)?;
    let report = engine
        .prune(&PruneRequest {
            older_than: args.older_than.map(|a| a.0),
            space_budget: args.space_budget.map(|b| b.0),
            include_vms: args.vms,
            dry_run: args.dry_run,
        })
        .context("pruning")?;
    let mut out = std::io::stdout().lock();
    match args.format {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(&report)?)?,
        OutputFormat::Text => print_prune(&mut out, &report, config)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn reason(r: Reason) -> &'static str {
    match r {
        Reason::Broken => "broken: a blob it needs is missing",
        Reason::Orphaned => "a signature whose image is gone",
        Reason::Unreferenced => "no image uses it",
        Reason::DeadProcess => "left by a process that is gone",
        Reason::Abandoned => "abandoned download",
        Reason::OlderThan => "not used for --older-than",
        Reason::SpaceBudget => "least recently used, over the space budget",
        Reason::Reclaim => "least recently used, to make room",
        Reason::Requested => "asked for",
    }
}

fn print_prune(out: &mut impl Write, report: &PruneReport, config: &Config) -> Result<()> {
    let plan = &report.plan;
    match &report.swept {
        None => print_plan(out, plan)?,
        Some(swept) => print_swept(out, plan, swept)?,
    }
    let freed = report
        .swept
        .as_ref()
        .map_or(plan.bytes_freed, |s| s.bytes_freed);
    let scope = if plan.vms.is_empty() && plan.budget.is_none() {
        "the cache"
    } else {
        "cache and VMs"
    };
    writeln!(
        out,
        "{} {}: {scope} took {}",
        if report.dry_run {
            "would free"
        } else {
            "freed"
        },
        human(freed),
        human(plan.bytes_before)
    )?;
    if let Some(budget) = plan.budget.as_ref().filter(|b| b.over_budget) {
        writeln!(
            out,
            "still over the space budget of {}: {} remain, of which {} in use and {} used within prune-min-age ({})",
            human(budget.budget),
            human(budget.bytes_after),
            human(budget.kept_in_use),
            human(budget.kept_recent),
            config.settings.prune_min_age
        )?;
    }
    Ok(())
}

/// What a dry run would remove, item by item (blobs per repository).
fn print_plan(out: &mut impl Write, plan: &sarde_lifecycle::Plan) -> Result<()> {
    let verb = "would remove";
    for image in &plan.images {
        writeln!(
            out,
            "{verb} image {} ({})",
            image.name,
            reason(image.reason)
        )?;
    }
    for vm in &plan.vms {
        writeln!(
            out,
            "{verb} VM {} from {}, {} ({})",
            vm.name,
            vm.image,
            human(vm.freed),
            reason(vm.reason)
        )?;
    }
    let mut blobs: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for blob in &plan.blobs {
        let entry = blobs.entry(blob.layout.as_str()).or_default();
        entry.0 += 1;
        entry.1 += blob.freed;
    }
    for (layout, (count, bytes)) in blobs {
        writeln!(
            out,
            "{verb} {count} blob(s) of {layout} no image uses, {}",
            human(bytes)
        )?;
    }
    for (what, files) in [
        ("temporary file", &plan.temps),
        ("partial download", &plan.partials),
        ("staging directory", &plan.staging),
    ] {
        for f in files {
            writeln!(
                out,
                "{verb} {what} {}, {} ({})",
                f.path.display(),
                human(f.freed),
                reason(f.reason)
            )?;
        }
    }
    Ok(())
}

/// What a prune removed: the planned items that were still garbage when their
/// turn came, and those found in use by then.
fn print_swept(
    out: &mut impl Write,
    plan: &sarde_lifecycle::Plan,
    swept: &sarde_lifecycle::Swept,
) -> Result<()> {
    for image in plan
        .images
        .iter()
        .filter(|i| swept.images.contains(&i.name))
    {
        writeln!(
            out,
            "removed image {} ({})",
            image.name,
            reason(image.reason)
        )?;
    }
    for vm in plan.vms.iter().filter(|v| swept.vms.contains(&v.name)) {
        writeln!(
            out,
            "removed VM {} from {}, {} ({})",
            vm.name,
            vm.image,
            human(vm.freed),
            reason(vm.reason)
        )?;
    }
    for (count, what) in [
        (swept.blobs, "blob(s) no image uses"),
        (swept.temps, "temporary file(s) of processes that are gone"),
        (swept.partials, "abandoned partial download(s)"),
        (
            swept.staging,
            "staging director(y/ies) of imports that are gone",
        ),
    ] {
        if count > 0 {
            writeln!(out, "removed {count} {what}")?;
        }
    }
    for spared in &swept.spared {
        writeln!(out, "kept (in use by now): {spared}")?;
    }
    Ok(())
}
