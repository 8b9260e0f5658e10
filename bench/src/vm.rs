//! Helpers of the VM benchmarks.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, Result, bail};

/// Runs a program to completion; a failure carries its standard error.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The benchmarks' VM: `<dir>/disk.qcow2`, `virtual_gib` GiB with `data_mib` MiB of
/// [`write_raw`] data at its start (all allocated, zero blocks included, as on a
/// used disk), defined on `connect` as `vm`. The data is written by this program
/// run again as `<exe> __generate PATH MIB`, which the caller's `main` must
/// dispatch to [`write_raw`]: on Linux a child's peak RSS (wait4) starts from its
/// parent's, so the measuring parent must stay small. Returns the disk's path.
pub fn define_vm(
    dir: &Path,
    vm: &str,
    virtual_gib: u64,
    data_mib: u64,
    connect: &str,
) -> Result<PathBuf> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    eprintln!("generating a {virtual_gib} GiB disk with {data_mib} MiB of data…");
    let raw = dir.join("data.raw");
    run(
        &std::env::current_exe()?.to_string_lossy(),
        &["__generate", &s(&raw), &data_mib.to_string()],
    )?;
    let disk = dir.join("disk.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            &s(&disk),
            &format!("{virtual_gib}G"),
        ],
    )?;
    // -n writes into the existing (bigger) image; -S 0 keeps the data's zero blocks
    // allocated, as a used disk has them, while the rest stays unallocated.
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-n",
            "-S",
            "0",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &s(&raw),
            &s(&disk),
        ],
    )?;
    std::fs::remove_file(&raw)?;
    let xml = format!(
        "<domain type='qemu'><name>{vm}</name><memory unit='MiB'>128</memory><os><type arch='x86_64'>hvm</type></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        disk.display()
    );
    let xml_path = dir.join("vm.xml");
    std::fs::write(&xml_path, xml)?;
    run("virsh", &["-q", "-c", connect, "define", &s(&xml_path)])?;
    Ok(disk)
}

/// Empties the page cache so every run reads from the disk, and lets the system
/// settle (root only; best effort).
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    // Let the kernel finish what the previous step left it (reclaim,
    // compaction, write-back of metadata) before the clock starts: on this
    // shared machine the first command after a burst of I/O otherwise pays
    // several seconds of system time for it (seen: the same archive pull took
    // 7.1 s right after a benchmark run and 1.8–2.7 s in the next three).
    let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
    std::thread::sleep(std::time::Duration::from_secs(2));
}

/// Waits for `child` with `wait4` (std's `Child` never waits for it), retrying on
/// EINTR; returns its wait status and peak RSS in MiB.
pub fn wait_with_peak_rss(child: &Child) -> Result<(i32, f64)> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if waited == pid {
            return Ok((status, usage.ru_maxrss as f64 / 1024.0));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).with_context(|| format!("wait4 for process {pid}"));
        }
    }
}

/// Whether a wait status says "exited with 0".
pub fn succeeded(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// A command run with its standard output and error in files (so reading a pipe
/// is not part of its time): wall time, wait status and peak RSS.
pub struct TimedRun {
    pub seconds: f64,
    pub status: i32,
    pub peak_rss_mib: f64,
}

/// Runs `cmd` with stdin closed and stdout, stderr into `out` and `err`, waits
/// with wait4 for its resource usage.
pub fn run_timed(cmd: &mut Command, out: &Path, err: &Path) -> Result<TimedRun> {
    let start = std::time::Instant::now();
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(out)?)
        .stderr(std::fs::File::create(err)?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let (status, peak_rss_mib) = wait_with_peak_rss(&child)?;
    let seconds = start.elapsed().as_secs_f64();
    drop(child);
    Ok(TimedRun {
        seconds,
        status,
        peak_rss_mib,
    })
}

/// A raw file like a real disk's content: text, binaries, random data and zeros in
/// 1 MiB blocks, deterministic.
pub fn write_raw(path: &Path, mib: u64) -> Result<()> {
    let binaries: Vec<u8> = std::fs::read_dir("/usr/bin")?
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .take(400)
        .flatten()
        .collect();
    let words = [
        "libvirt ",
        "qcow2 ",
        "registry ",
        "runner ",
        "kernel ",
        "the ",
        "and ",
        "of ",
        "\n",
    ];
    let mut out = BufWriter::new(File::create(path)?);
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        match i % 8 {
            0 | 1 => block.fill(0),
            2 | 3 => fill_random(&mut block, &mut state),
            4 | 5 => {
                let mut pos = 0;
                while pos < block.len() {
                    let w = words[(xorshift(&mut state) % words.len() as u64) as usize].as_bytes();
                    let n = w.len().min(block.len() - pos);
                    block[pos..pos + n].copy_from_slice(&w[..n]);
                    pos += n;
                }
            }
            _ => {
                let start = ((i as usize) << 20) % binaries.len().max(1);
                for (j, b) in block.iter_mut().enumerate() {
                    *b = binaries
                        .get((start + j) % binaries.len().max(1))
                        .copied()
                        .unwrap_or(0);
                }
            }
        }
        out.write_all(&block)?;
    }
    out.flush()?;
    Ok(())
}

/// The next value of a xorshift64 generator.
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Fills `block` with the generator's output, 8 bytes a step.
pub fn fill_random(block: &mut [u8], state: &mut u64) {
    for chunk in block.chunks_mut(8) {
        chunk.copy_from_slice(&xorshift(state).to_le_bytes()[..chunk.len()]);
    }
}

/// Undefines a domain (with its NVRAM when it has one); errors ignored.
pub fn undefine(connect: &str, name: &str) {
    let _ = Command::new("virsh")
        .args(["-q", "-c", connect, "undefine", "--nvram", name])
        .output();
    let _ = Command::new("virsh")
        .args(["-q", "-c", connect, "undefine", name])
        .output();
}
