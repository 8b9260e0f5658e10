//! Layered configuration: built-in defaults < `/etc/sardinecake/sarde.{ini,toml}`
//! < `~/.config/sardinecake/sarde.{ini,toml}` (or only the files listed in
//! `SARDE_CONF_FILES`) < `SARDE_*` environment variables < command-line flags.
//!
//! Keys are the long option names (`chunksize`, `plugin-dir`). Every value keeps
//! its origin, which `sarde config` shows and error messages name.

pub mod sources;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::Env;
use figment::value::{Dict, Value};
use figment::{Figment, Provider, Source};
use serde::{Deserialize, Deserializer, Serialize};

pub use sarde_api::age::Age;
pub use sarde_api::size::ByteSize;
pub use sources::{DEFAULT_SECTION, FileError};

/// The effective settings of one subcommand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// libvirt connection URI.
    #[serde(deserialize_with = "lenient::from_str")]
    pub connect: String,
    /// The local cache of OCI images: one OCI layout per repository.
    #[serde(deserialize_with = "lenient::from_str")]
    pub ocidir: PathBuf,
    /// Where imported VMs' disks go: `<vmdir>/<vm name>/`.
    #[serde(deserialize_with = "lenient::from_str")]
    pub vmdir: PathBuf,
    /// Where clones' overlays go; next to the source VM's disks when unset.
    #[serde(
        default,
        deserialize_with = "lenient::opt_from_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub clonedir: Option<PathBuf>,
    /// Size of the uncompressed pieces a disk is cut into.
    pub chunksize: ByteSize,
    /// Compression codec for export.
    #[serde(deserialize_with = "lenient::from_str")]
    pub codec: String,
    /// Compression level; the codec's default when unset.
    #[serde(
        default,
        deserialize_with = "lenient::opt_from_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub level: Option<i32>,
    /// Worker threads for compression and hashing; 0 = one per core.
    #[serde(deserialize_with = "lenient::from_str")]
    pub threads: usize,
    /// Blob transfers at a time.
    #[serde(deserialize_with = "lenient::from_str")]
    pub concurrency: usize,
    /// Retries of a request after a network error or a 5xx/429 answer.
    #[serde(deserialize_with = "lenient::from_str")]
    pub retries: u32,
    /// The transport of references written without a scheme.
    #[serde(deserialize_with = "lenient::from_str")]
    pub transport: String,
    /// Retries one push, fetch or pull may spend in all, over all its requests.
    #[serde(deserialize_with = "lenient::from_str")]
    pub retry_budget: u32,
    /// Time to establish a connection to a registry.
    #[serde(deserialize_with = "lenient::from_str")]
    pub connect_timeout: Age,
    /// A request that receives no byte for this long fails and is retried
    /// (a download resumes where it stopped).
    #[serde(deserialize_with = "lenient::from_str")]
    pub idle_timeout: Age,
    /// The whole of a small request: a manifest, a token, a tag page.
    #[serde(deserialize_with = "lenient::from_str")]
    pub request_timeout: Age,
    /// Bytes per second a blob download must average over each idle-timeout
    /// window; 0 turns the check off.
    pub min_rate: ByteSize,
    /// Registries (`host[:port]`) reached over plain HTTP or without verifying TLS.
    #[serde(default, deserialize_with = "lenient::word_list")]
    pub insecure: Vec<String>,
    /// Directories of per-registry CA certificates: `<dir>/<host[:port]>/*.crt`.
    #[serde(deserialize_with = "lenient::path_list")]
    pub certs_dir: Vec<PathBuf>,
    /// Directories whose shared libraries are loaded as plugins.
    #[serde(deserialize_with = "lenient::path_list")]
    pub plugin_dir: Vec<PathBuf>,
    /// Extra plugin libraries to load.
    #[serde(default, deserialize_with = "lenient::path_list")]
    pub plugin: Vec<PathBuf>,
    /// Bytes the cache and the imported VMs may take together; fetch, pull and
    /// import reclaim the least recently used first to stay under it.
    #[serde(
        default,
        deserialize_with = "lenient::opt_from_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub space_budget: Option<ByteSize>,
    /// Reclaim space before fetch, pull and import when they need it.
    #[serde(deserialize_with = "lenient::switch")]
    pub auto_prune: bool,
    /// A pull keeps the image's disk pieces in the cache; `no`: only its
    /// metadata (the imported VM holds the data).
    #[serde(deserialize_with = "lenient::switch")]
    pub keep_blobs: bool,
    /// The `containers-policy.json(5)` fetch, pull, copy and clone check images
    /// against; unset: the first of `~/.config/containers/policy.json` and
    /// `/etc/containers/policy.json` that exists.
    #[serde(
        default,
        deserialize_with = "lenient::opt_from_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub policy: Option<PathBuf>,
    /// Nothing used more recently is removed automatically or for a budget, and
    /// partial downloads are kept this long for a later run to resume.
    #[serde(deserialize_with = "lenient::from_str")]
    pub prune_min_age: Age,
    /// Verbosity from the config file (the Python tool's `verbose` / `quiet` keys);
    /// `-v` and `-q` add to these.
    #[serde(deserialize_with = "lenient::from_str")]
    pub verbose: i32,
    #[serde(deserialize_with = "lenient::from_str")]
    pub quiet: i32,
}

/// The keys `Settings` knows, as users write them.
pub const KNOWN_KEYS: &[&str] = &[
    "connect",
    "ocidir",
    "vmdir",
    "clonedir",
    "chunksize",
    "codec",
    "level",
    "threads",
    "concurrency",
    "retries",
    "transport",
    "retry-budget",
    "connect-timeout",
    "idle-timeout",
    "request-timeout",
    "min-rate",
    "insecure",
    "certs-dir",
    "plugin-dir",
    "plugin",
    "space-budget",
    "auto-prune",
    "prune-min-age",
    "keep-blobs",
    "policy",
    "verbose",
    "quiet",
];

/// The keys by what they configure. A command uses some of these groups and
/// sees, shows and checks only their keys: a bad value of a key that does
/// not concern it never fails it.
pub mod groups {
    pub const OUTPUT: &[&str] = &["verbose", "quiet"];
    pub const PLUGINS: &[&str] = &["plugin-dir", "plugin"];
    pub const LIBVIRT: &[&str] = &["connect"];
    pub const CACHE: &[&str] = &["ocidir"];
    pub const VMS: &[&str] = &["vmdir"];
    pub const CLONES: &[&str] = &["clonedir"];
    pub const THREADS: &[&str] = &["threads"];
    pub const COMPRESSION: &[&str] = &["chunksize", "codec", "level"];
    pub const SPACE: &[&str] = &["space-budget", "auto-prune", "prune-min-age"];
    /// What a pull keeps of an image besides the VM.
    pub const KEEP: &[&str] = &["keep-blobs"];
    /// Which images are let in: the signature policy.
    pub const TRUST: &[&str] = &["policy"];
    /// Reaching a registry at all (login checks credentials with one request).
    pub const REGISTRY: &[&str] = &[
        "insecure",
        "certs-dir",
        "connect-timeout",
        "idle-timeout",
        "request-timeout",
    ];
    /// Moving images between transports.
    pub const TRANSFER: &[&str] = &[
        "transport",
        "concurrency",
        "retries",
        "retry-budget",
        "min-rate",
    ];
}

/// Every command that has a section, with the key groups it uses.
const COMMANDS: &[(&str, &[&[&str]])] = {
    use groups::*;
    &[
        (
            "export",
            &[OUTPUT, PLUGINS, LIBVIRT, CACHE, THREADS, COMPRESSION],
        ),
        (
            "import",
            &[OUTPUT, PLUGINS, LIBVIRT, CACHE, VMS, THREADS, SPACE],
        ),
        ("push", &[OUTPUT, PLUGINS, CACHE, REGISTRY, TRANSFER]),
        // fetch reclaims space, which may remove VMs sarde imported: it must
        // see them where they are (libvirt, vmdir).
        (
            "fetch",
            &[
                OUTPUT, PLUGINS, LIBVIRT, CACHE, VMS, REGISTRY, TRANSFER, SPACE, TRUST,
            ],
        ),
        ("copy", &[OUTPUT, PLUGINS, CACHE, REGISTRY, TRANSFER, TRUST]),
        (
            "pull",
            &[
                OUTPUT, PLUGINS, LIBVIRT, CACHE, VMS, THREADS, SPACE, KEEP, REGISTRY, TRANSFER,
                TRUST,
            ],
        ),
        (
            "clone",
            &[
                OUTPUT, PLUGINS, LIBVIRT, CACHE, VMS, CLONES, THREADS, SPACE, KEEP, REGISTRY,
                TRANSFER, TRUST,
            ],
        ),
        ("login", &[OUTPUT, PLUGINS, REGISTRY]),
        ("logout", &[OUTPUT]),
        ("list", &[OUTPUT, PLUGINS, LIBVIRT, CACHE, VMS]),
        ("getconfig", &[OUTPUT, PLUGINS, CACHE]),
        ("inspect", &[OUTPUT, PLUGINS, LIBVIRT, CACHE, VMS]),
        // rm keeps blobs younger than prune-min-age (another tool may be writing them).
        ("rm", &[OUTPUT, PLUGINS, LIBVIRT, CACHE, VMS, SPACE]),
        ("prune", &[OUTPUT, PLUGINS, LIBVIRT, CACHE, VMS, SPACE]),
        ("plugins", &[OUTPUT, PLUGINS]),
    ]
};

/// The commands that have a configuration section, for messages.
pub fn command_names() -> Vec<&'static str> {
    COMMANDS.iter().map(|(name, _)| *name).collect()
}

/// The keys `command` uses, in the order of [`KNOWN_KEYS`]; `None` for a
/// command sarde does not have.
pub fn command_keys(command: &str) -> Option<Vec<&'static str>> {
    let (_, used) = COMMANDS.iter().find(|(name, _)| *name == command)?;
    Some(
        KNOWN_KEYS
            .iter()
            .copied()
            .filter(|key| used.iter().any(|group| group.contains(key)))
            .collect(),
    )
}

/// Whether this process runs as root, which picks system-wide defaults.
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The user's home directory.
pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// Expands a leading `~` or `~/`.
pub fn expand_tilde(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_path_buf(),
    }
}

impl Settings {
    /// Defaults for root (system directories) or a user (XDG data directory).
    pub fn defaults(root: bool, home: Option<&Path>) -> Settings {
        let data_dir = if root {
            PathBuf::from("/var/lib/sardinecake")
        } else {
            std::env::var_os("XDG_DATA_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".local/share")))
                .unwrap_or_else(|| PathBuf::from("."))
                .join("sardinecake")
        };
        let mut plugin_dir = vec![
            PathBuf::from("/usr/lib/sardinecake/plugins"),
            PathBuf::from("/usr/local/lib/sardinecake/plugins"),
        ];
        if !root {
            plugin_dir.push(data_dir.join("plugins"));
        }
        let mut certs_dir = Vec::new();
        if let (false, Some(home)) = (root, home) {
            certs_dir.push(home.join(".config/sardinecake/certs.d"));
            certs_dir.push(home.join(".config/containers/certs.d"));
        }
        certs_dir.extend(
            [
                "/etc/sardinecake/certs.d",
                "/etc/containers/certs.d",
                "/etc/docker/certs.d",
            ]
            .map(PathBuf::from),
        );
        let bounds = sarde_api::limits::TimeBounds::default();
        Settings {
            connect: if root {
                "qemu:///system".into()
            } else {
                "qemu:///session".into()
            },
            ocidir: data_dir.join("OCI"),
            vmdir: data_dir.join("VMs"),
            clonedir: None,
            chunksize: ByteSize(64 << 20),
            codec: "zstd".into(),
            level: None,
            threads: 0,
            concurrency: 4,
            retries: 5,
            transport: "docker".into(),
            retry_budget: 50,
            connect_timeout: Age(bounds.connect),
            idle_timeout: Age(bounds.idle),
            request_timeout: Age(bounds.request),
            min_rate: ByteSize(bounds.min_rate),
            insecure: Vec::new(),
            certs_dir,
            plugin_dir,
            plugin: Vec::new(),
            space_budget: None,
            auto_prune: true,
            prune_min_age: Age(std::time::Duration::from_secs(3600)),
            keep_blobs: true,
            policy: None,
            verbose: 0,
            quiet: 0,
        }
    }

    fn expand_paths(&mut self, home: Option<&Path>) {
        // Absolute, because these paths end up in domain XML that libvirt reads.
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        self.ocidir = absolute(expand_tilde(&self.ocidir, home));
        self.vmdir = absolute(expand_tilde(&self.vmdir, home));
        if let Some(dir) = &self.clonedir {
            self.clonedir = Some(absolute(expand_tilde(dir, home)));
        }
        if let Some(policy) = &self.policy {
            self.policy = Some(expand_tilde(policy, home));
        }
        for p in self
            .plugin_dir
            .iter_mut()
            .chain(self.plugin.iter_mut())
            .chain(self.certs_dir.iter_mut())
        {
            *p = expand_tilde(p, home);
        }
    }

    /// How long requests to registries may wait.
    pub fn time_bounds(&self) -> sarde_api::limits::TimeBounds {
        sarde_api::limits::TimeBounds {
            connect: self.connect_timeout.0,
            idle: self.idle_timeout.0,
            request: self.request_timeout.0,
            min_rate: self.min_rate.0,
        }
    }
}

/// Values given on the command line, keyed by field name (`plugin_dir`); they
/// override everything else.
#[derive(Debug, Clone, Default)]
pub struct FlagValues(pub Dict);

impl FlagValues {
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.0.insert(sources::normalise_key(key), value.into());
    }
}

/// Where the configuration comes from, as the process sees it.
#[derive(Debug, Clone)]
pub struct Environment {
    pub root: bool,
    pub home: Option<PathBuf>,
    /// The URI libvirt would connect to, the default of `connect`.
    pub libvirt_uri: sarde_api::default_uri::DefaultUri,
    pub files: Vec<PathBuf>,
    /// Whether `files` came from `SARDE_CONF_FILES`.
    pub files_from_env: bool,
}

impl Environment {
    /// The real process environment.
    pub fn from_process() -> Environment {
        let home = home_dir();
        let env_files = std::env::var("SARDE_CONF_FILES").ok();
        let root = running_as_root();
        Environment {
            libvirt_uri: sarde_api::default_uri::libvirt_default_uri(root, home.as_deref()),
            root,
            files: sources::default_files(env_files.as_deref(), home.as_deref()),
            files_from_env: env_files.is_some(),
            home,
        }
    }
}

/// A configuration error that names the file, section and key, and says what is expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("there is no command `{command}` (commands with a configuration section: {})", known.join(", "))]
    UnknownCommand {
        command: String,
        known: Vec<&'static str>,
    },
    #[error("{origin}: key `{key}`: {message}")]
    Value {
        origin: String,
        key: String,
        message: String,
    },
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OriginInfo {
    /// `default`, `file`, `environment` or `command line`.
    pub kind: &'static str,
    /// Human description: the file and section, the variable, or the flag.
    pub detail: String,
}

impl fmt::Display for OriginInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            f.write_str(self.kind)
        } else {
            write!(f, "{} {}", self.kind, self.detail)
        }
    }
}

const DEFAULTS_NAME: &str = "built-in default";
const FLAGS_NAME: &str = "command line";
const LIBVIRT_NAME: &str = "libvirt default";

/// The loaded configuration of one subcommand.
pub struct Config {
    pub settings: Settings,
    /// The subcommand whose section applied.
    pub command: Option<String>,
    /// Files that existed and were read, in order.
    pub files_read: Vec<PathBuf>,
    /// Keys in the files or environment that sarde does not know, with their origin.
    pub unknown_keys: Vec<(String, OriginInfo)>,
    /// Keys set in the files or environment that this command does not use
    /// (left at their defaults here, never checked), with their origin.
    pub unused_keys: Vec<(String, OriginInfo)>,
    /// The keys this command uses, as users write them.
    pub used_keys: Vec<&'static str>,
    figment: Figment,
}

impl Config {
    /// Loads the layers for `command` (its section overrides `[DEFAULT]`).
    /// Only the keys the command uses are read from files and environment;
    /// without a command, all of them.
    pub fn load(
        env: &Environment,
        command: Option<&str>,
        flags: &FlagValues,
    ) -> Result<Config, ConfigError> {
        let used_keys = match command {
            Some(command) => command_keys(command).ok_or_else(|| ConfigError::UnknownCommand {
                command: command.to_string(),
                known: command_names(),
            })?,
            None => KNOWN_KEYS.to_vec(),
        };
        let used_fields: Vec<String> = used_keys
            .iter()
            .map(|k| sources::normalise_key(k))
            .collect();
        // Unknown keys pass, so that they can be reported; known keys this
        // command does not use stay out.
        let keep =
            move |field: &str| used_fields.iter().any(|f| f == field) || !is_known_field(field);

        let defaults = Settings::defaults(env.root, env.home.as_deref());
        let mut figment = Figment::from(sources::NamedDict {
            name: DEFAULTS_NAME.into(),
            source: Source::Custom(DEFAULTS_NAME.into()),
            values: to_dict(&defaults),
        });
        // libvirt's own default, where it has one (the environment, its file).
        if !env.libvirt_uri.origin.is_empty() {
            let mut values = Dict::new();
            values.insert("connect".into(), env.libvirt_uri.uri.clone().into());
            figment = figment.merge(sources::NamedDict {
                name: env.libvirt_uri.origin.clone(),
                source: Source::Custom(LIBVIRT_NAME.into()),
                values,
            });
        }
        // Everything as set, for the report of what this command leaves alone.
        let mut everything = Figment::new();

        let mut all_sections = Vec::new();
        let mut files_read = Vec::new();
        for file in &env.files {
            if let Some(sections) = sources::read_file(file)? {
                files_read.push(file.clone());
                all_sections.extend(sections);
            }
        }
        // Every file's [DEFAULT] first, then every file's subcommand section.
        let applied = all_sections
            .iter()
            .filter(|s| s.name == DEFAULT_SECTION || command.is_some_and(|c| s.name == c));
        let (defaults_first, command_sections): (Vec<_>, Vec<_>) =
            applied.partition(|s| s.name == DEFAULT_SECTION);
        for section in defaults_first.into_iter().chain(command_sections) {
            let all = sources::NamedDict::from_section(section);
            figment = figment.merge(all.only(&keep));
            everything = everything.merge(all);
        }
        let env_keep = keep.clone();
        figment = figment
            .merge(sarde_env().filter(move |key| env_keep(&key.as_str().to_ascii_lowercase())));
        everything = everything.merge(sarde_env());
        figment = figment.merge(sources::NamedDict {
            name: FLAGS_NAME.into(),
            source: Source::Custom(FLAGS_NAME.into()),
            values: flags.0.clone(),
        });

        let mut settings: Settings = figment.extract().map_err(value_error)?;
        settings.expand_paths(env.home.as_deref());
        validate(&settings, &figment, &keep)?;

        let set_keys = |figment: &Figment| -> Vec<String> {
            figment
                .data()
                .ok()
                .and_then(|mut d| d.remove(&figment::Profile::Default))
                .map(|dict| dict.into_keys().collect())
                .unwrap_or_default()
        };
        let unknown_keys = set_keys(&figment)
            .into_iter()
            .filter(|k| !is_known_field(k))
            .map(|k| (k.replace('_', "-"), origin_of(&figment, &k)))
            .collect();
        let unused_keys = set_keys(&everything)
            .into_iter()
            .filter(|k| is_known_field(k) && !keep(k))
            .map(|k| (k.replace('_', "-"), origin_of(&everything, &k)))
            .collect();
        Ok(Config {
            settings,
            command: command.map(str::to_string),
            files_read,
            unknown_keys,
            unused_keys,
            used_keys,
            figment,
        })
    }

    /// Where `key` (as users write it) got its value.
    pub fn origin(&self, key: &str) -> OriginInfo {
        origin_of(&self.figment, &sources::normalise_key(key))
    }

    /// Every known key with its effective value (as text) and origin.
    pub fn report(&self) -> Vec<(String, String, OriginInfo)> {
        let value = serde_json::to_value(&self.settings).expect("settings serialise");
        self.used_keys
            .iter()
            .map(|key| {
                let field = sources::normalise_key(key);
                let shown = match (key, &value[&field]) {
                    (&"chunksize", _) => self.settings.chunksize.to_string(),
                    (&"min-rate", _) => self.settings.min_rate.to_string(),
                    (&"space-budget", serde_json::Value::Number(_)) => self
                        .settings
                        .space_budget
                        .map_or_else(String::new, |b| b.to_string()),
                    (_, serde_json::Value::String(s)) => s.clone(),
                    (_, serde_json::Value::Null) => "(unset)".into(),
                    (_, serde_json::Value::Array(items)) => items
                        .iter()
                        .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                        .collect::<Vec<_>>()
                        .join(":"),
                    (_, other) => other.to_string(),
                };
                (key.to_string(), shown, self.origin(key))
            })
            .collect()
    }
}

/// Whether `field` (a key as figment names it: `plugin_dir`) is one sarde knows.
fn is_known_field(field: &str) -> bool {
    KNOWN_KEYS
        .iter()
        .any(|known| sources::normalise_key(known) == field)
}

fn to_dict(settings: &Settings) -> Dict {
    match Value::serialize(settings) {
        Ok(Value::Dict(_, dict)) => dict,
        _ => unreachable!("Settings serialises to a map"),
    }
}

/// `SARDE_*` variables, except those that are not settings.
fn sarde_env() -> Env {
    Env::prefixed("SARDE_").filter(|key| {
        let key = key.as_str().to_ascii_lowercase();
        !(key == "conf_files" || key == "log" || key.starts_with("registry_"))
    })
}

fn env_var_name(field: &str) -> String {
    format!("SARDE_{}", field.to_ascii_uppercase())
}

fn origin_of(figment: &Figment, field: &str) -> OriginInfo {
    let Some(meta) = figment.find_metadata(field) else {
        return OriginInfo {
            kind: "default",
            detail: String::new(),
        };
    };
    match &meta.source {
        Some(Source::File(_)) => OriginInfo {
            kind: "file",
            detail: meta.name.to_string(),
        },
        Some(Source::Custom(name)) if name == FLAGS_NAME => OriginInfo {
            kind: "command line",
            detail: format!("--{}", field.replace('_', "-")),
        },
        Some(Source::Custom(name)) if name == DEFAULTS_NAME => OriginInfo {
            kind: "default",
            detail: String::new(),
        },
        Some(Source::Custom(name)) if name == LIBVIRT_NAME => OriginInfo {
            kind: "libvirt default",
            detail: meta.name.to_string(),
        },
        _ => OriginInfo {
            kind: "environment",
            detail: env_var_name(field),
        },
    }
}

fn describe_metadata(meta: Option<&figment::Metadata>, key: &str) -> String {
    match meta {
        Some(m) if matches!(m.source, Some(Source::File(_))) => m.name.to_string(),
        Some(m) if matches!(&m.source, Some(Source::Custom(n)) if n == FLAGS_NAME) => {
            format!("command line flag --{}", key.replace('_', "-"))
        }
        Some(m) if matches!(&m.source, Some(Source::Custom(n)) if n == DEFAULTS_NAME) => {
            "built-in default".into()
        }
        Some(m) if matches!(&m.source, Some(Source::Custom(n)) if n == LIBVIRT_NAME) => {
            format!("libvirt's default ({})", m.name)
        }
        Some(_) => format!("environment variable {}", env_var_name(key)),
        None => "configuration".into(),
    }
}

fn value_error(err: figment::Error) -> ConfigError {
    // Report the first error; figment chains them and the first is the one to fix.
    let err = err
        .into_iter()
        .next()
        .expect("an error has at least one entry");
    let key = err.path.last().cloned().unwrap_or_default();
    ConfigError::Value {
        origin: describe_metadata(err.metadata.as_ref(), &key),
        key: key.replace('_', "-"),
        message: err.kind.to_string(),
    }
}

fn validate(
    settings: &Settings,
    figment: &Figment,
    used: &dyn Fn(&str) -> bool,
) -> Result<(), ConfigError> {
    let fail = |key: &str, message: &str| ConfigError::Value {
        origin: describe_metadata(figment.find_metadata(key), key),
        key: key.replace('_', "-"),
        message: message.to_string(),
    };
    if used("concurrency") && settings.concurrency == 0 {
        return Err(fail("concurrency", "must be at least 1"));
    }
    for (key, value) in [
        ("connect_timeout", settings.connect_timeout),
        ("idle_timeout", settings.idle_timeout),
        ("request_timeout", settings.request_timeout),
    ] {
        if used(key) && value.0.is_zero() {
            return Err(fail(key, "must be longer than 0 s"));
        }
    }
    if used("chunksize") && settings.chunksize.0 < (1 << 20) {
        return Err(fail(
            "chunksize",
            "must be at least 1 MiB (pieces that small cost more in requests than they save)",
        ));
    }
    if used("chunksize") && settings.chunksize.0 > (4 << 30) {
        return Err(fail(
            "chunksize",
            "must be at most 4 GiB (the largest piece an image may announce)",
        ));
    }
    if used("connect") && settings.connect.trim().is_empty() {
        return Err(fail(
            "connect",
            "expected a libvirt URI such as qemu:///system",
        ));
    }
    if used("transport") && settings.transport.trim().is_empty() {
        return Err(fail(
            "transport",
            "expected a transport name such as docker, oci or oci-archive (`sarde plugins`)",
        ));
    }
    if used("codec") && settings.codec.trim().is_empty() {
        return Err(fail(
            "codec",
            "expected a codec name such as zstd, xz, gzip or raw",
        ));
    }
    Ok(())
}

/// Deserializers that accept a value as a string or as the native type, since INI
/// and environment values are text while TOML values are typed.
mod lenient {
    use super::*;

    struct AnyAsText;

    impl serde::de::Visitor<'_> for AnyAsText {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string, number or boolean")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }

    pub fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: fmt::Display,
    {
        let text = d.deserialize_any(AnyAsText)?;
        T::from_str(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "{:?} is not valid: {e} (expected {})",
                text,
                std::any::type_name::<T>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("a value")
            ))
        })
    }

    pub fn opt_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: fmt::Display,
    {
        let text = d.deserialize_any(AnyAsText)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        T::from_str(text.trim())
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not valid: {e}")))
    }

    /// A yes/no value: `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`.
    pub fn switch<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        let text = d.deserialize_any(AnyAsText)?;
        sarde_api::age::parse_switch(&text).map_err(serde::de::Error::custom)
    }

    /// Words separated by commas or white space, or a list.
    pub fn word_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            List(Vec<String>),
        }
        let items = match Either::deserialize(d)? {
            Either::Text(s) => vec![s],
            Either::List(items) => items,
        };
        Ok(items
            .iter()
            .flat_map(|s| s.split(|c: char| c == ',' || c.is_whitespace()))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// A colon-separated string (like `PATH`) or a list.
    pub fn path_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            List(Vec<String>),
        }
        Ok(match Either::deserialize(d)? {
            Either::Text(s) => s
                .split(':')
                .filter(|p| !p.trim().is_empty())
                .map(|p| PathBuf::from(p.trim()))
                .collect(),
            Either::List(items) => items.into_iter().map(PathBuf::from).collect(),
        })
    }
}

/// Keys (unknown, or not used by a command) grouped by origin for display.
pub fn keys_by_origin(keys: &[(String, OriginInfo)]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, origin) in keys {
        map.entry(origin.to_string()).or_default().push(key.clone());
    }
    map
}
