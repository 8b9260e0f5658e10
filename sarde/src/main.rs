//! `sarde`: libvirt VMs as OCI images.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("sarde: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
