//! Logging to stderr through tracing. `-v`/`-q` move the level; `SARDE_LOG`
//! (an env-filter directive such as `sarde_api=debug`) overrides it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `verbosity` 0 shows warnings and errors; each step up adds a level.
pub fn init(verbosity: i32) {
    let level = match verbosity {
        i32::MIN..=-1 => "error",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("SARDE_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(verbosity >= 2)
        .without_time()
        .try_init();
}
