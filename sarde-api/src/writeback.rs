//! Starting the write-back of data just written, so a later `fsync` finds it
//! (mostly) on disk already: disk writes overlap with the rest of the work
//! instead of piling up behind one `fsync` at the end.

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
