//! # sarde-executor
//!
//! The GitLab Runner custom executor: every job runs in an ephemeral
//! copy-on-write clone (`gitlab-<CI_JOB_ID>`) of a VM image, reached over SSH.
//!
//! - [`config`]: the INI files (compatible with the Python tool's executor).
//! - [`stages`]: `config`, `prepare`, `run`, `cleanup` as gitlab-runner calls them.
//! - [`ssh`]: russh sessions with a pinned host key, scripts piped into the shell.
//! - [`address`]: finding the VM's address (lease, agent, ARP, neighbour table).
//! - [`state`]: per-job state between the stages, and the VM slots per host.

pub mod address;
pub mod config;
pub mod ssh;
pub mod stages;
pub mod state;

/// How the executor names itself in the import records of the base VMs it makes,
/// so it removes those and nothing else.
pub const EXECUTOR_NAME: &str = "gitlab-sardinecake-executor";
