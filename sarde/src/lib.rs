//! The `sarde` front end: flags, configuration, logging and output. Formats and
//! protocols live in the library crates; this crate wires them together.

pub mod builtin;
pub mod config;
pub mod logging;
