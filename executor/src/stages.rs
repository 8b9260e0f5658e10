//! The four stages gitlab-runner calls: `config`, `prepare`, `run`, `cleanup`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use sarde_api::ImageReference;
use sarde_api::transport::Credentials;
use sarde_engine::clone::{CloneRequest, CloneStart};
use sarde_engine::remote::RemoteReference;
use sarde_engine::{Engine, ImageLocation};
use sarde_transfer::NoProgress;
use serde::Serialize;
use serde_json::json;

use crate::address::wait_for_address;
use crate::config::{PullPolicy, Settings};
use crate::ssh::{Login, SshError};
use crate::state::{JobState, Slot, release_slot};

/// The job as gitlab-runner describes it in the environment.
#[derive(Debug, Clone, Default)]
pub struct Job {
    pub image: Option<String>,
    pub id: Option<String>,
    pub registry: Option<String>,
    pub registry_user: Option<String>,
    pub registry_password: Option<String>,
    pub build_failure: i32,
    pub system_failure: i32,
    pub exit_code_file: Option<PathBuf>,
}

impl Job {
    pub fn from_env() -> Job {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let custom = |k: &str| var(&format!("CUSTOM_ENV_{k}"));
        let code = |k: &str, default: i32| var(k).and_then(|v| v.parse().ok()).unwrap_or(default);
        Job {
            image: custom("CI_JOB_IMAGE"),
            id: custom("CI_JOB_ID"),
            registry: custom("CI_REGISTRY"),
            registry_user: custom("CI_REGISTRY_USER"),
            registry_password: custom("CI_REGISTRY_PASSWORD"),
            build_failure: code("BUILD_FAILURE_EXIT_CODE", 1),
            system_failure: code("SYSTEM_FAILURE_EXIT_CODE", 2),
            exit_code_file: var("BUILD_EXIT_CODE_FILE").map(PathBuf::from),
        }
    }

    /// The clone's name: `gitlab-<CI_JOB_ID>`.
    pub fn vm_name(&self) -> Result<String, StageError> {
        match &self.id {
            Some(id)
                if id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                Ok(format!("gitlab-{id}"))
            }
            Some(id) => Err(StageError::System(format!(
                "CUSTOM_ENV_CI_JOB_ID {id:?} is not a job id"
            ))),
            None => Err(StageError::System(
                "CUSTOM_ENV_CI_JOB_ID is not set: run me from gitlab-runner's custom executor"
                    .into(),
            )),
        }
    }
}

/// Why a stage failed, as gitlab-runner needs to know it.
#[derive(Debug)]
pub enum StageError {
    /// The job's own fault (its script failed, its image is refused): no retry.
    Build(String),
    /// The infrastructure failed: the runner may retry.
    System(String),
}

impl std::fmt::Display for StageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageError::Build(m) | StageError::System(m) => f.write_str(m),
        }
    }
}

fn system(e: impl std::fmt::Display) -> StageError {
    StageError::System(e.to_string())
}

/// `config`: what the runner should know about this executor.
pub fn config(engine: &Engine, settings: &Settings, job: &Job) -> serde_json::Value {
    let version = engine
        .registry
        .connect(&engine.connect)
        .and_then(|hv| hv.version())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let hostname = job
        .vm_name()
        .unwrap_or_else(|_| host_name().unwrap_or_else(|| "localhost".into()));
    let mut value = json!({
        "driver": {
            "name": "gitlab-sardinecake-executor",
            "version": format!("{} ({version})", env!("CARGO_PKG_VERSION")),
        },
        "hostname": hostname,
        "builds_dir_is_shared": false,
        "shell": settings.shell,
        "job_env": {},
    });
    if let Some(d) = &settings.guest_builds_dir {
        value["builds_dir"] = json!(d);
    }
    if let Some(d) = &settings.guest_cache_dir {
        value["cache_dir"] = json!(d);
    }
    value
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}

/// How long the steps of prepare took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PrepareTimes {
    pub pull: f64,
    pub clone: f64,
    pub boot: f64,
    pub ssh: f64,
    pub total: f64,
}

/// `prepare`: get the image, clone it ephemerally, boot it, wait for SSH, run the
/// prepare script.
pub async fn prepare(
    engine: &mut Engine,
    settings: &Settings,
    job: &Job,
) -> Result<PrepareTimes, StageError> {
    let started = Instant::now();
    let mut times = PrepareTimes::default();
    let image_text = job.image.clone().ok_or_else(|| {
        StageError::Build("the job names no image (`image:` in .gitlab-ci.yml)".into())
    })?;
    let is_scheme = |scheme: &str| engine.registry.transport(scheme).is_ok();
    if !settings.allows(&image_text, &is_scheme) {
        return Err(StageError::Build(format!(
            "image {image_text} is not in this runner's allowed-images ({})",
            settings.allowed_images.join(", ")
        )));
    }
    // A registry reference, or `scheme:rest` of another transport (an archive
    // on a shared file system), cached under a name made from it.
    let (source, name) = engine
        .parse_image_argument(&image_text)
        .map_err(|e| StageError::Build(format!("image {image_text:?}: {e}")))?;
    let vm = job.vm_name()?;
    let hv = engine.registry.connect(&engine.connect).map_err(system)?;

    let _slot = if settings.max_vms > 0 {
        let deadline = Instant::now() + Duration::from_secs(24 * 3600);
        let exists = |name: &str| hv.exists(name).unwrap_or(true);
        let slot = Slot::claim(
            &settings.state_dir,
            settings.max_vms,
            &vm,
            deadline,
            &exists,
        )
        .await
        .map_err(|e| system(format!("claiming a VM slot: {e}")))?
        .ok_or_else(|| system("no VM slot became free"))?;
        tracing::info!("{vm}: VM slot {}", slot.path().display());
        Some(slot)
    } else {
        None
    };

    // A retried prepare starts from scratch.
    if hv.exists(&vm).map_err(system)? {
        tracing::warn!("{vm} exists from an earlier attempt; removing it");
        let dirs = JobState::read(&settings.state_dir, &vm)
            .map(|s| s.overlay_dirs)
            .unwrap_or_default();
        engine.remove_clone(&vm, &dirs).map_err(system)?;
    }

    if let (Some(registry), Some(user), Some(password)) =
        (&job.registry, &job.registry_user, &job.registry_password)
    {
        if source.scheme == sarde_engine::remote::DEFAULT_SCHEME
            && *registry == source.target.location
        {
            engine.remote.credentials.push((
                registry.clone(),
                Credentials {
                    username: user.clone(),
                    password: password.clone(),
                },
            ));
        }
    }

    let t = Instant::now();
    eprintln!(
        "Getting image {image_text} ({:?} pull policy)…",
        settings.pull_policy
    );
    let (mut source_vm, image) = source_vm(engine, settings, &source, name.as_ref()).await?;
    times.pull = t.elapsed().as_secs_f64();

    let overlay_dirs = overlay_dirs(hv.as_ref(), settings, &source_vm)?;
    let mut state = JobState {
        vm: vm.clone(),
        source_vm: source_vm.clone(),
        image: image_text.clone(),
        cached_as: Some(image.to_string()),
        login: login_for(engine, settings, &image, "0.0.0.0".into()),
        overlay_dirs,
    };
    // Written before the clone exists, so cleanup finds its files whatever happens.
    state
        .write(&settings.state_dir)
        .map_err(|e| system(format!("writing the job state: {e}")))?;

    let t = Instant::now();
    eprintln!("Cloning {source_vm} as {vm} and booting it…");
    let clone = |source: &str| {
        engine.clone_vm(&CloneRequest {
            source: source.to_string(),
            name: Some(vm.clone()),
            clonedir: settings.clonedir.clone(),
            mac: None,
            start: CloneStart::Ephemeral,
        })
    };
    if let Err(e) = clone(&source_vm) {
        // Another job's cleanup may have removed this version as superseded
        // between our pull and our clone: get the image again, once.
        if hv.exists(&source_vm).map_err(system)? {
            return Err(system(e));
        }
        eprintln!(
            "{source_vm} was removed meanwhile (a newer version arrived); getting {image_text} again…"
        );
        source_vm = self::source_vm(engine, settings, &source, Some(&image))
            .await?
            .0;
        state.source_vm = source_vm.clone();
        state.overlay_dirs = self::overlay_dirs(hv.as_ref(), settings, &source_vm)?;
        state
            .write(&settings.state_dir)
            .map_err(|e| system(format!("writing the job state: {e}")))?;
        clone(&source_vm).map_err(system)?;
    }
    times.clone = t.elapsed().as_secs_f64();
    remove_superseded(engine, &image).await;

    let deadline = started.max(t) + settings.timeout;
    let t = Instant::now();
    let address = {
        let hv = engine.registry.connect(&engine.connect).map_err(system)?;
        let name = vm.clone();
        let timeout = settings.timeout;
        tokio::task::spawn_blocking(move || wait_for_address(hv.as_ref(), &name, deadline, timeout))
            .await
            .map_err(system)?
            .map_err(system)?
    };
    times.boot = t.elapsed().as_secs_f64();
    eprintln!("{vm} has address {address}; waiting for SSH…");

    let t = Instant::now();
    state.login.host = address.to_string();
    let session = wait_for_ssh(&state.login, deadline).await?;
    state.login.host_key = Some(session.host_key.clone());
    session.close().await;
    times.ssh = t.elapsed().as_secs_f64();
    state
        .write(&settings.state_dir)
        .map_err(|e| system(format!("writing the job state: {e}")))?;

    if let Some(script) = &settings.prepare_script {
        eprintln!("Running the prepare script {}…", script.display());
        let code = run_script(settings, &state.login, script).await?;
        if code != 0 {
            return Err(StageError::Build(format!(
                "the prepare script {} exited with {code}",
                script.display()
            )));
        }
    }
    times.total = started.elapsed().as_secs_f64();
    eprintln!(
        "{vm} is ready: image {:.1}s, clone {:.2}s, boot to address {:.1}s, SSH {:.1}s",
        times.pull, times.clone, times.boot, times.ssh
    );
    Ok(times)
}

/// The local VM of the image, per the pull policy: imported under the image id,
/// so every job of one image shares one base VM; and the image's cache name.
/// An image of another transport whose name only its digest can make (an
/// archive entry with no tag) is read each time: nothing moves when it is
/// cached already.
async fn source_vm(
    engine: &Engine,
    settings: &Settings,
    source: &RemoteReference,
    name: Option<&ImageReference>,
) -> Result<(String, ImageReference), StageError> {
    let Some(image) = name else {
        if settings.pull_policy == PullPolicy::Never {
            return Err(StageError::Build(format!(
                "image {source} names no tag, so only reading it tells its cache name, and the pull policy is never: name a tag"
            )));
        }
        return pull_source_vm(engine, source, None).await;
    };
    let location = ImageLocation::cached(&engine.ocidir, image);
    let import = base_import(location.clone());
    let cached = engine
        .layout(&location)
        .is_ok_and(|l| l.resolve(&location.reference).is_ok());
    let pull = match settings.pull_policy {
        PullPolicy::Always => true,
        PullPolicy::IfNotPresent => !cached,
        PullPolicy::Never if cached => false,
        PullPolicy::Never => {
            return Err(StageError::Build(format!(
                "image {image} is not in the local cache and the pull policy is never"
            )));
        }
    };
    if pull {
        pull_source_vm(engine, source, Some(image)).await
    } else {
        // The cached image, with the signatures the cache kept; the manifest
        // checked is the one imported, even if the tag moves meanwhile.
        let (_, checked) = engine
            .check_cached_policy(image)
            .await
            .map_err(|e| system(format!("using {image} from the cache: {e}")))?;
        let mut import = import;
        import.image.reference = checked.to_string();
        let engine = engine.clone();
        let name = tokio::task::spawn_blocking(move || engine.import(&import))
            .await
            .map_err(system)?
            .map(|o| o.name)
            .map_err(|e| system(format!("importing {image} from the cache: {e}")))?;
        Ok((name, image.clone()))
    }
}

/// The import of a base VM: under the image id, recorded as the executor's.
fn base_import(image: ImageLocation) -> sarde_engine::import::ImportRequest {
    sarde_engine::import::ImportRequest {
        image,
        name: None,
        replace: false,
        allow_unsafe_xml: false,
        incoming: None,
        imported_by: Some(crate::EXECUTOR_NAME.to_string()),
    }
}

async fn pull_source_vm(
    engine: &Engine,
    source: &RemoteReference,
    name: Option<&ImageReference>,
) -> Result<(String, ImageReference), StageError> {
    let import = base_import(ImageLocation::pending(&engine.ocidir));
    let pulled = engine
        .pull(source, name, import, std::sync::Arc::new(NoProgress))
        .await
        .map_err(|e| system(format!("pulling {source}: {e}")))?;
    Ok((pulled.import.name, pulled.fetched.image))
}

fn overlay_dirs(
    hv: &dyn sarde_api::Hypervisor,
    settings: &Settings,
    source_vm: &str,
) -> Result<Vec<PathBuf>, StageError> {
    if let Some(dir) = &settings.clonedir {
        return Ok(vec![dir.clone()]);
    }
    let xml = hv.domain_xml(source_vm, true).map_err(system)?;
    let mut dirs: Vec<PathBuf> = sarde_domain::file_disk_sources(&xml)
        .map_err(system)?
        .into_iter()
        .filter_map(|d| d.source.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    Ok(dirs)
}

/// SSH login: the INI and flags first, then the image's access JSON.
fn login_for(engine: &Engine, settings: &Settings, image: &ImageReference, host: String) -> Login {
    let mut username = settings.username.clone();
    let mut password = settings.password.clone();
    if username.is_none() || (password.is_none() && settings.identity_file.is_none()) {
        let location = ImageLocation::cached(&engine.ocidir, image);
        if let Ok(Some(bytes)) = engine.getconfig(&location) {
            if let Ok(access) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                if let Some(user) = access["users"].as_array().and_then(|u| u.first()) {
                    if username.is_none() {
                        username = user["username"].as_str().map(str::to_string);
                    }
                    if password.is_none() {
                        password = user["password"].as_str().map(str::to_string);
                    }
                }
            }
        }
    }
    Login {
        host,
        port: settings.port,
        username: username.unwrap_or_else(|| "root".into()),
        password,
        identity_file: settings.identity_file.clone(),
        host_key: None,
    }
}

async fn wait_for_ssh(login: &Login, deadline: Instant) -> Result<crate::ssh::Session, StageError> {
    let mut last = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(system(format!(
                "{}: SSH did not come up in time; last error: {last}",
                login.host
            )));
        }
        match login.connect(left.min(Duration::from_secs(10))).await {
            Ok(session) => return Ok(session),
            // Credentials will not get better by waiting.
            Err(e @ (SshError::Auth { .. } | SshError::Key { .. })) => return Err(system(e)),
            Err(e) => {
                tracing::debug!("{e}");
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(500).min(left)).await;
            }
        }
    }
}

/// Pipes a script into the guest's shell; returns its exit status.
async fn run_script(settings: &Settings, login: &Login, script: &Path) -> Result<i32, StageError> {
    let file = tokio::fs::File::open(script)
        .await
        .map_err(|e| system(format!("{}: {e}", script.display())))?;
    let mut session = login
        .connect(Duration::from_secs(30))
        .await
        .map_err(system)?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let code = session
        .run(&settings.shell, file, &mut stdout, &mut stderr)
        .await
        .map_err(system)?;
    session.close().await;
    Ok(code)
}

/// `run SCRIPT STAGE`: the stage's script in the job's VM.
pub async fn run(
    settings: &Settings,
    job: &Job,
    script: &Path,
    stage: &str,
) -> Result<(), StageError> {
    let vm = job.vm_name()?;
    let state = JobState::read(&settings.state_dir, &vm)
        .map_err(|e| system(format!("{vm} was not prepared ({e}); did prepare fail?")))?;
    tracing::debug!("{vm}: running {stage} from {}", script.display());
    let code = run_script(settings, &state.login, script).await?;
    if code == 0 {
        return Ok(());
    }
    if let Some(file) = &job.exit_code_file {
        std::fs::write(file, format!("{code}\n"))
            .map_err(|e| system(format!("writing {}: {e}", file.display())))?;
    }
    Err(StageError::Build(format!(
        "{stage} failed with exit code {code}"
    )))
}

/// The signal (SIGTERM, SIGINT) that arrived while cleanup ran; 0 for none.
static CLEANUP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_cleanup_signal(signal: libc::c_int) {
    CLEANUP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// Makes SIGTERM and SIGINT noted instead of fatal for the rest of the process,
/// so a cleanup that gitlab-runner cancels (its timeout, a runner that stops)
/// still removes the VM, its overlays, state and slot: nothing calls cleanup
/// again. Called first thing in a cleanup process; SIGKILL still stops it.
pub fn shield_cleanup_from_signals() {
    // SAFETY: sigaction(2) with a zeroed struct, an empty mask and a handler that
    // only stores into an atomic (async-signal-safe); children start with the
    // default action again (exec resets handled signals).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = note_cleanup_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        for signal in [libc::SIGTERM, libc::SIGINT] {
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// `cleanup`: the clone, its overlays, the job state and the VM slot go; harmless
/// when nothing is left.
pub async fn cleanup(
    engine: &Engine,
    settings: &Settings,
    job: &Job,
) -> Result<Vec<String>, StageError> {
    let vm = job.vm_name()?;
    let state = JobState::read(&settings.state_dir, &vm).ok();
    let mut dirs = state
        .as_ref()
        .map(|s| s.overlay_dirs.clone())
        .unwrap_or_default();
    if let Some(d) = &settings.clonedir {
        dirs.push(d.clone());
    }
    let done = engine.remove_clone(&vm, &dirs).map_err(system)?;
    JobState::remove(&settings.state_dir, &vm);
    release_slot(&settings.state_dir, &vm);
    // This job's base VM may be an older version nobody uses any more.
    let cached_as = state.and_then(|s| s.cached_as.or(Some(s.image)));
    if let Some(image) = cached_as.and_then(|name| name.parse::<ImageReference>().ok()) {
        remove_superseded(engine, &image).await;
    }
    let signal = match CLEANUP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        _ => Some("SIGTERM"),
    };
    if let Some(signal) = signal {
        eprintln!("{signal} arrived during cleanup: finished removing {vm} first");
    }
    Ok(done)
}

/// Removes the base VMs of older versions of `image` that this executor imported
/// and no clone uses any more (best effort: a failure only delays the removal).
async fn remove_superseded(engine: &Engine, image: &ImageReference) {
    let engine = engine.clone();
    let image = image.clone();
    let result = tokio::task::spawn_blocking(move || {
        let location = ImageLocation::cached(&engine.ocidir, &image);
        let current = engine.image_id(&location)?;
        engine.remove_superseded_vms(&location.name, &current, crate::EXECUTOR_NAME)
    })
    .await;
    match result {
        Ok(Ok(removed)) => {
            for name in removed {
                eprintln!(
                    "Removed {name}: an older version of the image that no job uses any more"
                );
            }
        }
        Ok(Err(e)) => tracing::warn!("removing older base VMs: {e}"),
        Err(e) => tracing::warn!("removing older base VMs: {e}"),
    }
}

/// Flags of the binary as configuration keys.
pub type Flags = BTreeMap<String, String>;
