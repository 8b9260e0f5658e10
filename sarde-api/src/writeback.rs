//! Hints to the kernel about file I/O: starting the write-back of data just
//! written, so a later `fsync` finds it (mostly) on disk already, and reading a
//! region ahead that will be read once from start to end. Disk I/O overlaps
//! with the rest of the work instead of piling up behind it.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Asks the kernel to start writing `[offset, offset + len)` of `file` to disk,
/// without waiting. A hint: errors are ignored (the final `fsync` reports them).
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range on a descriptor we borrow; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Asks the kernel to read `[offset, offset + len)` of `file` ahead in the
/// background and to read it sequentially: a blob is read once, start to end,
/// often while others are read from the same disk. A hint: errors are ignored.
pub fn read_ahead(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: advice on a descriptor we borrow; no memory is passed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_SEQUENTIAL);
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED);
    }
}
