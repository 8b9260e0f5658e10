//! The `sarde` binary as users run it: configuration layering, errors, plugins.

use std::path::Path;
use std::process::{Command, Output};

use sarde_e2e::build_cdylib;
use serde_json::Value;

/// `sarde` with a clean environment: no real config files, HOME in `home`.
fn sarde(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sarde"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("SARDE_CONF_FILES", "")
        .env("SARDE_PLUGIN_DIR", home.join("no-plugins"));
    cmd
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("sarde runs");
    assert!(
        out.status.success(),
        "sarde failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("sarde runs");
    assert!(!out.status.success(), "sarde succeeded unexpectedly");
    String::from_utf8(out.stderr).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

const PYTHON_TOOL_INI: &str = "\
# written for the Python sardinecake
[DEFAULT]
connect = qemu:///system
ocidir = ~/share/sardinecake/OCI/
verbose = 0

[export]
chunksize = 256 MiB
";

#[test]
fn version_help_and_completions() {
    let home = tempfile::tempdir().unwrap();
    let out = run_ok(sarde(home.path()).arg("--version"));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sarde "));
    let out = run_ok(sarde(home.path()).arg("--help"));
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["plugins", "config", "completions", "--verbose", "--quiet"] {
        assert!(help.contains(word), "help lacks {word}: {help}");
    }
    let out = run_ok(sarde(home.path()).args(["completions", "bash"]));
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_sarde()") && script.contains("plugins"),
        "{script}"
    );
    let err = run_err(sarde(home.path()).args(["completions", "tcsh"]));
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn python_tool_ini_merges_with_environment_and_flags() {
    let home = tempfile::tempdir().unwrap();
    let ini = home.path().join("sarde.ini");
    std::fs::write(&ini, PYTHON_TOOL_INI).unwrap();
    let out = run_ok(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .env("SARDE_CONCURRENCY", "8")
            .args([
                "config", "--for", "export", "--format", "json", "--codec", "xz",
            ]),
    );
    let v = json(&out);
    let s = &v["settings"];
    let ini_name = ini.display().to_string();
    assert_eq!(s["connect"]["value"], "qemu:///system");
    assert_eq!(s["connect"]["origin"]["kind"], "file");
    assert_eq!(
        s["connect"]["origin"]["detail"],
        format!("{ini_name} [DEFAULT]")
    );
    assert_eq!(
        s["ocidir"]["value"],
        home.path()
            .join("share/sardinecake/OCI")
            .display()
            .to_string()
    );
    assert_eq!(s["chunksize"]["value"], "256 MiB");
    assert_eq!(
        s["chunksize"]["origin"]["detail"],
        format!("{ini_name} [export]")
    );
    // export moves nothing over the network: concurrency is not its key, set
    // or not; it is reported as unused, never shown or checked.
    assert!(s.get("concurrency").is_none(), "{s}");
    assert!(
        v["unused_keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["key"] == "concurrency" && k["origin"]["detail"] == "SARDE_CONCURRENCY"),
        "{v}"
    );
    let pull = json(&run_ok(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .env("SARDE_CONCURRENCY", "8")
            .args(["config", "--for", "pull", "--format", "json"]),
    ));
    assert_eq!(pull["settings"]["concurrency"]["value"], "8");
    assert_eq!(
        pull["settings"]["concurrency"]["origin"]["detail"],
        "SARDE_CONCURRENCY"
    );
    assert!(pull["settings"].get("chunksize").is_none(), "{pull}");
    assert_eq!(s["codec"]["value"], "xz");
    assert_eq!(s["codec"]["origin"]["kind"], "command line");
    assert_eq!(s["level"]["origin"]["kind"], "default");
    assert_eq!(v["files_read"][0], ini_name);

    // Without --for export, the [export] section does not apply.
    let out = run_ok(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .args(["config", "--format", "json"]),
    );
    assert_eq!(json(&out)["settings"]["chunksize"]["value"], "64 MiB");

    // The text form names the files and origins too.
    let out = run_ok(sarde(home.path()).env("SARDE_CONF_FILES", &ini).args([
        "config",
        "--for",
        "export",
        "--chunksize",
        "1G",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{ini_name} (read)")), "{text}");
    assert!(
        text.contains("1 GiB") && text.contains("command line --chunksize"),
        "{text}"
    );
}

#[test]
fn later_files_and_subcommand_sections_layer_like_configparser() {
    let home = tempfile::tempdir().unwrap();
    let system = home.path().join("system.ini");
    let user = home.path().join("user.toml");
    std::fs::write(
        &system,
        "[DEFAULT]\ncodec = gzip\nthreads = 2\n[export]\nlevel = 9\n",
    )
    .unwrap();
    std::fs::write(&user, "level = 1\nthreads = 3\n[export]\ncodec = \"raw\"\n").unwrap();
    let files = format!("{}:{}", system.display(), user.display());
    let out = run_ok(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &files)
            .args(["config", "--for", "export", "--format", "json"]),
    );
    let s = &json(&out)["settings"];
    // The user's [DEFAULT] beats the system's [DEFAULT]...
    assert_eq!(s["threads"]["value"], "3");
    // ...but a subcommand section beats any [DEFAULT], as in one configparser.
    assert_eq!(s["level"]["value"], "9");
    assert_eq!(s["codec"]["value"], "raw");
    assert_eq!(
        s["codec"]["origin"]["detail"],
        format!("{} [export]", user.display())
    );
}

#[test]
fn malformed_values_name_file_section_key_and_expectation() {
    let home = tempfile::tempdir().unwrap();
    let ini = home.path().join("bad.ini");
    std::fs::write(
        &ini,
        "[DEFAULT]\nconnect = qemu:///system\n[export]\nchunksize = lots\n",
    )
    .unwrap();
    let err = run_err(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .args(["config", "--for", "export"]),
    );
    assert!(
        err.contains(&format!("{} [export]", ini.display())),
        "{err}"
    );
    assert!(
        err.contains("key `chunksize`") && err.contains("256MiB"),
        "{err}"
    );

    std::fs::write(&ini, "[DEFAULT]\nconcurrency = many\n").unwrap();
    let err = run_err(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .arg("config"),
    );
    assert!(
        err.contains("[DEFAULT]: key `concurrency`") && err.contains("\"many\""),
        "{err}"
    );

    std::fs::write(&ini, "[DEFAULT\nconnect = x\n").unwrap();
    let err = run_err(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .arg("config"),
    );
    assert!(err.contains(&format!("{}: line 1", ini.display())), "{err}");

    let err = run_err(sarde(home.path()).env("SARDE_THREADS", "-2").arg("config"));
    assert!(
        err.contains("environment variable SARDE_THREADS") && err.contains("threads"),
        "{err}"
    );

    let err = run_err(sarde(home.path()).args(["config", "--concurrency", "0"]));
    assert!(
        err.contains("command line flag --concurrency") && err.contains("at least 1"),
        "{err}"
    );
}

#[test]
fn registry_time_bounds_are_keys_with_defaults_and_checked_values() {
    let home = tempfile::tempdir().unwrap();
    let out = run_ok(sarde(home.path()).args(["config", "--format", "json"]));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    for key in [
        "connect-timeout",
        "idle-timeout",
        "request-timeout",
        "min-rate",
        "retry-budget",
    ] {
        assert!(shown.contains(key), "{key} missing from {shown}");
    }
    let ini = home.path().join("bounds.ini");
    std::fs::write(
        &ini,
        "[DEFAULT]\nidle-timeout = 90s\nmin-rate = 1 MiB\nretry-budget = 7\n",
    )
    .unwrap();
    let out = run_ok(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .args(["config", "--format", "json"]),
    );
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains("1m 30s") || shown.contains("90s"), "{shown}");
    assert!(shown.contains("1 MiB"), "{shown}");

    std::fs::write(&ini, "[DEFAULT]\nidle-timeout = 0\n").unwrap();
    let err = run_err(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .arg("config"),
    );
    assert!(
        err.contains("key `idle-timeout`") && err.contains("longer than 0"),
        "{err}"
    );
    let err = run_err(
        sarde(home.path())
            .env("SARDE_CONNECT_TIMEOUT", "soon")
            .arg("config"),
    );
    assert!(
        err.contains("SARDE_CONNECT_TIMEOUT") && err.contains("90s"),
        "{err}"
    );
}

#[test]
fn plugins_lists_builtins_and_loaded_plugins_with_origin() {
    let home = tempfile::tempdir().unwrap();
    let out = run_ok(sarde(home.path()).args(["plugins", "--format", "json"]));
    let v = json(&out);
    let names: Vec<(String, String, String)> = v["factories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["name"].as_str().unwrap().to_string(),
                e["origin"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for codec in ["gzip", "raw", "xz", "zstd"] {
        assert!(
            names.contains(&("codec".into(), codec.into(), "built in".into())),
            "{codec} missing: {names:?}"
        );
    }
    assert!(names.contains(&("transport".into(), "oci-dir".into(), "built in".into())));
    for scheme in ["qemu", "xen", "lxc", "test"] {
        assert!(
            names.contains(&("hypervisor".into(), scheme.into(), "built in".into())),
            "{scheme} missing: {names:?}"
        );
    }

    let lib = build_cdylib("sarde-plugin-example-lz4", &[]);
    let out = run_ok(sarde(home.path()).arg("plugins").arg("--plugin").arg(&lib));
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("codec") && l.contains(" lz4 "))
        .unwrap_or_else(|| panic!("no lz4 row in {text}"));
    assert!(row.contains(&lib.display().to_string()), "{row}");

    // The same library found in a plugin directory loads too.
    let dir = home.path().join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&lib, dir.join("libexample.so")).unwrap();
    let out = run_ok(
        sarde(home.path())
            .env("SARDE_PLUGIN_DIR", &dir)
            .args(["plugins", "--format", "json"]),
    );
    let v = json(&out);
    assert_eq!(v["plugins"][0]["name"], "example-lz4");
}

#[test]
fn incompatible_plugins_are_refused_clearly() {
    let home = tempfile::tempdir().unwrap();
    let lib = build_cdylib("sarde-fixture-incompatible-plugin", &[]);
    // Named explicitly: an error and a non-zero exit.
    let err = run_err(sarde(home.path()).arg("plugins").arg("--plugin").arg(&lib));
    assert!(err.contains("incompatible") && err.contains("ABI"), "{err}");
    assert!(err.contains(&lib.display().to_string()), "{err}");
    // Found in a plugin directory: skipped with the reason, the rest still works.
    let dir = home.path().join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&lib, dir.join("libold.so")).unwrap();
    let out = run_ok(
        sarde(home.path())
            .env("SARDE_PLUGIN_DIR", &dir)
            .args(["plugins", "--format", "json"]),
    );
    let v = json(&out);
    assert!(
        v["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("incompatible")
    );
    assert!(!v["factories"].as_array().unwrap().is_empty());
}

#[test]
fn each_command_shows_and_checks_only_its_own_flags_and_keys() {
    let home = tempfile::tempdir().unwrap();
    let help = String::from_utf8_lossy(&run_ok(sarde(home.path()).args(["push", "--help"])).stdout)
        .into_owned();
    for flag in [
        "--ocidir",
        "--concurrency",
        "--retries",
        "--transport",
        "--target",
    ] {
        assert!(help.contains(flag), "push --help lacks {flag}: {help}");
    }
    for flag in [
        "--clonedir",
        "--chunksize",
        "--codec",
        "--threads",
        "--connect",
        "--vmdir",
        "--level",
    ] {
        assert!(!help.contains(flag), "push --help shows {flag}: {help}");
    }
    // A flag of another command is refused, not ignored.
    let err = run_err(sarde(home.path()).args(["push", "--chunksize", "1MiB", "x"]));
    assert!(err.contains("--chunksize"), "{err}");

    // A bad value of a key a command does not use never fails it…
    let ini = home.path().join("sarde.ini");
    std::fs::write(
        &ini,
        "[DEFAULT]\nchunksize = 0\nconnect = test:///default\n",
    )
    .unwrap();
    let listed = run_ok(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .env("SARDE_OCIDIR", home.path().join("OCI"))
            .env("SARDE_VMDIR", home.path().join("VMs"))
            .args(["list", "--format", "json"]),
    );
    assert_eq!(json(&listed)["images"], serde_json::json!([]));
    // …and fails the command that uses it, naming the key and the file.
    let err = run_err(
        sarde(home.path())
            .env("SARDE_CONF_FILES", &ini)
            .args(["export", "some-vm"]),
    );
    assert!(
        err.contains("chunksize") && err.contains("sarde.ini"),
        "{err}"
    );
    assert!(!home.path().join("OCI").exists(), "nothing written");
}

#[test]
fn unknown_commands_are_errors_in_config_too() {
    let home = tempfile::tempdir().unwrap();
    let err = run_err(sarde(home.path()).args(["config", "--for", "nosuch"]));
    assert!(err.contains("nosuch") && err.contains("export"), "{err}");
}

#[test]
fn connect_defaults_to_what_libvirt_would_choose() {
    let home = tempfile::tempdir().unwrap();
    let out = run_ok(
        sarde(home.path())
            .env("LIBVIRT_DEFAULT_URI", "test:///default")
            .args(["config", "--for", "list", "--format", "json"]),
    );
    let v = json(&out);
    assert_eq!(v["settings"]["connect"]["value"], "test:///default");
    assert_eq!(
        v["settings"]["connect"]["origin"]["kind"],
        "libvirt default"
    );
    assert_eq!(
        v["settings"]["connect"]["origin"]["detail"],
        "LIBVIRT_DEFAULT_URI"
    );
    // libvirt's own file, for a user: $XDG_CONFIG_HOME/libvirt/libvirt.conf.
    let config_home = home.path().join("config");
    std::fs::create_dir_all(config_home.join("libvirt")).unwrap();
    std::fs::write(
        config_home.join("libvirt/libvirt.conf"),
        "uri_default = \"test:///default\"\n",
    )
    .unwrap();
    let text = String::from_utf8_lossy(
        &run_ok(
            sarde(home.path())
                .env("XDG_CONFIG_HOME", &config_home)
                .args(["config", "--for", "list"]),
        )
        .stdout,
    )
    .into_owned();
    // (As root, libvirt reads /etc/libvirt/libvirt.conf instead.)
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            text.contains("test:///default") && text.contains("uri_default"),
            "{text}"
        );
    }
    // A flag still wins.
    let v = json(&run_ok(
        sarde(home.path())
            .env("LIBVIRT_DEFAULT_URI", "test:///default")
            .args([
                "config",
                "--for",
                "list",
                "--format",
                "json",
                "--connect",
                "qemu:///session",
            ]),
    ));
    assert_eq!(v["settings"]["connect"]["value"], "qemu:///session");
}

#[test]
fn export_takes_the_python_tools_tag_flag_and_v1_means_gzip() {
    let home = tempfile::tempdir().unwrap();
    let ocidir = home.path().join("OCI");
    // Every argument is checked before anything is written.
    let err = run_err(
        sarde(home.path())
            .env("SARDE_OCIDIR", &ocidir)
            .env("SARDE_CONNECT", "test:///default")
            .args([
                "export",
                "--image-format",
                "v1",
                "--codec",
                "zstd",
                "--tag",
                "e2e/x:1",
                "test",
            ]),
    );
    assert!(err.contains("gzip"), "{err}");
    assert!(!ocidir.exists(), "nothing written: {err}");
    // --tag and IMAGE name the same thing: one of them.
    let err = run_err(sarde(home.path()).args(["export", "--tag", "a:1", "vm", "b:1"]));
    assert!(err.contains("--tag"), "{err}");
}

#[test]
fn a_host_that_does_not_resolve_fails_at_once() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("none.conf"), "").unwrap();
    // `.invalid` never resolves (RFC 6761): no retries, a message that says so.
    let err = run_err(
        sarde(home.path())
            .env("SARDE_OCIDIR", home.path().join("OCI"))
            .env("CONTAINERS_REGISTRIES_CONF", home.path().join("none.conf"))
            .args(["fetch", "--retries", "5", "registry.invalid/sardines/x:1"]),
    );
    assert!(err.contains("no such host"), "{err}");
    assert!(!err.contains("retr"), "not retried: {err}");
}
