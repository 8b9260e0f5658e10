//! `vm-bench`: sarde export and import against the Python sardinecake tool, side by
//! side on the same VM in the same run, with peak memory, and import throughput
//! against `cp` of the same bytes.
//!
//! Needs root, libvirtd (scripts/start-services.sh) and the Python tool
//! (scripts/install-python-tool.sh prints its path):
//!
//! ```text
//! cargo build --release -p sarde --bin sarde
//! cargo run --release -p sarde-bench --bin vm-bench -- \
//!     --sarde target/release/sarde --python /var/lib/sardinecake-test/python-sardinecake/bin/sarde
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sarde_bench::vm::{define_vm, drop_caches, succeeded, undefine, wait_with_peak_rss, write_raw};

#[derive(Parser)]
#[command(about = "sarde export/import against the Python tool, side by side")]
struct Args {
    /// The sarde binary to measure (build it with --release)
    #[arg(long, default_value = "target/release/sarde")]
    sarde: PathBuf,
    /// The Python tool's sarde
    #[arg(
        long,
        default_value = "/var/lib/sardinecake-test/python-sardinecake/bin/sarde"
    )]
    python: PathBuf,
    /// Work directory (needs a few GiB)
    #[arg(long, default_value = "/var/tmp/sarde-vm-bench")]
    dir: PathBuf,
    /// Virtual disk size in GiB
    #[arg(long, default_value_t = 2)]
    virtual_gib: u64,
    /// Bytes of data written into the disk, in MiB
    #[arg(long, default_value_t = 1536)]
    data_mib: u64,
    /// libvirt URI
    #[arg(long, default_value = "qemu:///system")]
    connect: String,
}

/// Wall time and peak memory of one child process.
struct Run {
    seconds: f64,
    peak_rss_mib: f64,
}

/// Runs a command, waits with wait4 for its resource usage; fails on non-zero exit.
fn measure(cmd: &mut Command) -> Result<Run> {
    drop_caches();
    let start = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let (status, peak_rss_mib) = wait_with_peak_rss(&child)?;
    let seconds = start.elapsed().as_secs_f64();
    if !succeeded(status) {
        bail!("{cmd:?} failed with status {status}");
    }
    Ok(Run {
        seconds,
        peak_rss_mib,
    })
}

fn main() -> Result<()> {
    // Data is generated in a child process: on Linux a child's peak RSS (wait4)
    // starts from its parent's, so the measuring parent must stay small.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__generate") {
        return write_raw(Path::new(&argv[2]), argv[3].parse()?);
    }
    let args = Args::parse();
    let sarde = std::fs::canonicalize(&args.sarde)
        .context("the sarde binary (build it with cargo build --release -p sarde)")?;
    if !args.python.exists() {
        bail!(
            "the Python tool is not at {} (scripts/install-python-tool.sh)",
            args.python.display()
        );
    }
    let dir = &args.dir;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    // The VM: one qcow2 disk with `data_mib` of mixed data, all allocated.
    let vm = format!("sarde-bench-{}", std::process::id());
    let disk = define_vm(dir, &vm, args.virtual_gib, args.data_mib, &args.connect)?;
    let disk_bytes = std::fs::metadata(&disk)?.len();
    let result = bench(&args, &sarde, dir, &vm, &disk, disk_bytes);
    undefine(&args.connect, &vm);
    for suffix in ["-sarde", "-python", "-sarde-v1"] {
        undefine(&args.connect, &format!("{vm}{suffix}"));
    }
    result
}

fn bench(
    args: &Args,
    sarde: &Path,
    dir: &Path,
    vm: &str,
    disk: &Path,
    disk_bytes: u64,
) -> Result<()> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let sarde_cmd = |sub: &[&str]| {
        let mut c = Command::new(sarde);
        c.env("HOME", &home)
            .env("SARDE_CONF_FILES", "")
            .env("SARDE_OCIDIR", dir.join("sarde-oci"))
            .env("SARDE_VMDIR", dir.join("sarde-vms"))
            .env("SARDE_CONNECT", &args.connect)
            .args(sub);
        c
    };
    let python_cmd = |sub: &[&str]| {
        let mut c = Command::new(&args.python);
        c.env("HOME", &home)
            .args(["--connect", &args.connect])
            .args(sub);
        c
    };
    let py_oci = s(&dir.join("python-oci"));
    let py_vms = format!("{}/", dir.join("python-vms").display());

    eprintln!("sarde export…");
    let sarde_export = measure(&mut sarde_cmd(&["export", vm, "localhost/bench:1"]))?;
    eprintln!("sarde export --image-format v1…");
    let sarde_export_v1 = measure(&mut sarde_cmd(&[
        "export",
        "--image-format",
        "v1",
        vm,
        "localhost/bench-v1:1",
    ]))?;
    eprintln!("Python export…");
    let python_export = measure(&mut python_cmd(&[
        "export", "--ocidir", &py_oci, vm, "bench:1",
    ]))?;
    eprintln!("sarde import…");
    let sarde_import = measure(&mut sarde_cmd(&[
        "import",
        "-n",
        &format!("{vm}-sarde"),
        "localhost/bench:1",
    ]))?;
    eprintln!("sarde import of the v1 image…");
    let sarde_import_v1 = measure(&mut sarde_cmd(&[
        "import",
        "-n",
        &format!("{vm}-sarde-v1"),
        "localhost/bench-v1:1",
    ]))?;
    eprintln!("Python import…");
    let python_import = measure(&mut python_cmd(&[
        "import",
        "--ocidir",
        &py_oci,
        "--vmdir",
        &py_vms,
        "-n",
        &format!("{vm}-python"),
        "bench:1",
    ]))?;
    eprintln!("cp of the disk file…");
    let copy = dir.join("copy.qcow2");
    let cp = measure(
        Command::new("cp")
            .arg("--sparse=never")
            .arg(disk)
            .arg(&copy),
    )?;
    let _ = std::fs::remove_file(&copy);

    let mb = disk_bytes as f64 / 1e6;
    let oci_bytes = du(&dir.join("sarde-oci"));
    let py_bytes = du(Path::new(&py_oci));
    println!();
    println!(
        "disk: {:.0} MB qcow2 file, {} GiB virtual; cache size: sarde {:.0} MB (native and v1 image), Python {:.0} MB",
        mb,
        args.virtual_gib,
        oci_bytes as f64 / 1e6,
        py_bytes as f64 / 1e6
    );
    println!();
    println!(
        "| operation | sarde s | sarde MB/s | baseline | baseline s | speed-up | sarde peak RSS | baseline peak RSS |"
    );
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |");
    let row = |op: &str, ours: &Run, name: &str, theirs: &Run| {
        println!(
            "| {op} | {:.2} | {:.0} | {name} | {:.2} | {:.2}x | {:.0} MiB | {:.0} MiB |",
            ours.seconds,
            mb / ours.seconds,
            theirs.seconds,
            theirs.seconds / ours.seconds,
            ours.peak_rss_mib,
            theirs.peak_rss_mib
        )
    };
    row(
        "export (native, zstd)",
        &sarde_export,
        "Python export",
        &python_export,
    );
    row(
        "export (v1, gzip)",
        &sarde_export_v1,
        "Python export",
        &python_export,
    );
    row(
        "import (native)",
        &sarde_import,
        "Python import",
        &python_import,
    );
    row(
        "import (v1)",
        &sarde_import_v1,
        "Python import",
        &python_import,
    );
    row("import (native)", &sarde_import, "cp of the file", &cp);
    println!();
    let target = |what: &str, ok: bool| println!("{} {what}", if ok { "PASS" } else { "MISS" });
    target(
        "export at least 8x faster than the Python tool",
        python_export.seconds / sarde_export.seconds >= 8.0,
    );
    target(
        "import at least 2x faster than the Python tool",
        python_import.seconds / sarde_import.seconds >= 2.0,
    );
    let peak = [
        sarde_export.peak_rss_mib,
        sarde_import.peak_rss_mib,
        sarde_export_v1.peak_rss_mib,
        sarde_import_v1.peak_rss_mib,
    ]
    .into_iter()
    .fold(0.0, f64::max);
    target(
        &format!("peak memory under 256 MiB (max {peak:.0} MiB)"),
        peak < 256.0,
    );
    target(
        &format!(
            "import throughput at least 60% of cp ({:.0}%)",
            100.0 * cp.seconds / sarde_import.seconds
        ),
        cp.seconds / sarde_import.seconds >= 0.6,
    );
    Ok(())
}

fn du(path: &Path) -> u64 {
    let Ok(out) = Command::new("du").args(["-sb"]).arg(path).output() else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
