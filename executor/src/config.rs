//! The executor's INI configuration, compatible with the Python tool's:
//! `/etc/gitlab-runner/gitlab-sardinecake-executor.ini`,
//! `~/.config/gitlab-runner/gitlab-sardinecake-executor.ini`, or the files in
//! `GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES` (colon-separated). `[DEFAULT]` applies
//! to every image; a section named after an image (wildcards `*` and `?` allowed;
//! the longest matching pattern wins) overrides it for that image. Images and
//! patterns are `scheme:rest` as sarde reads references (`oci-archive:/srv/*`);
//! one without a scheme is a registry reference, and matches only those.
//!
//! Precedence, lowest first: built-in defaults, `[DEFAULT]`, command-line flags,
//! the image's section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

/// Environment variable listing configuration files.
pub const CONF_FILES_ENV: &str = "GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Value {
        origin: String,
        key: String,
        message: String,
    },
}

/// When to pull the job's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Ask the registry every time (an unchanged tag costs one manifest request).
    Always,
    /// Use the cached image when there is one.
    IfNotPresent,
    /// Never contact the registry.
    Never,
}

/// Everything the stages need, for one image.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect: String,
    pub ocidir: PathBuf,
    pub vmdir: PathBuf,
    /// Where clones' overlays go; next to the source's disks when unset.
    pub clonedir: Option<PathBuf>,
    /// Bound on boot + address + SSH wait in prepare.
    pub timeout: Duration,
    /// Fallback SSH credentials (the image's access JSON comes first).
    pub username: Option<String>,
    pub password: Option<String>,
    pub identity_file: Option<PathBuf>,
    pub port: u16,
    /// A script (on the host) run in the VM at the end of prepare.
    pub prepare_script: Option<PathBuf>,
    /// Paths inside the guest, for the runner's `config` answer.
    pub guest_builds_dir: Option<String>,
    pub guest_cache_dir: Option<String>,
    /// The shell the job scripts are piped into in the guest.
    pub shell: String,
    /// Image patterns a job may use; empty allows every image.
    pub allowed_images: Vec<String>,
    pub pull_policy: PullPolicy,
    /// VMs running at once on this host; 0 = no limit.
    pub max_vms: usize,
    /// Registries reached over plain HTTP or unverified TLS.
    pub insecure: Vec<String>,
    /// Per-job state (address, pinned host key) and VM slots.
    pub state_dir: PathBuf,
    pub concurrency: usize,
    pub retries: u32,
    pub retry_budget: u32,
    /// How long requests to registries may wait.
    pub time_bounds: sarde_api::limits::TimeBounds,
    /// Bytes the cache and the VMs may take on this host.
    pub space_budget: Option<u64>,
    /// Reclaim space before a pull or import needs it.
    pub auto_prune: bool,
    /// Nothing used more recently is removed automatically.
    pub prune_min_age: Duration,
    /// A pull keeps the image's disk pieces in the cache; false: only its
    /// metadata (the base VM holds the data).
    pub keep_blobs: bool,
    /// The `containers-policy.json(5)` images are checked against; unset: where
    /// podman looks (`~/.config/containers/policy.json`,
    /// `/etc/containers/policy.json`).
    pub policy: Option<PathBuf>,
    /// Refuse the image unless a signature of it was verified.
    pub require_signature: bool,
}

/// The longest `timeout` (boot, address and SSH in prepare) accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Every key this executor reads.
pub const KEYS: &[&str] = &[
    "connect",
    "ocidir",
    "vmdir",
    "clonedir",
    "timeout",
    "username",
    "password",
    "identity-file",
    "port",
    "prepare-script",
    "guest-builds-dir",
    "guest-cache-dir",
    "builds-dir",
    "cache-dir",
    "shell",
    "allowed-images",
    "pull-policy",
    "max-vms",
    "insecure",
    "state-dir",
    "concurrency",
    "retries",
    "retry-budget",
    "connect-timeout",
    "idle-timeout",
    "request-timeout",
    "min-rate",
    "space-budget",
    "auto-prune",
    "prune-min-age",
    "keep-blobs",
    "policy",
    "require-signature",
    "omit-backingstore",
    "verbosity",
];

/// A section's values: key → (value, origin).
pub type Values = BTreeMap<String, (String, String)>;

/// The configuration files as read: `[DEFAULT]` and the image sections.
#[derive(Debug, Clone, Default)]
pub struct Files {
    pub defaults: Values,
    /// (pattern, values), in file order (later files override).
    pub sections: Vec<(String, Values)>,
    pub read: Vec<PathBuf>,
}

/// The files to read: `$GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES`, else the system
/// file and the user's.
pub fn config_files() -> Vec<PathBuf> {
    if let Some(list) = std::env::var_os(CONF_FILES_ENV) {
        return std::env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
    }
    let mut files = vec![PathBuf::from(
        "/etc/gitlab-runner/gitlab-sardinecake-executor.ini",
    )];
    if let Some(home) = std::env::var_os("HOME") {
        files.push(Path::new(&home).join(".config/gitlab-runner/gitlab-sardinecake-executor.ini"));
    }
    files
}

fn normalise(key: &str) -> String {
    key.trim().to_ascii_lowercase().replace('_', "-")
}

impl Files {
    /// Reads the files that exist, in order; later files override earlier ones.
    pub fn read(paths: &[PathBuf]) -> Result<Files, ConfigError> {
        let mut files = Files::default();
        for path in paths {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(ConfigError::File {
                        path: path.clone(),
                        message: e.to_string(),
                    });
                }
            };
            let ini = ini::Ini::load_from_str_opt(
                &text,
                ini::ParseOption {
                    enabled_quote: false,
                    enabled_escape: false,
                    ..Default::default()
                },
            )
            .map_err(|e| ConfigError::File {
                path: path.clone(),
                message: format!("not an INI file: {e}"),
            })?;
            for (section, props) in ini.iter() {
                let name = section.unwrap_or("DEFAULT");
                let origin = format!("{} [{name}]", path.display());
                let mut values = BTreeMap::new();
                for (k, v) in props.iter() {
                    let key = normalise(k);
                    if !KEYS.contains(&key.as_str()) {
                        tracing::warn!("{origin}: unknown key `{k}` ignored");
                        continue;
                    }
                    values.insert(key, (v.trim().to_string(), origin.clone()));
                }
                if name == "DEFAULT" {
                    files.defaults.extend(values);
                } else {
                    files.sections.push((name.to_string(), values));
                }
            }
            files.read.push(path.clone());
        }
        Ok(files)
    }

    /// The section that applies to `image`: the longest matching pattern (the
    /// later one among equally long ones). `is_scheme` tells transport schemes.
    pub fn section_for(
        &self,
        image: &str,
        is_scheme: &dyn Fn(&str) -> bool,
    ) -> Option<&(String, Values)> {
        self.sections
            .iter()
            .filter(|(pattern, _)| image_matches(pattern, image, is_scheme))
            .max_by_key(|(pattern, _)| pattern.len())
    }

    /// The settings for `image`, with command-line `flags` (key → value).
    pub fn settings(
        &self,
        image: Option<&str>,
        flags: &BTreeMap<String, String>,
        root: bool,
        is_scheme: &dyn Fn(&str) -> bool,
    ) -> Result<Settings, ConfigError> {
        let mut merged: BTreeMap<String, (String, String)> = self.defaults.clone();
        for (k, v) in flags {
            merged.insert(normalise(k), (v.clone(), "command line".into()));
        }
        if let Some((_, section)) = image.and_then(|i| self.section_for(i, is_scheme)) {
            merged.extend(section.clone());
        }
        Settings::from_values(&merged, root)
    }
}

/// Whether `pattern` (an allow-list entry, a section name) matches `image` as a
/// job names it: the transport schemes agree (none and `docker://` both mean
/// a registry) and the rest matches with wildcards.
pub fn image_matches(pattern: &str, image: &str, is_scheme: &dyn Fn(&str) -> bool) -> bool {
    let split = |text: &'_ str| -> (String, String) {
        match sarde_api::transport::split_scheme(text, is_scheme) {
            Some(("docker", rest)) => (
                "docker".into(),
                rest.strip_prefix("//").unwrap_or(rest).into(),
            ),
            Some((scheme, rest)) => (scheme.into(), rest.into()),
            None => ("docker".into(), text.into()),
        }
    };
    let (pattern_scheme, pattern_rest) = split(pattern);
    let (image_scheme, image_rest) = split(image);
    // `*` matches `/` too: a path that climbs out (`/srv/images/../../etc`)
    // or hides a step (`/./`) matches nothing.
    let unclean = image_scheme != "docker"
        && image_rest
            .split(['/', ':'])
            .any(|part| part == ".." || part == ".");
    !unclean && pattern_scheme == image_scheme && wildcard_match(&pattern_rest, &image_rest)
}

/// Whether `image` is a registry reference (no scheme, or `docker://`).
pub fn is_registry_image(image: &str, is_scheme: &dyn Fn(&str) -> bool) -> bool {
    matches!(
        sarde_api::transport::split_scheme(image, is_scheme),
        None | Some(("docker", _))
    )
}

/// `*` matches any run of characters, `?` one character.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

impl Settings {
    fn from_values(
        v: &BTreeMap<String, (String, String)>,
        root: bool,
    ) -> Result<Settings, ConfigError> {
        let get = |k: &str| {
            v.get(k)
                .map(|(value, _)| value.as_str())
                .filter(|s| !s.is_empty())
        };
        let bad = |k: &str, message: String| ConfigError::Value {
            origin: v.get(k).map(|(_, o)| o.clone()).unwrap_or_default(),
            key: k.to_string(),
            message,
        };
        let number = |k: &str, default: f64| -> Result<f64, ConfigError> {
            match get(k) {
                None => Ok(default),
                Some(s) => s
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .ok_or_else(|| bad(k, format!("{s:?} is not a non-negative number"))),
            }
        };
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let path = |s: &str| -> PathBuf {
            match (s.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => h.join(rest),
                _ => PathBuf::from(s),
            }
        };
        let data = if root {
            PathBuf::from("/var/lib/sardinecake")
        } else {
            home.clone()
                .map(|h| h.join(".local/share/sardinecake"))
                .unwrap_or_else(|| PathBuf::from("sardinecake"))
        };
        let state_default = if root {
            PathBuf::from("/run/sardinecake-executor")
        } else {
            std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
                .join("sardinecake-executor")
        };
        let list = |k: &str| -> Vec<String> {
            get(k)
                .map(|s| {
                    s.split(|c: char| c == ',' || c.is_whitespace())
                        .filter(|w| !w.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let pull_policy = match get("pull-policy").unwrap_or("always") {
            "always" => PullPolicy::Always,
            "if-not-present" => PullPolicy::IfNotPresent,
            "never" => PullPolicy::Never,
            other => {
                return Err(bad(
                    "pull-policy",
                    format!("{other:?}: expected always, if-not-present or never"),
                ));
            }
        };
        let space_budget = get("space-budget")
            .map(|s| s.parse::<sarde_api::size::ByteSize>())
            .transpose()
            .map_err(|e| bad("space-budget", e))?
            .map(|b| b.0);
        let auto_prune = get("auto-prune")
            .map(sarde_api::age::parse_switch)
            .transpose()
            .map_err(|e| bad("auto-prune", e))?
            .unwrap_or(true);
        let keep_blobs = get("keep-blobs")
            .map(sarde_api::age::parse_switch)
            .transpose()
            .map_err(|e| bad("keep-blobs", e))?
            .unwrap_or(true);
        let require_signature = get("require-signature")
            .map(sarde_api::age::parse_switch)
            .transpose()
            .map_err(|e| bad("require-signature", e))?
            .unwrap_or(false);
        let prune_min_age = get("prune-min-age")
            .map(|s| s.parse::<sarde_api::age::Age>())
            .transpose()
            .map_err(|e| bad("prune-min-age", e))?
            .map_or(Duration::from_secs(3600), |a| a.0);
        let defaults = sarde_api::limits::TimeBounds::default();
        let duration = |key: &str, default: Duration| -> Result<Duration, ConfigError> {
            let value = get(key)
                .map(|s| s.parse::<sarde_api::age::Age>())
                .transpose()
                .map_err(|e| bad(key, e))?
                .map_or(default, |a| a.0);
            if value.is_zero() {
                return Err(bad(key, "must be longer than 0 s".to_string()));
            }
            Ok(value)
        };
        let time_bounds = sarde_api::limits::TimeBounds {
            connect: duration("connect-timeout", defaults.connect)?,
            idle: duration("idle-timeout", defaults.idle)?,
            request: duration("request-timeout", defaults.request)?,
            min_rate: get("min-rate")
                .map(|s| s.parse::<sarde_api::size::ByteSize>())
                .transpose()
                .map_err(|e| bad("min-rate", e))?
                .map_or(defaults.min_rate, |b| b.0),
        };
        // prepare waits until now + timeout: a timeout must fit the clock.
        let timeout = number("timeout", 300.0)?;
        if timeout > MAX_TIMEOUT.as_secs_f64() {
            return Err(bad(
                "timeout",
                format!(
                    "{timeout} s is longer than the {} s (30 days) allowed",
                    MAX_TIMEOUT.as_secs()
                ),
            ));
        }
        let timeout = Duration::from_secs_f64(timeout);
        let port = number("port", 22.0)?;
        if !(1.0..=65535.0).contains(&port) || port.fract() != 0.0 {
            return Err(bad("port", format!("{port} is not a TCP port")));
        }
        Ok(Settings {
            // Where virsh would go: LIBVIRT_DEFAULT_URI, libvirt's uri_default.
            connect: get("connect").map_or_else(
                || sarde_api::default_uri::libvirt_default_uri(root, home.as_deref()).uri,
                str::to_string,
            ),
            ocidir: get("ocidir").map(path).unwrap_or_else(|| data.join("OCI")),
            vmdir: get("vmdir").map(path).unwrap_or_else(|| data.join("VMs")),
            clonedir: get("clonedir").map(path),
            timeout,
            username: get("username").map(str::to_string),
            password: get("password").map(str::to_string),
            identity_file: get("identity-file").map(path),
            port: port as u16,
            prepare_script: get("prepare-script").map(path),
            guest_builds_dir: get("guest-builds-dir").map(str::to_string),
            guest_cache_dir: get("guest-cache-dir").map(str::to_string),
            shell: get("shell").unwrap_or("bash").to_string(),
            allowed_images: list("allowed-images"),
            pull_policy,
            max_vms: number("max-vms", 0.0)? as usize,
            insecure: list("insecure"),
            state_dir: get("state-dir").map(path).unwrap_or(state_default),
            concurrency: (number("concurrency", 4.0)? as usize).max(1),
            retries: number("retries", 5.0)? as u32,
            retry_budget: number("retry-budget", 50.0)? as u32,
            time_bounds,
            space_budget,
            auto_prune,
            prune_min_age,
            keep_blobs,
            policy: get("policy").map(path),
            require_signature,
        })
    }

    /// Whether the allow-list admits `image`. An empty list admits every
    /// registry reference and nothing else: a job naming a path on the runner
    /// host (`oci:`, `oci-archive:`) or a plugin's transport needs an entry.
    pub fn allows(&self, image: &str, is_scheme: &dyn Fn(&str) -> bool) -> bool {
        if self.allowed_images.is_empty() {
            return is_registry_image(image, is_scheme);
        }
        self.allowed_images
            .iter()
            .any(|p| image_matches(p, image, is_scheme))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match(
            "registry.example.org/*",
            "registry.example.org/a/b:1"
        ));
        assert!(wildcard_match("*/debian:1?", "r/debian:12"));
        assert!(!wildcard_match("*/debian:1?", "r/debian:1"));
        assert!(!wildcard_match("r/*", "s/x"));
        assert!(wildcard_match("a*b*c", "aXXbYYc"));
        assert!(!wildcard_match("a*b*c", "aXXbYY"));
    }

    fn schemes(s: &str) -> bool {
        matches!(s, "docker" | "oci" | "oci-archive")
    }

    #[test]
    fn patterns_match_scheme_and_rest() {
        let m = |p: &str, i: &str| image_matches(p, i, &schemes);
        assert!(m(
            "oci-archive:/shared/*",
            "oci-archive:/shared/win11.tar:1"
        ));
        assert!(!m("oci-archive:/shared/*", "oci-archive:/home/x.tar"));
        assert!(!m("oci:/shared/*", "oci-archive:/shared/x.tar"));
        // No scheme: registry references only, `docker://` included.
        assert!(m("*", "debian:12"));
        assert!(!m("*", "oci-archive:/shared/x.tar"));
        assert!(m("r.example/*", "docker://r.example/x:1"));
        assert!(m("docker://r.example/*", "r.example/x:1"));
        // A port is no scheme.
        assert!(m("docker:5000/*", "docker:5000/vm:1"));
        assert!(!m("docker:5000/*", "docker://other/vm:1"));
    }

    #[test]
    fn the_longest_matching_section_wins_over_flags_and_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.ini");
        std::fs::write(
            &file,
            "[DEFAULT]\nusername = vagrant\npassword = vagrant\ntimeout = 60\nmax-vms = 2\n\n\
             [registry.example.org/*]\nusername = generic\n\n\
             [registry.example.org/sardines/win*]\nusername = admin\npassword = secret\n",
        )
        .unwrap();
        let files = Files::read(&[file, dir.path().join("missing.ini")]).unwrap();
        let flags = BTreeMap::from([("username".to_string(), "flag".to_string())]);
        let win = files
            .settings(
                Some("registry.example.org/sardines/win11:latest"),
                &flags,
                true,
                &schemes,
            )
            .unwrap();
        assert_eq!(win.username.as_deref(), Some("admin"));
        assert_eq!(win.password.as_deref(), Some("secret"));
        assert_eq!(win.timeout, Duration::from_secs(60));
        assert_eq!(win.max_vms, 2);
        let deb = files
            .settings(
                Some("registry.example.org/sardines/debian:12"),
                &flags,
                true,
                &schemes,
            )
            .unwrap();
        assert_eq!(deb.username.as_deref(), Some("generic"));
        let other = files
            .settings(Some("other/x"), &flags, true, &schemes)
            .unwrap();
        assert_eq!(other.username.as_deref(), Some("flag"));
        assert_eq!(other.password.as_deref(), Some("vagrant"));
        assert_eq!(other.pull_policy, PullPolicy::Always);
    }

    #[test]
    fn bad_values_name_file_section_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.ini");
        std::fs::write(&file, "[DEFAULT]\npull-policy = sometimes\n").unwrap();
        let files = Files::read(std::slice::from_ref(&file)).unwrap();
        let e = files
            .settings(None, &BTreeMap::new(), true, &schemes)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.ini [DEFAULT]") && e.contains("pull-policy"),
            "{e}"
        );
    }

    #[test]
    fn a_timeout_too_long_for_the_clock_is_refused() {
        // 1e20 s made Duration::from_secs_f64 panic (fuzz/regressions/executor_config/).
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.ini");
        for (value, ok) in [("2592000", true), ("2592000.5", false), ("1e20", false)] {
            std::fs::write(&file, format!("[DEFAULT]\ntimeout = {value}\n")).unwrap();
            let files = Files::read(std::slice::from_ref(&file)).unwrap();
            let result = files.settings(None, &BTreeMap::new(), true, &schemes);
            match result {
                Ok(s) => assert!(ok && s.timeout == MAX_TIMEOUT, "{value}"),
                Err(e) => assert!(!ok && e.to_string().contains("timeout"), "{value}: {e}"),
            }
        }
    }

    #[test]
    fn allow_list() {
        let files = Files::default();
        let mut s = files
            .settings(None, &BTreeMap::new(), true, &schemes)
            .unwrap();
        assert!(s.allows("any/image", &schemes));
        assert!(s.allows("docker://any/image", &schemes));
        assert!(
            !s.allows("oci-archive:/srv/x.tar", &schemes),
            "paths need an entry"
        );
        s.allowed_images = vec![
            "registry.example.org/sardines/*".into(),
            "oci-archive:/shared/images/*".into(),
        ];
        assert!(s.allows("registry.example.org/sardines/debian:12", &schemes));
        assert!(!s.allows("evil.example/x", &schemes));
        assert!(s.allows("oci-archive:/shared/images/win11.tar", &schemes));
        assert!(!s.allows("oci-archive:/tmp/evil.tar", &schemes));
        assert!(!s.allows("oci:/shared/images/win11", &schemes));
        assert!(!s.allows("oci-archive:/shared/images/../../etc/x.tar", &schemes));
        assert!(!s.allows("oci-archive:/shared/images/./x.tar", &schemes));
    }
}
