//! The connection URI libvirt itself would pick when none is given, so that
//! `sarde` and the executor go where `virsh` goes: `LIBVIRT_DEFAULT_URI`, else
//! `uri_default` in libvirt's client configuration (`/etc/libvirt/libvirt.conf`
//! for root, `$XDG_CONFIG_HOME/libvirt/libvirt.conf` for a user), else
//! `qemu:///system` for root and `qemu:///session` for a user.

use std::path::{Path, PathBuf};

/// A default URI and where it came from (for `sarde config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultUri {
    pub uri: String,
    /// `LIBVIRT_DEFAULT_URI`, `uri_default in FILE`, or empty for the fallback.
    pub origin: String,
}

/// What libvirt would choose in this process's environment.
pub fn libvirt_default_uri(root: bool, home: Option<&Path>) -> DefaultUri {
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.map(|h| h.join(".config")));
    choose(
        std::env::var("LIBVIRT_DEFAULT_URI").ok(),
        root,
        config_home.as_deref(),
        Path::new("/etc/libvirt/libvirt.conf"),
    )
}

fn choose(
    env: Option<String>,
    root: bool,
    config_home: Option<&Path>,
    system_file: &Path,
) -> DefaultUri {
    if let Some(uri) = env.filter(|v| !v.trim().is_empty()) {
        return DefaultUri {
            uri: uri.trim().to_string(),
            origin: "LIBVIRT_DEFAULT_URI".into(),
        };
    }
    let file = if root {
        Some(system_file.to_path_buf())
    } else {
        config_home.map(|dir| dir.join("libvirt/libvirt.conf"))
    };
    if let Some(file) = file {
        if let Some(uri) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| uri_default(&text))
        {
            return DefaultUri {
                uri,
                origin: format!("uri_default in {}", file.display()),
            };
        }
    }
    DefaultUri {
        uri: if root {
            "qemu:///system"
        } else {
            "qemu:///session"
        }
        .into(),
        origin: String::new(),
    }
}

/// `uri_default = "…"` from libvirt's configuration syntax (`#` comments).
/// Public for the fuzz targets only.
#[doc(hidden)]
pub fn uri_default(text: &str) -> Option<String> {
    // libvirt takes the first setting of a key.
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        if key.trim() != "uri_default" {
            return None;
        }
        let value = value.trim_start();
        let quote = value.chars().next().filter(|c| *c == '"' || *c == '\'')?;
        let rest = &value[1..];
        let unquoted = &rest[..rest.find(quote)?];
        (!unquoted.is_empty()).then(|| unquoted.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_wins_then_the_file_then_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("libvirt.conf");
        std::fs::write(
            &system,
            "# hi\nuri_default = \"qemu+ssh://host/system\" # there\n",
        )
        .unwrap();
        let user_home = dir.path().join("config");
        std::fs::create_dir_all(user_home.join("libvirt")).unwrap();
        std::fs::write(
            user_home.join("libvirt/libvirt.conf"),
            "uri_default='test:///default'\n",
        )
        .unwrap();

        let env = choose(Some("xen:///system".into()), true, None, &system);
        assert_eq!(env.uri, "xen:///system");
        assert_eq!(env.origin, "LIBVIRT_DEFAULT_URI");

        let root = choose(None, true, Some(&user_home), &system);
        assert_eq!(root.uri, "qemu+ssh://host/system");
        assert!(root.origin.contains("libvirt.conf"), "{}", root.origin);

        let user = choose(Some(String::new()), false, Some(&user_home), &system);
        assert_eq!(user.uri, "test:///default");

        let none = choose(None, false, Some(dir.path()), &system);
        assert_eq!(
            none,
            DefaultUri {
                uri: "qemu:///session".into(),
                origin: String::new()
            }
        );
        assert_eq!(
            choose(None, true, None, &dir.path().join("absent")).uri,
            "qemu:///system"
        );
    }

    #[test]
    fn commented_out_keys_do_not_count() {
        assert_eq!(uri_default("#uri_default = \"a:///\"\n"), None);
        assert_eq!(uri_default("uri_default = \"\"\n"), None);
        assert_eq!(uri_default("uri_defaults = \"x:///\"\n"), None);
        // The first setting counts, and a # inside the quotes is part of it.
        assert_eq!(
            uri_default("uri_default = \"a:///x#y\" # c\nuri_default = \"b:///\"\n").as_deref(),
            Some("a:///x#y")
        );
    }
}
