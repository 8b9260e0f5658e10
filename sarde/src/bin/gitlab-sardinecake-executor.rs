//! `gitlab-sardinecake-executor`: the GitLab Runner custom executor. Every job runs
//! in an ephemeral copy-on-write clone of the job's VM image, over SSH.
//!
//! ```toml
//! [runners.custom]
//!   config_exec = "gitlab-sardinecake-executor"  ; config_args = ["config"]
//!   prepare_exec = "gitlab-sardinecake-executor" ; prepare_args = ["prepare"]
//!   run_exec = "gitlab-sardinecake-executor"     ; run_args = ["run"]
//!   cleanup_exec = "gitlab-sardinecake-executor" ; cleanup_args = ["cleanup"]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{ArgAction, Args, Parser, Subcommand};
use sarde_cli::builtin;
use sarde_cli::config::{Settings as SardeSettings, home_dir, running_as_root};
use sarde_engine::Engine;
use sarde_engine::lifecycle::LifecycleSettings;
use sarde_engine::remote::Remote;
use sarde_executor::config::{Files, Settings, config_files};
use sarde_executor::stages::{self, Job, StageError};
use sarde_transfer::{RetryBudget, TransferOptions};
use sarde_transport_oci_dir::OciDir;

#[derive(Debug, Parser)]
#[command(
    name = "gitlab-sardinecake-executor",
    version,
    about = "GitLab Runner custom executor: each job in an ephemeral clone of a libvirt VM image, over SSH"
)]
struct Cli {
    /// More output on stderr (repeat for more)
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Less output on stderr
    #[arg(short, long, action = ArgAction::Count, global = true)]
    quiet: u8,
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    stage: Stage,
}

/// Fallbacks for the configuration files' keys (an image's own section wins).
#[derive(Debug, Args)]
struct Flags {
    /// libvirt connection URI
    #[arg(long, global = true)]
    connect: Option<String>,
    /// SSH user in the VM
    #[arg(short = 'u', long, global = true)]
    username: Option<String>,
    /// SSH password
    #[arg(short = 'p', long, global = true)]
    password: Option<String>,
    /// SSH private key
    #[arg(long, global = true)]
    identity_file: Option<PathBuf>,
    /// Seconds to wait for the VM's address and SSH
    #[arg(long, global = true)]
    timeout: Option<f64>,
    /// Script (on this host) run in the VM at the end of prepare
    #[arg(long, global = true)]
    prepare_script: Option<PathBuf>,
    /// Where clones' overlays go
    #[arg(long, global = true)]
    clonedir: Option<PathBuf>,
    /// Where imported VMs' disks go
    #[arg(long, global = true)]
    vmdir: Option<PathBuf>,
    /// The local image cache
    #[arg(long, global = true)]
    ocidir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Stage {
    /// Print the executor's configuration for gitlab-runner (JSON)
    Config,
    /// Get the job's image, clone it, boot the clone and wait for SSH
    Prepare,
    /// Run one stage's script in the job's VM
    Run {
        /// The script gitlab-runner generated
        script: PathBuf,
        /// The stage's name (prepare_script, get_sources, step_script, …)
        stage: String,
    },
    /// Remove the job's VM and its overlays
    Cleanup,
}

impl Flags {
    fn values(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut set = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        set("connect", self.connect.clone());
        set("username", self.username.clone());
        set("password", self.password.clone());
        set("identity-file", path(&self.identity_file));
        set("timeout", self.timeout.map(|t| t.to_string()));
        set("prepare-script", path(&self.prepare_script));
        set("clonedir", path(&self.clonedir));
        set("vmdir", path(&self.vmdir));
        set("ocidir", path(&self.ocidir));
        m
    }
}

/// The factories: built in, and the plugins of the default plugin directory.
fn registry() -> Result<Arc<sarde_api::Registry>> {
    let defaults = SardeSettings::defaults(running_as_root(), home_dir().as_deref());
    Ok(Arc::new(
        builtin::load_registry(&defaults.plugin_dir, &[])?.registry,
    ))
}

fn engine(settings: &Settings, registry: Arc<sarde_api::Registry>) -> Result<Engine> {
    let defaults = SardeSettings::defaults(running_as_root(), home_dir().as_deref());
    Ok(Engine {
        registry,
        connect: settings.connect.clone(),
        ocidir: OciDir::new(settings.ocidir.clone()),
        vmdir: settings.vmdir.clone(),
        // As many as the host has (twice that where workers wait for the disk).
        threads: 0,
        remote: Remote {
            insecure: settings.insecure.clone(),
            certs_dirs: defaults.certs_dir,
            transfer: TransferOptions {
                concurrency: settings.concurrency,
                retries: settings.retries,
                retry_budget: RetryBudget::new(settings.retry_budget),
                ..TransferOptions::default()
            },
            bounds: settings.time_bounds,
            default_transport: sarde_engine::remote::DEFAULT_SCHEME.to_string(),
            credentials: Vec::new(),
            // Only prepare reads images: set there, so a broken policy file
            // never stops a cleanup.
            trust: Default::default(),
        },
        lifecycle: LifecycleSettings {
            space_budget: settings.space_budget,
            auto_prune: settings.auto_prune,
            prune_min_age: settings.prune_min_age,
            keep_blobs: settings.keep_blobs,
        },
    })
}

/// The signature policy of the image's settings (`policy`, else where podman
/// looks) and whether it must be signed (`require-signature`).
fn trust(settings: &Settings) -> Result<sarde_engine::trust::Trust> {
    let policy = match &settings.policy {
        Some(path) => Some(sarde_trust::Policy::load(path)?),
        None => sarde_trust::Policy::load_default()?,
    };
    Ok(sarde_engine::trust::Trust {
        policy: policy.map(Arc::new),
        require_signature: settings.require_signature,
    })
}

/// Runs `stage` until it ends or SIGTERM/SIGINT arrives (gitlab-runner signals the
/// whole process group on cancel and timeout); dropping the stage's future closes
/// its SSH session and stops its downloads.
async fn until_terminated<T>(
    stage: impl std::future::Future<Output = Result<T, StageError>>,
) -> Result<T, StageError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| StageError::System(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| StageError::System(e.to_string()))?;
    tokio::select! {
        r = stage => r,
        _ = term.recv() => Err(StageError::System("terminated (SIGTERM): stopped; cleanup removes the VM".into())),
        _ = int.recv() => Err(StageError::System("interrupted (SIGINT): stopped; cleanup removes the VM".into())),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.stage, Stage::Cleanup) {
        // A cancelled cleanup still finishes: nothing calls it again.
        stages::shield_cleanup_from_signals();
    }
    sarde_cli::logging::init(1 + i32::from(cli.verbose) - i32::from(cli.quiet));
    let job = Job::from_env();
    match run(&cli, &job) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gitlab-sardinecake-executor: error: {e:#}");
            ExitCode::from(u8::try_from(job.system_failure).unwrap_or(2))
        }
    }
}

fn run(cli: &Cli, job: &Job) -> Result<ExitCode> {
    let files = Files::read(&config_files()).context("reading the configuration")?;
    let registry = registry()?;
    // Section names and images are `scheme:rest` of the transports sarde knows.
    let is_scheme = |scheme: &str| registry.transport(scheme).is_ok();
    let settings = files
        .settings(
            job.image.as_deref(),
            &cli.flags.values(),
            running_as_root(),
            &is_scheme,
        )
        .context("invalid configuration")?;
    let mut engine = engine(&settings, registry.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.concurrency.clamp(2, 16))
        .enable_all()
        .build()?;
    let exit = |e: StageError| {
        let code = match &e {
            StageError::Build(_) => job.build_failure,
            StageError::System(_) => job.system_failure,
        };
        eprintln!("gitlab-sardinecake-executor: {e}");
        ExitCode::from(u8::try_from(code).unwrap_or(1))
    };
    let result = match &cli.stage {
        Stage::Config => {
            println!("{}", stages::config(&engine, &settings, job));
            Ok(())
        }
        Stage::Prepare => {
            engine.remote.trust = trust(&settings).context("the signature policy")?;
            runtime
                .block_on(until_terminated(stages::prepare(
                    &mut engine,
                    &settings,
                    job,
                )))
                .map(drop)
        }
        Stage::Run { script, stage } => {
            runtime.block_on(until_terminated(stages::run(&settings, job, script, stage)))
        }
        Stage::Cleanup => runtime
            .block_on(stages::cleanup(&engine, &settings, job))
            .map(|done| {
                for line in done {
                    tracing::info!("{line}");
                }
            }),
    };
    // Dropping the runtime would wait for blocking tasks (an import) to finish.
    runtime.shutdown_background();
    Ok(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit(e),
    })
}
