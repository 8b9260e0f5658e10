//! Configuration files: where they are, and how INI and TOML files become figment
//! providers, one per (file, section) so that every value remembers where it came from.
//!
//! INI follows Python's configparser as the Python tool used it: `[DEFAULT]` applies
//! to every subcommand, a section named after a subcommand overrides it, and keys
//! are case-insensitive. With several files, every file's `[DEFAULT]` is read first
//! and every file's subcommand section after, in file order — so a subcommand
//! section in `/etc` still beats `[DEFAULT]` in the user's file, exactly as one
//! configparser reading both files would decide.
//!
//! TOML files take the same shape: top-level keys are `[DEFAULT]`, a table named
//! after a subcommand overrides them.

use std::path::{Path, PathBuf};

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider, Source};

/// A problem with a configuration file itself (not with one value in it).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: line {line}, column {col}: {message} (expected INI: `[section]` headers and `key = value` lines)"
    )]
    Ini {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{path}: section [{section}], key `{key}`: {message}")]
    Value {
        path: PathBuf,
        section: String,
        key: String,
        message: String,
    },
}

/// The name of the section that applies to all subcommands.
pub const DEFAULT_SECTION: &str = "DEFAULT";

/// One section of one file: its keys (normalised to snake_case) and values.
#[derive(Debug, Clone)]
pub struct Section {
    pub file: PathBuf,
    pub name: String,
    pub values: Dict,
}

/// Turns a user-facing key (`plugin-dir`, `Plugin_Dir`) into the field name (`plugin_dir`).
pub fn normalise_key(key: &str) -> String {
    key.trim().to_ascii_lowercase().replace('-', "_")
}

/// The configuration files to read: those in `SARDE_CONF_FILES` (colon-separated)
/// when it is set, else the system file then the user's. Missing files are skipped
/// by the reader, as the Python tool does.
pub fn default_files(conf_files_env: Option<&str>, home: Option<&Path>) -> Vec<PathBuf> {
    if let Some(list) = conf_files_env {
        return list
            .split(':')
            .filter(|s| !s.trim().is_empty())
            .map(|s| super::expand_tilde(Path::new(s.trim()), home))
            .collect();
    }
    let user_config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.map(|h| h.join(".config")));
    let mut files = vec![
        PathBuf::from("/etc/sardinecake/sarde.ini"),
        PathBuf::from("/etc/sardinecake/sarde.toml"),
    ];
    if let Some(dir) = user_config {
        files.push(dir.join("sardinecake/sarde.ini"));
        files.push(dir.join("sardinecake/sarde.toml"));
    }
    files
}

/// Reads one file into its sections. `Ok(None)` when the file does not exist.
pub fn read_file(path: &Path) -> Result<Option<Vec<Section>>, FileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let sections = if is_toml {
        parse_toml(path, &text)?
    } else {
        parse_ini(path, &text)?
    };
    Ok(Some(sections))
}

fn parse_ini(path: &Path, text: &str) -> Result<Vec<Section>, FileError> {
    // rust-ini reports an unclosed header only at the end of the file; name its line.
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') && !line.ends_with(']') {
            return Err(FileError::Ini {
                path: path.to_path_buf(),
                line: i + 1,
                col: 1,
                message: format!("section header {line:?} is not closed with ']'"),
            });
        }
    }
    // configparser keeps quotes and backslashes as they are; so do we.
    let options = ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        enabled_indented_mutiline_value: true,
        enabled_preserve_key_leading_whitespace: false,
    };
    let parsed = ini::Ini::load_from_str_opt(text, options).map_err(|e| FileError::Ini {
        path: path.to_path_buf(),
        line: e.line,
        col: e.col,
        message: e.msg.to_string(),
    })?;
    let mut sections: Vec<Section> = Vec::new();
    for (name, properties) in parsed.iter() {
        // Keys before any header count as [DEFAULT].
        let name = name.unwrap_or(DEFAULT_SECTION).trim().to_string();
        let mut values = Dict::new();
        for (key, value) in properties.iter() {
            values.insert(normalise_key(key), Value::from(value.trim().to_string()));
        }
        if values.is_empty() {
            continue;
        }
        match sections.iter_mut().find(|s| s.name == name) {
            Some(existing) => existing.values.extend(values),
            None => sections.push(Section {
                file: path.to_path_buf(),
                name,
                values,
            }),
        }
    }
    Ok(sections)
}

fn toml_to_value(
    path: &Path,
    section: &str,
    key: &str,
    v: toml::Value,
) -> Result<Value, FileError> {
    Ok(match v {
        toml::Value::String(s) => Value::from(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => Value::from(f),
        toml::Value::Boolean(b) => Value::from(b),
        toml::Value::Datetime(d) => Value::from(d.to_string()),
        toml::Value::Array(items) => Value::from(
            items
                .into_iter()
                .map(|item| toml_to_value(path, section, key, item))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        toml::Value::Table(_) => {
            return Err(FileError::Value {
                path: path.to_path_buf(),
                section: section.to_string(),
                key: key.to_string(),
                message:
                    "a table is not a valid value here (tables name subcommands, one level deep)"
                        .into(),
            });
        }
    })
}

fn parse_toml(path: &Path, text: &str) -> Result<Vec<Section>, FileError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| FileError::Toml {
        path: path.to_path_buf(),
        message: e.to_string().trim().to_string(),
    })?;
    let mut defaults = Dict::new();
    let mut sections = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => {
                let mut values = Dict::new();
                for (k, v) in inner {
                    values.insert(normalise_key(&k), toml_to_value(path, &key, &k, v)?);
                }
                sections.push(Section {
                    file: path.to_path_buf(),
                    name: key,
                    values,
                });
            }
            other => {
                let v = toml_to_value(path, DEFAULT_SECTION, &key, other)?;
                defaults.insert(normalise_key(&key), v);
            }
        }
    }
    if !defaults.is_empty() {
        sections.insert(
            0,
            Section {
                file: path.to_path_buf(),
                name: DEFAULT_SECTION.to_string(),
                values: defaults,
            },
        );
    }
    Ok(sections)
}

/// A figment provider holding one dictionary with a name and a source, so that
/// `sarde config` and error messages can say where a value came from.
pub struct NamedDict {
    pub name: String,
    pub source: Source,
    pub values: Dict,
}

impl NamedDict {
    pub fn from_section(section: &Section) -> Self {
        NamedDict {
            name: format!("{} [{}]", section.file.display(), section.name),
            source: Source::File(section.file.clone()),
            values: section.values.clone(),
        }
    }
}

impl NamedDict {
    /// The same values without the keys (field names) `keep` refuses.
    pub fn only(&self, keep: &dyn Fn(&str) -> bool) -> NamedDict {
        NamedDict {
            name: self.name.clone(),
            source: self.source.clone(),
            values: self
                .values
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl Provider for NamedDict {
    fn metadata(&self) -> Metadata {
        Metadata::from(self.name.clone(), self.source.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_tool_ini_parses_with_sections_and_case_insensitive_keys() {
        let text = "# comment\n[DEFAULT]\nconnect = qemu:///system\nOciDir: ~/share/sardinecake/OCI/\n\n; another\n[export]\nchunksize = 256 MiB\n";
        let sections = parse_ini(Path::new("x.ini"), text).unwrap();
        assert_eq!(sections.len(), 2);
        assert_eq!(sections[0].name, "DEFAULT");
        assert_eq!(
            sections[0].values["connect"].as_str(),
            Some("qemu:///system")
        );
        assert_eq!(
            sections[0].values["ocidir"].as_str(),
            Some("~/share/sardinecake/OCI/")
        );
        assert_eq!(sections[1].name, "export");
        assert_eq!(sections[1].values["chunksize"].as_str(), Some("256 MiB"));
    }

    #[test]
    fn broken_ini_names_file_and_line() {
        let err = parse_ini(
            Path::new("/etc/x.ini"),
            "[DEFAULT]\nconnect = a\n[unclosed\n",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("/etc/x.ini: line 3, column 1: section header \"[unclosed\""),
            "{msg}"
        );
        let err = parse_ini(
            Path::new("/etc/x.ini"),
            "[DEFAULT]\nconnect = a\n= novalue\n",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("/etc/x.ini: line 3"), "{err}");
    }

    #[test]
    fn toml_top_level_is_default_and_tables_are_subcommands() {
        let text = "connect = \"qemu:///system\"\nconcurrency = 8\n[export]\nchunk-size = \"1G\"\n";
        let sections = parse_toml(Path::new("x.toml"), text).unwrap();
        assert_eq!(sections[0].name, "DEFAULT");
        assert_eq!(sections[0].values.len(), 2);
        assert_eq!(sections[1].name, "export");
        assert!(sections[1].values.contains_key("chunk_size"));
        let err = parse_toml(Path::new("x.toml"), "a = [").unwrap_err();
        assert!(err.to_string().starts_with("x.toml: "), "{err}");
    }

    #[test]
    fn conf_files_env_replaces_the_default_list() {
        let files = default_files(Some("/a.ini::~/b.toml"), Some(Path::new("/home/u")));
        assert_eq!(
            files,
            vec![PathBuf::from("/a.ini"), PathBuf::from("/home/u/b.toml")]
        );
        let files = default_files(None, Some(Path::new("/home/u")));
        assert_eq!(files[0], PathBuf::from("/etc/sardinecake/sarde.ini"));
    }
}
