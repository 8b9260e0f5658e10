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

/// The files that apply, in the order they are merged, as containers/image
/// picks them: the main file is `$CONTAINERS_REGISTRIES_CONF` when set (it must
/// exist), else `~/.config/containers/registries.conf` when it exists (then
/// only the user's drop-ins follow), else `/etc/containers/registries.conf`;
/// then the drop-ins (`*.conf`, in name order) of
/// `/etc/containers/registries.conf.d/` and `~/.config/containers/registries.conf.d/`.
/// Files that do not exist are left out, except a main file the environment names.
pub fn files_from_process() -> Result<ConfFiles, ConfError> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from);
    files(
        std::env::var_os("CONTAINERS_REGISTRIES_CONF")
            .filter(|f| !f.is_empty())
            .map(PathBuf::from),
        home.as_deref(),
        Path::new("/etc/containers"),
    )
}

/// The main file (if any; version 1 is allowed there) and the drop-ins, in
/// merge order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfFiles {
    pub main: Option<PathBuf>,
    pub drop_ins: Vec<PathBuf>,
}

fn files(env: Option<PathBuf>, home: Option<&Path>, system: &Path) -> Result<ConfFiles, ConfError> {
    let user = home.map(|h| h.join(".config/containers"));
    let user_main = user.as_ref().map(|u| u.join("registries.conf"));
    let (main, dirs) = match (env, user_main.filter(|f| f.is_file())) {
        (Some(file), _) => {
            if !file.is_file() {
                return Err(ConfError::Read {
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "CONTAINERS_REGISTRIES_CONF names it, and it does not exist",
                    ),
                    file,
                });
            }
            (Some(file), vec![Some(system.to_path_buf()), user])
        }
        (None, Some(file)) => (Some(file), vec![user]),
        (None, None) => {
            let file = system.join("registries.conf");
            (
                file.is_file().then_some(file),
                vec![Some(system.to_path_buf()), user],
            )
        }
    };
    let mut drop_ins = Vec::new();
    for dir in dirs.into_iter().flatten() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join("registries.conf.d"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conf") && p.is_file())
            .collect();
        found.sort();
        drop_ins.extend(found);
    }
    Ok(ConfFiles { main, drop_ins })
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
    /// Version 1 tables: `[registries.search]`, `[registries.insecure]`,
    /// `[registries.block]`, each with a `registries` list.
    #[serde(default)]
    registries: Option<V1Tables>,
}

#[derive(Debug, Default, Deserialize)]
struct V1Tables {
    #[serde(default)]
    insecure: Option<V1List>,
    #[serde(default)]
    block: Option<V1List>,
}

#[derive(Debug, Default, Deserialize)]
struct V1List {
    #[serde(default)]
    registries: Vec<String>,
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
    /// Reads and merges the files (later files replace tables with the same
    /// prefix); only the main file may be in version 1.
    pub fn load(files: &ConfFiles) -> Result<RegistriesConf, ConfError> {
        let mut conf = RegistriesConf::default();
        let all = files
            .main
            .iter()
            .map(|f| (f, true))
            .chain(files.drop_ins.iter().map(|f| (f, false)));
        for (file, main) in all {
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
            conf.merge(file, &text, main)?;
            conf.files.push(file.clone());
        }
        Ok(conf)
    }

    fn merge(&mut self, file: &Path, text: &str, main: bool) -> Result<(), ConfError> {
        let syntax = |message: String| ConfError::Syntax {
            file: file.to_path_buf(),
            message,
        };
        let parsed: FileV2 = toml::from_str(text).map_err(|e| syntax(e.to_string()))?;
        let mut tables = parsed.registry;
        if let Some(v1) = parsed.registries {
            if !main {
                return Err(syntax(
                    "a drop-in must use version 2 ([[registry]] tables), not [registries.*]".into(),
                ));
            }
            if !tables.is_empty() {
                return Err(syntax(
                    "version 1 ([registries.*]) and version 2 ([[registry]]) tables mixed in one file"
                        .into(),
                ));
            }
            // As containers/image reads version 1: a table per listed registry;
            // search lists do not apply to docker:// references.
            let lists = [
                (v1.insecure.map(|l| l.registries), true),
                (v1.block.map(|l| l.registries), false),
            ];
            for (registries, insecure) in lists {
                for registry in registries.unwrap_or_default() {
                    let registry = registry.trim_end_matches('/').to_string();
                    let index = match tables.iter().position(|t| t.location == registry) {
                        Some(i) => i,
                        None => {
                            tables.push(RegistryTable {
                                prefix: registry.clone(),
                                location: registry,
                                insecure: false,
                                blocked: false,
                                mirror_by_digest_only: false,
                                mirror: Vec::new(),
                                file: PathBuf::new(),
                            });
                            tables.len() - 1
                        }
                    };
                    if insecure {
                        tables[index].insecure = true;
                    } else {
                        tables[index].blocked = true;
                    }
                }
            }
        }
        for mut table in tables {
            table.file = file.to_path_buf();
            normalise(&mut table);
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

    /// The table for `name` (`host[:port]/path`): the longest prefix that
    /// matches, the first of equally long ones.
    pub fn table_for(&self, name: &str) -> Option<&RegistryTable> {
        let mut best: Option<&RegistryTable> = None;
        for table in &self.tables {
            let prefix = table.effective_prefix();
            if prefix_matches(prefix, name)
                && best.is_none_or(|b| prefix.len() > b.effective_prefix().len())
            {
                best = Some(table);
            }
        }
        best
    }

    /// Whether some table can apply to a repository at `location` (`host[:port]`).
    pub fn applies_to(&self, location: &str) -> bool {
        self.tables.iter().any(|t| {
            let prefix = t.effective_prefix();
            prefix_matches(prefix, location) || prefix.starts_with(&format!("{location}/"))
        })
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
    // A `:` boundary: a prefix without a port matches its host on any port.
    match name.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with(':'),
        None => false,
    }
}

/// Surrounding blanks and trailing slashes go, as containers/image parses locations.
fn normalise(table: &mut RegistryTable) {
    let trim = |s: &mut String| {
        let trimmed = s.trim().trim_end_matches('/').to_string();
        *s = trimmed;
    };
    trim(&mut table.prefix);
    trim(&mut table.location);
    for mirror in &mut table.mirror {
        trim(&mut mirror.location);
    }
}

fn check_table(table: &RegistryTable) -> Result<(), String> {
    let prefix = table.effective_prefix();
    if prefix.is_empty() {
        return Err("a [[registry]] table needs a prefix or a location".into());
    }
    if prefix.starts_with("*.") && prefix[2..].contains(['*', '/', ':', '@']) {
        return Err(format!(
            "prefix {prefix:?}: a wildcard names hosts only, without port or path (*.example.com)"
        ));
    }
    if prefix.contains('*') && !prefix.starts_with("*.") {
        return Err(format!(
            "prefix {prefix:?}: a wildcard goes first (*.example.com)"
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
        conf.merge(Path::new("test.conf"), text, true).unwrap();
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
            "[[registry]]\nprefix = \"a.example/\"\nblocked = true\n",
            false,
        )
        .unwrap();
        assert_eq!(c.tables.len(), 1, "a trailing / is the same prefix");
        assert!(c.tables[0].blocked && !c.tables[0].insecure);
    }

    #[test]
    fn version_1_main_files_are_read_and_drop_ins_must_be_version_2() {
        let mut c = RegistriesConf::default();
        c.merge(
            Path::new("registries.conf"),
            "[registries.search]\nregistries = [\"docker.io\"]\n\
             [registries.insecure]\nregistries = [\"old.example:5000\"]\n\
             [registries.block]\nregistries = [\"bad.example\"]\n",
            true,
        )
        .unwrap();
        assert_eq!(
            endpoints(c.resolve("old.example:5000", "x", false)),
            [ep("old.example:5000", "x", true, false)]
        );
        assert!(matches!(
            c.resolve("bad.example", "x", false),
            Resolution::Blocked { .. }
        ));
        let err = c
            .merge(
                Path::new("v1.conf"),
                "[registries.search]\nregistries = [\"docker.io\"]\n",
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("v1.conf") && err.contains("version 2"),
            "{err}"
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_problem() {
        let mut c = RegistriesConf::default();
        let scheme = c
            .merge(
                Path::new("s.conf"),
                "[[registry]]\nlocation = \"https://x\"\n",
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(scheme.contains("no URL scheme"), "{scheme}");
        let wildcard = c
            .merge(
                Path::new("w.conf"),
                "[[registry]]\nprefix = \"*.x.example:5000\"\n",
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(wildcard.contains("wildcard"), "{wildcard}");
        let toml = c
            .merge(Path::new("t.conf"), "[[registry]\n", false)
            .unwrap_err()
            .to_string();
        assert!(toml.contains("t.conf"), "{toml}");
    }

    #[test]
    fn a_prefix_without_a_port_applies_to_every_port_of_its_host() {
        let c = conf("[[registry]]\nlocation = \"localhost\"\ninsecure = true\n");
        assert!(c.applies_to("localhost:5000"));
        assert!(!c.applies_to("localhostx:5000"));
        assert_eq!(
            endpoints(c.resolve("localhost:5000", "a/b", false)),
            [ep("localhost:5000", "a/b", true, false)]
        );
        let deep = conf("[[registry]]\nprefix = \"r.example/team\"\nblocked = true\n");
        assert!(deep.applies_to("r.example"));
        assert!(!deep.applies_to("r.example:5000"));
    }

    #[test]
    fn the_files_containers_image_reads() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("etc");
        let home = dir.path().join("home");
        std::fs::create_dir_all(system.join("registries.conf.d")).unwrap();
        std::fs::create_dir_all(home.join(".config/containers/registries.conf.d")).unwrap();
        std::fs::write(system.join("registries.conf"), "").unwrap();
        std::fs::write(system.join("registries.conf.d/b.conf"), "").unwrap();
        std::fs::write(system.join("registries.conf.d/a.conf"), "").unwrap();
        std::fs::write(system.join("registries.conf.d/c.txt"), "").unwrap();
        let user_drop_in = home.join(".config/containers/registries.conf.d/z.conf");
        std::fs::write(&user_drop_in, "").unwrap();
        let system_drop_ins = vec![
            system.join("registries.conf.d/a.conf"),
            system.join("registries.conf.d/b.conf"),
            user_drop_in.clone(),
        ];
        // The environment names the main file; the drop-ins still follow.
        let only = dir.path().join("only.conf");
        assert!(
            files(Some(only.clone()), Some(&home), &system).is_err(),
            "it must exist"
        );
        std::fs::write(&only, "").unwrap();
        assert_eq!(
            files(Some(only.clone()), Some(&home), &system).unwrap(),
            ConfFiles {
                main: Some(only),
                drop_ins: system_drop_ins.clone()
            }
        );
        assert_eq!(
            files(None, Some(&home), &system).unwrap(),
            ConfFiles {
                main: Some(system.join("registries.conf")),
                drop_ins: system_drop_ins
            }
        );
        // A user's own file: the system's drop-ins are not read.
        let user_main = home.join(".config/containers/registries.conf");
        std::fs::write(&user_main, "").unwrap();
        assert_eq!(
            files(None, Some(&home), &system).unwrap(),
            ConfFiles {
                main: Some(user_main),
                drop_ins: vec![user_drop_in]
            }
        );
    }
}
