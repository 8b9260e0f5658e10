//! # sarde-disk
//!
//! The disk files of a VM, as sardinecake moves them:
//!
//! - [`backing_chain`] and [`rebase_in_place`] find and rewrite qcow2 backing chains
//!   with `qemu-img`, which is the authority on how qemu resolves them;
//! - [`export_file`] cuts a file (its raw bytes: qcow2 files travel as files, not as
//!   the guest's view) into fixed-size pieces, each hashed and compressed on its own by
//!   several threads, so pieces can later be fetched, decompressed and written in
//!   parallel and out of order; all-zero pieces are not stored at all;
//! - [`create_sparse`], [`write_piece`], [`zero_range`] and [`verify_pieces`] /
//!   [`verify_file`] rebuild such a file, sparse, checking every piece's digest;
//!   [`copy_range`] takes a piece from an earlier version of the file instead.
//!
//! Memory stays bounded whatever the disk size: everything streams through 1 MiB
//! blocks per thread.

mod chain;
mod copy;
mod error;
mod export;
mod holes;
mod import;

pub use chain::{ChainFile, ImageHeader, backing_chain, create_overlay, inspect, rebase_in_place};
pub use copy::copy_range;
pub use error::DiskError;
pub use export::{PieceInfo, PieceSink, PieceWriter, export_file};
pub use import::{
    PieceRange, PieceSpan, create_sparse, open_direct, verify_file, verify_pieces, write_piece,
    write_piece_direct, zero_range,
};

/// The unit of every read, write and zero check: large enough for few system calls,
/// small enough that memory per thread does not depend on the piece size.
pub const BLOCK_SIZE: usize = 1 << 20;
