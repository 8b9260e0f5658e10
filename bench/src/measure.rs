//! Runs one process and measures it: wall time from spawn to exit and its peak
//! resident memory, taken from `wait4`'s rusage so nothing samples or races.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What one process cost.
#[derive(Debug, Clone, Copy)]
pub struct Measurement {
    pub wall: Duration,
    /// Peak resident set size in KiB (`ru_maxrss` on Linux).
    pub max_rss_kib: u64,
}

/// Spawns `command`, waits for it with `wait4` and fails unless it exits with 0.
pub fn run(command: &mut Command) -> Result<Measurement> {
    let start = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let pid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our own child, not yet reaped (std's Child is never waited
        // on); status and usage are valid for writes.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4");
        }
    }
    let wall = start.elapsed();
    // The child is reaped; dropping std's handle neither waits nor kills.
    drop(child);
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{command:?} failed (wait status {status:#x})");
    }
    Ok(Measurement {
        wall,
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    })
}

/// A try that took longer than this is not repeated: long runs average the noise
/// out themselves, and xz would otherwise take most of an hour.
const REPEAT_BELOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `make()`'s command up to `repeat` times (once if it takes longer than
/// [`REPEAT_BELOW`]); keeps the fastest wall time and the highest peak RSS.
/// `before` runs untimed before each try (removing outputs, warming the input).
pub fn best_of(
    repeat: usize,
    mut before: impl FnMut() -> Result<()>,
    mut make: impl FnMut() -> Result<Command>,
) -> Result<Measurement> {
    let mut best: Option<Measurement> = None;
    for _ in 0..repeat.max(1) {
        before()?;
        // Write back the previous run's output so its I/O does not land in this one.
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        let m = run(&mut make()?)?;
        eprintln!(
            "    {:.3} s, peak RSS {} KiB",
            m.wall.as_secs_f64(),
            m.max_rss_kib
        );
        best = Some(match best {
            None => m,
            Some(b) => Measurement {
                wall: b.wall.min(m.wall),
                max_rss_kib: b.max_rss_kib.max(m.max_rss_kib),
            },
        });
        if m.wall > REPEAT_BELOW {
            break;
        }
    }
    best.context("no run")
}

/// A CPU set holding only the first CPU this process may use.
pub fn one_cpu_set() -> Result<libc::cpu_set_t> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; the CPU_* macros stay within it and
    // sched_getaffinity gets its real size.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        let first = (0..8 * size)
            .find(|&cpu| libc::CPU_ISSET(cpu, &allowed))
            .context("no CPU in the affinity mask")?;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(first, &mut set);
        Ok(set)
    }
}

/// Restricts the calling process to `set`. Only a system call, so it is safe to
/// run between fork and exec.
pub fn apply_cpu_set(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Restricts this process to one CPU (the first it may use), so "one thread" also
/// holds for decoders that size their thread pool from the CPUs they may use.
pub fn pin_to_one_cpu() -> Result<()> {
    apply_cpu_set(&one_cpu_set()?).context("sched_setaffinity")
}

/// Makes `command` run on one CPU, like [`pin_to_one_cpu`] does for our child.
pub fn pin_command(command: &mut Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let set = one_cpu_set()?;
    // SAFETY: the closure only makes one system call and allocates nothing.
    unsafe {
        command.pre_exec(move || apply_cpu_set(&set));
    }
    Ok(())
}
