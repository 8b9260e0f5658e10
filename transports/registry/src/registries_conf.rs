//! `containers-registries.conf(5)`, version 2, as skopeo applies it to
//! `docker://` references: the one `[[registry]]` table with the longest
//! matching `prefix` rewrites the reference to its `location`, may block it,
//! may make it insecure, and lists read-only mirrors tried before it.
//!
//! Not applied, as in skopeo's `docker://`: `unqualified-search-registries`,
//! `short-name-mode` and `[aliases]` (a short name means docker.io here).
//! Version 1 files (`[registries.search]`…) are refused with a clear error.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The files that apply, in the order they are merged: `CONTAINERS_REGISTRIES_CONF`
/// alone when set; otherwise the user's `~/.config/containers/registries.conf`
/// or else `/etc/containers/registries.conf`, then the drop-ins of
/// `/etc/containers/registries.conf.d/` and `~/.config/containers/registries.conf.d/`
/// (`*.conf`, in name order). Files that do not exist are left out.
pub fn files_from_process() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from);
    files(
        std::env::var_os("CONTAINERS_REGISTRIES_CONF").map(PathBuf::from),
        home.as_deref(),
        Path::new("/etc/containers"),
    )
}

fn files(env: Option<PathBuf>, home: Option<&Path>, system: &Path) -> Vec<PathBuf> {
    if let Some(file) = env.filter(|f| !f.as_os_str().is_empty()) {
        return vec![file];
    }
    let user = home.map(|h| h.join(".config/containers"));
    let mut out = Vec::new();
    let user_main = user.as_ref().map(|u| u.join("registries.conf"));
    match user_main.filter(|f| f.is_file()) {
        Some(file) => out.push(file),
        None => {
            let main = system.join("registries.conf");
            if main.is_file() {
                out.push(main);
            }
        }
    }
    for dir in std::iter::once(system.to_path_buf()).chain(user) {
        let mut drop_ins: Vec<PathBuf> = std::fs::read_dir(dir.join("registries.conf.d"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conf") && p.is_file())
            .collect();
        drop_ins.sort();
        out.extend(drop_ins);
    }
    out
}

/// A registries.conf that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("{file}: cannot read it: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: not a containers-registries.conf(5) file: {message}")]
    Syntax { file: PathBuf, message: String },
}

/// `pull-from-mirror`: which references a mirror serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullFromMirror {
    #[default]
    All,
    DigestOnly,
    TagOnly,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Mirror {
    pub location: String,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub pull_from_mirror: Option<PullFromMirror>,
}

/// One `[[registry]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RegistryTable {
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub blocked: bool,
    #[serde(default)]
    pub mirror_by_digest_only: bool,
    #[serde(default)]
    pub mirror: Vec<Mirror>,
    /// The file that defined it, for messages and `sarde config`.
    #[serde(skip)]
    pub file: PathBuf,
}

impl RegistryTable {
    /// What the table matches: `prefix`, or `location` without one.
    pub fn effective_prefix(&self) -> &str {
        if self.prefix.is_empty() {
            &self.location
        } else {
            &self.prefix
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct FileV2 {
    #[serde(default)]
    registry: Vec<RegistryTable>,
    /// Present only in version 1 files.
    #[serde(default)]
    registries: Option<toml::Value>,
}

/// The merged tables of every file that applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistriesConf {
    pub files: Vec<PathBuf>,
    pub tables: Vec<RegistryTable>,
}

/// One place to ask for an image: a mirror or the (rewritten) primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]`.
    pub location: String,
    /// The repository path there.
    pub repository: String,
    pub insecure: bool,
    /// A mirror (read-only), not the primary.
    pub mirror: bool,
}

/// Where a `docker://` reference goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The table that blocks it.
    Blocked { prefix: String, file: PathBuf },
    /// Mirrors first, in order, the primary last.
    Endpoints(Vec<Endpoint>),
}

impl RegistriesConf {
    /// Reads and merges `files` (later files replace tables with the same prefix).
    pub fn load(files: &[PathBuf]) -> Result<RegistriesConf, ConfError> {
        let mut conf = RegistriesConf::default();
        for file in files {
            let text = match std::fs::read_to_string(file) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ConfError::Read {
                        file: file.clone(),
                        source,
                    });
                }
            };
            conf.merge(file, &text)?;
            conf.files.push(file.clone());
        }
        Ok(conf)
    }

    fn merge(&mut self, file: &Path, text: &str) -> Result<(), ConfError> {
        let syntax = |message: String| ConfError::Syntax {
            file: file.to_path_buf(),
            message,
        };
        let parsed: FileV2 = toml::from_str(text).map_err(|e| syntax(e.to_string()))?;
        if parsed.registries.is_some() {
            return Err(syntax(
                "version 1 tables ([registries.search], [registries.insecure], [registries.block]) are not read: rewrite them as [[registry]] tables (version 2)".into(),
            ));
        }
        for mut table in parsed.registry {
            table.file = file.to_path_buf();
            check_table(&table).map_err(syntax)?;
            match self
                .tables
                .iter_mut()
                .find(|t| t.effective_prefix() == table.effective_prefix())
            {
                Some(existing) => *existing = table,
                None => self.tables.push(table),
            }
        }
        Ok(())
    }

    /// The table for `name` (`host[:port]/path`): the longest prefix that matches.
    pub fn table_for(&self, name: &str) -> Option<&RegistryTable> {
        self.tables
            .iter()
            .filter(|t| prefix_matches(t.effective_prefix(), name))
            .max_by_key(|t| t.effective_prefix().len())
    }

    /// Where to ask for `location/repository`, read with `by_digest` or a tag.
    /// Without a table: the reference itself.
    pub fn resolve(&self, location: &str, repository: &str, by_digest: bool) -> Resolution {
        let name = format!("{location}/{repository}");
        let Some(table) = self.table_for(&name) else {
            return Resolution::Endpoints(vec![Endpoint {
                location: location.to_string(),
                repository: repository.to_string(),
                insecure: false,
                mirror: false,
            }]);
        };
        if table.blocked {
            return Resolution::Blocked {
                prefix: table.effective_prefix().to_string(),
                file: table.file.clone(),
            };
        }
        let prefix = table.effective_prefix();
        let mut endpoints = Vec::new();
        for mirror in &table.mirror {
            let serves = match mirror.pull_from_mirror {
                Some(PullFromMirror::DigestOnly) => by_digest,
                Some(PullFromMirror::TagOnly) => !by_digest,
                Some(PullFromMirror::All) => true,
                None => by_digest || !table.mirror_by_digest_only,
            };
            if serves {
                endpoints.push(endpoint(
                    prefix,
                    &mirror.location,
                    &name,
                    mirror.insecure,
                    true,
                ));
            }
        }
        let primary = if table.location.is_empty() {
            name.clone()
        } else {
            rewrite(prefix, &table.location, &name)
        };
        endpoints.push(split(&primary, table.insecure, false));
        Resolution::Endpoints(endpoints)
    }
}

/// A mirror's endpoint: `name` with `prefix` replaced by the mirror's location.
fn endpoint(prefix: &str, location: &str, name: &str, insecure: bool, mirror: bool) -> Endpoint {
    split(&rewrite(prefix, location, name), insecure, mirror)
}

/// `name` with its `prefix` replaced by `location`. A wildcard prefix
/// (`*.example.com`) replaces the host it matched.
fn rewrite(prefix: &str, location: &str, name: &str) -> String {
    if prefix.starts_with("*.") {
        let rest = name.find('/').map_or("", |i| &name[i..]);
        return format!("{location}{rest}");
    }
    format!("{location}{}", &name[prefix.len()..])
}

fn split(name: &str, insecure: bool, mirror: bool) -> Endpoint {
    let (location, repository) = name.split_once('/').unwrap_or((name, ""));
    Endpoint {
        location: location.to_string(),
        repository: repository.to_string(),
        insecure,
        mirror,
    }
}

/// Whether `prefix` matches `name` at a path boundary (`example.com/foo`
/// matches `example.com/foo/bar` and `example.com/foo`, not `example.com/foobar`;
/// `*.example.com` matches any host below example.com).
fn prefix_matches(prefix: &str, name: &str) -> bool {
    if let Some(domain) = prefix.strip_prefix("*.") {
        let host = name.split('/').next().unwrap_or("");
        let host = host.split(':').next().unwrap_or(host);
        return host.ends_with(&format!(".{domain}"));
    }
    match name.strip_prefix(prefix) {
        Some(rest) => {
            rest.is_empty()
                || rest.starts_with('/')
                || rest.starts_with(':')
                || rest.starts_with('@')
        }
        None => false,
    }
}

fn check_table(table: &RegistryTable) -> Result<(), String> {
    let prefix = table.effective_prefix();
    if prefix.is_empty() {
        return Err("a [[registry]] table needs a prefix or a location".into());
    }
    if prefix.starts_with("*.") && prefix[2..].contains(['*', '/']) {
        return Err(format!(
            "prefix {prefix:?}: a wildcard names hosts only (*.example.com)"
        ));
    }
    if prefix.contains("://") || table.location.contains("://") {
        return Err(format!(
            "prefix {prefix:?} / location {:?}: no URL scheme (host[:port][/path])",
            table.location
        ));
    }
    if prefix.starts_with("*.") && !table.location.is_empty() && table.location.contains('/') {
        return Err(format!(
            "prefix {prefix:?}: a wildcard prefix's location may name a host only"
        ));
    }
    for mirror in &table.mirror {
        if mirror.location.is_empty() || mirror.location.contains("://") {
            return Err(format!(
                "prefix {prefix:?}: mirror location {:?} must be host[:port][/path]",
                mirror.location
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> RegistriesConf {
        let mut conf = RegistriesConf::default();
        conf.merge(Path::new("test.conf"), text).unwrap();
        conf
    }

    fn endpoints(r: Resolution) -> Vec<(String, String, bool, bool)> {
        match r {
            Resolution::Endpoints(e) => e
                .into_iter()
                .map(|e| (e.location, e.repository, e.insecure, e.mirror))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    fn ep(l: &str, r: &str, insecure: bool, mirror: bool) -> (String, String, bool, bool) {
        (l.into(), r.into(), insecure, mirror)
    }

    #[test]
    fn the_longest_prefix_rewrites_and_mirrors_come_first() {
        let c = conf(
            r#"
unqualified-search-registries = ["docker.io"]
[[registry]]
prefix = "example.com"
location = "upstream.example.com:5000"
[[registry]]
prefix = "example.com/vms"
location = "vms.example.com/mirror/vms"
insecure = true
[[registry.mirror]]
location = "cache.local:5000/vms"
[[registry.mirror]]
location = "peer.local:4001"
insecure = true
pull-from-mirror = "digest-only"
"#,
        );
        assert_eq!(
            endpoints(c.resolve("example.com", "vms/win11", false)),
            [
                ep("cache.local:5000", "vms/win11", false, true),
                ep("vms.example.com", "mirror/vms/win11", true, false)
            ]
        );
        assert_eq!(
            endpoints(c.resolve("example.com", "vms/win11", true)),
            [
                ep("cache.local:5000", "vms/win11", false, true),
                ep("peer.local:4001", "win11", true, true),
                ep("vms.example.com", "mirror/vms/win11", true, false)
            ]
        );
        assert_eq!(
            endpoints(c.resolve("example.com", "other", false)),
            [ep("upstream.example.com:5000", "other", false, false)]
        );
        // A prefix ends at a path boundary.
        assert_eq!(
            endpoints(c.resolve("example.com", "vmsx/a", false)),
            [ep("upstream.example.com:5000", "vmsx/a", false, false)]
        );
        assert_eq!(
            endpoints(c.resolve("elsewhere.org", "a", false)),
            [ep("elsewhere.org", "a", false, false)]
        );
    }

    #[test]
    fn blocked_wildcards_and_digest_only_mirrors() {
        let c = conf(
            r#"
[[registry]]
prefix = "*.corp.example"
location = "proxy.corp.example"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m.local"
[[registry.mirror]]
location = "t.local"
pull-from-mirror = "tag-only"
[[registry]]
location = "bad.example.com"
blocked = true
"#,
        );
        assert_eq!(
            endpoints(c.resolve("git.corp.example", "a/b", false)),
            [
                ep("t.local", "a/b", false, true),
                ep("proxy.corp.example", "a/b", false, false)
            ]
        );
        assert_eq!(
            endpoints(c.resolve("git.corp.example:443", "a/b", true)),
            [
                ep("m.local", "a/b", false, true),
                ep("proxy.corp.example", "a/b", false, false)
            ]
        );
        assert!(matches!(
            c.resolve("bad.example.com", "x", false),
            Resolution::Blocked { .. }
        ));
    }

    #[test]
    fn later_files_replace_tables_of_the_same_prefix() {
        let mut c = conf("[[registry]]\nlocation = \"a.example\"\ninsecure = true\n");
        c.merge(
            Path::new("drop-in.conf"),
            "[[registry]]\nprefix = \"a.example\"\nblocked = true\n",
        )
        .unwrap();
        assert_eq!(c.tables.len(), 1);
        assert!(c.tables[0].blocked && !c.tables[0].insecure);
    }

    #[test]
    fn bad_files_are_refused_naming_the_problem() {
        let mut c = RegistriesConf::default();
        let v1 = c
            .merge(
                Path::new("v1.conf"),
                "[registries.search]\nregistries = [\"docker.io\"]\n",
            )
            .unwrap_err()
            .to_string();
        assert!(v1.contains("v1.conf") && v1.contains("version 1"), "{v1}");
        let scheme = c
            .merge(
                Path::new("s.conf"),
                "[[registry]]\nlocation = \"https://x\"\n",
            )
            .unwrap_err()
            .to_string();
        assert!(scheme.contains("no URL scheme"), "{scheme}");
        let toml = c
            .merge(Path::new("t.conf"), "[[registry]\n")
            .unwrap_err()
            .to_string();
        assert!(toml.contains("t.conf"), "{toml}");
    }

    #[test]
    fn the_environment_names_one_file_else_user_or_system_then_drop_ins() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("etc");
        let home = dir.path().join("home");
        std::fs::create_dir_all(system.join("registries.conf.d")).unwrap();
        std::fs::create_dir_all(home.join(".config/containers/registries.conf.d")).unwrap();
        std::fs::write(system.join("registries.conf"), "").unwrap();
        std::fs::write(system.join("registries.conf.d/b.conf"), "").unwrap();
        std::fs::write(system.join("registries.conf.d/a.conf"), "").unwrap();
        std::fs::write(system.join("registries.conf.d/c.txt"), "").unwrap();
        let only = dir.path().join("only.conf");
        assert_eq!(files(Some(only.clone()), Some(&home), &system), [only]);
        assert_eq!(
            files(None, Some(&home), &system),
            [
                system.join("registries.conf"),
                system.join("registries.conf.d/a.conf"),
                system.join("registries.conf.d/b.conf")
            ]
        );
        let user_main = home.join(".config/containers/registries.conf");
        std::fs::write(&user_main, "").unwrap();
        let user_drop_in = home.join(".config/containers/registries.conf.d/z.conf");
        std::fs::write(&user_drop_in, "").unwrap();
        assert_eq!(
            files(None, Some(&home), &system),
            [
                user_main,
                system.join("registries.conf.d/a.conf"),
                system.join("registries.conf.d/b.conf"),
                user_drop_in
            ]
        );
    }
}
